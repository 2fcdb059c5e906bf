"""Fault injection (issue: nothing written outside --out, nothing hangs, nothing lost on resume).

The scenarios in ``faults.py`` run the real CLI in subprocesses with a time bound; here each runs once
and must end with zeros. ``bench/reliability.py`` repeats them for the table in BENCHMARKS.md.
"""
from __future__ import annotations

import os
import random
import threading
import time

import pytest
import torch

import faults
from faults import Outcome, make_images

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", list(faults.SCENARIOS))
def test_scenario(name, tmp_path, monkeypatch):
    # in the suite, non-kill runs go through CliRunner (a process start costs seconds here); one FIFO
    # run and every kill run are real subprocesses. bench/reliability.py runs all as subprocesses.
    monkeypatch.setattr(faults, "MODE", "inprocess")
    o: Outcome = faults.SCENARIOS[name](tmp_path)
    assert o.runs > 0
    assert o.ok, o.notes


# ---------------------------------------------------------------------------------------------
# in-process checks of the pieces (fast)
# ---------------------------------------------------------------------------------------------

def test_cache_does_not_remember_transient_failures(tmp_path, monkeypatch, shapes_scorer):
    """A decode timeout is retried on the next run (the cause may be gone); a corrupt file is not."""
    import clipkit.core.io as io
    from clipkit.core.cache import EmbeddingCache
    from clipkit.core.embedding import embed_files
    paths = make_images(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "bad.png").write_bytes(b"garbage")
    paths.append(tmp_path / "imgs" / "bad.png")
    cache = EmbeddingCache(tmp_path / "c", shapes_scorer.spec, shapes_scorer.preprocess)
    real = io._to_rgb

    def slow(im, background):
        time.sleep(3)
        return real(im, background)
    monkeypatch.setattr(io, "_to_rgb", slow)
    first = embed_files(paths[:1], shapes_scorer, cache=cache, timeout_s=0.3)
    assert first.paths == [] and "longer than" in first.skipped[0]["reason"]
    monkeypatch.setattr(io, "_to_rgb", real)
    second = embed_files(paths, shapes_scorer, cache=cache, timeout_s=30)
    assert second.paths == [str(p) for p in paths[:3]]          # the timed-out file is retried
    assert [s["reason"] for s in second.skipped] == ["not an image Pillow can identify"]
    third = embed_files(paths, shapes_scorer, cache=cache, timeout_s=30)
    assert third.cached == 3 and third.skipped == second.skipped   # the corrupt file is remembered


def test_fifo_and_special_files_never_opened(tmp_path):
    from clipkit.core.errors import ImageLoadError
    from clipkit.core.io import load_image
    fifo = tmp_path / "p.png"
    os.mkfifo(fifo)
    t0 = time.time()
    with pytest.raises(ImageLoadError, match="not a regular file") as e:
        load_image(fifo)
    assert time.time() - t0 < 5 and e.value.permanent is False
    with pytest.raises(ImageLoadError, match="is a directory"):
        load_image(tmp_path)
    os.symlink(tmp_path / "nowhere.png", tmp_path / "dangling.png")
    with pytest.raises(ImageLoadError, match="no such file"):
        load_image(tmp_path / "dangling.png")


def test_unreadable_file_named_on_the_command_line_is_skipped(tmp_path):
    from click.testing import CliRunner

    from clipkit.cli.main import cli
    imgs = make_images(tmp_path / "imgs", 2)
    os.symlink(tmp_path / "nowhere.png", tmp_path / "dangling.png")
    for args in (["score", tmp_path / "dangling.png", imgs[0], "-t", "a red shape"],
                 ["classify", tmp_path / "dangling.png", imgs[0], "--labels", "red,blue"]):
        res = CliRunner().invoke(cli, ["-q", *map(str, args), "--json"])
        assert res.exit_code == 0, res.output
        assert '"reason": "no such file"' in res.stdout


def test_stderr_holds_only_clipkit_lines(tmp_path):
    """Third-party warnings only with -v (run as a subprocess: warnings filters are process state)."""
    imgs = make_images(tmp_path / "imgs", 2)
    r = faults.clipkit(["caption", *imgs], tmp_path / "cache", timeout=180)
    assert r.rc == 0, r.err
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert all(ln.split(":")[0] in ("note", "warning", "error", "info") for ln in lines), lines


def test_concurrent_reranks_share_a_cache(tmp_path):
    """Two writers on one cache at the same time: both finish, same ranking as alone."""
    make_images(tmp_path / "imgs", 60)
    args = ["-q", "rerank", tmp_path / "imgs", "-q", "a red circle", "--json", "--cache", tmp_path / "c",
            "--batch-size", "8", "--workers", "0"]
    runs = [None, None]

    def go(k):
        runs[k] = faults.clipkit(args, tmp_path / "xdg")
    ts = [threading.Thread(target=go, args=(k,)) for k in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    alone = faults.clipkit(args[:-4] + ["--no-cache"], tmp_path / "xdg")
    assert all(r.rc == 0 for r in runs), [r.err for r in runs]
    import json
    want = json.loads(alone.out)["results"]
    assert all(json.loads(r.out)["results"] == want for r in runs)


# ---------------------------------------------------------------------------------------------
# checkpoints and logs: unit level (output files: tests/core/test_outputs.py)
# ---------------------------------------------------------------------------------------------

def test_checkpoint_survives_leftovers_and_interrupted_swaps(tmp_path):
    from clipkit.core.dist import accelerator
    from clipkit.core.errors import InputError
    from clipkit.core.training import RngStates, load_training_state, save_training_state
    acc = accelerator()
    model = torch.nn.Linear(3, 2)
    model, opt = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    gen = torch.Generator().manual_seed(1)
    rng = RngStates({"g": gen, "py": random.Random(3)})
    ck = tmp_path / "checkpoint"
    (tmp_path / "checkpoint.old").mkdir()                  # from an earlier crash
    (tmp_path / "checkpoint.old" / "junk").write_text("x")
    save_training_state(acc, ck, 5, {"a": 1}, objects=[rng])
    save_training_state(acc, ck, 6, {"a": 1}, objects=[rng])
    assert not list(ck.glob("custom_checkpoint_*")) and not any(p.suffix == ".pkl" and "custom" in p.name
                                                                for p in ck.iterdir())
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]
    # a kill between the two renames of a swap: only checkpoint.old is left
    os.replace(ck, tmp_path / "checkpoint.old")
    want, want_py = torch.randn(3, generator=gen), rng.generators["py"].random()
    state = load_training_state(acc, ck, [rng], rng)
    assert state["step"] == 6 and ck.is_dir()
    assert torch.equal(torch.randn(3, generator=gen), want)  # the generators' states came back
    assert rng.generators["py"].random() == want_py
    (ck / "model.safetensors").write_bytes(b"\0" * 8)
    with pytest.raises(InputError, match="damaged"):
        load_training_state(acc, ck, [rng], rng)


def test_resumed_log_has_no_duplicate_rows(tmp_path):
    from clipkit.core.training import CsvLog
    log = CsvLog(tmp_path / "train_log.csv", ["step", "loss"])
    for s in (10, 20, 30, 40, 50):
        log.write(step=s, loss=float(s))
    log.close()
    with open(tmp_path / "train_log.csv", "a") as f:
        f.write("60,0.")                                  # half a row: killed mid-write
    log = CsvLog(tmp_path / "train_log.csv", ["step", "loss"], append=True, resume_from=40)
    log.write(step=50, loss=5.0)
    log.close()
    lines = (tmp_path / "train_log.csv").read_text().splitlines()
    assert lines == ["step,loss", "10,10", "20,20", "30,30", "40,40", "50,5"]
