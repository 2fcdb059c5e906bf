"""Evaluate a CLIP on a labelled image set: zero-shot (prompt-ensembled class embeddings) or a
linear probe on frozen image embeddings.

Zero-shot (Radford et al. 2021, §3.1.4): every class name is put in every template, embedded,
normalised, averaged and renormalised (:func:`clipkit.core.prompts.build_classifier`); an image
is assigned the class of highest cosine.

Linear probe (Radford et al. 2021, App. A.3): scikit-learn's L-BFGS logistic regression on
L2-normalised image embeddings; the L2 strength ``lambda = 1/C`` is chosen on a validation split
by a parametric binary search over ``C in [1e-6, 1e6]`` (start at every second decade, halve the
step around the best value down to 8 steps per decade), then the probe is refitted on train (+ val)
with that ``C`` and scored on the evaluation split.

Reports: top-1, top-5 (top-k with k = min(5, classes)), balanced accuracy (mean per-class recall
over the classes with images), per-class accuracy and the confusion matrix (rows: true class).
"""
from __future__ import annotations

import contextlib
import csv
import logging
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from threadpoolctl import threadpool_limits
from torch.utils.data import DataLoader, Dataset

from clipkit.core.errors import ImageLoadError, InputError
from clipkit.core.io import load_image
from clipkit.core.labelled import LabelledSet, LabelledSplit, load_labelled, read_class_names
from clipkit.core.outputs import write_atomic
from clipkit.core.plots import confusion_matrix_plot
from clipkit.core.preprocess import pil_to_tensor
from clipkit.core.prompts import build_classifier, resolve_templates
from clipkit.core.scorer import load_scorer

# Imported where used: numpy, sklearn (heavy or optional; the paths that do not need them, and
# `clipkit --help`, start without them).

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def summarised_truncation(context_length: int):
    """One warning for all the prompts a tokenizer truncates (instead of one line per prompt)."""
    caught: list[str] = []

    class _Catch(logging.Filter):
        def filter(self, record):
            if isinstance(record.msg, str) and record.msg.startswith("text truncated"):
                caught.append(str(record.args[-1]) if record.args else "")
                return False
            return True

    logger = logging.getLogger("clipkit.core.backends")
    f = _Catch()
    logger.addFilter(f)
    try:
        yield caught
    finally:
        logger.removeFilter(f)
    texts = list(dict.fromkeys(caught))              # a prompt tokenized twice is counted once
    if texts:
        log.warning("%d class prompts are longer than the model's %d-token context and were truncated "
                    "(e.g. %s): shorten the class names (--class-names) or the templates",
                    len(texts), context_length, texts[0])


def check_class_prompts(ids: torch.Tensor, names: Sequence[str], context_length: int) -> None:
    """``ids`` [C * T, L]: the token ids of every class x template prompt (class-major). Two classes
    whose prompts are identical after truncation cannot be told apart: a one-line error."""
    per_class = ids.reshape(len(names), -1)
    seen: dict[bytes, int] = {}
    for c in range(len(names)):
        key = per_class[c].numpy().tobytes()
        if key in seen:
            raise InputError(f"classes {names[seen[key]]!r} and {names[c]!r} give identical prompts after "
                             f"truncation to the model's {context_length}-token context: shorten their "
                             "names (--class-names)")
        seen[key] = c


def class_embeddings(scorer, names: Sequence[str], templates) -> torch.Tensor:
    """Zero-shot weights [C, D] (unit norm), with the prompt checks above."""
    tmpl = resolve_templates(templates)
    texts = [t.format(n) for n in names for t in tmpl]
    tokenize = getattr(scorer.backend, "tokenize", None)
    with summarised_truncation(scorer.context_length):
        if tokenize is not None:
            check_class_prompts(tokenize(texts).ids, names, scorer.context_length)
        return build_classifier(scorer, names, tmpl)


# --------------------------------------------------------------------------------------------
# Encoding image files (unreadable ones skipped and counted)
# --------------------------------------------------------------------------------------------

class _Files(Dataset):
    def __init__(self, paths, cfg):
        self.paths, self.cfg = paths, cfg

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return i, pil_to_tensor(load_image(self.paths[i]), self.cfg), None
        except ImageLoadError as e:
            return i, None, e.reason
        except Exception as e:          # anything else a decoder throws: reported, not fatal
            return i, None, f"{type(e).__name__}: {e}"


def _collate(items):
    good = [it for it in items if it[1] is not None]
    return ([it[0] for it in good], torch.stack([it[1] for it in good]) if good else None,
            [(it[0], it[2]) for it in items if it[1] is None])


@dataclass
class EncodedFiles:
    index: list[int]                  # positions (in the input list) of the files that were read
    embeddings: torch.Tensor          # [len(index), D] unit norm, fp32, CPU
    skipped: list[dict] = field(default_factory=list)     # [{path, reason}]


def encode_files(scorer, paths: Sequence[str], batch_size: int | None = None, num_workers: int = 0,
                 progress: Callable | None = None) -> EncodedFiles:
    """Decode (in ``num_workers`` DataLoader workers) and encode image files in order; a file that
    cannot be read is skipped with its reason (a warning per file, and one count)."""
    loader = DataLoader(_Files(list(paths), scorer.preprocess), batch_size=batch_size or scorer.batch_size,
                        num_workers=num_workers, collate_fn=_collate, shuffle=False)
    index, embs, skipped = [], [], []
    for idx, px, bad in (progress(loader, total=len(loader)) if progress else loader):
        for i, reason in bad:
            skipped.append({"path": str(paths[i]), "reason": reason})
            log.warning("skipped %s: %s", paths[i], reason)
        if px is not None:
            index += idx
            embs.append(scorer.encode_pixel_batch(px).float().cpu())
    if skipped:
        log.warning("%d of %d images could not be read and were skipped", len(skipped), len(paths))
    dim = embs[0].shape[1] if embs else 0
    return EncodedFiles(index, torch.cat(embs) if embs else torch.zeros(0, dim), skipped)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------

@dataclass
class Metrics:
    images: int
    top1: float
    top5: float                       # top-k accuracy, k = top5_k = min(5, classes)
    top5_k: int
    balanced_accuracy: float          # mean per-class recall over the classes with images
    per_class: list[dict]             # [{class, name, images, correct, accuracy (None: no images)}]
    confusion: list[list[int]]        # [C, C]: rows true class, columns predicted class


def compute_metrics(scores: torch.Tensor, labels: torch.Tensor, classes: Sequence[str],
                    names: Sequence[str]) -> Metrics:
    """``scores`` [N, C] (any monotone score per class), ``labels`` [N] class indices."""
    n, c = len(labels), len(classes)
    if n == 0:
        raise InputError("no images to evaluate")
    labels = labels.long()
    pred = scores.argmax(dim=1)
    k = min(5, c)
    topk = scores.topk(k, dim=1).indices
    conf = torch.zeros(c, c, dtype=torch.long)
    conf.index_put_((labels, pred), torch.ones(n, dtype=torch.long), accumulate=True)
    per_class, recalls = [], []
    for i in range(c):
        total, correct = int(conf[i].sum()), int(conf[i, i])
        acc = correct / total if total else None
        if acc is not None:
            recalls.append(acc)
        per_class.append({"class": classes[i], "name": names[i], "images": total, "correct": correct,
                          "accuracy": acc})
    return Metrics(images=n, top1=float((pred == labels).float().mean()),
                   top5=float((topk == labels[:, None]).any(dim=1).float().mean()), top5_k=k,
                   balanced_accuracy=sum(recalls) / len(recalls), per_class=per_class,
                   confusion=conf.tolist())


# --------------------------------------------------------------------------------------------
# Linear probe
# --------------------------------------------------------------------------------------------

@dataclass
class ProbeResult:
    C: float                                   # inverse L2 strength chosen on the validation images
    sweep: list[dict]                          # [{C, val_accuracy}] in the order tried
    train_images: int                          # images the final probe was fitted on
    val_images: int
    val_source: str                            # "val" or "20% of train (no val split)"
    shots: int | None = None
    refit_on: str = "train+val"


def _fit(X, y, C: float, seed: int = 0):

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    clf = LogisticRegression(C=C, max_iter=1000, random_state=seed)      # lbfgs, multinomial
    # one BLAS thread: these problems are small, and on a busy machine multi-threaded BLAS spends
    # its time spin-waiting (measured 1.7-4.8 s -> 0.05-0.13 s per fit on 1,078 x 128 features)
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X, y)
    return clf


def sweep_C(Xtr, ytr, Xval, yval, lo: float = -6, hi: float = 6, per_decade: int = 8,
            seed: int = 0) -> tuple[float, list[dict]]:
    """The CLIP paper's parametric binary search for C on a validation set -> (best C, sweep).
    Ties go to the smaller C (the stronger regularisation)."""
    import numpy as np
    tried: dict[float, float] = {}
    order: list[dict] = []

    def score(e):
        e = round(min(hi, max(lo, e)), 6)
        if e not in tried:
            clf = _fit(Xtr, ytr, 10.0 ** e, seed)
            tried[e] = float(np.mean(clf.predict(Xval) == yval))
            order.append({"C": 10.0 ** e, "val_accuracy": tried[e]})
        return tried[e]

    def best():
        return max(tried, key=lambda e: (tried[e], -e))

    for e in np.arange(lo, hi + 1e-9, 2.0):
        score(float(e))
    step = 2.0
    while step > 1.0 / per_decade + 1e-9:
        step /= 2
        b = best()
        score(b - step)
        score(b + step)
    return 10.0 ** best(), order


def few_shot(labels: Sequence[int], shots: int, seed: int) -> list[int]:
    """Positions of ``shots`` images per class drawn with ``seed`` (all of a class that has fewer)."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    out, short = [], []
    for y in sorted(by_class):
        idx = by_class[y]
        if len(idx) < shots:
            short.append(y)
        out += sorted(rng.sample(idx, min(shots, len(idx))))
    if short:
        log.warning("%d classes have fewer than %d training images: all of theirs are used", len(short), shots)
    return sorted(out)


def _holdout(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Stratified split of positions -> (keep, held out): ``fraction`` of each class, at least one
    image held out of a class that has two or more, at least one kept."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    keep, out = [], []
    for y in sorted(by_class):
        idx = by_class[y][:]
        rng.shuffle(idx)
        n = min(len(idx) - 1, max(1, round(len(idx) * fraction)))
        out += idx[:n]
        keep += idx[n:]
    return sorted(keep), sorted(out)


# --------------------------------------------------------------------------------------------
# evaluate()
# --------------------------------------------------------------------------------------------

@dataclass
class EvalResult:
    model: str
    data: str
    split: str
    method: str                          # "zero-shot" | "linear-probe"
    classes: list[str]
    names: list[str]
    metrics: Metrics
    templates: int | None = None         # zero-shot: prompts per class
    probe: ProbeResult | None = None
    skipped: list[dict] = field(default_factory=list)
    images_per_s: float = 0.0            # images encoded per second (all splits read)
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        m = d.pop("metrics")
        return {**{k: d[k] for k in ("model", "data", "split", "method", "templates")},
                "classes": [{"class": c, "name": n} for c, n in zip(self.classes, self.names)],
                **m, "linear_probe": d["probe"], "skipped": self.skipped,
                "images_per_s": round(self.images_per_s, 2), "wall_s": round(self.wall_s, 3)}

    def write_csv(self, path, overwrite: bool = False) -> Path:
        """Per-class rows (class, name, images, correct, accuracy), then an ``(all)`` row."""


        def write(tmp: Path):
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["class", "name", "images", "correct", "accuracy"])
                for r in self.metrics.per_class:
                    w.writerow([r["class"], r["name"], r["images"], r["correct"],
                                "" if r["accuracy"] is None else f"{r['accuracy']:.6g}"])
                m = self.metrics
                w.writerow(["(all)", f"{self.method} on {self.split}", m.images,
                            sum(r["correct"] for r in m.per_class), f"{m.top1:.6g}"])
        return write_atomic(path, write, overwrite=overwrite)

    def plot_confusion(self, path, overwrite: bool = False) -> Path:
        parts = Path(self.model).parts
        model = "/".join(parts[-2:]) if len(parts) > 1 else self.model
        title = f"{model}: {self.method} on {self.split}, top-1 {self.metrics.top1:.3f}"
        return confusion_matrix_plot(self.metrics.confusion, self.names, path, title=title, overwrite=overwrite)


def _as_set(data, class_names) -> LabelledSet:
    if isinstance(data, LabelledSet):
        if class_names:
            data.names = read_class_names(class_names, data.classes)
        return data
    return load_labelled(data, class_names)


def _encode_split(scorer, split: LabelledSplit, batch_size, num_workers, progress) -> tuple[EncodedFiles, torch.Tensor]:
    enc = encode_files(scorer, split.paths, batch_size, num_workers, progress)
    return enc, torch.tensor([split.labels[i] for i in enc.index], dtype=torch.long)


def evaluate(data, scorer=None, *, templates="simple", split: str | None = None, class_names=None,
             linear_probe: bool = False, shots: int | None = None, seed: int = 0,
             batch_size: int | None = None, num_workers: int = 0,
             progress: Callable | None = None) -> EvalResult:
    """Evaluate ``scorer`` (default: the bundled ``shapes`` CLIP) on a labelled image set.

    Args:
        data: an ImageFolder directory, a CSV/JSONL ``path,label[,split]`` list, or a LabelledSet.
        templates: zero-shot prompts, as in :func:`clipkit.core.prompts.classify`.
        split: evaluation split (default ``test``, else ``val``, else the whole set).
        class_names: a JSON or ``folder,name`` file of readable class names.
        linear_probe: fit a logistic-regression probe on the ``train`` split instead of zero-shot.
        shots: K-shot probe: K training images per class, drawn with ``seed``.
    """
    if shots is not None and not linear_probe:
        raise InputError("--shots is for the linear probe (add --linear-probe)")
    if shots is not None and shots < 1:
        raise InputError(f"shots must be >= 1, got {shots}")
    ds = _as_set(data, class_names)
    ev = ds.eval_split(split)
    if len(ev) == 0:
        raise InputError(f"{ds.root}: the {ev.name} split has no images")
    if linear_probe and "train" not in ds.splits:
        raise InputError(f"{ds.root}: the linear probe needs a train split (DIR/train/<class>/...), "
                         f"it has: {', '.join(ds.splits)}")
    if linear_probe and ev.name == "train":
        raise InputError("the linear probe is fitted on train: evaluate it on another split (--split)")
    if scorer is None:
        scorer = load_scorer("shapes")
    t0 = time.perf_counter()
    if not linear_probe:
        weights = class_embeddings(scorer, ds.names, templates)               # [C, D]
        n_tmpl = len(resolve_templates(templates))
        enc, y = _encode_split(scorer, ev, batch_size, num_workers, progress)
        if not enc.index:
            raise InputError(f"none of the {len(ev)} images of the {ev.name} split could be read")
        scores = enc.embeddings @ weights.float().cpu().T
        wall = time.perf_counter() - t0
        return EvalResult(scorer.spec, ds.root, ev.name, "zero-shot", ds.classes, ds.names,
                          compute_metrics(scores, y, ds.classes, ds.names), templates=n_tmpl,
                          skipped=enc.skipped, images_per_s=len(enc.index) / max(wall, 1e-9), wall_s=wall)
    return _linear_probe(ds, ev, scorer, shots, seed, batch_size, num_workers, progress, t0)


def _linear_probe(ds: LabelledSet, ev: LabelledSplit, scorer, shots, seed, batch_size, num_workers,
                  progress, t0) -> EvalResult:
    import numpy as np
    train = ds.splits["train"]
    if shots:
        pick = few_shot(train.labels, shots, seed)
        train = LabelledSplit("train", [train.paths[i] for i in pick], [train.labels[i] for i in pick])
    skipped: list[dict] = []
    enc_tr, y_tr = _encode_split(scorer, train, batch_size, num_workers, progress)
    skipped += enc_tr.skipped
    n_read = len(enc_tr.index)
    val_split = ds.splits.get("val") if ev.name != "val" else None
    if val_split is not None and len(val_split):
        enc_va, y_va = _encode_split(scorer, val_split, batch_size, num_workers, progress)
        skipped += enc_va.skipped
        n_read += len(enc_va.index)
        X_tr, X_va, source = enc_tr.embeddings.numpy(), enc_va.embeddings.numpy(), "val"
        yt, yv = y_tr.numpy(), y_va.numpy()
        refit = (np.concatenate([X_tr, X_va]), np.concatenate([yt, yv]), "train+val")
    else:
        keep, held = _holdout(y_tr.tolist(), 0.2, seed)
        X_all, y_all = enc_tr.embeddings.numpy(), y_tr.numpy()
        X_tr, yt, X_va, yv = X_all[keep], y_all[keep], X_all[held], y_all[held]
        source = "20% of train (no val split)"
        refit = (X_all, y_all, "train")
    if len(set(yt.tolist())) < 2:
        raise InputError("the linear probe needs training images of at least 2 classes")
    if len(yv) == 0:
        raise InputError("no validation images to choose the regularisation on (add DIR/val)")
    C, sweep = sweep_C(X_tr, yt, X_va, yv, seed=seed)
    clf = _fit(refit[0], refit[1], C, seed)
    enc_ev, y_ev = _encode_split(scorer, ev, batch_size, num_workers, progress)
    skipped += enc_ev.skipped
    n_read += len(enc_ev.index)
    if not enc_ev.index:
        raise InputError(f"none of the {len(ev)} images of the {ev.name} split could be read")
    # decision_function over the classes the probe saw; classes absent from train score -inf
    scores = torch.full((len(enc_ev.index), len(ds.classes)), -math.inf)
    dec = torch.from_numpy(np.asarray(clf.decision_function(enc_ev.embeddings.numpy()), dtype=np.float32))
    if dec.ndim == 1:                                  # binary: one column, the positive class
        dec = torch.stack([-dec, dec], dim=1)
    scores[:, torch.as_tensor(clf.classes_, dtype=torch.long)] = dec
    wall = time.perf_counter() - t0
    probe = ProbeResult(C=C, sweep=sweep, train_images=len(refit[1]), val_images=len(yv), val_source=source,
                        shots=shots, refit_on=refit[2])
    return EvalResult(scorer.spec, ds.root, ev.name, "linear-probe", ds.classes, ds.names,
                      compute_metrics(scores, y_ev, ds.classes, ds.names), probe=probe, skipped=skipped,
                      images_per_s=n_read / max(wall, 1e-9), wall_s=wall)
