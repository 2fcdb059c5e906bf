"""``clipkit classify``: zero-shot classification with prompt ensembling."""
from __future__ import annotations

import click

from clipkit.cli.common import (batch_size_option, plural, clip_option, emit_json, fmt_table, json_option,
                                load_images_tolerant, make_scorer)


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(readable=False))
@click.option("--labels", "-l", required=True, help='Comma-separated class names, e.g. "cat,dog".')
@click.option("--templates", default="simple", show_default=True,
              help="simple (7 templates) | openai (80) | a file (one per line) | one template with {}.")
@click.option("--top", type=click.IntRange(min=1), default=3, show_default=True,
              help="Labels shown per image.")
@clip_option
@batch_size_option
@json_option
@click.pass_obj
def classify(settings, images, labels, templates, top, clip_spec, batch_size, as_json):
    """Zero-shot classify IMAGES (files or folders) into --labels.

    Each label is embedded with every template (prompt ensembling: normalise, average,
    renormalise); probabilities are the softmax of logit_scale * cosine over the labels.

    \b
    Example:
      clipkit classify shapes/*.png --labels "red,green,blue" --templates "a {} shape"
    """
    from clipkit.core.prompts import classify as do_classify
    from clipkit.core.prompts import parse_labels, resolve_templates
    labels = parse_labels(labels)                  # bad labels or templates fail before the model loads
    tmpl = resolve_templates(templates)
    loaded = load_images_tolerant(images, quiet=settings.quiet or as_json)   # inputs first: a missing file fails before the model loads
    scorer = make_scorer(settings, clip_spec, batch_size)
    res = do_classify(loaded.images, labels, tmpl, scorer=scorer)
    res.sources = loaded.paths
    if as_json:
        emit_json({**res.to_dict(), "skipped": loaded.skipped})
        return
    probs = res.probs.cpu()
    k = min(top, len(labels))
    rows = []
    for i, p in enumerate(res.sources):
        vals, idx = probs[i].topk(k)
        rows.append([p] + [f"{labels[j]} {v:.3f}" for v, j in zip(vals.tolist(), idx.tolist())])
    click.echo(f"# zero-shot probabilities ({res.model}, {plural(len(res.templates), 'template')})")
    click.echo(fmt_table(["image"] + [f"#{j + 1}" for j in range(k)], rows))
