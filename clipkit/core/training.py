"""The one training loop of clipkit (CLIP, DDPM, ClipCap) and what it is made of.

A trainer builds its model, optimizer and data, prepares them with ``accelerate`` and hands them to
:func:`train_loop` with two functions of its own: ``step_fn`` (a batch -> :class:`StepOutput`, the
loss to minimise) and ``eval_fn`` (step -> metrics). The loop owns everything else, once:

1. resume: ``accelerate``'s ``load_state`` (model, optimizer, the global python/numpy/torch RNG
   states, all loaded with ``weights_only=True``), plus the trainer's own stateful objects (an EMA,
   our generators) saved as safetensors + JSON, never pickled; logs cut back to the checkpoint;
2. the LR schedule: linear warmup then cosine decay to ``min_lr_ratio`` (transformers'
   ``get_cosine_with_min_lr_schedule_with_warmup``);
3. per step: backward, gradient clipping, optimizer and schedule step, the trainer's ``after_step``;
4. a time limit: after a measuring window the run is re-planned (:func:`plan_steps` returns a
   :class:`StepPlan`, the config is never changed) and the schedule rebuilt to end with it;
5. cadence: CSV log rows, evaluations, crash-safe checkpoints (``save_state`` into a fresh folder
   swapped in atomically, :func:`clipkit.core.outputs.atomic_dir`), curves as PNG, a progress bar.

Exported weights use one dtype table, :data:`EXPORT_DTYPES`.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from clipkit.core.errors import InputError
from clipkit.core.outputs import (atomic_dir, check_output_dir, old_dir, open_log, recover_dir, remove_path,
                                  write_atomic)
from clipkit.core.plots import save_figure

# Imported where used: accelerate, matplotlib, transformers (heavy or optional; the paths that do not need them, and
# `clipkit --help`, start without them).


#: ``--export-dtype`` names -> torch dtypes (one table for every trainer).
EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def export_dtype(name: str) -> torch.dtype:
    """The dtype of exported weights, by name (fp32 | fp16 | bf16)."""
    try:
        return EXPORT_DTYPES[name]
    except KeyError:
        raise InputError(f"export dtype must be one of {', '.join(EXPORT_DTYPES)}, got {name!r}") from None


def cosine_schedule(optimizer, total: int, warmup: int, step: int = 0, min_lr_ratio: float = 0.05):
    """LR multiplier: linear warmup over ``warmup`` steps (from 0), then cosine decay to ``min_lr_ratio``
    at ``total`` (transformers' schedule); ``step``: the schedule starts there (a resumed or re-planned
    run), which needs the optimizer's ``initial_lr`` set by an earlier schedule or a loaded state."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup
    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, total, min_lr_rate=min_lr_ratio,
                                                       last_epoch=step - 1 if step else -1)


class RngStates:
    """Named generators (``torch.Generator`` or ``random.Random``) as one checkpointed object, so a
    resumed run draws what the uninterrupted run would. The global python/numpy/torch RNGs are
    accelerate's own business (``save_state``)."""

    def __init__(self, generators: dict, seed: int = 0):
        self.generators, self.seed = dict(generators), seed

    def state_dict(self) -> dict:
        out = {}
        for name, g in self.generators.items():
            if isinstance(g, torch.Generator):
                out[name] = g.get_state()
            else:
                v, state, gauss = g.getstate()
                out[name] = [v, list(state), gauss]
        return out

    def load_state_dict(self, states: dict) -> None:
        for name, g in self.generators.items():
            if name not in states:
                continue
            if isinstance(g, torch.Generator):
                g.set_state(states[name])
            else:
                v, st, gauss = states[name]
                g.setstate((v, tuple(st), gauss))

    def reseed(self, process_index: int, step: int) -> None:
        """A checkpoint written by fewer processes has no states for this one: seed its torch
        generators from the seed, the process index and the step."""
        for g in self.generators.values():
            if isinstance(g, torch.Generator):
                g.manual_seed(self.seed * 1000 + process_index + step)


# Stateful objects (``state_dict``/``load_state_dict``: an EMA, :class:`RngStates`) are saved per
# process as one safetensors file (the tensors) and one JSON file (the structure and the scalars).
# accelerate's ``register_for_checkpointing`` would pickle them and load them back with
# ``weights_only=False``, i.e. run whatever a planted checkpoint holds: we never unpickle.

def _flatten(obj, tensors: dict, key: str):
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(obj, dict):
        return {"dict": [[k, _flatten(v, tensors, f"{key}.{i}")] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return {"list": [_flatten(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} (tensors, dicts, lists and scalars only)")


def _unflatten(node, tensors: dict):
    if "tensor" in node:
        return tensors[node["tensor"]]
    if "dict" in node:
        return {k: _unflatten(v, tensors) for k, v in node["dict"]}
    if "list" in node:
        items = [_unflatten(v, tensors) for v in node["list"]]
        return tuple(items) if node.get("tuple") else items
    return node["value"]


def save_objects(folder, objects, process_index: int = 0) -> None:
    """Write the ``state_dict()`` of each object into ``folder`` (objects_P.safetensors/.json)."""
    tensors: dict = {}
    tree = [_flatten(o.state_dict(), tensors, f"o{i}") for i, o in enumerate(objects)]
    save_file(tensors, str(Path(folder) / f"objects_{process_index}.safetensors"))
    (Path(folder) / f"objects_{process_index}.json").write_text(json.dumps(tree))


def load_objects(folder, objects, process_index: int = 0) -> bool:
    """Restore objects saved by :func:`save_objects`; False when this process has no file there."""
    folder = Path(folder)
    meta = folder / f"objects_{process_index}.json"
    if not meta.is_file():
        return False
    tensors = load_file(str(folder / f"objects_{process_index}.safetensors"))
    tree = json.loads(meta.read_text())
    if len(tree) != len(objects):
        raise ValueError(f"the checkpoint holds {len(tree)} training objects, this run has {len(objects)}")
    for o, node in zip(objects, tree):
        o.load_state_dict(_unflatten(node, tensors))
    return True


def _damaged(ckpt_dir, e: Exception):
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = str(e)
    if isinstance(e, RuntimeError) and ("size mismatch" in text or "Missing key" in text
                                        or "Unexpected key" in text):
        # the checkpoint is whole, but of another model than the one this run builds
        return InputError(f"checkpoint {ckpt_dir} holds a model of another shape than this run builds "
                          f"({msg[:120]}): resume with the options the run was started with, or start a "
                          "new --out")
    return InputError(f"checkpoint {ckpt_dir} is damaged ({type(e).__name__}: {msg[:160]}): "
                      "delete it to start over, or restore a copy")


def save_training_state(acc, ckpt_dir, step: int, config=None, extra: dict | None = None,
                        objects=()) -> Path:
    """Checkpoint with ``accelerate``'s ``save_state`` (every process calls this): model, optimizer,
    RNG states; ``objects`` (EMA, :class:`RngStates`) with :func:`save_objects`; then ``state.json``
    (step, config, ``extra``) written last, so a folder without it is never taken for a checkpoint.

    Crash-safe at every instant: written into a fresh folder beside ``ckpt_dir`` that is then
    swapped in (:func:`clipkit.core.outputs.atomic_dir`); an interrupted swap is repaired on the
    next save or load, and a leftover from an earlier crash never blocks a save."""
    ckpt_dir = Path(ckpt_dir)
    cfg = asdict(config) if is_dataclass(config) else dict(config or {})

    def write(tmp):
        if acc.num_processes > 1:                       # every process writes into the main one's folder
            from accelerate.utils import broadcast_object_list
            tmp = broadcast_object_list([str(tmp) if tmp is not None else None])[0]
        acc.save_state(str(tmp), safe_serialization=True)
        if objects:
            save_objects(tmp, objects, acc.process_index)
        acc.wait_for_everyone()
        if acc.is_main_process:
            (Path(tmp) / "state.json").write_text(json.dumps({"step": step, "config": cfg, **(extra or {})},
                                                             indent=2))
    if acc.is_main_process:
        with atomic_dir(ckpt_dir, overwrite=True) as tmp:
            write(tmp)
    else:
        write(None)
    acc.wait_for_everyone()
    return ckpt_dir


def load_training_state(acc, ckpt_dir, objects=(), rng: "RngStates | None" = None, config=None) -> dict:
    """Restore a checkpoint of :func:`save_training_state` into the prepared objects and ``objects``
    (every process calls this); -> its state.json. No checkpoint, a damaged one, or (``config``
    given) one of a run started with other settings (:func:`check_resume`) is a one-line
    InputError. A process the checkpoint has no objects for (it was written by fewer processes)
    keeps its objects and reseeds ``rng`` (one of ``objects``) from the step."""
    ckpt_dir = Path(ckpt_dir)
    if acc.is_main_process:
        recover_dir(ckpt_dir)
    acc.wait_for_everyone()
    if not (ckpt_dir / "state.json").is_file():
        raise InputError(f"--resume: no checkpoint in {ckpt_dir}")
    check_resume(ckpt_dir, config)
    if (ckpt_dir / "optimizer.pt").is_file() and not (ckpt_dir / "optimizer.bin").is_file():
        raise InputError(f"checkpoint {ckpt_dir} was written by an older clipkit (before the shared "
                         "training loop): start over without --resume")
    try:
        state = json.loads((ckpt_dir / "state.json").read_text())
        state["step"] = int(state["step"])
        acc.load_state(str(ckpt_dir))
        if objects and not load_objects(ckpt_dir, objects, acc.process_index):
            if acc.process_index == 0:
                raise FileNotFoundError("objects_0.json is missing")
            if rng is not None:
                rng.reseed(acc.process_index, state["step"])
    except InputError:
        raise
    except Exception as e:          # truncated files, bad JSON, missing keys, wrong shapes
        raise _damaged(ckpt_dir, e) from None
    logging.getLogger(__name__).info("resumed from step %d", state["step"])
    return state


#: What makes a run the run it is: a resumed run must ask for the same (config field names present
#: in both configs; steps, epochs, cadence, time limit, workers and exports may change on resume).
RESUME_MUST_MATCH = ("data", "images", "init", "model_cfg", "unet_cfg", "clip", "decoder", "mapper",
                     "prefix_length", "lr", "batch_size", "seed", "weight_decay", "train_only")

#: What a training run leaves in its folder (a folder holding one of these holds a run).
RUN_FILES = ("checkpoint", "checkpoint.old", "model", "train_log.csv")


def _flat(key: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for k in sorted(value):
            _flat(f"{key}.{k}", value[k], out)
    else:
        out[key] = value
    return out


def _same(key: str, a, b) -> bool:
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and key in ("data", "images", "init", "clip", "decoder"):
        return os.path.exists(a) and os.path.realpath(a) == os.path.realpath(b)
    return False


def _show(v) -> str:
    text = json.dumps(v, separators=(",", ":")) if isinstance(v, (list, dict)) or v is None else str(v)
    return text if len(text) <= 80 else text[:77] + "..."


def resume_mismatch(saved: dict, config) -> tuple[list[str], list[str]]:
    """The settings of :data:`RESUME_MUST_MATCH` a resumed run changes: -> (``key=value`` as the run
    was started, ``key=value`` as asked now); nested configs (``model_cfg``) by their dotted keys."""
    now = json.loads(json.dumps(asdict(config) if is_dataclass(config) else dict(config or {})))
    was, asks = [], []
    for k in RESUME_MUST_MATCH:
        if k not in saved or k not in now or _same(k, saved[k], now[k]):
            continue
        if not (isinstance(saved[k], dict) and isinstance(now[k], dict)):
            was.append(f"{k}={_show(saved[k])}")
            asks.append(f"{k}={_show(now[k])}")
            continue
        a, b = _flat(k, saved[k], {}), _flat(k, now[k], {})
        for kk in sorted(set(a) | set(b)):
            if kk not in a or kk not in b or a[kk] != b[kk]:
                was.append(f"{kk}={_show(a.get(kk))}")
                asks.append(f"{kk}={_show(b.get(kk))}")
    return was, asks


def check_resume(ckpt_dir, config) -> None:
    """A one-line InputError when ``config`` asks for other settings (:data:`RESUME_MUST_MATCH`)
    than the run whose checkpoint is ``ckpt_dir`` (or its ``.old``) was started with. A missing or
    unreadable state.json says nothing here (loading the checkpoint reports it)."""
    ckpt_dir = Path(ckpt_dir)
    for d in (ckpt_dir, old_dir(ckpt_dir)):
        try:
            saved = json.loads((d / "state.json").read_text(encoding="utf-8")).get("config")
            break
        except (OSError, ValueError, AttributeError):
            continue
    else:
        return
    if not isinstance(saved, dict) or config is None:
        return
    was, asks = resume_mismatch(saved, config)
    if was:
        raise InputError(f"--resume {ckpt_dir.parent} was started with {', '.join(was)}; this run asks "
                         f"{', '.join(asks)}: pass the same options (or start a new --out)")


def check_run_dir(out_dir, *, resume: bool = False, overwrite: bool = False, config=None,
                  main: bool = True) -> Path:
    """Validate a training run's folder before any work (``clipkit train``): it must be a folder
    (created if missing); one that already holds a run (:data:`RUN_FILES`) is continued only with
    ``resume`` (and the same settings, :func:`check_resume`) and replaced only with ``overwrite``
    (its checkpoint is removed then, on the ``main`` process, so a later ``--resume`` never
    continues the replaced run). -> the folder. Raises a one-line InputError."""

    out = Path(out_dir)
    existed = os.path.isdir(out)
    if resume and not existed and not os.path.lexists(out):
        raise InputError(f"--resume: no checkpoint in {out / 'checkpoint'} ({out} does not exist)")
    check_output_dir(out, what="--out")
    if resume:
        check_resume(out / "checkpoint", config)
        return out
    held = [f for f in RUN_FILES if os.path.lexists(out / f)] if existed else []
    if held and not overwrite:
        raise InputError(f"--out {out} already holds a training run ({', '.join(held)}): pass --resume to "
                         "continue it or --overwrite to replace it (or choose another --out)")
    if held and main:
        for d in (out / "checkpoint", old_dir(out / "checkpoint")):
            remove_path(d)
    return out


def config_from_dict(cls, d: dict):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})

class CsvLog:
    """Append rows to a CSV file, flushing each one (a killed run keeps its log).

    ``resume_from=STEP`` (with ``append``): rows logged after the checkpoint's step are cut first,
    so a resumed run does not leave duplicates of the steps it repeats. Never written through a
    symlink."""

    def __init__(self, path, columns: list[str], append: bool = False, resume_from: int | None = None):
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
    return save_figure(fig, png_path, overwrite=True)


@dataclass
class StepPlan:
    """How many steps a run will take: what was asked, or fewer to fit a time limit."""
    steps: int                          # the step the run ends at
    requested: int                      # the steps asked for
    rate: float | None = None           # measured optimizer steps per second (None: not measured)
    time_limit_s: float | None = None

    @property
    def limited(self) -> bool:
        return self.steps < self.requested


def plan_steps(requested: int, time_limit_s: float | None, *, step: int, rate: float,
               elapsed_s: float) -> StepPlan:
    """The steps that fit in what is left of ``time_limit_s`` at ``rate`` steps/s (a 5% margin),
    at most ``requested`` and at least one more than ``step``."""
    if not time_limit_s:
        return StepPlan(requested, requested, rate, None)
    fit = step + int(rate * max(0.0, time_limit_s - elapsed_s) * 0.95)
    steps = max(step + 1, fit) if fit < requested else requested
    if steps < requested:
        logging.getLogger(__name__).info("time limit %.0fs: %d steps planned (%.1f steps/s)",
                                         time_limit_s, steps, rate)
    return StepPlan(steps, requested, rate, time_limit_s)


@dataclass
class StepOutput:
    """What a trainer's ``step_fn`` returns for one batch."""
    loss: torch.Tensor                  # scalar to minimise (backward is the loop's)
    batch_size: int                     # samples in the batch (this process), for samples/s
    metrics: dict = field(default_factory=dict)     # more log columns: tensors or numbers


@dataclass
class LoopSettings:
    out_dir: str | Path                 # logs, curves and OUT/checkpoint
    steps: int                          # optimizer steps asked for (a time limit may plan fewer)
    log_columns: list                   # train_log.csv: step, [epoch], loss, metrics..., lr, samples_per_s
    warmup: int = 0                     # linear LR warmup steps
    min_lr_ratio: float = 0.05          # the cosine decays to this fraction of the peak LR
    grad_clip: float | None = 1.0       # max gradient norm (None/0: no clipping)
    log_every: int = 50
    save_every: int = 1000
    eval_every: int | None = None       # None: evaluate at the end only
    eval_columns: list | None = None    # eval_log.csv columns (step, [epoch], metrics...)
    eval_at_start: bool = False         # also evaluate the initial model (step 0) of a fresh run
    epoch_length: int | None = None     # steps per pass over the data (default: len(data), if it has one)
    save_each_epoch: bool = False       # also checkpoint at the end of every epoch
    resume: bool = False                # continue from OUT/checkpoint
    time_limit_s: float | None = None
    plan_window: tuple = (50, 300)      # the rate is measured between these steps (after start-up)
    progress: bool = True
    desc: str = "train"
    train_plot: tuple | None = None     # (columns, title) of OUT/train_curves.png
    eval_plot_title: str | None = None  # OUT/eval_curves.png, when there is an eval log


@dataclass
class LoopResult:
    steps: int                          # the step training ended at
    wall_s: float
    final_eval: dict
    samples_per_s: float
    plan: StepPlan


def train_loop(acc, model, optimizer, data, step_fn, settings: LoopSettings, *, eval_fn=None, after_step=None,
               on_epoch=None, state_objects=(), rng: RngStates | None = None, config=None) -> LoopResult:
    """Run the training loop (see the module docstring) on prepared ``model``, ``optimizer``, ``data``.

    ``data``: a DataLoader (passes over it are epochs; a resumed run skips the batches already
    seen) or any iterator (drawn from for ever). A ``None`` batch is skipped.
    ``step_fn(batch) -> StepOutput``; ``eval_fn(step) -> {metric: value}`` (main process only);
    ``after_step(step) -> dict | None`` after each optimizer step (EMA, clamps; values returned are
    logged); ``on_epoch(epoch)`` before each pass; ``state_objects`` (objects with
    ``state_dict``/``load_state_dict``) and ``rng`` are checkpointed; ``config`` goes in state.json.
    """
    s = settings
    out = Path(s.out_dir)
    ckpt_dir = out / "checkpoint"
    main = acc.is_main_process
    objects = [*state_objects] + ([rng] if rng is not None else [])
    step = 0
    if s.resume:
        step = load_training_state(acc, ckpt_dir, objects, rng, config)["step"]
    elif main:
        check_output_dir(out, what="output folder")
    plan = StepPlan(s.steps, s.steps, None, s.time_limit_s)
    sched = cosine_schedule(optimizer, plan.steps, s.warmup, step, s.min_lr_ratio)
    epoch_len = s.epoch_length or (len(data) if hasattr(data, "__len__") else None)
    logf = CsvLog(out / "train_log.csv", s.log_columns, append=s.resume, resume_from=step) if main else None
    evalf = CsvLog(out / "eval_log.csv", s.eval_columns, append=s.resume, resume_from=step) \
        if main and eval_fn is not None and s.eval_columns else None
    bar = tqdm(total=plan.steps, initial=step, disable=not (s.progress and main), desc=s.desc)
    t0, seen, last_eval, start, t_mark = time.time(), 0, {}, step, None

    def epoch_of(at: int) -> int:            # the epoch the step that ended at ``at`` belongs to
        return (at - 1) // epoch_len if epoch_len else 0

    def evaluate(at: int) -> dict:
        res = eval_fn(at)
        if evalf is not None:
            evalf.write(step=at, epoch=max(0, epoch_of(at)),
                        **{k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in res.items()})
        logging.getLogger(__name__).info("step %d eval %s", at, res)
        return res

    def plots():
        if s.train_plot:
            plot_curves(out / "train_log.csv", out / "train_curves.png", ys=list(s.train_plot[0]),
                        title=s.train_plot[1])
        if evalf is not None and s.eval_plot_title:
            plot_curves(out / "eval_log.csv", out / "eval_curves.png", title=s.eval_plot_title)

    def batches():
        if epoch_len is None:
            yield from data
            return
        epoch, skip = divmod(step, epoch_len)
        while True:
            if on_epoch is not None:
                on_epoch(epoch)
            end, before = step - skip + epoch_len, step
            for batch in (acc.skip_first_batches(data, skip) if skip else data):
                yield batch
                if step >= end:
                    break
            if step == before:
                raise InputError("the training data gave no usable batch in a whole pass")
            epoch, skip = epoch + 1, 0

    if eval_fn is not None and s.eval_at_start and step == 0 and main:
        last_eval = evaluate(0)
    it = batches()
    model.train()
    while step < plan.steps:
        batch = next(it)
        if batch is None:
            continue
        res = step_fn(batch)
        acc.backward(res.loss)
        if s.grad_clip:
            acc.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        sched.step()
        optimizer.zero_grad(set_to_none=True)
        more = after_step(step) if after_step is not None else None
        step += 1
        seen += res.batch_size
        bar.update(1)
        # 4. a time limit: measure the rate after start-up (workers, kernels), then re-plan once
        if s.time_limit_s and step == start + s.plan_window[0]:
            t_mark = time.time()
        if s.time_limit_s and t_mark is not None and step == start + s.plan_window[1]:
            rate = (s.plan_window[1] - s.plan_window[0]) / max(time.time() - t_mark, 1e-6)
            plan = plan_steps(s.steps, s.time_limit_s, step=step, rate=rate, elapsed_s=time.time() - t0)
            if acc.num_processes > 1:           # one plan for all: processes that disagree would deadlock
                from accelerate.utils import broadcast_object_list
                plan = broadcast_object_list([plan])[0]
            if plan.limited:
                sched = cosine_schedule(optimizer, plan.steps, s.warmup, step, s.min_lr_ratio)
                bar.total = plan.steps
        # 5. cadence: log, evaluate, checkpoint
        last = step >= plan.steps
        if main and (step % s.log_every == 0 or last):
            loss = res.loss.item()
            row = {k: float(v) for k, v in {**res.metrics, **(more or {})}.items()}
            logf.write(step=step, epoch=epoch_of(step), loss=loss, lr=sched.get_last_lr()[0],
                       samples_per_s=seen * acc.num_processes / (time.time() - t0), **row)
            bar.set_postfix(loss=f"{loss:.4g}")
        if eval_fn is not None and main and ((s.eval_every and step % s.eval_every == 0) or last):
            last_eval = evaluate(step)
        end_epoch = s.save_each_epoch and epoch_len and step % epoch_len == 0
        if step % s.save_every == 0 or last or end_epoch:
            save_training_state(acc, ckpt_dir, step, config, {"eval": last_eval}, objects)
            if main:
                plots()
    bar.close()
    acc.wait_for_everyone()
    if main:
        logf.close()
        if evalf is not None:
            evalf.close()
        plots()
    wall = time.time() - t0
    return LoopResult(step, wall, last_eval, seen * acc.num_processes / max(wall, 1e-9), plan)
