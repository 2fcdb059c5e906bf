"""Captioner checkpoints: our directory format, and the official ClipCap ``.pt`` importer.

Our format (a directory)::

    clipcap_config.json     CaptionerConfig (mapper, prefix length, decoder GPT2Config, CLIP spec)
    model.safetensors       mapper.* and gpt.* weights
    tokenizer.json, ...     the decoder's tokenizer (save_pretrained)

Official checkpoints are ``torch.save(model.state_dict())`` pickles with ``clip_project.*`` (the
mapper) and ``gpt.*`` keys. They are read with ``torch.load(weights_only=True)``: a file that holds
anything but tensors (pickled code) is refused before anything runs. The mapper variant, prefix
length, widths and depth are read off the tensor shapes; stray ``attn.bias``/``attn.masked_bias``
buffers (old transformers) are dropped.

What the official inference code does, and the imported config records (FIELD_NOTES C, E):

* ``coco_weights.pt``, ``conceptual_weights.pt``: MLP mapper, prefix 10, on the *raw* image features
  of OpenAI's ViT-B/32 (512-d), GPT-2 fine-tuned.
* ``transformer_weights.pt``: transformer mapper (prefix 40, clip length 40, 8 layers, 8 heads), on
  OpenAI's RN50x4 image features (640-d) divided by their L2 norm, GPT-2 frozen.
* decoding (``generate2`` greedy, ``generate_beam`` beam 5, length-normalised): at most 67 tokens,
  ending at the '.' token only (EOS is not a stop token there).

The official training script picks the CLIP by the feature width (``prefix_dim = 640 if is_rn else
512``), so the CLIP spec is read off the mapper's input width. Normalisation cannot be read off the
weights: it defaults to the released checkpoints' (transformer: yes, MLP: no); pass
``normalize_prefix`` for a checkpoint trained otherwise (``train.py --normalize_prefix``).
"""
from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from clipkit.captioning.model import CaptionerConfig, ClipCapModel
from clipkit.captioning.tokenizer import load_tokenizer
from clipkit.core.errors import ModelLoadError

CONFIG_NAME = "clipcap_config.json"
WEIGHTS_NAME = "model.safetensors"
#: the CLIP an official checkpoint needs, by the mapper's input width: ViT-B/32 (coco/conceptual MLP
#: weights; QuickGELU, FIELD_NOTES A) and RN50x4 (transformer_weights.pt); clipkit forces QuickGELU
#: for every ``openai`` tag
OFFICIAL_CLIPS = {512: "openclip:ViT-B-32-quickgelu/openai", 640: "openclip:RN50x4/openai"}
OFFICIAL_MAX_TOKENS = 67      # generate2 / generate_beam ``entry_length``
OFFICIAL_STOP = "."           # their ``stop_token``; EOS does not stop them


def save_captioner(path, model: ClipCapModel, tokenizer=None, dtype: torch.dtype | None = None) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    cfg.decoder = model.gpt.config.to_dict()
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    # GPT-2 ties lm_head to the token embeddings: store the tensor once
    sd.pop("gpt.lm_head.weight", None)
    save_file(sd, str(path / WEIGHTS_NAME))
    (path / CONFIG_NAME).write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path


def _config_from_dict(d: dict) -> CaptionerConfig:
    names = {f.name for f in fields(CaptionerConfig)}
    return CaptionerConfig(**{k: v for k, v in d.items() if k in names})


def _build_with_weights(cfg: CaptionerConfig, sd: dict[str, torch.Tensor]) -> ClipCapModel:
    """A ClipCapModel for ``cfg`` holding exactly the weights ``sd`` (fp32; lm_head tied to wte)."""
    model = ClipCapModel(cfg)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "gpt.lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"keys do not match a ClipCap model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.gpt.tie_weights()
    return model


def load_captioner_dir(path) -> tuple[ClipCapModel, object]:
    """Load our directory format -> (model, tokenizer)."""

    path = Path(path)
    try:
        cfg = _config_from_dict(json.loads((path / CONFIG_NAME).read_text()))
        model = _build_with_weights(cfg, load_file(str(path / WEIGHTS_NAME)))
        tokenizer = load_tokenizer(path)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(str(path), f"{type(e).__name__}: {str(e).splitlines()[0][:200]}",
                             "expected a directory written by `clipkit train captioner`") from e
    return model.eval(), tokenizer


# ---- official .pt import --------------------------------------------------------------------

_OFFICIAL_DECODING = dict(stop_token=OFFICIAL_STOP, stop_at_eos=False, max_tokens=OFFICIAL_MAX_TOKENS)
_STRAY = re.compile(r"(^|\.)attn\.(bias|masked_bias)$")


def read_official_state_dict(path) -> dict[str, torch.Tensor]:
    """Tensors of an official checkpoint, safely (``weights_only=True``), with stray buffers dropped."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:   # UnpicklingError for pickled code/objects, or not a torch file at all
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            reason = "the file contains pickled Python objects, not only tensors; refusing to load it"
        raise ModelLoadError(str(path), reason, "expected an official ClipCap .pt state dict") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(str(path), "not a state dict of tensors", "expected an official ClipCap .pt")
    sd = {k.removeprefix("module."): v for k, v in obj.items() if not _STRAY.search(k)}
    if not any(k.startswith("clip_project.") for k in sd) or not any(k.startswith("gpt.") for k in sd):
        raise ModelLoadError(str(path), "not a ClipCap checkpoint (no clip_project.* and gpt.* keys)",
                             "expected an official ClipCap .pt state dict")
    return sd


def config_from_official(sd: dict[str, torch.Tensor], mapper_heads: int = 8, clip_spec: str | None = None,
                         normalize_prefix: bool | None = None) -> CaptionerConfig:
    """Infer the ClipCap and GPT-2 configuration from the tensor shapes of an official state dict.

    ``clip_spec`` None: the official CLIP for the mapper's input width (None when the width is neither
    512 nor 640: the user must name the CLIP). ``normalize_prefix`` None: as the released checkpoints
    (the transformer mapper's input is L2-normalised, the MLP's is raw)."""
    wte = sd.get("gpt.transformer.wte.weight")
    wpe = sd.get("gpt.transformer.wpe.weight")
    if wte is None or wpe is None:
        raise ValueError("missing gpt.transformer.wte/wpe weights")
    vocab, width = wte.shape
    n_layer = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"gpt\.transformer\.h\.(\d+)\.", k)))
    decoder = {"vocab_size": vocab, "n_embd": width, "n_layer": n_layer, "n_positions": wpe.shape[0],
               "n_head": max(1, width // 64)}     # every GPT-2 size has 64-wide heads
    if "clip_project.model.0.weight" in sd:
        w0, w2 = sd["clip_project.model.0.weight"], sd["clip_project.model.2.weight"]
        if w2.shape[0] % width:
            raise ValueError(f"mapper output {w2.shape[0]} is not a multiple of GPT-2 width {width}")
        clip_dim = w0.shape[1]
        return CaptionerConfig(mapper="mlp", clip_dim=clip_dim, prefix_length=w2.shape[0] // width,
                               mlp_hidden=w0.shape[0], decoder=decoder,
                               normalize_prefix=False if normalize_prefix is None else normalize_prefix,
                               clip_spec=clip_spec or OFFICIAL_CLIPS.get(clip_dim), **_OFFICIAL_DECODING)
    if "clip_project.prefix_const" in sd:
        k = sd["clip_project.prefix_const"].shape[0]
        lin = sd["clip_project.linear.weight"]
        if lin.shape[0] % width:
            raise ValueError(f"mapper linear output {lin.shape[0]} is not a multiple of GPT-2 width {width}")
        layers = 1 + max(int(m.group(1)) for key in sd
                         if (m := re.match(r"clip_project\.transformer\.layers\.(\d+)\.", key)))
        clip_dim = lin.shape[1]
        return CaptionerConfig(mapper="transformer", clip_dim=clip_dim, prefix_length=k,
                               clip_length=lin.shape[0] // width, mapper_layers=layers,
                               mapper_heads=mapper_heads, decoder=decoder,
                               normalize_prefix=True if normalize_prefix is None else normalize_prefix,
                               clip_spec=clip_spec or OFFICIAL_CLIPS.get(clip_dim), **_OFFICIAL_DECODING)
    raise ValueError("unknown mapper layout (neither clip_project.model.* nor clip_project.prefix_const)")


def import_official(path, tokenizer: str | Path | None = None, clip_spec: str | None = None,
                    mapper_heads: int = 8, local_only: bool = True, normalize_prefix: bool | None = None):
    """Official ClipCap ``.pt`` -> (model, tokenizer or None). ``tokenizer``: a GPT-2 tokenizer
    directory or hub name (the official models use ``gpt2``'s). ``clip_spec``/``normalize_prefix``:
    see :func:`config_from_official` (defaults: those of the released checkpoints)."""
    sd = read_official_state_dict(path)
    try:
        cfg = config_from_official(sd, mapper_heads, clip_spec, normalize_prefix)
        model = _build_with_weights(cfg, {("mapper." + k[len("clip_project."):])
                                           if k.startswith("clip_project.") else k: v for k, v in sd.items()})
    except Exception as e:
        raise ModelLoadError(str(path), f"{type(e).__name__}: {str(e).splitlines()[0][:200]}",
                             "expected an official ClipCap .pt (MLP or transformer mapper)") from e
    tok = None
    if tokenizer is not None:
        try:
            tok = load_tokenizer(tokenizer, local_only=local_only)
        except Exception as e:
            raise ModelLoadError(str(tokenizer), f"cannot load the GPT-2 tokenizer: {str(e).splitlines()[0][:160]}",
                                 "pass --tokenizer with a local GPT-2 tokenizer directory") from e
    return model.eval(), tok
