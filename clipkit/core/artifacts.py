"""Our own model artifacts: safetensors weights + a JSON config beside them (never pickles).

An open_clip model is saved in open_clip's own local-directory layout
(``open_clip_config.json`` with ``model_cfg``/``preprocess_cfg`` + ``open_clip_model.safetensors``),
so both open_clip (``local-dir:``) and clipkit load it from the directory alone.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


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
                      dtype: torch.dtype | None = None, extra: dict | None = None) -> Path:
    """Write ``open_clip_config.json`` + ``open_clip_model.safetensors`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    if extra:
        cfg["clipkit"] = extra
    (out / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    save_file(_state_for_save(model, dtype), str(out / "open_clip_model.safetensors"),
              metadata={"format": "pt", "config": json.dumps(cfg)})
    return out
