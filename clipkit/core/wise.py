"""WiSE-FT: weight-space ensembles of a zero-shot and a fine-tuned CLIP (Wortsman et al. 2022).

    theta(alpha) = (1 - alpha) * theta_init + alpha * theta_ft          (Eq. 1, per parameter)

alpha = 0 is the initial model, 1 the fine-tuned one. Intermediate alphas often keep most of the
fine-tuned accuracy on the new task while keeping what the initial model knew (its zero-shot
accuracy elsewhere): :func:`wise_ft` exports each interpolation and measures both, on the
labelled set's evaluation split and on a *reference task* the caller supplies (a callable
``scorer -> {metric: value}``; core knows no particular task).
"""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from clipkit.core.artifacts import save_openclip_dir
from clipkit.core.errors import InputError
from clipkit.core.evaluate import evaluate
from clipkit.core.outputs import atomic_dir, write_atomic, write_text_atomic
from clipkit.core.plots import save_figure
from clipkit.core.registry import load_clip
from clipkit.core.scorer import load_scorer

# Imported where used: matplotlib (heavy or optional; the paths that do not need them, and
# `clipkit --help`, start without them).

log = logging.getLogger(__name__)


def check_alphas(alphas: Sequence[float]) -> list[float]:
    out = sorted({float(a) for a in alphas})
    if not out:
        raise InputError("no WiSE-FT alphas given (e.g. --wise 0.25,0.5,0.75)")
    bad = [a for a in out if not 0.0 <= a <= 1.0]
    if bad:
        raise InputError(f"WiSE-FT alpha {bad[0]:g} is outside [0, 1]")
    return out


def interpolate_state(init: dict, finetuned: dict, alpha: float, keys=None) -> dict:
    """theta = (1 - alpha) * init + alpha * finetuned for every floating tensor (fp32); other
    tensors (integer buffers) are taken from ``finetuned``. ``keys``: only these entries."""
    out = {}
    for k, v in finetuned.items():
        if keys is not None and k not in keys:
            continue
        if k not in init or init[k].shape != v.shape:
            raise InputError(f"WiSE-FT: parameter {k!r} differs in the initial and fine-tuned models")
        if v.is_floating_point():
            out[k] = torch.lerp(init[k].detach().float().cpu(), v.detach().float().cpu(), float(alpha))
        else:
            out[k] = v.detach().cpu().clone()
    return out


@dataclass
class WiseRow:
    alpha: float
    model: str                      # a spec or directory loadable with --clip
    top1: float                     # zero-shot accuracy on the labelled set's evaluation split
    balanced_accuracy: float
    reference: dict = field(default_factory=dict)


@dataclass
class WiseReport:
    split: str
    images: int
    reference_name: str | None
    rows: list[WiseRow]

    def to_dict(self) -> dict:
        return asdict(self)

    def write(self, out_dir, overwrite: bool = True) -> dict[str, Path]:
        """``wise.json``, ``wise.csv`` (one row per alpha) and ``wise.png`` (accuracy against alpha)."""

        out = Path(out_dir)
        ref_keys = sorted({k for r in self.rows for k in r.reference})
        paths = {"json": write_text_atomic(out / "wise.json", json.dumps(self.to_dict(), indent=2),
                                           overwrite=overwrite)}

        def write_csv(tmp: Path):
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["alpha", "model", f"{self.split}_top1", f"{self.split}_balanced_accuracy"]
                           + [f"reference_{k}" for k in ref_keys])
                for r in self.rows:
                    w.writerow([f"{r.alpha:g}", r.model, f"{r.top1:.4f}", f"{r.balanced_accuracy:.4f}"]
                               + [f"{r.reference[k]:.4f}" if k in r.reference else "" for k in ref_keys])
        paths["csv"] = write_atomic(out / "wise.csv", write_csv, overwrite=overwrite)
        paths["png"] = self._plot(out / "wise.png", ref_keys, overwrite)
        return paths

    def _plot(self, path: Path, ref_keys, overwrite: bool) -> Path:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        a = [r.alpha for r in self.rows]
        fig, ax = plt.subplots(figsize=(5.0, 3.4))
        ax.plot(a, [r.top1 for r in self.rows], "o-", label=f"new task ({self.split}) top-1")
        for k in ref_keys:
            ax.plot(a, [r.reference.get(k, float("nan")) for r in self.rows], "s--",
                    label=f"{self.reference_name or 'reference'}: {k}")
        ax.set_xlabel("alpha (0 = initial, 1 = fine-tuned)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("WiSE-FT", fontsize=10)
        fig.tight_layout()
        return save_figure(fig, path, overwrite=overwrite)


def wise_ft(init_spec: str, finetuned: torch.nn.Module, model_cfg: dict, preprocess_cfg: dict, out_dir,
            alphas: Sequence[float], data, templates="simple",
            reference: Callable | None = None, reference_name: str | None = None,
            export_dtype: torch.dtype | None = torch.float16, keys=None, extra: dict | None = None,
            device="cpu", batch_size: int = 64) -> WiseReport:
    """Export ``OUT/wise-<alpha>/`` for every alpha strictly between 0 and 1 and measure every
    model, alpha 0 (``init_spec``) and 1 (``OUT/model``, already exported) included.

    ``keys``: the fine-tune was partial (an overlay of ``init_spec``): interpolate and export only
    those weights. The report is written to ``OUT/wise.json|csv|png`` and returned.
    """
    out = Path(out_dir)
    init_sd = load_clip(init_spec).module.float().state_dict()
    ft_sd = {k: v.detach().float().cpu() for k, v in finetuned.state_dict().items()}
    models: dict[float, str] = {0.0: init_spec, 1.0: str(out / "model")}
    for a in check_alphas(alphas):
        if a in models:
            continue
        sd = interpolate_state(init_sd, ft_sd, a, keys)
        full = {**init_sd, **sd} if keys is not None else sd
        module = _Holder(full)
        d = out / f"wise-{a:g}"
        with atomic_dir(d, overwrite=True) as tmp:
            save_openclip_dir(module, model_cfg, preprocess_cfg, tmp, dtype=export_dtype,
                              extra={**(extra or {}), "wise": {"alpha": a, "init": init_spec,
                                                               "finetuned": str(out / "model")}},
                              keys=keys, base=init_spec if keys is not None else None)
        models[a] = str(d)
    rows, split, n = [], "", 0
    for a in sorted(models):
        scorer = load_scorer(models[a], device=device, batch_size=batch_size)
        res = evaluate(data, scorer, templates=templates)
        ref = dict(reference(scorer)) if reference is not None else {}
        split, n = res.split, res.metrics.images
        rows.append(WiseRow(a, models[a], res.metrics.top1, res.metrics.balanced_accuracy, ref))
        log.info("WiSE-FT alpha %g: %s top-1 %.4f, reference %s", a, split, res.metrics.top1, ref)
        del scorer
    report = WiseReport(split, n, reference_name, rows)
    report.write(out)
    return report


class _Holder(torch.nn.Module):
    """Just a ``state_dict()`` for :func:`save_openclip_dir` (no model is built)."""

    def __init__(self, sd: dict):
        super().__init__()
        self._sd = sd

    def state_dict(self, *args, **kwargs):
        return dict(self._sd)
