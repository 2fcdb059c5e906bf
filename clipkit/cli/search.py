"""``clipkit search``: query an index built by ``clipkit index build``."""
from __future__ import annotations

import click

from clipkit.cli.common import check_report_outputs, clip_option, emit_json, fmt_table, json_option


@click.command()
@click.argument("index_path", metavar="INDEX", type=click.Path(readable=False))
@click.option("--query", "-q", "query", default=None, help="Text query.")
@click.option("--query-image", "query_image", type=click.Path(readable=False), default=None, help="Image query.")
@click.option("--top", "top_k", type=click.IntRange(min=1, max=1000), default=10, show_default=True,
              help="How many results.")
@click.option("--nprobe", type=click.IntRange(min=1), default=None,
              help="Inverted lists probed (default: the value tuned at build time).")
@click.option("--csv", "csv_path", type=click.Path(readable=False), help="Also write the results to this CSV file.")
@click.option("--sheet", type=click.Path(readable=False), help="Contact sheet PNG of the results (at most 100).")
@click.option("--overwrite", is_flag=True, help="Replace existing --csv/--sheet files (default: refuse, exit 2).")
@clip_option
@json_option
@click.pass_obj
def search(settings, index_path, query, query_image, top_k, nprobe, csv_path, sheet, overwrite, clip_spec, as_json):
    """Search INDEX by a text (--query) or an image (--query-image) with the CLIP it was built with.

    Results are sorted by cosine (of the query with the stored fp16 embedding), ties by path, as
    `clipkit rerank` orders them.

    \b
    Examples:
      clipkit search photos.idx --query "a red circle" --top 10
      clipkit search photos.idx --query-image example.png --json
      clipkit search photos.idx -q "a dog" --csv top.csv --sheet top.png
    """

    from clipkit.cli.index import index_scorer
    from clipkit.search.query import search as do_search
    from clipkit.search.store import IndexReader
    if (query is None) == (query_image is None):
        raise click.UsageError("give --query TEXT or --query-image IMG (exactly one)")
    reader = IndexReader(index_path)
    # the inputs an output must never be: the index, the query image, the indexed images (and shards)
    inputs = [index_path] + ([query_image] if query_image else []) + reader.manifest.sources \
        + reader.indexed_files(csv_path, sheet)
    check_report_outputs(csv_path, sheet, overwrite, inputs)
    scorer = index_scorer(settings, reader, clip_spec)
    res = do_search(reader, scorer, text=query, image=query_image, top_k=top_k, nprobe=nprobe)
    if csv_path:
        res.write_csv(csv_path, overwrite=overwrite)
    if sheet:
        res.contact_sheet(sheet, overwrite=overwrite, loader=lambda r: reader.item_image(r.id))
    if as_json:
        emit_json(res.to_dict())
        return
    click.echo(f"# {res.score} with {res.query[0]!r} ({res.model}; {res.candidates} indexed, "
               f"{res.structure}, nprobe {res.nprobe}, {res.took_ms:.1f} ms)")
    click.echo(fmt_table(["rank", "score", "path"], [[h.rank, f"{h.score:.4f}", h.path] for h in res.results]))
