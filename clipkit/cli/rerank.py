"""``clipkit rerank``: rank a folder of images against a query (or caption candidates for one image)."""
from __future__ import annotations

import click

from clipkit.cli.common import check_inputs_exist, check_report_outputs, FiniteFloat, FloatList, batch_size_option, clip_option, emit_json, fmt_table, json_option, make_scorer, progress


@click.command()
@click.argument("candidates", nargs=-1, required=True, type=click.Path(readable=False))
@click.option("--query", "-q", "queries", multiple=True, help="Text query (repeat for several).")
@click.option("--query-image", "query_images", multiple=True, type=click.Path(readable=False),
              help="Image query (repeat for several).")
@click.option("--texts", "texts_file", type=click.Path(readable=False),
              help="Rank the caption candidates in this file (one per line) for the single image given.")
@click.option("--combine", is_flag=True, help="Several queries: one ranking by their weighted mean score "
                                              "(default: one ranking per query).")
@click.option("--weights", type=FloatList(min=0), default=None,
              help="Comma-separated weights for --combine, e.g. 2,1.")
@click.option("--top", "top_k", type=click.IntRange(min=1), default=None, help="Keep the K best (default: all).")
@click.option("--csv", "csv_path", type=click.Path(readable=False), help="Also write the ranking to this CSV file.")
@click.option("--sheet", type=click.Path(readable=False),
              help="Contact sheet PNG of the top results (at most 100 thumbnails).")
@click.option("--overwrite", is_flag=True, help="Replace existing --csv/--sheet files (default: refuse, exit 2).")
@click.option("--cache", "cache_dir", type=click.Path(readable=False), default=None,
              help="Embedding cache directory (default: the user cache dir).")
@click.option("--no-cache", is_flag=True, help="Do not read or write the embedding cache.")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="Processes that decode and resize images.")
@click.option("--timeout", "timeout_s", type=FiniteFloat(min=0.1), default=30.0, show_default=True,
              help="Seconds allowed to decode one file before it is skipped.")
@clip_option
@batch_size_option
@json_option
@click.pass_obj
def rerank(settings, candidates, queries, query_images, texts_file, combine, weights, top_k, csv_path, sheet,
           overwrite, cache_dir, no_cache, workers, timeout_s, clip_spec, batch_size, as_json):
    """Rank CANDIDATES (images, folders walked recursively) by CLIP cosine with a query.

    Results are sorted by score, ties broken by path. Unreadable files are reported under
    "skipped" and the rest are ranked (exit 0 with a warning count); embeddings are cached, so a
    second query over the same folder encodes only the query.

    \b
    Examples:
      clipkit rerank photos/ --query "a red circle" --top 10 --sheet top.png
      clipkit rerank photos/ -q "a red shape" -q "a circle" --combine --weights 2,1 --json
      clipkit rerank photos/ --query-image example.png --csv ranking.csv
      clipkit rerank image.png --texts candidates.txt
    """

    from clipkit.rerank.rank import rank_texts
    from clipkit.rerank.rank import rerank as do_rerank
    w = None
    if weights:
        w = list(weights)
        combine = True
    many = not texts_file and not combine and len(queries or query_images) > 1
    for opt, path in (("--csv", csv_path), ("--sheet", sheet)):
        if path and many:
            raise click.UsageError(f"{opt} writes one ranking: use --combine with several queries")
    # every output is checked before the model loads and the folder is ranked
    inputs = list(candidates) + list(query_images) + ([texts_file] if texts_file else [])
    check_report_outputs(csv_path, sheet, overwrite, inputs)
    check_inputs_exist(candidates, "candidate")               # before the model loads
    check_inputs_exist(query_images, "--query-image", all_needed=True)
    texts = None
    if texts_file:
        if len(candidates) != 1 or queries or query_images:
            raise click.UsageError("--texts ranks caption candidates for exactly one IMAGE (no --query)")
        from clipkit.core.io import read_text_file
        texts = [ln.strip() for ln in read_text_file(texts_file, "--texts").splitlines() if ln.strip()]
    elif bool(queries) == bool(query_images):
        raise click.UsageError("give --query TEXT or --query-image IMG (one kind)")
    scorer = make_scorer(settings, clip_spec, batch_size)
    quiet = settings.quiet or as_json
    if texts is not None:
        results = [rank_texts(candidates[0], texts, scorer, top_k)]
    else:
        cache = None
        if not no_cache:
            from clipkit.core.cache import default_cache_dir, open_cache
            cache = open_cache(cache_dir or default_cache_dir(), scorer)
        try:
            out = do_rerank(list(candidates), list(queries) or None, scorer, top_k,
                            query_images=list(query_images) or None, weights=w,
                            per_query=not combine and len(queries or query_images) > 1, cache=cache,
                            batch_size=batch_size, num_workers=workers, timeout_s=timeout_s,
                            progress=None if quiet else lambda it, total: progress(it, "embedding", total=total))
        finally:
            if cache is not None:
                cache.close()
        results = out if isinstance(out, list) else [out]
    if csv_path:
        results[0].write_csv(csv_path, overwrite=overwrite)
        click.echo(f"wrote {csv_path}", err=True)          # on stderr, as score --plot: stdout stays the table/JSON
    if sheet:
        results[0].contact_sheet(sheet, overwrite=overwrite)
        click.echo(f"wrote {sheet}", err=True)
    skipped = results[0].skipped
    if as_json:
        doc = [r.to_dict() for r in results]
        emit_json(doc[0] if len(doc) == 1 else {"rankings": doc})
    else:
        for r in results:
            click.echo(f"# {r.score} with {' + '.join(repr(q) for q in r.query)} ({r.model}; "
                       f"{r.candidates} candidates, {r.cached} from cache)")
            click.echo(fmt_table(["rank", "score", "candidate"],
                                 [[it.rank, f"{it.score:.4f}", it.path or it.text] for it in r.results]))
    if skipped:
        import logging
        logging.getLogger("clipkit.cli").warning("%d file(s) skipped (unreadable); see 'skipped' in --json",
                                                 len(skipped))
