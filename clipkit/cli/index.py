"""``clipkit index build|add|dedup|info``: an appendable ANN index over CLIP image embeddings."""
from __future__ import annotations

import re

import click

from clipkit.cli.common import FiniteFloat, batch_size_option, clip_option, emit_json, fmt_table, json_option, make_scorer, plural, progress


class ByteSize(click.ParamType):
    """A size in bytes: ``4GB``, ``512MiB``, ``1.5G``, ``200000000``."""
    name = "size"
    UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024 ** 2, "mb": 1024 ** 2,
             "mib": 1024 ** 2, "g": 1024 ** 3, "gb": 1024 ** 3, "gib": 1024 ** 3, "t": 1024 ** 4,
             "tb": 1024 ** 4, "tib": 1024 ** 4}

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in self.UNITS:
            self.fail(f"expected a size such as 4GB, 512MB or 1000000, got {value!r}", param, ctx)
        n = int(float(m.group(1)) * self.UNITS[m.group(2).lower()])
        if n <= 0:
            self.fail(f"{value!r} is not a positive size", param, ctx)
        return n


def embedding_options(f):
    for opt in reversed([
        click.option("--cache", "cache_dir", type=click.Path(readable=False), default=None,
                     help="Embedding cache directory (default: the user cache dir); an interrupted run resumes from it."),
        click.option("--no-cache", is_flag=True, help="Do not read or write the embedding cache (no resume)."),
        click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
                     help="Processes that decode and resize images."),
        click.option("--timeout", "timeout_s", type=FiniteFloat(min=0.1), default=30.0, show_default=True,
                     help="Seconds allowed to decode one image before it is skipped."),
    ]):
        f = opt(f)
    return f


def open_cache_for(scorer, cache_dir, no_cache):
    if no_cache:
        return None
    from clipkit.core.cache import default_cache_dir, open_cache
    return open_cache(cache_dir or default_cache_dir(), scorer)      # keyed by the weights, not the spec


def index_scorer(settings, reader, clip_spec, batch_size: int = 64):
    """The CLIP an index was built with (``--clip`` must name the same one)."""
    from clipkit.core.errors import InputError
    from clipkit.core.scorer import load_scorer
    if reader.model == "vectors" and not clip_spec:
        raise InputError(f"index {reader.path} holds bare vectors with no CLIP recorded: "
                         "only item queries work (clipkit serve / the Python API)")
    spec = clip_spec or reader.model
    reader.check_model(spec, reader.manifest.preprocess)      # another model: refused before it loads
    scorer = load_scorer(spec, device=settings.device, precision=settings.precision, batch_size=batch_size)
    reader.check_scorer(scorer)                               # and its weights, once loaded
    return scorer


def _progress(quiet):
    return None if quiet else (lambda it, total: progress(it, "embedding", total=total))


def _report(res, as_json: bool, verb: str) -> None:
    import logging
    if as_json:
        emit_json(res.to_dict())
    else:
        extra = f", {res.removed} dropped, {res.reembedded} re-embedded" if verb == "added" else ""
        rec = f", tuned recall@10 {res.recall:.3f}" if res.recall is not None else ""
        click.echo(f"{verb} {res.added} items ({res.cached} from cache{extra}): {res.items} in {res.index} "
                   f"[{res.structure}, nprobe {res.nprobe}{rec}{', retrained' if res.retrained and verb == 'added' else ''}] "
                   f"in {res.seconds:.1f}s")
    if res.skipped:
        logging.getLogger("clipkit.cli").warning("%d input(s) skipped (unreadable); see 'skipped' in --json",
                                                 len(res.skipped))


@click.group()
def index():
    """Build and maintain a search index (FAISS over fp16 CLIP embeddings).

    \b
    Examples:
      clipkit index build photos/ more.txt shards/data-{000..009}.tar --out photos.idx
      clipkit index add photos.idx new_photos/
      clipkit index dedup photos.idx --threshold 0.95 --csv dups.csv
      clipkit search photos.idx --query "a red circle" --top 10
    """


@index.command()
@click.argument("sources", nargs=-1, required=True, type=click.Path(readable=False))
@click.option("--out", "out", required=True, type=click.Path(readable=False), help="The index folder to create.")
@click.option("--max-memory", type=ByteSize(), default=None,
              help="RAM budget of the ANN structure (e.g. 4GB); picks the codec (default: no limit, SQfp16).")
@click.option("--flat-max", type=click.IntRange(min=0), default=20_000, show_default=True,
              help="Up to this many images: an exact scan instead of inverted lists.")
@click.option("--target-recall", type=FiniteFloat(min=0, max=1, min_open=True), default=0.95, show_default=True,
              help="recall@10 vs an exact scan that the tuned nprobe must reach.")
@click.option("--overwrite", is_flag=True, help="Replace an existing index at --out.")
@embedding_options
@clip_option
@batch_size_option
@json_option
@click.pass_obj
def build(settings, sources, out, max_memory, flat_max, target_recall, overwrite, cache_dir, no_cache, workers,
          timeout_s, clip_spec, batch_size, as_json):
    """Index the images in SOURCES: folders (recursive), file lists (.txt: one path per line,
    optionally TAB caption) and webdataset .tar shards (brace patterns expand).

    Embeddings are cached per batch: run the same command again after an interruption and it
    resumes. The index is written beside --out and renamed into place when complete.
    """
    from clipkit.search.ann import AnnConfig
    from clipkit.search.build import build_index, check_index_output
    from clipkit.search.sources import expand_sources
    cfg = AnnConfig(max_memory=max_memory, flat_max=flat_max, target_recall=target_recall).validate()
    check_index_output(out, sources, overwrite)               # before the model loads
    srcs = expand_sources(sources)                            # bad sources fail before the model loads too
    scorer = make_scorer(settings, clip_spec, batch_size)
    cache = open_cache_for(scorer, cache_dir, no_cache)
    try:
        res = build_index(list(sources), out, scorer, config=cfg, cache=cache, batch_size=batch_size,
                          num_workers=workers, timeout_s=timeout_s, overwrite=overwrite,
                          progress=_progress(settings.quiet or as_json), expanded=srcs)
    finally:
        if cache is not None:
            cache.close()
    _report(res, as_json, "indexed")


@index.command()
@click.argument("index_path", metavar="INDEX", type=click.Path(readable=False))
@click.argument("sources", nargs=-1, required=True, type=click.Path(readable=False))
@click.option("--max-memory", type=ByteSize(), default=None, help="A new RAM budget for the ANN structure.")
@click.option("--no-refresh", is_flag=True, help="Do not check the files already indexed (gone -> dropped, "
                                                "changed -> re-embedded).")
@embedding_options
@clip_option
@batch_size_option
@json_option
@click.pass_obj
def add(settings, index_path, sources, max_memory, no_refresh, cache_dir, no_cache, workers, timeout_s, clip_spec,
        batch_size, as_json):
    """Append the images in SOURCES to INDEX without rebuilding it.

    Files already indexed are checked too: a file that is gone is dropped, a changed one is
    embedded again. The coarse quantiser is retrained only when the data outgrew it.
    """
    from clipkit.search.add import add_to_index
    from clipkit.search.sources import expand_sources
    from clipkit.search.store import IndexReader
    reader = IndexReader(index_path)
    expand_sources(sources)
    scorer = index_scorer(settings, reader, clip_spec, batch_size)
    reader.close()
    cache = open_cache_for(scorer, cache_dir, no_cache)
    try:
        res = add_to_index(index_path, list(sources), scorer, cache=cache, batch_size=batch_size,
                           num_workers=workers, timeout_s=timeout_s, max_memory=max_memory,
                           progress=_progress(settings.quiet or as_json), refresh=not no_refresh)
    finally:
        if cache is not None:
            cache.close()
    _report(res, as_json, "added")


@index.command()
@click.argument("index_path", metavar="INDEX", type=click.Path(readable=False))
@click.option("--threshold", type=FiniteFloat(min=0, max=1, min_open=True), default=0.95, show_default=True,
              help="Cosine at or above which two images are near-duplicates.")
@click.option("--csv", "csv_path", type=click.Path(readable=False), help="Also write the groups to this CSV file.")
@click.option("--sheets", "sheets_dir", type=click.Path(readable=False),
              help="Write one contact sheet per group into this folder (group-0001.png ...; at most 100).")
@click.option("--nprobe", type=click.IntRange(min=1), default=None, help="Lists probed (default: the tuned value).")
@click.option("--overwrite", is_flag=True, help="Replace existing --csv / contact sheet files.")
@json_option
@click.pass_obj
def dedup(settings, index_path, threshold, csv_path, sheets_dir, nprobe, overwrite, as_json):
    """Near-duplicate groups in INDEX: images with cosine >= --threshold, joined transitively."""
    from clipkit.core.outputs import check_output_file
    from clipkit.search.dedup import dedup as find
    from clipkit.search.store import IndexReader
    from clipkit.search.dedup import SHEETS_LIMIT, sheet_name
    reader = IndexReader(index_path)
    inputs = [index_path] + reader.manifest.sources           # + the indexed images an output would replace
    if csv_path:
        check_output_file(csv_path, overwrite=overwrite, inputs=inputs + reader.indexed_files(csv_path), what="--csv")
    if sheets_dir:
        from pathlib import Path

        from clipkit.core.outputs import check_not_input, check_output_dir
        check_output_dir(sheets_dir, what="--sheets folder")
        sheets = [Path(sheets_dir) / sheet_name(n) for n in range(1, SHEETS_LIMIT + 1)]
        hit = reader.indexed_files(*sheets)
        for p in sheets:
            check_not_input(p, inputs + hit, what="contact sheet")
    res = find(reader, threshold, nprobe=nprobe,
               progress=None if settings.quiet or as_json else lambda it, total: progress(it, "dedup", total=total))
    if csv_path:
        res.write_csv(csv_path, overwrite=overwrite)
    if sheets_dir and res.groups:
        res.contact_sheets(sheets_dir, reader.item_image, overwrite=overwrite, inputs=inputs + hit)
    if as_json:
        emit_json(res.to_dict())
        return
    click.echo(f"# {plural(len(res.groups), 'group')} of near-duplicates (cosine >= {threshold:g}) among {res.scanned} images")
    rows = [[g.group, it.id, f"{it.score:.4f}", it.path] for g in res.groups for it in g.items]
    if rows:
        click.echo(fmt_table(["group", "id", "score", "path"], rows))


@index.command()
@click.argument("index_path", metavar="INDEX", type=click.Path(readable=False))
@click.option("--verify", is_flag=True, help="Also read every file against the sha256 the manifest records "
                                             "(and every row: a finite unit vector).")
@json_option
def info(index_path, verify, as_json):
    """What INDEX holds: model, items, structure, memory, disk."""
    from clipkit.search.store import IndexReader
    reader = IndexReader(index_path)
    d = reader.info()
    if verify:
        d["verified"] = reader.verify()
    if as_json:
        emit_json(d)
        return
    for k, v in d.items():
        click.echo(f"{k:24} {v}")
