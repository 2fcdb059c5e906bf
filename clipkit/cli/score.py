"""``clipkit score``: cosine similarity of images with texts."""
from __future__ import annotations

import click

from clipkit.cli.common import (batch_size_option, clip_option, emit_json, fmt_table, json_option,
                                load_images_tolerant, make_scorer)


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(readable=False))
@click.option("--text", "-t", "texts", multiple=True, required=True,
              help="A text to score against (repeat for several).")
@click.option("--plot", type=click.Path(readable=False), default=None,
              help="Also draw the image x text cosine matrix (thumbnails as row labels) to this PNG.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --plot file (default: refuse, exit 2).")
@clip_option
@batch_size_option
@json_option
@click.pass_obj
def score(settings, images, texts, plot, overwrite, clip_spec, batch_size, as_json):
    """Score IMAGES (files or folders) against one or more --text.

    Reports the raw cosine similarity; --json adds CLIP-S (2.5 * max(cos, 0), Hessel et al. 2021)
    and the softmax over the texts (logit_scale * cos).

    \b
    Example:
      clipkit score photo.jpg --text "a dog" --text "a cat"
    """
    from clipkit.core.backends import check_texts
    texts = check_texts(list(texts))
    if plot:      # checked before any work: an existing file, an input, an unwritable folder
        from clipkit.core.outputs import check_output_file
        check_output_file(plot, overwrite=overwrite, inputs=images, what="--plot")
    loaded = load_images_tolerant(images, quiet=settings.quiet or as_json)   # inputs first: a missing file fails before the model loads
    scorer = make_scorer(settings, clip_spec, batch_size)
    scores = scorer.score(loaded.images, texts)
    sim, probs, clip_s = scores.similarity.cpu(), scores.probs.cpu(), scores.clip_s.cpu()
    if plot:
        from clipkit.core.plots import similarity_heatmap
        similarity_heatmap(loaded.images, texts, sim, plot, labels=loaded.paths, overwrite=overwrite)
    if as_json:
        emit_json({
            "model": scorer.spec, "score": "cosine", "texts": texts, "logit_scale": scorer.logit_scale,
            "results": [{"path": p, "scores": sim[i].tolist(), "clip_s": clip_s[i].tolist(),
                         "probs": probs[i].tolist()} for i, p in enumerate(loaded.paths)],
            "skipped": loaded.skipped})
        return
    click.echo(f"# cosine similarity ({scorer.spec})")
    header = ["image"] + [t if len(t) <= 30 else t[:27] + "..." for t in texts]
    rows = [[p] + [f"{v:.4f}" for v in sim[i].tolist()] for i, p in enumerate(loaded.paths)]
    click.echo(fmt_table(header, rows))
    if plot:
        click.echo(f"wrote {plot}", err=True)
