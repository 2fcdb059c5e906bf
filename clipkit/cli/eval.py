"""``clipkit eval``: zero-shot accuracy (or a linear probe) of a CLIP on a labelled image set."""
from __future__ import annotations

import click

from clipkit.cli.common import batch_size_option, clip_option, emit_json, fmt_table, json_option, plural


@click.command("eval")
@click.argument("data", type=click.Path(readable=False))
@click.option("--split", default=None, metavar="NAME",
              help="Split to evaluate: train, val, test or all (default: test, else val, else the whole set).")
@click.option("--class-names", "class_names", default=None, type=click.Path(readable=False), metavar="FILE",
              help='Readable class names: JSON {"folder": "name"} or "folder,name" lines.')
@click.option("--templates", default="simple", show_default=True,
              help="simple (7 templates) | openai (80) | a file (one per line) | one template with {}.")
@click.option("--linear-probe", is_flag=True,
              help="Logistic regression on frozen image embeddings (fitted on train, C swept on val) "
                   "instead of zero-shot.")
@click.option("--shots", type=click.IntRange(min=1), default=None, metavar="K",
              help="Linear probe on K training images per class (seeded by --seed).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --shots sampling and the probe.")
@click.option("--plot", "plot_path", default=None, type=click.Path(readable=False), metavar="PNG",
              help="Write the confusion matrix as a PNG.")
@click.option("--csv", "csv_path", default=None, type=click.Path(readable=False), metavar="FILE",
              help="Write per-class accuracy as CSV (and an '(all)' row).")
@click.option("--overwrite", is_flag=True, help="Replace existing --plot/--csv files.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="DataLoader workers decoding images.")
@clip_option
@batch_size_option
@json_option
@click.pass_obj
def eval_cmd(settings, data, split, class_names, templates, linear_probe, shots, seed, plot_path, csv_path,
             overwrite, workers, clip_spec, batch_size, as_json):
    """Evaluate a CLIP on DATA: an ImageFolder (DATA/<class>/<image>, optionally inside
    DATA/train|val|test/) or a CSV/JSONL list of path,label[,split].

    Zero-shot by default: every class name in every template, ensembled (as `classify`); reports
    top-1, top-5, balanced accuracy, per-class accuracy and the confusion matrix. Unreadable
    images are skipped and counted. Empty class folders stay candidate labels (a warning).

    \b
    Examples:
      clipkit eval data/digits --class-names data/digits/class_names.json --plot cm.png
      clipkit eval data/digits --linear-probe --json
      clipkit eval data/digits --linear-probe --shots 4 --seed 1
      clipkit eval photos.csv --clip openclip:ViT-B-32/laion2b_s34b_b79k --templates openai
    """
    from clipkit.core.errors import InputError
    from clipkit.core.evaluate import evaluate
    from clipkit.core.outputs import check_output_file
    from clipkit.core.prompts import resolve_templates
    if shots is not None and not linear_probe:
        raise click.UsageError("--shots K is for the linear probe: add --linear-probe")
    outs = [(p, what) for p, what in ((plot_path, "--plot"), (csv_path, "--csv")) if p]
    if plot_path and csv_path:
        import os
        if os.path.abspath(plot_path) == os.path.abspath(csv_path):
            raise InputError("--plot and --csv name the same file")
    for p, what in outs:                                 # validated before any model loads
        check_output_file(p, overwrite=overwrite, inputs=[data], what=what)
    if not linear_probe:
        resolve_templates(templates)
    from clipkit.core.labelled import load_labelled
    dataset = load_labelled(data, class_names)          # a bad folder or list fails before the model loads
    dataset.eval_split(split)
    from clipkit.cli.common import make_scorer, progress
    scorer = make_scorer(settings, clip_spec, batch_size, num_workers=workers)
    quiet = settings.quiet or as_json

    def bar(it, total=None):
        return progress(it, "encoding", disable=quiet, total=total)

    res = evaluate(dataset, scorer, templates=templates, split=split,
                   linear_probe=linear_probe, shots=shots, seed=seed, batch_size=batch_size,
                   num_workers=workers, progress=bar)
    if csv_path:
        res.write_csv(csv_path, overwrite=overwrite)
        click.echo(f"wrote {csv_path}", err=True)          # on stderr, as score --plot: stdout stays the table/JSON
    if plot_path:
        res.plot_confusion(plot_path, overwrite=overwrite)
        click.echo(f"wrote {plot_path}", err=True)
    if as_json:
        emit_json(res.to_dict())
        return
    m = res.metrics
    what = (f"zero-shot, {plural(res.templates, 'template')}" if res.method == "zero-shot"
            else f"linear probe, C={res.probe.C:.3g} (swept on {res.probe.val_source}), fitted on "
                 f"{res.probe.train_images} images ({res.probe.refit_on})"
                 + (f", {res.probe.shots}-shot" if res.probe.shots else ""))
    click.echo(f"# {res.model} on {res.data} [{res.split}]: {what}")
    rows = [[r["class"], r["name"], r["images"],
             "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"] for r in m.per_class]
    click.echo(fmt_table(["class", "name", "images", "accuracy"], rows))
    click.echo(f"top-1 {m.top1:.4f}  top-{m.top5_k} {m.top5:.4f}  balanced {m.balanced_accuracy:.4f}  "
               f"({m.images} images, {len(res.skipped)} skipped, {res.images_per_s:.0f} images/s)")
