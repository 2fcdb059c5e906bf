"""Our own model artifacts: safetensors weights + a JSON config beside them (never pickles).

An open_clip model is saved in open_clip's own local-directory layout
(``open_clip_config.json`` with ``model_cfg``/``preprocess_cfg`` + ``open_clip_model.safetensors``),
so both open_clip (``local-dir:``) and clipkit load it from the directory alone.

An *overlay* is a partial fine-tune of another CLIP: the same layout, but the safetensors hold only
the weights that changed and ``open_clip_config.json`` names the base spec (``clipkit.base``);
clipkit loads the base and replaces those weights (:func:`apply_overlay`).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save, save_file

# Imported where used: open_clip (heavy or optional; the paths that do not need them, and
# `clipkit --help`, start without them).


def safetensors_bytes(tensors: dict, metadata: dict | None = None) -> bytes:
    """The safetensors file of ``tensors`` + ``metadata`` (str -> str), the same bytes for the same
    input on every run: safetensors itself writes the header's keys in a random (hash) order, so it
    is rewritten here with sorted keys (same data offsets; the header stays 8-byte aligned)."""

    blob = save(tensors, metadata=metadata)
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + blob[8 + n:]


def save_safetensors(tensors: dict, path, metadata: dict | None = None) -> Path:
    """Write :func:`safetensors_bytes` to ``path`` (deterministic: same input, same file)."""
    Path(path).write_bytes(safetensors_bytes(tensors, metadata))
    return Path(path)


def build_openclip(model_cfg: dict):
    """An open_clip ``CLIP`` from a config dict (``embed_dim``, ``vision_cfg``, ``text_cfg``, ...)."""
    from open_clip.model import CLIP
    return CLIP(**model_cfg)


def _state_for_save(module: torch.nn.Module, dtype: torch.dtype | None) -> dict:
    sd = {}
    for k, v in module.state_dict().items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        sd[k] = v.contiguous()
    return sd


def save_openclip_dir(model: torch.nn.Module, model_cfg: dict, preprocess_cfg: dict, out_dir,
                      dtype: torch.dtype | None = None, extra: dict | None = None,
                      keys=None, base: str | None = None) -> Path:
    """Write ``open_clip_config.json`` + ``open_clip_model.safetensors`` into ``out_dir``; with
    ``keys`` and ``base``, an overlay: only those weights, on top of the CLIP ``base``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    if extra or base:
        cfg["clipkit"] = {**(extra or {}), **({"base": base} if base else {})}
    (out / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    sd = _state_for_save(model, dtype)
    if keys is not None:
        sd = {k: v for k, v in sd.items() if k in set(keys)}
    save_file(sd, str(out / "open_clip_model.safetensors"), metadata={"format": "pt", "config": json.dumps(cfg)})
    return out


def overlay_base(directory) -> str | None:
    """The base spec of an overlay directory, or None for a complete model."""
    p = Path(directory) / "open_clip_config.json"
    try:
        return json.loads(p.read_text()).get("clipkit", {}).get("base")
    except (OSError, ValueError, AttributeError):
        return None


def apply_overlay(module: torch.nn.Module, directory) -> list[str]:
    """Replace ``module``'s weights by the overlay's; every key must exist with the same shape."""
    sd = load_file(str(Path(directory) / "open_clip_model.safetensors"))
    own = module.state_dict()
    bad = [k for k, v in sd.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise ValueError(f"overlay weights do not fit the base model: {bad[:3]}")
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v.to(own[k].dtype))
    return sorted(sd)
