"""Shared training utilities: LR schedule, resumable checkpoints (no pickles of code), CSV logs, plots."""
from __future__ import annotations

import csv
import json
import math
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


def _rng_states(rng: dict | None) -> tuple[dict[str, torch.Tensor], dict]:
    """Generator states as tensors (safetensors, no pickle) and ``random.Random`` states as JSON.
    The global torch RNG (dropout) is always included, as ``torch``."""
    tensors, py = {"torch": torch.get_rng_state()}, {}
    for name, g in (rng or {}).items():
        if isinstance(g, torch.Generator):
            tensors[name] = g.get_state()
        else:                                             # random.Random
            v, state, gauss = g.getstate()
            py[name] = [v, list(state), gauss]
    return tensors, py


def save_checkpoint(ckpt_dir, model: torch.nn.Module, optimizer, step: int, config, extra: dict | None = None,
                    rng: dict | None = None):
    """Write ``model.safetensors`` + ``optimizer.pt`` (tensors only) + ``rng.safetensors`` (the RNG
    states, so a resumed run draws what the uninterrupted run would) + ``state.json``.

    Crash-safe at every instant: the checkpoint is built in a fresh folder and swapped in
    (:func:`clipkit.core.outputs.atomic_dir`); an interrupted swap is repaired on the next save or
    load, and a leftover from an earlier crash never blocks a save.
    """
    from clipkit.core.outputs import atomic_dir
    sd, seen = {}, set()
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        ptr = v.untyped_storage().data_ptr()
        sd[k] = v.clone() if ptr in seen else v     # tied weights (GPT-2's lm_head): store a copy
        seen.add(ptr)
    rng_tensors, rng_py = _rng_states(rng)
    cfg = asdict(config) if is_dataclass(config) else dict(config)
    with atomic_dir(ckpt_dir, overwrite=True) as tmp:
        save_file(sd, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        save_file({k: v.contiguous() for k, v in rng_tensors.items()}, str(tmp / "rng.safetensors"))
        # state.json last: a folder without it is never taken for a checkpoint
        (tmp / "state.json").write_text(json.dumps(
            {"step": step, "config": cfg, "rng": rng_py, **(extra or {})}, indent=2))


def load_checkpoint(ckpt_dir, model: torch.nn.Module, optimizer=None, rng: dict | None = None) -> dict:
    """Restore a checkpoint written by :func:`save_checkpoint` (model, optimizer and, given ``rng``,
    the generators' states); returns its state.json. A damaged checkpoint is an InputError."""
    from clipkit.core.errors import InputError
    from clipkit.core.outputs import recover_dir
    ckpt_dir = Path(ckpt_dir)
    recover_dir(ckpt_dir)
    try:
        state = json.loads((ckpt_dir / "state.json").read_text())
        step = int(state["step"])
        model.load_state_dict(load_file(str(ckpt_dir / "model.safetensors")))
        if optimizer is not None and (ckpt_dir / "optimizer.pt").is_file():
            optimizer.load_state_dict(torch.load(ckpt_dir / "optimizer.pt", weights_only=True,
                                                 map_location="cpu"))
        rng_file = ckpt_dir / "rng.safetensors"
        if rng is not None and rng_file.is_file():
            saved = load_file(str(rng_file))
            torch.set_rng_state(saved["torch"])
            for name, g in rng.items():
                if isinstance(g, torch.Generator) and name in saved:
                    g.set_state(saved[name])
                elif not isinstance(g, torch.Generator) and name in state.get("rng", {}):
                    v, st, gauss = state["rng"][name]
                    g.setstate((v, tuple(st), gauss))
    except InputError:
        raise
    except Exception as e:          # truncated files, bad JSON, missing keys, wrong shapes
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"checkpoint {ckpt_dir} is damaged ({type(e).__name__}: {msg[:160]}): "
                         "delete it to start over, or restore a copy") from None
    state["step"] = step
    return state


def resume_step(ckpt_dir, model: torch.nn.Module, optimizer, resume: bool, rng: dict | None = None) -> int:
    """The step to start from: 0, or (``resume``) the step of the checkpoint in ``ckpt_dir``, whose
    model, optimizer and RNG states (``rng``: name -> generator) are restored. A missing or damaged
    checkpoint is a clear error."""
    if not resume:
        return 0
    from clipkit.core.errors import InputError
    from clipkit.core.outputs import recover_dir
    recover_dir(ckpt_dir)
    if not (Path(ckpt_dir) / "state.json").is_file():
        raise InputError(f"--resume: no checkpoint in {ckpt_dir}")
    step = load_checkpoint(ckpt_dir, model, optimizer, rng=rng)["step"]
    import logging
    logging.getLogger(__name__).info("resumed from step %d", step)
    return step


def config_from_dict(cls, d: dict):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


class CsvLog:
    """Append rows to a CSV file, flushing each one (a killed run keeps its log).

    ``resume_from=STEP`` (with ``append``): rows logged after the checkpoint's step are cut first,
    so a resumed run does not leave duplicates of the steps it repeats. Never written through a
    symlink."""

    def __init__(self, path, columns: list[str], append: bool = False, resume_from: int | None = None):
        from clipkit.core.outputs import open_log
        self.path, self.columns = Path(path), columns
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not (append and self.path.is_file())
        if not new and resume_from is not None:
            truncate_log(self.path, resume_from)
        self._f = open_log(self.path, append=not new)
        self._w = csv.DictWriter(self._f, fieldnames=columns, extrasaction="ignore")
        if new:
            self._w.writeheader()
            self._f.flush()

    def write(self, **row):
        self._w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self._f.flush()

    def close(self):
        self._f.close()


def truncate_log(path, step: int, column: str = "step") -> None:
    """Keep the header and the rows whose ``column`` is <= ``step`` (atomically)."""
    from clipkit.core.outputs import write_atomic
    lines = Path(path).read_text(encoding="utf-8").splitlines(keepends=True)
    if not lines:
        return
    header = next(csv.reader([lines[0]]))
    col = header.index(column) if column in header else 0
    keep = [lines[0]]
    for ln in lines[1:]:
        cells = next(csv.reader([ln]), [])
        try:
            if int(float(cells[col])) <= step:
                keep.append(ln if ln.endswith("\n") else ln + "\n")
        except (IndexError, ValueError):
            continue                               # a half-written last row of a killed run
    write_atomic(path, lambda t: t.write_text("".join(keep), encoding="utf-8"), overwrite=True)


def plot_curves(csv_path, png_path, x: str = "step", ys: list[str] | None = None, title: str = "") -> Path | None:
    """One subplot per column of ``ys`` from a CSV log."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
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
    from clipkit.core.plots import save_figure
    return save_figure(fig, png_path, overwrite=True)


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
