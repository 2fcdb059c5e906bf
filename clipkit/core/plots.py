"""Figures: the image x text similarity heatmap people expect from CLIP tutorials."""
from __future__ import annotations

from pathlib import Path

from clipkit.core.outputs import write_atomic

# Imported where used: matplotlib, numpy (heavy or optional; the paths that do not need them, and
# `clipkit --help`, start without them).


def save_figure(fig, out_path, dpi: int = 100, overwrite: bool = False) -> Path:
    """Write a matplotlib figure atomically (never through a link; an existing file only with
    ``overwrite``) and close it."""
    import matplotlib.pyplot as plt

    try:
        return write_atomic(out_path, lambda t: fig.savefig(t, dpi=dpi), overwrite=overwrite)
    finally:
        plt.close(fig)


def similarity_heatmap(images, texts, sim, out_path, labels=None, thumb: int = 64, overwrite: bool = False) -> Path:
    """Draw cosine ``sim`` [N, M] with image thumbnails as row labels and texts as columns."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sim = np.asarray(sim, dtype=float)
    n, m = sim.shape
    fig_w = 2.0 + 1.1 * m
    fig_h = 1.0 + 0.9 * n
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    ax.imshow(sim, cmap="viridis", aspect="auto", vmin=min(0.0, sim.min()), vmax=max(sim.max(), 1e-6))
    for i in range(n):
        for j in range(m):
            ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if sim[i, j] < (sim.max() + sim.min()) / 2 else "black")
    ax.set_xticks(range(m))
    ax.set_xticklabels([t if len(t) <= 28 else t[:25] + "..." for t in texts], rotation=35,
                       ha="right", fontsize=8)
    ax.set_yticks([])
    ax.set_xlim(-0.5 - 1.0, m - 0.5)   # room on the left for thumbnails
    for i, im in enumerate(images):
        t = im.copy()
        t.thumbnail((thumb, thumb))
        ax.imshow(np.asarray(t), extent=(-1.45, -0.55, i + 0.45, i - 0.45), zorder=3)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_title("cosine similarity")
    fig.tight_layout()
    return save_figure(fig, out_path, dpi=110, overwrite=overwrite)


def confusion_matrix_plot(confusion, names, out_path, title: str = "", overwrite: bool = False) -> Path:
    """Row-normalised confusion matrix (rows: true class, columns: predicted), counts in the cells."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cm = np.asarray(confusion, dtype=float)
    c = len(cm)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    side = min(18.0, 2.5 + 0.45 * c)
    fig, ax = plt.subplots(figsize=(side, side * 0.9))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    if c <= 30:
        for i in range(c):
            for j in range(c):
                if cm[i, j]:
                    ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if frac[i, j] > 0.5 else "black")
    labels = [n if len(n) <= 20 else n[:17] + "..." for n in names]
    if c <= 60:
        ax.set_xticks(range(c))
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(c))
        ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out_path, overwrite=overwrite)
