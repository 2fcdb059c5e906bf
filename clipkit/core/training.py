"""Shared training utilities: LR schedule, resumable checkpoints (no pickles of code), CSV logs, plots."""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float = 0.05) -> float:
    """LR multiplier: linear warmup, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def save_checkpoint(ckpt_dir, model: torch.nn.Module, optimizer, step: int, config, extra: dict | None = None):
    """Atomically write ``model.safetensors`` + ``optimizer.pt`` (tensors only) + ``state.json``."""
    ckpt_dir = Path(ckpt_dir)
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    sd, seen = {}, set()
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        ptr = v.untyped_storage().data_ptr()
        sd[k] = v.clone() if ptr in seen else v     # tied weights (GPT-2's lm_head): store a copy
        seen.add(ptr)
    save_file(sd, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    cfg = asdict(config) if is_dataclass(config) else dict(config)
    (tmp / "state.json").write_text(json.dumps({"step": step, "config": cfg, **(extra or {})}, indent=2))
    if ckpt_dir.exists():
        old = ckpt_dir.with_name(ckpt_dir.name + ".old")
        os.replace(ckpt_dir, old)
        os.replace(tmp, ckpt_dir)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        os.replace(tmp, ckpt_dir)


def load_checkpoint(ckpt_dir, model: torch.nn.Module, optimizer=None) -> dict:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns its state.json."""
    ckpt_dir = Path(ckpt_dir)
    model.load_state_dict(load_file(str(ckpt_dir / "model.safetensors")))
    if optimizer is not None and (ckpt_dir / "optimizer.pt").is_file():
        optimizer.load_state_dict(torch.load(ckpt_dir / "optimizer.pt", weights_only=True,
                                             map_location="cpu"))
    return json.loads((ckpt_dir / "state.json").read_text())


def resume_step(ckpt_dir, model: torch.nn.Module, optimizer, resume: bool) -> int:
    """The step to start from: 0, or (``resume``) the step of the checkpoint in ``ckpt_dir``, whose
    model and optimizer states are restored. A missing checkpoint is a clear error."""
    if not resume:
        return 0
    from clipkit.core.errors import InputError
    if not (Path(ckpt_dir) / "state.json").is_file():
        raise InputError(f"--resume: no checkpoint in {ckpt_dir}")
    step = load_checkpoint(ckpt_dir, model, optimizer)["step"]
    import logging
    logging.getLogger(__name__).info("resumed from step %d", step)
    return step


def config_from_dict(cls, d: dict):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


class CsvLog:
    """Append rows to a CSV file, flushing each one (a killed run keeps its log)."""

    def __init__(self, path, columns: list[str], append: bool = False):
        self.path, self.columns = Path(path), columns
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not (append and self.path.exists())
        self._f = open(self.path, "w" if new else "a", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=columns, extrasaction="ignore")
        if new:
            self._w.writeheader()
            self._f.flush()

    def write(self, **row):
        self._w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self._f.flush()

    def close(self):
        self._f.close()


def plot_curves(csv_path, png_path, x: str = "step", ys: list[str] | None = None, title: str = "") -> Path | None:
    """One subplot per column of ``ys`` from a CSV log."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = list(csv.DictReader(open(csv_path)))
    if not rows:
        return None
    ys = ys or [c for c in rows[0] if c != x]
    fig, axes = plt.subplots(1, len(ys), figsize=(3.6 * len(ys), 3.0), squeeze=False)
    xs = [float(r[x]) for r in rows]
    for ax, y in zip(axes[0], ys):
        vals = [float(r[y]) if r.get(y) not in (None, "") else float("nan") for r in rows]
        ax.plot(xs, vals)
        ax.set_title(y, fontsize=9)
        ax.set_xlabel(x, fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return Path(png_path)


def plan_steps(cfg, steps_done: int, window_s: float, step: int, elapsed_s: float) -> None:
    """With ``cfg.time_limit_s``: shrink ``cfg.steps`` to what fits in the time left at the measured
    rate (the LR schedule reads ``cfg.steps``, so it still decays to its end)."""
    import logging
    rate = steps_done / max(window_s, 1e-6)
    fit = step + int(rate * max(0.0, cfg.time_limit_s - elapsed_s) * 0.95)
    if fit < cfg.steps:
        logging.getLogger(__name__).info("time limit %.0fs: %d steps planned (%.1f steps/s)",
                                         cfg.time_limit_s, fit, rate)
        cfg.steps = max(step + 1, fit)
