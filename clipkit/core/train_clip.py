"""Contrastive training of CLIP (``clipkit train clip``): from scratch on the Shapes world
(through ``clipkit.shapes.recipes``, which supplies its data and evaluation), or
fine-tuning any open_clip CLIP on a folder of image-caption pairs (``captions.jsonl``) or on a
labelled image set (an ImageFolder or a ``path,label`` list: FLYP, below).

The objective is the paper's pseudocode (Radford et al. 2021, Fig. 3)::

    I_e = normalize(image_encoder(I));  T_e = normalize(text_encoder(T))
    logits = exp(t) * I_e @ T_e.T
    loss = (CE(logits, arange(n), axis=0) + CE(logits, arange(n), axis=1)) / 2

with a learned temperature ``t`` (clamped so that exp(t) <= 100).

Labelled data is fine-tuned as FLYP does ("Finetune like you pretrain", Goyal et al. 2023): each
image is paired with a caption made from a random template and its class name, and the same
contrastive loss is minimised. Images and captions of the same class in a batch are positives of
each other (the targets are spread uniformly over them, as in UniCL, Yang et al. 2022), not
negatives: with few classes, a batch holds many. The validation split is evaluated zero-shot
(top-1 and cross-entropy of the class logits) every ``eval_every`` steps, and ``wise`` alphas
export WiSE-FT interpolations of the initial and fine-tuned weights (:mod:`clipkit.core.wise`).

Runs through ``accelerate`` (``accelerate launch`` for several processes; each contrasts its pairs
against those of every process: the loss is that of the global batch, as in one process).
Checkpoints (core.training: accelerate save_state, never unpickled with code) are resumable; a CSV
log and a PNG of the curves are written as training goes.

Robust training (``augment="robust"``) shows the CLIP images like the x0 estimates that guidance
will feed it (noise, blur, low resolution, tinted backgrounds, low contrast); ``noise_aware=True``
additionally trains on DDPM-noised images x_t (GLIDE-style), with the forward schedule of the
diffusion model ``noise_schedule`` names (its own scheduler config; default: the bundled Shapes DDPM).
"""
from __future__ import annotations

import itertools
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from clipkit.core.artifacts import build_openclip, save_openclip_dir
from clipkit.core.augment import augment_robust, ddpm_alphas_cumprod, noise_images
from clipkit.core.backends import OpenClipBackend, openclip_tokenize
from clipkit.core.dist import accelerator, gather_cat
from clipkit.core.errors import ImageLoadError, InputError
from clipkit.core.evaluate import check_class_prompts, compute_metrics, summarised_truncation
from clipkit.core.io import load_image
from clipkit.core.labelled import ALL, load_labelled
from clipkit.core.outputs import atomic_dir
from clipkit.core.preprocess import OPENAI_MEAN, OPENAI_STD, PreprocessConfig, pil_to_tensor, torch_preprocess
from clipkit.core.prompts import resolve_templates
from clipkit.core.registry import load_clip, parse_spec
from clipkit.core.training import LoopSettings, RngStates, StepOutput, export_dtype, train_loop
from clipkit.core.wise import check_alphas, wise_ft

# Imported where used: accelerate, open_clip (heavy or optional; the paths that do not need them, and
# `clipkit --help`, start without them).

if TYPE_CHECKING:
    from clipkit.core.labelled import LabelledSet, LabelledSplit

log = logging.getLogger(__name__)

#: The bundled Shapes CLIP: open_clip ``CLIP`` with a small custom config (~9.8M parameters,
#: most of them the 49,408-row token embedding of the real CLIP BPE tokenizer).
SHAPES_CLIP_CFG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 48, "patch_size": 6, "width": 192, "layers": 6, "head_width": 48},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
}


@dataclass
class TrainClipConfig:
    out_dir: str = "runs/clip"
    data: str = "shapes"                 # "shapes", a captions.jsonl ({"image": path, "caption": text}),
                                         # or labelled images: an ImageFolder or a path,label CSV/JSONL
    init: str | None = None              # CLIP spec to fine-tune (open_clip kinds); None = from scratch
    model_cfg: dict | None = None        # open_clip config when training from scratch (default: Shapes)
    steps: int = 20_000
    batch_size: int = 256                # per process
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup: int = 500                    # linear warmup steps (at most 10% of the run)
    grad_clip: float = 1.0
    augment: str = "auto"                # "robust" | "none" | "auto" (robust, but none for labelled data)
    noise_aware: bool = False            # also train on DDPM-noised x_t (GLIDE-style)
    noise_fraction: float = 0.5          # fraction of each batch noised when noise_aware
    noise_schedule: str = "shapes"       # diffusion model spec whose scheduler config gives the x_t schedule
    train_only: tuple | None = None      # parameter-name prefixes to train, the rest frozen; with
                                         # `init`, the export is an overlay (these weights + the base spec)
    render_sizes: tuple = (32, 48, 64)   # Shapes renders are drawn at one of these sizes per batch
    p_two: float = 0.35                  # fraction of two-object scenes
    eval_every: int | None = None        # None: 500 steps (Shapes), one epoch (labelled data)
    save_every: int = 1000
    log_every: int = 50
    seed: int = 0
    mixed_precision: str = "no"          # accelerate: no | fp16 | bf16
    num_workers: int = 0
    export_dtype: str = "fp16"           # dtype of the exported weights
    resume: bool = False
    time_limit_s: float | None = None    # stop early: total steps re-planned from the measured rate
    # labelled data (FLYP)
    class_names: str | None = None       # JSON or folder,name file of readable class names
    templates: str | list = "simple"     # caption templates: simple | openai | a file | one "{}" template
    class_positives: bool = True         # same-class pairs in a batch are positives (else plain CLIP loss)
    wise: tuple | None = None            # WiSE-FT alphas: export theta = (1-a) theta_init + a theta_ft
    reference: str | None = None         # name of the reference task the WiSE-FT report measures


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

@dataclass
class JsonlStats:
    used: int = 0
    broken_json: int = 0
    missing_image: int = 0
    empty_caption: int = 0


def read_captions_jsonl(path) -> tuple[list[tuple[str, str]], JsonlStats]:
    """Parse ``{"image": path, "caption": text}`` lines; paths are relative to the file's folder.

    Broken lines, missing images and empty captions are skipped and counted (a warning says how
    many); an InputError is raised only if nothing usable is left.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"captions file {path} does not exist")
    stats, pairs = JsonlStats(), []
    for ln in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not ln.strip():
            continue
        try:
            row = json.loads(ln)
            img, cap = row["image"], row["caption"]
            if not isinstance(img, str) or not isinstance(cap, str):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError):
            stats.broken_json += 1
            continue
        if not cap.strip():
            stats.empty_caption += 1
            continue
        ip = Path(img) if Path(img).is_absolute() else path.parent / img
        if not ip.is_file():
            stats.missing_image += 1
            continue
        pairs.append((str(ip), cap.strip()))
    stats.used = len(pairs)
    skipped = stats.broken_json + stats.missing_image + stats.empty_caption
    if skipped:
        log.warning("%s: skipped %d lines (%d broken JSON, %d missing images, %d empty captions)",
                    path, skipped, stats.broken_json, stats.missing_image, stats.empty_caption)
    if not pairs:
        raise InputError(f"{path}: no usable image-caption pairs")
    return pairs, stats


class ImageCaptionPairs(Dataset):
    """Image files + captions -> square [0, 1] tensors at ``size`` (resize shortest side + centre crop)."""

    def __init__(self, pairs, size: int, tokenizer):
        self.pairs, self.size, self.tokenizer = pairs, size, tokenizer
        self.cfg = PreprocessConfig(image_size=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        path, cap = self.pairs[i]
        try:
            px = pil_to_tensor(load_image(path), self.cfg)
        except ImageLoadError as e:
            log.warning("skipped %s: %s", path, e.reason)
            return None
        return {"pixels": px, "tokens": self.tokenizer([cap])[0], "caption": cap}


class LabelledImages(Dataset):
    """(path, class index) pairs -> {"pixels": [0, 1] tensor at ``size``, "label"}; an unreadable
    file is skipped (None) and reported once."""

    def __init__(self, paths, labels, size: int):
        self.paths, self.labels = list(paths), list(labels)
        self.cfg = PreprocessConfig(image_size=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        self._reported: set[int] = set()

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            px = pil_to_tensor(load_image(self.paths[i]), self.cfg)
        except ImageLoadError as e:
            if i not in self._reported:
                self._reported.add(i)
                log.warning("skipped %s: %s", self.paths[i], e.reason)
            return None
        return {"pixels": px, "label": torch.tensor(self.labels[i])}


def _collate(items):
    items = [it for it in items if it is not None]
    if not items:
        return None
    return {k: torch.stack([it[k] for it in items]) for k, v in items[0].items() if isinstance(v, torch.Tensor)}


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

def _build_model(cfg: TrainClipConfig):
    """-> (model, tokenizer, model_cfg, preprocess_cfg dict)."""
    import open_clip

    if cfg.init:
        spec = parse_spec(cfg.init)
        backend = load_clip(spec)
        if not isinstance(backend, OpenClipBackend):
            raise InputError(f"--init {cfg.init}: fine-tuning supports open_clip models "
                             "(shapes, openclip:ARCH/TAG, open_clip directories)")
        model_cfg = spec.model_cfg()       # its open_clip architecture, from its source
        pp = backend.preprocess
        preprocess = {"size": pp.image_size, "mean": list(pp.mean), "std": list(pp.std),
                      "interpolation": pp.interpolation, "resize_mode": pp.resize_mode}
        return backend.module.float().train().requires_grad_(True), backend.tokenizer, model_cfg, preprocess
    model_cfg = cfg.model_cfg or SHAPES_CLIP_CFG
    model = build_openclip(model_cfg)
    size = model_cfg["vision_cfg"]["image_size"]
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model_cfg["text_cfg"]["context_length"])
    preprocess = {"size": size, "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD),
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    return model, tokenizer, model_cfg, preprocess


def freeze_except(model: torch.nn.Module, prefixes) -> list[str]:
    """Train only the parameters whose names start with one of ``prefixes``; -> their names."""
    names = []
    for n, p in model.named_parameters():
        keep = any(n.startswith(pfx) for pfx in prefixes)
        p.requires_grad_(keep)
        if keep:
            names.append(n)
    if not names:
        raise InputError(f"train_only {list(prefixes)} matches no parameter "
                         f"(names look like {next(iter(dict(model.named_parameters())))!r})")
    return names


def _param_groups(model, weight_decay):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embedding" in n or "logit_scale" in n or "bias" in n else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
              classes: torch.Tensor | None = None, gather: bool = True):
    """Symmetric cross-entropy over the N x N cosine logits. img, txt normalised [N, D].

    ``classes`` [N]: pairs of the same class are all positives, the target of each row (and
    column) spread uniformly over them (UniCL); with distinct classes this is the CLIP loss.

    Several processes (torch.distributed initialised, e.g. ``accelerate launch``) with ``gather``:
    every process must call it (a collective). The features (with gradients) and classes of all
    processes are concatenated in process order (:func:`clipkit.core.dist.gather_cat`) and each
    process returns the loss and accuracies of that global batch, so that the gradients averaged over
    the processes, as DDP does, are those of one process on the concatenated batch. One process: the
    local batch, unchanged."""
    if gather:
        img, txt = gather_cat(img), gather_cat(txt)
        classes = gather_cat(classes, grad=False) if classes is not None else None
    logits = logit_scale.exp() * img @ txt.T
    labels = torch.arange(len(img), device=img.device)
    if classes is None:
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        hit_i, hit_t = logits.argmax(1) == labels, logits.argmax(0) == labels
    else:
        same = (classes[:, None] == classes[None, :]).float()                  # [N, N], symmetric
        target = same / same.sum(dim=1, keepdim=True)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        hit_i = classes[logits.argmax(1)] == classes                           # right class, any caption
        hit_t = classes[logits.argmax(0)] == classes
    return loss, hit_i.float().mean(), hit_t.float().mean()


# --------------------------------------------------------------------------------------------
# Labelled data (FLYP)
# --------------------------------------------------------------------------------------------

def data_kind(data: str) -> str:
    """``shapes``, ``captions`` (a captions.jsonl) or ``labelled`` (an ImageFolder, a CSV list, or
    a JSONL list whose rows have a ``label`` and no ``caption``)."""
    if data == "shapes":
        return "shapes"
    p = Path(data)
    if not p.exists():
        raise InputError(f"--data {data}: no such file or folder (give 'shapes', a captions.jsonl, an "
                         "ImageFolder or a path,label CSV/JSONL)")
    if p.is_dir() or p.suffix.lower() == ".csv":
        return "labelled"
    if p.suffix.lower() == ".jsonl" and p.is_file():
        with open(p, encoding="utf-8", errors="replace") as f:
            for ln in itertools.islice(f, 100):
                try:
                    row = json.loads(ln)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict):
                    return "labelled" if "label" in row and "caption" not in row else "captions"
    return "captions"


@dataclass
class FlypData:
    dataset: LabelledSet
    train: LabelledSplit
    val: LabelledSplit | None
    prompt_ids: torch.Tensor            # [C, T, L] token ids of every class x template caption
    templates: list[str]


def prepare_labelled(cfg: TrainClipConfig, tokenizer, context_length: int) -> FlypData:
    """Load the labelled set, pick train/val, and tokenize the class x template captions once
    (truncation summarised in one warning; classes whose captions collide are an error)."""
    ds = load_labelled(cfg.data, cfg.class_names)
    if ds.has_splits:
        if "train" not in ds.splits:
            raise InputError(f"{ds.root} has no train split (it has: {', '.join(ds.splits)}): fine-tuning "
                             "needs DIR/train/<class>/<image>")
        train, val = ds.splits["train"], ds.splits.get("val")
        if val is None or not len(val):
            val = None
            log.warning("%s has no val split: zero-shot validation accuracy is not tracked", ds.root)
    else:
        train, val = ds.splits[ALL], None
        log.warning("%s has no train/val/test split: training on every image, without validation", ds.root)
    if len(train) < 2:
        raise InputError(f"{ds.root}: need at least 2 training images, found {len(train)}")
    tmpl = resolve_templates(cfg.templates)
    texts = [t.format(n) for n in ds.names for t in tmpl]
    with summarised_truncation(context_length):
        ids = openclip_tokenize(tokenizer, texts, context_length).ids
    check_class_prompts(ids, ds.names, context_length)
    return FlypData(ds, train, val, ids.view(len(ds.names), len(tmpl), -1), tmpl)


@torch.no_grad()
def labelled_eval(model, flyp: FlypData, loader, preprocess: PreprocessConfig, device) -> dict:
    """Zero-shot on the validation split with the model being trained: top-1, balanced accuracy
    and the cross-entropy of logit_scale * cosine over the class embeddings."""
    was_training = model.training
    model.eval()
    C, T, L = flyp.prompt_ids.shape
    ids = flyp.prompt_ids.view(C * T, L).to(device)
    txt = torch.cat([F.normalize(model.encode_text(ids[i:i + 512]).float(), dim=-1) for i in range(0, len(ids), 512)])
    weights = F.normalize(txt.view(C, T, -1).mean(dim=1), dim=-1)                  # [C, D]
    scores, labels = [], []
    for batch in loader:
        if batch is None:
            continue
        img = model.encode_image(torch_preprocess(batch["pixels"].to(device), preprocess))
        scores.append((F.normalize(img.float(), dim=-1) @ weights.T).cpu())
        labels.append(batch["label"].cpu())
    model.train(was_training)
    s, y = torch.cat(scores), torch.cat(labels)
    m = compute_metrics(s, y, flyp.dataset.classes, flyp.dataset.names)
    loss = F.cross_entropy(float(model.logit_scale.exp()) * s, y)
    return {"val_top1": m.top1, "val_balanced_accuracy": m.balanced_accuracy, "val_loss": float(loss)}


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    out_dir: str
    model_dir: str
    steps: int
    wall_s: float
    final_eval: dict = field(default_factory=dict)
    processes: int = 1
    wise: dict = field(default_factory=dict)        # the WiSE-FT report (labelled data with ``wise``)


@dataclass
class ClipData:
    """What :func:`train_clip` trains on, from a recipe (:func:`clipkit.shapes.recipes.shapes_clip_data`
    for ``--data shapes``) or from the data files that core reads itself (captions.jsonl, labelled)."""
    dataset: Dataset                          # items: dicts of tensors ("pixels" [3,H,W] in [0,1], "tokens" [L])
    collate: Callable = _collate
    shuffle: bool = True
    to_pixels: Callable | None = None         # batch -> [B,3,H,W] in [0,1] on the device (default: batch["pixels"])
    rng: dict = field(default_factory=dict)   # generators to_pixels draws from (checkpointed)
    evaluate: Callable | None = None          # (model, preprocess, tokenizer, device) -> {metric: value}
    eval_columns: tuple = ()
    eval_every: int = 500


#: A recipe's data: (config, tokenizer, number of processes) -> :class:`ClipData`.
ClipDataFactory = Callable[[TrainClipConfig, object, int], ClipData]


def train_clip(cfg: TrainClipConfig, progress: bool = True, reference=None,
               data: ClipDataFactory | None = None) -> TrainResult:
    """Train (or fine-tune) a CLIP; see the module docstring.

    ``data``: the training data of a recipe (``cfg.data == "shapes"`` needs one:
    :func:`clipkit.shapes.recipes.shapes_clip_data`, which ``clipkit train clip`` wires); captions.jsonl
    and labelled data are read here. ``reference``: with ``cfg.wise``, a callable ``scorer ->
    {metric: value}`` measuring each WiSE-FT model on a reference task (e.g.
    :func:`clipkit.shapes.probes.reference_accuracy`); the caller supplies it, so that core knows no
    particular task."""
    from accelerate.utils import set_seed


    if cfg.augment not in ("robust", "none", "auto"):
        raise InputError(f"augment must be 'robust', 'none' or 'auto', got {cfg.augment!r}")
    if cfg.steps < 1 or cfg.batch_size < 2:
        raise InputError("steps must be >= 1 and batch_size >= 2 (contrastive loss needs negatives)")
    dtype = export_dtype(cfg.export_dtype)
    kind = "recipe" if data is not None else data_kind(cfg.data)
    if kind == "shapes":
        raise InputError("--data shapes: the Shapes data comes from its recipe "
                         "(clipkit.shapes.recipes.train_clip, or `clipkit train clip`)")
    if cfg.wise:
        cfg.wise = tuple(check_alphas(cfg.wise))
        if kind != "labelled" or not cfg.init:
            raise InputError("--wise interpolates the --init model and the fine-tuned one, measured on "
                             "labelled data: it needs --init SPEC and --data an ImageFolder or path,label list")
    abar = ddpm_alphas_cumprod(cfg.noise_schedule) if cfg.noise_aware else None   # the model's x_t schedule
    acc = accelerator(mixed_precision=cfg.mixed_precision)
    set_seed(cfg.seed)
    out = Path(cfg.out_dir)
    model, tokenizer, model_cfg, pp_dict = _build_model(cfg)
    trained = freeze_except(model, cfg.train_only) if cfg.train_only else None
    pp = PreprocessConfig.from_dict({**pp_dict, "image_size": pp_dict["size"]})
    flyp = None
    if kind == "recipe":
        cd = data(cfg, tokenizer, acc.num_processes)
    elif kind == "labelled":
        flyp = prepare_labelled(cfg, tokenizer, int(getattr(tokenizer, "context_length", None) or 77))
        cd = ClipData(LabelledImages(flyp.train.paths, flyp.train.labels, pp.image_size))
    else:
        pairs, _ = read_captions_jsonl(cfg.data)
        cd = ClipData(ImageCaptionPairs(pairs, pp.image_size, tokenizer))
        if len(cd.dataset) < 2:
            raise InputError("need at least 2 image-caption pairs for contrastive training")
    ds = cd.dataset
    augment = cfg.augment if cfg.augment != "auto" else ("none" if flyp else "robust")
    loader = DataLoader(ds, batch_size=min(cfg.batch_size, len(ds)), shuffle=cd.shuffle,
                        num_workers=cfg.num_workers, collate_fn=cd.collate, drop_last=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    gen = torch.Generator(device=acc.device).manual_seed(cfg.seed * 1000 + acc.process_index)
    rng = RngStates({f"gen{acc.process_index}": gen, **cd.rng}, cfg.seed)   # checkpointed, restored on resume
    model, opt, loader = acc.prepare(model, opt, loader)
    val_loader = None
    if flyp is not None and flyp.val is not None and acc.is_main_process:
        val_loader = DataLoader(LabelledImages(flyp.val.paths, flyp.val.labels, pp.image_size),
                                batch_size=max(64, cfg.batch_size), shuffle=False, collate_fn=_collate,
                                num_workers=cfg.num_workers)
    prompt_ids = flyp.prompt_ids.to(acc.device) if flyp else None
    unwrapped = acc.unwrap_model(model)

    def step_fn(batch) -> StepOutput:
        x = cd.to_pixels(batch) if cd.to_pixels is not None else batch["pixels"]
        classes = None
        if flyp is not None:       # FLYP: a caption per image from a random template and its class name
            classes = batch["label"]
            t_idx = torch.randint(0, prompt_ids.shape[1], (len(classes),), device=gen.device, generator=gen)
            tokens = prompt_ids[classes.to(prompt_ids.device), t_idx.to(prompt_ids.device)]
        else:
            tokens = batch["tokens"]
        if augment == "robust":
            x = augment_robust(x, gen)
        if abar is not None:
            x = noise_images(x, gen, cfg.noise_fraction, abar)
        pixels = torch_preprocess(x, pp)
        with acc.autocast():
            # through the prepared (DDP) wrapper, so gradients are all-reduced across processes
            res = model(pixels, tokens)
            if isinstance(res, dict):
                img, txt, scale = res["image_features"], res["text_features"], res["logit_scale"]
            else:
                img, txt, scale = res[:3]
            loss, a_i, a_t = clip_loss(F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1),
                                       scale.float().log(), classes if cfg.class_positives else None)
        return StepOutput(loss, len(pixels), {"acc_i2t": a_i, "acc_t2i": a_t})

    def after_step(step):
        with torch.no_grad():
            unwrapped.logit_scale.clamp_(0, math.log(100))
        return {"logit_scale": float(unwrapped.logit_scale.detach().exp())}

    eval_fn, eval_cols = None, None
    if cd.evaluate is not None:
        eval_cols = ["step", *cd.eval_columns]

        def eval_fn(step):
            return cd.evaluate(unwrapped, pp, tokenizer, acc.device)
    elif val_loader is not None:
        eval_cols = ["step", "val_top1", "val_balanced_accuracy", "val_loss"]

        def eval_fn(step):
            return labelled_eval(unwrapped, flyp, val_loader, pp, acc.device)
    settings = LoopSettings(
        out_dir=out, steps=cfg.steps, warmup=min(cfg.warmup, cfg.steps // 10),   # a short fine-tune still decays
        log_columns=["step", "loss", "acc_i2t", "acc_t2i", "logit_scale", "lr", "samples_per_s"],
        grad_clip=cfg.grad_clip, log_every=cfg.log_every, save_every=cfg.save_every,
        eval_every=cfg.eval_every or (max(1, len(loader)) if flyp else cd.eval_every), eval_columns=eval_cols,
        eval_at_start=flyp is not None, resume=cfg.resume, time_limit_s=cfg.time_limit_s, progress=progress,
        desc="train clip", train_plot=(["loss", "acc_i2t", "logit_scale", "lr"], "CLIP training"),
        eval_plot_title="zero-shot accuracy (val)")
    run = train_loop(acc, model, opt, loader, step_fn, settings, eval_fn=eval_fn, after_step=after_step,
                     rng=rng, config=cfg)
    model_dir = out / "model"
    overlay = trained is not None and cfg.init
    if acc.is_main_process:
        with atomic_dir(model_dir, overwrite=True) as tmp:       # never half a model, never through a link
            save_openclip_dir(unwrapped, model_cfg, pp_dict, tmp, dtype=dtype,
                              extra={"training": asdict(cfg), "eval": run.final_eval},
                              keys=trained if overlay else None, base=cfg.init if overlay else None)
    wise = {}
    if cfg.wise and acc.is_main_process:
        report = wise_ft(cfg.init, unwrapped, model_cfg, pp_dict, out, cfg.wise, flyp.dataset,
                         templates=flyp.templates, reference=reference, reference_name=cfg.reference,
                         export_dtype=dtype, keys=trained if overlay else None,
                         extra={"training": asdict(cfg)}, device=acc.device)
        wise = report.to_dict()
    return TrainResult(str(out), str(model_dir), run.steps, run.wall_s, run.final_eval, acc.num_processes, wise)
