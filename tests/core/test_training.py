"""Core's one training loop: resume == uninterrupted, damaged checkpoints, time-limit plans, schedule."""
import csv
import math
import time

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from clipkit.core.errors import InputError
from clipkit.core.training import (LoopSettings, RngStates, StepOutput, cosine_schedule, export_dtype, plan_steps,
                                   train_loop)


class Crash(Exception):
    pass


def _run(out, steps=8, resume=False, crash_at=None, **kw):
    """A tiny seeded run: shuffled data over epochs, dropout (the global RNG) and noise from a generator."""
    from accelerate.utils import set_seed

    from clipkit.core.dist import accelerator
    acc = accelerator()
    set_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    model, opt, loader = acc.prepare(model, opt, loader)
    done = []

    def step_fn(batch):
        if crash_at is not None and len(done) == crash_at:
            raise Crash
        done.append(1)
        xb, yb = batch
        xb = xb + 0.1 * torch.randn(xb.shape, generator=gen)
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        return StepOutput(loss, len(xb), {"gnoise": torch.rand(1, generator=gen)})
    settings = LoopSettings(out_dir=out, steps=steps, warmup=2, log_columns=["step", "loss", "gnoise", "lr"],
                            log_every=1, save_every=3, eval_every=4, eval_columns=["step", "w"], resume=resume,
                            progress=False, **kw)
    run = train_loop(acc, model, opt, loader, step_fn, settings, rng=RngStates({"gen": gen}),
                     eval_fn=lambda step: {"w": float(sum(p.detach().sum() for p in model.parameters()))})
    return run, acc.unwrap_model(model)


def _rows(path):
    with open(path) as f:
        return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in csv.DictReader(f)]


def test_resume_equals_uninterrupted(tmp_path):
    """Killed after the checkpoint of step 3 (in the first pass over the shuffled data), resumed: the same
    logs and weights as the uninterrupted run, through the next epoch. (A run resumed in a later epoch
    of shuffled data sees another order: the DataLoader's generator is not checkpointed.)"""
    ref, ref_model = _run(tmp_path / "ref")
    assert ref.steps == 8
    with pytest.raises(Crash):
        _run(tmp_path / "run", crash_at=4)
    assert len(_rows(tmp_path / "run" / "train_log.csv")) == 4
    run, model = _run(tmp_path / "run", resume=True)
    assert run.steps == 8
    for a, b in zip(ref_model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    for f in ("train_log.csv", "eval_log.csv"):
        assert _rows(tmp_path / "run" / f) == _rows(tmp_path / "ref" / f), f
    assert [r["step"] for r in _rows(tmp_path / "run" / "eval_log.csv")] == ["4", "8"]


def test_damaged_or_missing_checkpoint_is_a_one_line_error(tmp_path):
    with pytest.raises(InputError, match="no checkpoint"):
        _run(tmp_path / "none", resume=True)
    _run(tmp_path / "run", steps=3)
    (tmp_path / "run" / "checkpoint" / "model.safetensors").write_bytes(b"\0" * 8)
    with pytest.raises(InputError, match="damaged") as e:
        _run(tmp_path / "run", steps=4, resume=True)
    assert "\n" not in str(e.value)


def test_interrupted_swap_is_repaired(tmp_path):
    import os
    _run(tmp_path / "run", steps=3)
    ck = tmp_path / "run" / "checkpoint"
    os.replace(ck, tmp_path / "run" / "checkpoint.old")        # killed between the two renames of a swap
    run, _ = _run(tmp_path / "run", steps=6, resume=True)
    assert run.steps == 6 and ck.is_dir() and not (tmp_path / "run" / "checkpoint.old").exists()
    assert [r["step"] for r in _rows(tmp_path / "run" / "train_log.csv")] == [str(i) for i in range(1, 7)]


def test_plan_steps():
    p = plan_steps(1000, 10.0, step=300, rate=50.0, elapsed_s=6.0)
    assert p.steps == 300 + int(50 * 4 * 0.95) and p.limited and p.requested == 1000
    assert plan_steps(1000, None, step=300, rate=50.0, elapsed_s=6.0).steps == 1000
    assert not plan_steps(400, 100.0, step=300, rate=50.0, elapsed_s=6.0).limited
    assert plan_steps(1000, 5.0, step=300, rate=50.0, elapsed_s=9.0).steps == 301   # out of time: one more


def test_time_limit_replans_and_the_schedule_still_ends(tmp_path):
    from accelerate.utils import set_seed

    from clipkit.core.dist import accelerator
    acc = accelerator()
    set_seed(0)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model, opt = acc.prepare(model, opt)

    def batches():
        while True:
            yield torch.ones(3, 2)

    def step_fn(x):
        time.sleep(0.02)
        return StepOutput(model(x).pow(2).mean(), len(x))
    settings = LoopSettings(out_dir=tmp_path, steps=10_000, log_columns=["step", "loss", "lr"], log_every=10_000,
                            save_every=10_000, time_limit_s=0.5, plan_window=(2, 6), progress=False)
    run = train_loop(acc, model, opt, batches(), step_fn, settings)
    assert run.plan.limited and 6 < run.steps < 100 and run.steps == run.plan.steps
    assert settings.steps == 10_000                                   # the config is not changed
    last = _rows(tmp_path / "train_log.csv")[-1]
    assert int(last["step"]) == run.steps and math.isclose(float(last["lr"]), 0.05, rel_tol=1e-4)


def test_schedule_and_export_dtypes():
    opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=2.0)
    sched = cosine_schedule(opt, total=10, warmup=4)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:4] == [0.0, 0.5, 1.0, 1.5] and lrs[4] == 2.0           # linear warmup from 0 (transformers)
    assert math.isclose(sched.get_last_lr()[0], 2.0 * 0.05)            # cosine down to 5%
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert export_dtype("fp32") is torch.float32 and export_dtype("bf16") is torch.bfloat16
    with pytest.raises(InputError, match="fp16"):
        export_dtype("int8")
