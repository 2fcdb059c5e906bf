"""``clipkit train captioner``: train a ClipCap mapper (+ GPT-2) on image-caption pairs.

Data: ``shapes`` (rendered on the fly from seeds, by :mod:`clipkit.shapes.recipes`), a
``captions.jsonl`` (``{"image", "caption"}`` lines) or a COCO captions JSON (``images`` + ``annotations``).
CLIP image embeddings are computed once per *image* (the official code encodes each image once per
caption, 5x the work on COCO) and cached in ``OUT/clip_embeddings.safetensors``; a rerun with the same
data and CLIP reuses them.

The decoder is GPT-2 from a spec (``gpt2``, a hub repo or a local dir) or, with ``decoder="tiny"``,
a small GPT-2 trained from scratch with a byte-level BPE tokenizer trained on the captions (the
bundled Shapes captioner). Loss on caption tokens only (masks, not a pad id); AdamW + warmup/cosine;
core's training loop (:func:`clipkit.core.training.train_loop`) under accelerate (``accelerate launch``
for several processes); resumable checkpoints; CSV log + PNG plot; validation loss and caption metrics
every epoch.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from clipkit.captioning.checkpoint import save_captioner
from clipkit.captioning.decode import DecodeConfig, decode
from clipkit.captioning.metrics import evaluate_captions
from clipkit.captioning.model import CaptionerConfig, ClipCapModel
from clipkit.captioning.tokenizer import encode_captions, load_tokenizer, train_bpe_tokenizer
from clipkit.core.cache import model_key
from clipkit.core.dist import accelerator
from clipkit.core.errors import ImageLoadError, InputError, ModelLoadError
from clipkit.core.io import load_image
from clipkit.core.outputs import atomic_dir
from clipkit.core.registry import resolve
from clipkit.core.scorer import load_scorer
from clipkit.core.train_clip import read_captions_jsonl
from clipkit.core.training import LoopSettings, StepOutput, export_dtype, train_loop

# Imported where used: accelerate, transformers (heavy or optional; the paths that do not need them, and
# `clipkit --help`, start without them).

log = logging.getLogger(__name__)


@dataclass
class TrainCaptionerConfig:
    out_dir: str = "runs/captioner"
    data: str = "shapes"             # "shapes" | captions.jsonl | COCO captions .json
    images: str | None = None        # image root for COCO file names (default: the JSON's folder)
    clip: str = "shapes"             # CLIP spec whose image embeddings feed the mapper
    mapper: str = "mlp"              # mlp | transformer
    prefix_length: int = 10
    clip_length: int = 10
    mapper_layers: int = 8
    mapper_heads: int = 8
    normalize_prefix: bool = True
    train_decoder: bool | None = None     # None: mlp -> fine-tune GPT-2, transformer -> frozen
    decoder: str = "tiny"            # "tiny" (from scratch, BPE trained on the captions) | GPT-2 spec/dir
    decoder_width: int = 128         # tiny decoder
    decoder_layers: int = 4
    decoder_heads: int = 4
    vocab_size: int = 400            # tiny decoder's BPE vocabulary
    epochs: int = 10
    batch_size: int = 64             # per process
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 200
    grad_clip: float = 1.0
    max_tokens: int = 40
    shapes_train: int = 20_000       # Shapes scenes (each with several describing captions)
    shapes_val: int = 500
    val_fraction: float = 0.05       # user data: images held out for validation
    val_decode: int = 200            # validation images captioned (greedy) for metrics each epoch
    seed: int = 0
    mixed_precision: str = "no"
    save_every: int = 500
    log_every: int = 25
    resume: bool = False
    time_limit_s: float | None = None
    export_dtype: str = "fp16"


@dataclass
class CaptionData:
    embeds: torch.Tensor              # [N_images, D] raw CLIP image features
    captions: list[list[str]]         # captions per image
    keys: list[str]                   # image ids (paths or Shapes seeds)
    skipped: int = 0


@dataclass
class TrainCaptionerResult:
    out_dir: str
    model_dir: str
    steps: int
    wall_s: float
    final_eval: dict
    processes: int = 1
    samples_per_s: float = 0.0


# ---- data -------------------------------------------------------------------------------------

def read_caption_pairs(path, images: str | None = None) -> tuple[dict[str, list[str]], int]:
    """captions.jsonl or COCO captions JSON -> {image path: [captions]}, bad lines skipped and counted."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"captions file {path} does not exist")
    if path.suffix == ".jsonl":
        pairs, stats = read_captions_jsonl(path)
        out: dict[str, list[str]] = {}
        for img, cap in pairs:
            out.setdefault(img, []).append(cap)
        return out, stats.broken_json + stats.missing_image + stats.empty_caption
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        files = {im["id"]: im["file_name"] for im in doc["images"]}
        anns = doc["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"{path}: not a COCO captions file ({type(e).__name__}: {e})") from e
    root = Path(images) if images else path.parent
    out, skipped = {}, 0
    for a in anns:
        try:
            f, cap = files[a["image_id"]], a["caption"]
        except (KeyError, TypeError):
            skipped += 1
            continue
        p = root / f
        if not isinstance(cap, str) or not cap.strip() or not p.is_file():
            skipped += 1
            continue
        out.setdefault(str(p), []).append(cap.strip())
    if skipped:
        log.warning("%s: skipped %d annotations (bad entries, empty captions or missing images)", path, skipped)
    if not out:
        raise InputError(f"{path}: no usable image-caption pairs")
    return out, skipped


def _cache_key(clip: str, keys: list[str]) -> str:
    return hashlib.sha1(json.dumps([clip, keys]).encode()).hexdigest()[:16]


def embed_images(scorer, keys: list[str], load, cache: Path | None, batch_size: int = 256) -> torch.Tensor:
    """Raw CLIP features of every image, once; cached in ``cache`` (safetensors) keyed by the model's
    weights (:func:`clipkit.core.cache.model_key`) and the image list. ``load(keys) -> images`` renders or reads one batch."""
    tag = _cache_key(model_key(scorer) if hasattr(scorer, "weights_digest") else scorer.spec, keys)
    if cache is not None and cache.is_file():
        blob = load_file(str(cache))
        if (cache.with_suffix(".json").is_file()
                and json.loads(cache.with_suffix(".json").read_text()).get("key") == tag):
            log.info("reusing cached CLIP embeddings %s", cache)
            return blob["embeds"]
    out = []
    for i in range(0, len(keys), batch_size):
        out.append(scorer.encode_images(load(keys[i:i + batch_size]), normalize=False).float().cpu())
    embeds = torch.cat(out)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file({"embeds": embeds.contiguous()}, str(cache))
        cache.with_suffix(".json").write_text(json.dumps({"key": tag, "clip": scorer.spec, "n": len(keys)}))
    return embeds


def file_data(scorer, pairs: dict[str, list[str]], cache: Path | None) -> CaptionData:
    good, bad = [], 0
    for p in pairs:
        try:
            load_image(p)
            good.append(p)
        except ImageLoadError as e:
            log.warning("skipping %s", e)
            bad += 1
    if not good:
        raise InputError("no readable images in the captions file")
    embeds = embed_images(scorer, good, lambda ks: [load_image(k) for k in ks], cache)
    return CaptionData(embeds, [pairs[p] for p in good], good, bad)


class _Pairs(Dataset):
    """One (embedding, caption) item per image per epoch; the caption drawn by (seed, epoch, index)."""

    def __init__(self, data: CaptionData, seed: int):
        self.data, self.seed, self.epoch = data, seed, 0

    def __len__(self):
        return len(self.data.keys)

    def __getitem__(self, i):
        caps = self.data.captions[i]
        return self.data.embeds[i], random.Random(hash((self.seed, self.epoch, i))).choice(caps)


# ---- model ------------------------------------------------------------------------------------

def build_model(cfg: TrainCaptionerConfig, clip_dim: int, corpus: list[str]):
    """(model, tokenizer) for the config: a tiny GPT-2 + BPE trained on ``corpus``, or a pretrained GPT-2."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if cfg.decoder == "tiny":
        tok = train_bpe_tokenizer(corpus, cfg.vocab_size)
        gcfg = GPT2Config(vocab_size=len(tok), n_embd=cfg.decoder_width, n_layer=cfg.decoder_layers,
                          n_head=cfg.decoder_heads, n_positions=cfg.prefix_length + cfg.max_tokens + 8,
                          bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
        gpt = GPT2LMHeadModel(gcfg)
    else:
        r = resolve(cfg.decoder, "decoder")     # a GPT-2 directory or hub repo; hub checks done
        try:
            tok = load_tokenizer(r.location, local_only=r.local_only)
            gpt = GPT2LMHeadModel.from_pretrained(r.location, local_files_only=r.local_only)
        except Exception as e:
            raise ModelLoadError(cfg.decoder, str(e).splitlines()[0][:200],
                                 "use a local GPT-2 directory, or 'tiny'") from e
    ccfg = CaptionerConfig(mapper=cfg.mapper, clip_dim=clip_dim, prefix_length=cfg.prefix_length,
                           clip_length=cfg.clip_length, mapper_layers=cfg.mapper_layers,
                           mapper_heads=cfg.mapper_heads, normalize_prefix=cfg.normalize_prefix,
                           train_decoder=cfg.train_decoder, clip_spec=cfg.clip,
                           decoder=gpt.config.to_dict())
    return ClipCapModel(ccfg, gpt), tok


# ---- evaluation -------------------------------------------------------------------------------

@torch.inference_mode()
def evaluate(model: ClipCapModel, tokenizer, data: CaptionData, n_decode: int, max_tokens: int,
             device, metrics=None) -> dict:
    """Validation loss over all of ``data`` and greedy-caption metrics on its first ``n_decode`` images;
    ``metrics``: ``{key: caption} -> {name: value}``, more metrics of a recipe (Shapes: ``exact_attr``)."""
    model.eval()
    losses, weights = [], []
    for i in range(0, len(data.keys), 256):
        e = data.embeds[i:i + 256].to(device)
        caps = [c[0] for c in data.captions[i:i + 256]]
        ids, mask = encode_captions(tokenizer, caps, max_tokens)
        res = model(e, ids.to(device), mask.to(device))
        losses.append(res.loss.item() * res.n_tokens.item())
        weights.append(res.n_tokens.item())
    out = {"val_loss": sum(losses) / max(1, sum(weights))}
    n = min(n_decode, len(data.keys))
    if n:
        prefix = model.prefix(data.embeds[:n].to(device))
        seqs = decode(model.gpt, prefix, tokenizer.eos_token_id,
                      DecodeConfig(strategy="greedy", max_length=max_tokens))
        cands = {k: tokenizer.decode(s[0].tokens, skip_special_tokens=True).strip()
                 for k, s in zip(data.keys[:n], seqs)}
        refs = {k: c for k, c in zip(data.keys[:n], data.captions[:n])}
        try:
            m = evaluate_captions(cands, refs)
            out.update(bleu4=m.bleu4, cider_d=m.cider_d)
        except ImportError:
            pass
        if metrics is not None:
            out.update(metrics(cands))
    model.train()
    return out


# ---- training ---------------------------------------------------------------------------------

@dataclass
class CaptionSplits:
    """What :func:`train_captioner` trains and validates on, from a recipe
    (:func:`clipkit.shapes.recipes.shapes_caption_data` for ``--data shapes``)."""
    train: CaptionData
    val: CaptionData
    metrics: Callable | None = None     # {image key: greedy caption} -> more validation metrics


#: A recipe's data: (config, CLIP scorer, embedding cache folder) -> :class:`CaptionSplits`.
CaptionDataFactory = Callable[[TrainCaptionerConfig, object, Path], CaptionSplits]


def train_captioner(cfg: TrainCaptionerConfig, progress: bool = True,
                    data: CaptionDataFactory | None = None) -> TrainCaptionerResult:
    """Train a ClipCap captioner (see the module docstring). ``data``: a recipe's splits
    (``cfg.data == "shapes"`` needs :func:`clipkit.shapes.recipes.shapes_caption_data`, which
    ``clipkit train captioner`` wires); a captions.jsonl or COCO JSON is read here."""
    from accelerate.utils import set_seed


    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise InputError("epochs and batch_size must be >= 1 and lr > 0")
    if data is None and cfg.data == "shapes":
        raise InputError("--data shapes: the Shapes data comes from its recipe "
                         "(clipkit.shapes.recipes.train_captioner, or `clipkit train captioner`)")
    dtype = export_dtype(cfg.export_dtype)
    acc = accelerator(mixed_precision=cfg.mixed_precision)
    set_seed(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoint"
    scorer = load_scorer(cfg.clip, device=acc.device)
    cache = out / "clip_embeddings"
    metrics = None
    with acc.main_process_first():      # the main process encodes and caches; the others read the cache
        if data is not None:
            splits = data(cfg, scorer, cache)
            train, val, metrics = splits.train, splits.val, splits.metrics
        else:
            pairs, _ = read_caption_pairs(cfg.data, cfg.images)
            every = file_data(scorer, pairs, cache / "all.safetensors")
    if data is None:
        n_val = int(len(every.keys) * cfg.val_fraction) if len(every.keys) >= 20 else 0
        perm = torch.randperm(len(every.keys), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        pick = lambda idx: CaptionData(every.embeds[idx], [every.captions[i] for i in idx],
                                       [every.keys[i] for i in idx])
        val, train = pick(perm[:n_val]), pick(perm[n_val:])
    del scorer
    corpus = [c for caps in train.captions for c in caps]
    if cfg.resume and (ckpt_dir / "state.json").is_file() and cfg.decoder == "tiny":
        model, _ = build_model(cfg, train.embeds.shape[1], corpus)
        tokenizer = load_tokenizer(out / "tokenizer")
    else:
        model, tokenizer = build_model(cfg, train.embeds.shape[1], corpus)
    ds = _Pairs(train, cfg.seed)
    collate = lambda items: (torch.stack([e for e, _ in items]),
                             *encode_captions(tokenizer, [c for _, c in items], cfg.max_tokens))
    loader = DataLoader(ds, batch_size=min(cfg.batch_size, len(ds)), shuffle=True, drop_last=len(ds) > cfg.batch_size,
                        collate_fn=collate, generator=torch.Generator().manual_seed(cfg.seed))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(loader) // acc.num_processes)
    if not cfg.resume and acc.is_main_process:
        tokenizer.save_pretrained(str(out / "tokenizer"))
    model, opt, loader = acc.prepare(model, opt, loader)
    unwrapped = acc.unwrap_model(model)

    def step_fn(batch) -> StepOutput:
        emb, ids, mask = batch
        with acc.autocast():
            res = model(emb, ids, mask)
        return StepOutput(res.loss, len(emb))

    def on_epoch(epoch):
        ds.epoch = epoch                  # fresh captions each epoch
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)

    def eval_fn(step):
        return evaluate(unwrapped, tokenizer, val, cfg.val_decode, cfg.max_tokens, acc.device, metrics)

    settings = LoopSettings(
        out_dir=out, steps=cfg.epochs * steps_per_epoch,
        warmup=min(cfg.warmup, cfg.epochs * steps_per_epoch // 10),                # a short run still decays
        log_columns=["step", "epoch", "loss", "lr", "samples_per_s"], grad_clip=cfg.grad_clip,
        log_every=cfg.log_every, save_every=cfg.save_every, eval_every=steps_per_epoch,
        eval_columns=["step", "epoch", "val_loss", "bleu4", "cider_d", "exact_attr"],
        epoch_length=steps_per_epoch, save_each_epoch=True, resume=cfg.resume, time_limit_s=cfg.time_limit_s,
        plan_window=(20, 120), progress=progress, desc="train captioner",
        train_plot=(["loss", "lr"], "captioner training"), eval_plot_title="captioner validation")
    run = train_loop(acc, model, opt, loader, step_fn, settings, eval_fn=eval_fn if len(val.keys) else None,
                     on_epoch=on_epoch, config=cfg)
    model_dir = out / "model"
    if acc.is_main_process:
        with atomic_dir(model_dir, overwrite=True) as tmp:       # never half a model, never through a link
            save_captioner(tmp, unwrapped, tokenizer, dtype=dtype)
            (tmp / "clipkit_training.json").write_text(json.dumps(
                {"training": asdict(cfg), "eval": run.final_eval, "steps": run.steps}, indent=2))
    return TrainCaptionerResult(str(out), str(model_dir), run.steps, run.wall_s, run.final_eval, acc.num_processes,
                                run.samples_per_s)
