"""``clipkit serve``: a local web page to search an index."""
from __future__ import annotations

import click

from clipkit.cli.common import clip_option


@click.command()
@click.argument("index_path", metavar="INDEX", type=click.Path(readable=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but localhost exposes the indexed images to the network.")
@click.option("--port", type=click.IntRange(min=0, max=65535), default=8000, show_default=True,
              help="Port (0: any free port).")
@click.option("--captioner", default=None, metavar="SPEC",
              help="Captioner for 'caption this' (default: the profile's; 'none' to turn it off).")
@click.option("--max-upload", type=click.IntRange(min=1, max=256), default=10, show_default=True,
              help="Largest uploaded query image, in MiB.")
@clip_option
@click.pass_obj
def serve(settings, index_path, host, port, captioner, max_upload, clip_spec):
    """Serve a search page for INDEX: a search box, image upload as a query, click a result to
    search by it, paged results with thumbnails and scores, "caption this", JSON export.

    Only the images in the index are served (by id; a file changed since indexing is refused).

    \b
    Example:
      clipkit serve photos.idx            # then open http://127.0.0.1:8000/
    """
    import logging

    from clipkit.captioning.captioner import load_captioner
    from clipkit.cli.index import index_scorer
    from clipkit.cli.common import profile_of
    from clipkit.search.server import LOCAL_HOSTS, ServeConfig, create_app, make_server
    from clipkit.search.store import IndexReader
    log = logging.getLogger("clipkit.cli")
    reader = IndexReader(index_path)
    scorer = None if reader.model == "vectors" and not clip_spec else index_scorer(settings, reader, clip_spec)
    if captioner is None:
        captioner = profile_of(settings).captioner
    elif captioner.lower() == "none":
        captioner = None
    if host not in LOCAL_HOSTS:
        log.warning("serving on %s: anyone who can reach this address can search and see the indexed images", host)
    app = create_app(reader, scorer, ServeConfig(max_upload=max_upload << 20, captioner=captioner), load_captioner)
    server = make_server(app, host, port)
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"serving {index_path} ({len(reader)} images) on http://{shown}:{server.server_port}/ "
               "(Ctrl-C to stop)", err=True)
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)          # `kill` / a service manager: the same clean stop as Ctrl-C
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        close_bounded(server)


def close_bounded(server, timeout_s: float = 10.0) -> None:
    """``server.server_close()`` (it joins the request threads), but a request still running
    ``timeout_s`` after Ctrl-C does not keep the process alive: warn and exit at once (``os._exit``
    skips interpreter teardown, so no thread is killed inside native code either)."""
    import logging
    import os
    import sys
    import threading
    closer = threading.Thread(target=server.server_close, daemon=True)
    closer.start()
    closer.join(timeout_s)
    if closer.is_alive():
        logging.getLogger("clipkit.cli").warning("a request was still running %.0f s after Ctrl-C; stopping "
                                                 "without it", timeout_s)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
