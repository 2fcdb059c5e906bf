"""``clipkit embed``: batch-embed a folder into one safetensors file (works under ``accelerate launch``)."""
from __future__ import annotations

import click

from clipkit.cli.common import FiniteFloat, batch_size_option, clip_option, make_scorer


@click.command()
@click.argument("folder", nargs=-1, required=True, type=click.Path(readable=False))
@click.option("--out", "out_path", required=True, type=click.Path(readable=False),
              help="Output .safetensors (tensor 'embeddings' [N, D] fp32; paths, model and skipped files in its metadata).")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="Image-decoding worker processes (0: decode in the main process).")
@click.option("--timeout", "timeout_s", type=FiniteFloat(min=0.1), default=30.0, show_default=True,
              help="Seconds one image may take to read and decode before it is skipped (reported, not fatal).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
@click.option("--cache", "cache_dir", type=click.Path(readable=False), default=None,
              help="Embedding cache directory (default: the user cache dir); an interrupted run resumes from it.")
@click.option("--no-cache", is_flag=True, help="Do not read or write the embedding cache (no resume).")
@clip_option
@batch_size_option
@click.pass_obj
def embed(settings, folder, out_path, workers, timeout_s, overwrite, cache_dir, no_cache, clip_spec, batch_size):
    """Embed every image under FOLDER (recursively) and write one file, in path order.

    Every batch is cached as it is encoded: run the same command again after an interruption and
    it resumes where it stopped, ending with the same file as an uninterrupted run.

    Under `accelerate launch --num_processes N -m clipkit.cli.main embed ...` each process embeds
    its shard of the files and the main process merges the shards into OUT (same order, same
    numbers as one process).

    \b
    Example:
      clipkit embed photos/ --out photos.safetensors
    """
    from clipkit.core.outputs import check_output_file
    from clipkit.core.cache import default_cache_dir
    from clipkit.rerank.embed import embed_folder_distributed
    check_output_file(out_path, overwrite=overwrite, inputs=folder, what="--out")   # before the model loads
    res = embed_folder_distributed(list(folder), out_path, make_scorer(settings, clip_spec, batch_size),
                                   batch_size=batch_size, num_workers=workers, timeout_s=timeout_s,
                                   overwrite=overwrite,
                                   cache_dir=None if no_cache else (cache_dir or default_cache_dir()))
    if res is not None:
        click.echo(f"wrote {res['count']} embeddings to {out_path} ({len(res['skipped'])} skipped)", err=True)
