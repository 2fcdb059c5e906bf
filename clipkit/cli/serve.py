"""``clipkit serve``: the studio, a local web page to generate, caption, rerank (and search an index)."""
from __future__ import annotations

import click

from clipkit.cli.common import ModelSpecType


@click.command()
@click.argument("index_path", metavar="[INDEX]", type=click.Path(readable=False), required=False)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="studio-out", show_default=True,
              help="Folder of everything the studio writes: a folder per generation (PNG + JSON sidecar), "
                   "uploads/ for init images and image prompts. Its pictures are the gallery.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but localhost exposes the studio (and the indexed images) "
                   "to the network.")
@click.option("--port", type=click.IntRange(min=0, max=65535), default=8000, show_default=True,
              help="Port (0: any free port).")
@click.option("--clip", "clip_specs", type=ModelSpecType("clip"), multiple=True, metavar="SPEC",
              help="CLIP that guides generation (repeat for an ensemble) and ranks the rerank tab; with an INDEX, "
                   "the first one also encodes its queries (it must be the index's). Default: the profile's.")
@click.option("--diffusion", "diffusion_spec", type=ModelSpecType("diffusion"), default=None, metavar="SPEC",
              help="Diffusion model for the generate tab (default: the profile's).")
@click.option("--captioner", default=None, metavar="SPEC",
              help="Captioner for the caption tab and 'caption this' (default: the profile's; 'none' to turn it off).")
@click.option("--max-upload", type=click.IntRange(min=1, max=256), default=10, show_default=True,
              help="Largest uploaded image, in MiB.")
@click.option("--decode-budget", type=click.IntRange(min=1, max=100_000), default=100, show_default=True,
              metavar="MPIX", help="Megapixels decoded at once across all requests (others wait): bounds the "
                                   "memory of concurrent uploads.")
@click.pass_obj
def serve(settings, index_path, out_dir, host, port, clip_specs, diffusion_spec, captioner, max_upload,
          decode_budget):
    """Open the studio: a local page with tabs to generate images (live previews, cancel), browse what
    was generated (same seed again, vary seed, caption, download), caption an image, and rerank images
    by a text query; with an INDEX, search it too.

    Generation runs the same function as `clipkit generate` (the same seed gives the same bytes); jobs
    run one at a time on a queue. Everything is written under --out.

    \b
    Examples:
      clipkit serve                        # then open http://127.0.0.1:8000/
      clipkit serve photos.idx --out runs/
      clipkit --profile sd --device cuda serve --port 8080
    """
    import logging
    import signal

    from clipkit.cli.common import profile_of
    from clipkit.search.web import LOCAL_HOSTS, make_server
    from clipkit.studio import StudioConfig, create_studio_app
    log = logging.getLogger("clipkit.cli")
    profile = profile_of(settings)
    if captioner is None:
        captioner = profile.captioner
    elif captioner.lower() == "none":
        captioner = None
    else:
        from clipkit.core.registry import parse_spec
        parse_spec(captioner, "captioner")
    reader = scorer = None
    if index_path is not None:
        from clipkit.cli.index import index_scorer
        from clipkit.search.store import IndexReader
        reader = IndexReader(index_path)
        first = clip_specs[0] if clip_specs else None
        scorer = None if reader.model == "vectors" and not first else index_scorer(settings, reader, first)
    if host not in LOCAL_HOSTS:
        log.warning("serving on %s: anyone who can reach this address can use the studio%s", host,
                    " and see the indexed images" if reader is not None else "")
    cfg = StudioConfig(max_upload=max_upload << 20, captioner=captioner, decode_budget=decode_budget * 1_000_000,
                       out=out_dir, profile=settings.profile, clip=tuple(clip_specs), diffusion=diffusion_spec,
                       device=settings.device, precision=settings.precision)
    app = create_studio_app(cfg, reader, scorer)
    studio = app.extensions["clipkit_studio"]
    try:
        server = make_server(app, host, port)
    except BaseException:
        studio.queue.close()
        raise
    shown = f"[{host}]" if ":" in host else host
    what = f"{index_path} ({len(reader)} images) and the studio" if reader is not None else "the studio"
    click.echo(f"serving {what} on http://{shown}:{server.server_port}/ (outputs in {out_dir}; Ctrl-C to stop)",
               err=True)

    def stop(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)          # `kill` / a service manager: the same clean stop as Ctrl-C
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        studio.queue.close(timeout=10.0)         # the running job stops within a step
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
