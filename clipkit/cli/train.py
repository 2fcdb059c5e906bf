"""``clipkit train clip|diffusion|captioner``: the recipes of the bundled models, usable on your own data."""
from __future__ import annotations

import click

from clipkit.cli.common import FiniteFloat, FloatList, emit_json, json_option, show_progress


def _common(f):
    opts = [
        click.option("--out", "out_dir", required=True, type=click.Path(readable=False),
                     help="Output directory (checkpoints, logs, curves, exported model)."),
        click.option("--steps", type=click.IntRange(min=1), default=None, help="Optimizer steps."),
        click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Batch size per process."),
        click.option("--lr", type=FiniteFloat(min=0, min_open=True), default=None, help="Peak learning rate."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of the weights' initialisation, the data order and the augmentations."),
        click.option("--resume", is_flag=True,
                     help="Continue the run in OUT from OUT/checkpoint (with the options it was started with)."),
        click.option("--overwrite", is_flag=True,
                     help="Replace the run already in OUT (its checkpoint, logs and model) instead of refusing."),
        click.option("--mixed-precision", type=click.Choice(["no", "fp16", "bf16"]), default="no",
                     show_default=True, help="accelerate mixed precision (GPU)."),
        click.option("--num-workers", type=click.IntRange(min=0), default=0, show_default=True,
                     help="DataLoader workers."),
        click.option("--eval-every", type=click.IntRange(min=1), default=None,
                     help="Steps between evaluations (train clip on labelled data: one epoch by default)."),
        click.option("--save-every", type=click.IntRange(min=1), default=None,
                     help="Steps between checkpoints (OUT/checkpoint, what --resume continues from); the last "
                          "step is always saved."),
        click.option("--log-every", type=click.IntRange(min=1), default=None, help="Steps between log rows."),
        click.option("--time-limit", "time_limit_s", type=FiniteFloat(min=1), default=None,
                     help="Seconds: re-plan --steps to fit (the LR schedule still completes)."),
        json_option,
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _config(cls, overwrite: bool = False, **kw):
    """The trainer's config from the options given; the run folder OUT is checked first, before any
    work (:func:`clipkit.core.training.check_run_dir`: a folder; a run already there needs --resume
    or --overwrite; a resumed run keeps its settings)."""
    from clipkit.core.dist import partial_state
    from clipkit.core.training import check_run_dir
    cfg = cls(**{k: v for k, v in kw.items() if v is not None})
    check_run_dir(cfg.out_dir, resume=cfg.resume, overwrite=overwrite, config=cfg,
                  main=partial_state().is_main_process)
    return cfg


def _progress(settings, as_json: bool) -> bool:
    return show_progress(settings.quiet or as_json)


@click.group()
def train():
    """Train the bundled models' recipes (CLIP, diffusion, captioner) on Shapes or your own data."""


@train.command("clip")
@click.option("--data", default="shapes", show_default=True,
              help="'shapes' (rendered on the fly), a captions.jsonl of {\"image\": path, \"caption\": text}, "
                   "or labelled images: an ImageFolder (DIR/train|val|test/<class>/...) or a path,label CSV "
                   "(FLYP fine-tuning with captions from --templates x class names).")
@click.option("--init", default=None, metavar="SPEC",
              help="Fine-tune this open_clip CLIP (shapes, openclip:ARCH/TAG, a directory); default: from scratch.")
@click.option("--model-config", "model_config", default=None, type=click.Path(readable=False), metavar="JSON",
              help="From scratch: an open_clip model config (JSON with embed_dim, vision_cfg, text_cfg) "
                   "instead of the Shapes CLIP's.")
@click.option("--augment", type=click.Choice(["auto", "robust", "none"]), default="auto", show_default=True,
              help="robust: noise/blur/low-res/tint augmentations (x0-estimate-like inputs); auto: robust, "
                   "none for labelled images.")
@click.option("--noise-aware", is_flag=True, help="Also train on DDPM-noised images x_t (GLIDE-style).")
@click.option("--noise-fraction", "noise_fraction", type=FiniteFloat(min=0, max=1, min_open=True), default=None,
              help="With --noise-aware: the fraction of each batch noised (default 0.5).")
@click.option("--noise-schedule", "noise_schedule", default=None, metavar="SPEC",
              help="With --noise-aware: the diffusion model (shapes, hf:ORG/NAME, a diffusers pipeline directory) "
                   "whose scheduler config gives the x_t noise schedule [default: shapes].")
@click.option("--render-size", "render_sizes", type=click.IntRange(min=8, max=1024), multiple=True,
              help="--data shapes: render at this size (repeatable; each batch picks one; default 32, 48 and 64).")
@click.option("--train-only", "train_only", multiple=True, metavar="PREFIX",
              help="Train only parameters whose names start with PREFIX (repeatable; the rest frozen). With "
                   "--init, the saved model is an overlay: just those weights + the base spec.")
@click.option("--warmup", type=click.IntRange(min=0), default=None,
              help="Linear LR warmup steps (default 500, at most 10% of --steps).")
@click.option("--class-names", "class_names", default=None, type=click.Path(readable=False), metavar="FILE",
              help='Labelled data: readable class names, JSON {"folder": "name"} or "folder,name" lines.')
@click.option("--templates", default=None,
              help="Labelled data: caption templates, simple (7) | openai (80) | a file | one template with {} "
                   "[default: simple].")
@click.option("--wise", type=FloatList(min=0), default=None, metavar="A,B,...",
              help="Labelled data + --init: export WiSE-FT models (1-a)*init + a*fine-tuned as OUT/wise-<a>/ "
                   "and report each one's accuracy (OUT/wise.json, wise.csv, wise.png).")
@click.option("--reference", default="auto", show_default=True, metavar="TASK",
              help="What --wise measures besides the new classes: 'shapes' (Shapes colour/shape zero-shot), "
                   "a labelled folder or list (zero-shot top-1), 'none'; auto: shapes for a Shapes CLIP.")
@_common
@click.pass_obj
def clip(settings, data, init, model_config, augment, noise_aware, noise_fraction, noise_schedule, render_sizes,
         train_only, warmup, class_names, templates, wise, reference, as_json, **kw):
    """Contrastive CLIP training (symmetric cross-entropy, learned temperature).

    \b
    Examples:
      clipkit train clip --out runs/clip --steps 20000            # the bundled Shapes CLIP
      clipkit train clip --data captions.jsonl --init shapes --out runs/ft --steps 500
      clipkit train clip --init shapes --noise-aware --noise-fraction 0.75 --render-size 32 \\
          --train-only visual. --out runs/noised --steps 4000 --batch-size 64 --lr 2e-4 --warmup 100 \\
          --time-limit 3600                      # the bundled guide's recipe (an image-tower overlay)
      accelerate launch --multi_gpu --num_processes 2 -m clipkit.cli.main train clip --out runs/clip
      clipkit train clip --data data/digits --class-names data/digits/class_names.json --init shapes \\
          --out runs/digits --wise 0.25,0.5,0.75          # FLYP fine-tuning + WiSE-FT on an ImageFolder
    """
    from clipkit.core.train_clip import TrainClipConfig
    from clipkit.shapes.recipes import train_clip       # --data shapes: the Shapes recipe's data
    model_cfg = None
    if model_config:
        import json

        from clipkit.core.errors import InputError
        if init:
            raise click.UsageError("--model-config builds a CLIP from scratch: it cannot go with --init")
        try:
            from clipkit.core.io import read_text_file
            model_cfg = json.loads(read_text_file(model_config, "--model-config"))
            assert isinstance(model_cfg, dict) and {"embed_dim", "vision_cfg", "text_cfg"} <= set(model_cfg)
        except (ValueError, AssertionError) as e:
            raise InputError(f"--model-config {model_config}: not an open_clip model config "
                             f"(JSON with embed_dim, vision_cfg, text_cfg){': ' + str(e) if str(e) else ''}") from None
    from clipkit.core.train_clip import data_kind
    labelled = data_kind(data) == "labelled"
    if not labelled and (class_names or templates or wise):
        raise click.UsageError("--class-names, --templates and --wise are for labelled --data "
                               "(an ImageFolder or a path,label list)")
    if noise_fraction is not None and not noise_aware:
        raise click.UsageError("--noise-fraction is the share of x_t images: it needs --noise-aware")
    if noise_schedule is not None and not noise_aware:
        raise click.UsageError("--noise-schedule is the schedule of the x_t images: it needs --noise-aware")
    if render_sizes and data != "shapes":
        raise click.UsageError("--render-size sets the size of Shapes renders: it needs --data shapes")
    if wise and not init:
        raise click.UsageError("--wise interpolates between --init SPEC and the fine-tuned model: give --init")
    ref_name, ref_fn = reference_task(reference, init) if wise else (None, None)
    cfg = _config(TrainClipConfig, data=data, init=init, model_cfg=model_cfg, augment=augment,
                  noise_aware=noise_aware, noise_fraction=noise_fraction, noise_schedule=noise_schedule,
                  render_sizes=tuple(render_sizes) or None, train_only=tuple(train_only) or None, warmup=warmup,
                  class_names=class_names, templates=templates, wise=tuple(wise) if wise else None,
                  reference=ref_name, **kw)
    res = train_clip(cfg, progress=_progress(settings, as_json), reference=ref_fn)
    _report(res, as_json)


def reference_task(task: str, init: str):
    """The WiSE-FT reference task -> (name, scorer -> {metric: value}) or (None, None)."""
    if task == "none":
        return None, None
    if task == "auto":
        from clipkit.core.registry import BUNDLED_NAMES, clip_training_info
        from_shapes = init in BUNDLED_NAMES or clip_training_info(init).get("data") == "shapes"
        if not from_shapes:
            return None, None
        task = "shapes"
    if task == "shapes":
        from clipkit.shapes.recipes import shapes_reference
        return "shapes zero-shot", shapes_reference
    from pathlib import Path
    if not Path(task).exists():
        raise click.BadParameter(f"{task!r} is not 'shapes', 'none', 'auto' or a labelled folder/list",
                                 param_hint="--reference")
    from clipkit.core.labelled import load_labelled
    ref_set = load_labelled(task)

    def labelled_reference(scorer):
        from clipkit.core.evaluate import evaluate
        return {"top1": evaluate(ref_set, scorer).metrics.top1}
    return f"zero-shot on {task}", labelled_reference


@train.command("diffusion")
@click.option("--init", default=None, type=click.Path(exists=True, file_okay=False),
              help="Continue from a diffusers pipeline or UNet directory.")
@click.option("--device-data", is_flag=True, help="Draw training scenes on the device (fast on GPUs).")
@_common
@click.pass_obj
def diffusion(settings, init, device_data, as_json, **kw):
    """DDPM training of the unconditional 32x32 Shapes UNet (EMA weights exported as a diffusers pipeline).

    \b
    Example:
      clipkit train diffusion --out runs/diffusion --steps 30000 --mixed-precision bf16
    """
    from clipkit.guidance.train_diffusion import TrainDiffusionConfig
    from clipkit.shapes.recipes import train_diffusion  # the Shapes recipe's data
    cfg = _config(TrainDiffusionConfig, init=init, device_data=device_data, **kw)
    res = train_diffusion(cfg, progress=_progress(settings, as_json))
    _report(res, as_json)


@train.command("captioner")
@click.option("--data", default="shapes", show_default=True,
              help="'shapes', a captions.jsonl ({\"image\", \"caption\"} lines) or a COCO captions JSON.")
@click.option("--images", default=None, type=click.Path(exists=True, file_okay=False),
              help="Image folder for the COCO JSON's file names (default: the JSON's folder).")
@click.option("--clip", "clip", default="shapes", show_default=True, metavar="SPEC",
              help="CLIP whose image embeddings feed the mapper (computed once per image, cached).")
@click.option("--mapper", type=click.Choice(["mlp", "transformer"]), default="mlp", show_default=True,
              help="mlp: GPT-2 fine-tuned; transformer: GPT-2 frozen.")
@click.option("--prefix-length", type=click.IntRange(min=1), default=None,
              help="GPT-2 prefix tokens the mapper makes from one CLIP embedding (default 10).")
@click.option("--decoder", default="tiny", show_default=True,
              help="'tiny' (small GPT-2 + BPE trained on the captions) or a GPT-2 spec/dir (gpt2, ./my-gpt2).")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Passes over the training captions (validated after each; default 10).")
@_common
@click.pass_obj
def captioner(settings, data, images, clip, mapper, prefix_length, decoder, epochs, as_json, **kw):
    """ClipCap training: a mapper from CLIP image embeddings to a GPT-2 prefix.

    \b
    Examples:
      clipkit train captioner --out runs/captioner --epochs 12          # the bundled Shapes captioner
      clipkit train captioner --data captions.jsonl --decoder gpt2 --clip openclip:ViT-B-32/laion2b_s34b_b79k --out runs/cc
      accelerate launch --multi_gpu --num_processes 2 -m clipkit.cli.main train captioner --out runs/cc
    """
    from clipkit.captioning.train import TrainCaptionerConfig
    from clipkit.shapes.recipes import train_captioner  # --data shapes: the Shapes recipe's data
    for opt in ("steps", "eval_every"):
        if kw.pop(opt) is not None:
            raise click.UsageError(f"--{opt.replace('_', '-')} does not apply to the captioner: it trains "
                                   "--epochs and validates after each")
    kw.pop("num_workers")
    cfg = _config(TrainCaptionerConfig, data=data, images=images, clip=clip, mapper=mapper,
                  prefix_length=prefix_length, decoder=decoder, epochs=epochs, **kw)
    res = train_captioner(cfg, progress=_progress(settings, as_json))
    _report(res, as_json)


def _report(res, as_json):
    from dataclasses import asdict

    from clipkit.core.dist import partial_state
    if not partial_state().is_main_process:
        return
    if as_json:
        emit_json(asdict(res))
    else:
        click.echo(f"trained {res.steps} steps in {res.wall_s:.0f}s; model: {res.model_dir}")
        if res.final_eval:
            click.echo(f"final eval: {res.final_eval}")
