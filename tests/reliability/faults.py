"""Fault injection through the real CLI: each scenario returns an :class:`Outcome` (hangs, lost results,
bytes written outside the output folder, files overwritten without --overwrite, exit codes).

Shared by ``tests/reliability/test_faults.py`` (each scenario once, asserting zeros) and
``bench/reliability.py`` (each scenario many times, printing the table in BENCHMARKS.md).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

#: every subprocess gets this many seconds; running past it counts as a hang
TIME_BOUND_S = 240

TINY_CLIP_CFG = {"embed_dim": 32,
                 "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
                 "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


@dataclass
class Outcome:
    runs: int = 0
    hangs: int = 0
    lost: int = 0              # results missing or different from an uninterrupted run
    outside: int = 0           # files created or changed outside the output folder
    clobbered: int = 0         # files replaced without --overwrite (inputs included)
    bad_exit: int = 0          # exit codes / messages not as documented
    notes: list = field(default_factory=list)

    def add(self, other: "Outcome") -> "Outcome":
        for k in ("runs", "hangs", "lost", "outside", "clobbered", "bad_exit"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.notes += other.notes
        return self

    @property
    def ok(self) -> bool:
        return not (self.hangs or self.lost or self.outside or self.clobbered or self.bad_exit)


@dataclass
class Run:
    rc: int | None             # None: killed by us (time bound or injected SIGKILL)
    out: str
    err: str
    hung: bool = False


def env(cache: Path) -> dict:
    e = dict(os.environ, XDG_CACHE_HOME=str(cache), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    e.pop("COLUMNS", None)
    return e


#: "subprocess" (the real CLI, as a user runs it; the bench) or "inprocess" (click's CliRunner, with
#: the same time bound by SIGALRM; the test suite, where a process start costs seconds). SIGKILL
#: scenarios always use subprocesses.
MODE = os.environ.get("CLIPKIT_FAULTS_MODE", "subprocess")


class _Hung(BaseException):
    pass


def _alarm(signum, frame):
    raise _Hung()


def _inprocess(args, cache: Path, timeout: float) -> Run:
    from click.testing import CliRunner

    from clipkit.cli.main import cli
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        res = CliRunner().invoke(cli, [str(a) for a in args], env={"XDG_CACHE_HOME": str(cache)},
                                 catch_exceptions=True)
    except _Hung:
        return Run(None, "", "", hung=True)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    if isinstance(res.exception, _Hung):
        return Run(None, res.stdout, res.stderr, hung=True)
    err = res.stderr
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        import traceback
        err += "Traceback\n" + "".join(traceback.format_exception(res.exception))
    return Run(res.exit_code, res.stdout, err)


def clipkit(args, cache: Path, cwd=None, timeout: float = TIME_BOUND_S, kill_after: float | None = None,
            mode: str | None = None) -> Run:
    """Run ``clipkit ARGS``; ``kill_after`` seconds: SIGKILL it (a crash; always a subprocess)."""
    if (mode or MODE) == "inprocess" and kill_after is None and cwd is None:
        return _inprocess(args, cache, timeout)
    p = subprocess.Popen([sys.executable, "-m", "clipkit.cli.main", *map(str, args)], cwd=cwd, env=env(cache),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=kill_after if kill_after is not None else timeout)
        return Run(p.returncode, out, err)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        return Run(None, out, err, hung=kill_after is None)


def snapshot(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, str]:
    """path -> sha256 (or link target) of everything under ``root`` except ``skip`` folders."""
    out = {}
    skip_s = tuple(str(s) for s in skip)
    for dirpath, dirs, files in os.walk(root):
        if dirpath.startswith(skip_s):
            dirs[:] = []
            continue
        for f in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            p = os.path.join(dirpath, f)
            if p.startswith(skip_s):
                continue
            if os.path.islink(p):
                out[p] = "link:" + os.readlink(p)
            elif os.path.isfile(p):
                out[p] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
            else:
                out[p] = "special"
    return out


def one_line_error(run: Run) -> bool:
    """Exit 2 with an ``Error: ...`` line and no traceback."""
    return run.rc == 2 and "Error: " in run.err and "Traceback" not in run.err


def expect_errors(o: Outcome, commands, cache: Path) -> None:
    """Each command must end with a one-line error (exit 2)."""
    for args in commands:
        o.runs += 1
        r = clipkit(["-q", *args], cache)
        o.hangs += r.hung
        if not one_line_error(r):
            o.bad_exit += 1
            o.notes.append(f"{args[0]}: rc={r.rc} {r.err[-200:]}")


# --------------------------------------------------------------------------------------------
# the world the scenarios play in
# --------------------------------------------------------------------------------------------

def make_images(folder: Path, n: int, size: int = 32, seed: int = 0) -> list[Path]:
    from clipkit.shapes.data import render_pil
    from clipkit.shapes.world import sample_scene, split_seed
    folder.mkdir(parents=True, exist_ok=True)
    scenes = [sample_scene(split_seed("test", seed * 10_000 + i), n_objects=1) for i in range(n)]
    paths = []
    for i, im in enumerate(render_pil(scenes, size)):
        paths.append(folder / f"{i:04d}.png")
        im.save(paths[-1])
    return paths


# --------------------------------------------------------------------------------------------
# scenarios
# --------------------------------------------------------------------------------------------

def symlink_outputs(tmp: Path) -> Outcome:
    """Links planted under output names (to a file outside, and dangling) with --overwrite: the links
    are replaced, nothing outside the output folder is written."""
    o = Outcome(runs=1)
    tmp.mkdir(parents=True, exist_ok=True)
    cache, outside, work = tmp / "cache", tmp / "outside", tmp / "work"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_text("precious")
    imgs = make_images(work / "imgs", 4)
    out = work / "out"
    out.mkdir()
    cases = {   # output name -> command
        "a-red-circle-0.png": ["generate", "a red circle", "-n", "1", "--steps", "2", "--seed", "0", "--best-of", "1",
                               "--out", out, "--overwrite"],
        "rank.csv": ["rerank", work / "imgs", "-q", "a red shape", "--csv", out / "rank.csv", "--overwrite"],
        "sheet.png": ["rerank", work / "imgs", "-q", "a red shape", "--sheet", out / "sheet.png", "--overwrite"],
        "emb.safetensors": ["embed", work / "imgs", "--out", out / "emb.safetensors", "--overwrite"],
        "plot.png": ["score", *imgs[:2], "-t", "a red shape", "--plot", out / "plot.png", "--overwrite"],
    }
    for k, (name, args) in enumerate(cases.items()):
        link = out / name
        dangling_target = outside / f"new-{k}"
        for target in (victim, dangling_target):
            if os.path.lexists(link):
                os.unlink(link)
            os.symlink(target, link)
            if name.endswith(".png") and name.startswith("a-red"):       # the sidecar too
                side = link.with_suffix(".json")
                if os.path.lexists(side):
                    os.unlink(side)
                os.symlink(outside / f"side-{k}", side)
            before = snapshot(outside)
            r = clipkit(["-q", *args], cache)
            o.hangs += r.hung
            if r.rc != 0:
                o.bad_exit += 1
                o.notes.append(f"{name}: rc={r.rc} {r.err.strip()[-200:]}")
            if snapshot(outside) != before or victim.read_text() != "precious":
                o.outside += 1
                o.notes.append(f"{name}: wrote outside")
            if os.path.islink(link) or not link.is_file():
                o.lost += 1
                o.notes.append(f"{name}: output not a regular file in --out")
    return o


def fifo_inputs(tmp: Path) -> Outcome:
    """A FIFO named on the command line and inside a folder: skipped as 'not a regular file', no hang;
    as a query image: a one-line error."""
    o = Outcome()
    tmp.mkdir(parents=True, exist_ok=True)
    cache = tmp / "cache"
    imgs = make_images(tmp / "imgs", 3)
    fifo = tmp / "imgs" / "pipe.png"
    os.mkfifo(fifo)
    runs = [
        (["score", fifo, imgs[0], "-t", "a red shape", "--json"], 0),
        (["score", tmp / "imgs", "-t", "a red shape", "--json"], 0),
        (["classify", tmp / "imgs", "--labels", "red,blue", "--json"], 0),
        (["caption", fifo, imgs[0], "--json"], 0),
        (["rerank", tmp / "imgs", "-q", "a red shape", "--json"], 0),
        (["rerank", imgs[0], imgs[1], "--query-image", fifo], 2),
    ]
    for n, (args, want) in enumerate(runs):
        o.runs += 1
        r = clipkit(["-q", *args], cache, timeout=120, mode="subprocess" if n == 0 else None)
        o.hangs += r.hung
        ok = r.rc == want and (want == 2 and one_line_error(r) and "not a regular file" in r.err
                               or want == 0 and "not a regular file" in r.out)
        if not ok:
            o.bad_exit += 1
            o.notes.append(f"{args[0]}: rc={r.rc} {(r.out + r.err).strip()[-200:]}")
    return o


def embed_killed(tmp: Path, n_images: int = 240, kills: int = 2, seed: int = 0) -> Outcome:
    """SIGKILL ``embed`` at random points, run it again until it finishes: the file equals an
    uninterrupted run's, bit for bit."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    rnd = random.Random(seed)
    o = Outcome()
    tmp.mkdir(parents=True, exist_ok=True)
    make_images(tmp / "imgs", n_images, seed=seed)
    (tmp / "imgs" / "broken.png").write_bytes(b"not an image")
    ref = tmp / "ref.safetensors"
    r = clipkit(["-q", "embed", tmp / "imgs", "--out", ref, "--batch-size", "16", "--workers", "0"], tmp / "c0")
    o.hangs += r.hung
    t_full = None
    for k in range(kills):
        o.runs += 1
        cache, out = tmp / f"c{k + 1}", tmp / f"out{k + 1}.safetensors"
        t0 = time.time()
        args = ["-q", "embed", tmp / "imgs", "--out", out, "--batch-size", "16", "--workers", "0"]
        first = clipkit(args, cache, kill_after=rnd.uniform(6, 14))
        t_full = t_full or (time.time() - t0)
        runs = 1
        while not out.exists() and runs < 5:
            again = clipkit(args, cache, kill_after=None if runs >= 2 else rnd.uniform(4, 10))
            o.hangs += again.hung
            runs += 1
        if first.rc not in (None, 0) or not out.exists():
            o.lost += 1
            o.notes.append(f"kill {k}: no output after {runs} runs")
            continue
        a, b = load_file(str(ref))["embeddings"], load_file(str(out))["embeddings"]
        with safe_open(str(ref), "pt") as f1, safe_open(str(out), "pt") as f2:
            same_meta = json.loads(f1.metadata()["paths"]) == json.loads(f2.metadata()["paths"]) and \
                json.loads(f1.metadata()["skipped"]) == json.loads(f2.metadata()["skipped"])
        if not (a.shape == b.shape and bool((a == b).all()) and same_meta):
            o.lost += 1
            o.notes.append(f"kill {k}: resumed file differs (max {float((a - b).abs().max()) if a.shape == b.shape else 'shape'})")
    return o


def rerank_killed(tmp: Path, n_images: int = 240, kills: int = 2, seed: int = 1) -> Outcome:
    """SIGKILL ``rerank`` while it fills its cache; the next run's ranking equals a fresh one's."""
    rnd = random.Random(seed)
    o = Outcome()
    tmp.mkdir(parents=True, exist_ok=True)
    make_images(tmp / "imgs", n_images, seed=seed)
    args = ["-q", "rerank", tmp / "imgs", "-q", "a red circle", "--json", "--batch-size", "16", "--workers", "0"]
    ref = clipkit(args + ["--no-cache"], tmp / "c0")
    o.hangs += ref.hung
    want = json.loads(ref.out)["results"]
    for k in range(kills):
        o.runs += 1
        cache = tmp / f"c{k + 1}"
        clipkit(args, cache, kill_after=rnd.uniform(6, 14))
        r = clipkit(args, cache)
        o.hangs += r.hung
        if r.rc != 0 or json.loads(r.out)["results"] != want:
            o.lost += 1
            o.notes.append(f"kill {k}: rc={r.rc}")
    return o


def train_killed(tmp: Path, kills: int = 1, seed: int = 2, steps: int = 12) -> Outcome:
    """SIGKILL ``train clip`` after its first checkpoint; ``--resume`` ends with the uninterrupted run's
    log (same losses, no duplicate steps)."""
    rnd = random.Random(seed)
    o = Outcome()
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = tmp / "tiny.json"
    cfg.write_text(json.dumps(TINY_CLIP_CFG))
    base = ["-q", "train", "clip", "--model-config", cfg, "--steps", steps, "--batch-size", "8",
            "--save-every", "4", "--log-every", "2", "--eval-every", "1000"]

    def log_rows(out: Path) -> list[tuple]:
        import csv
        with open(out / "train_log.csv") as f:
            return [(r["step"], r["loss"]) for r in csv.DictReader(f)]
    ref = clipkit(base + ["--out", tmp / "ref"], tmp / "cache")
    o.hangs += ref.hung
    want = log_rows(tmp / "ref")
    for k in range(kills):
        o.runs += 1
        out = tmp / f"run{k}"
        # kill once a checkpoint exists (not at a fixed time: start-up time varies with the load)
        p = subprocess.Popen([sys.executable, "-m", "clipkit.cli.main", *map(str, base + ["--out", out])],
                             env=env(tmp / "cache"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        t0 = time.time()
        while p.poll() is None and not (out / "checkpoint" / "state.json").exists() and time.time() - t0 < TIME_BOUND_S:
            time.sleep(0.05)
        time.sleep(rnd.uniform(0, 1.5))
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        r = clipkit(base + ["--out", out, "--resume"], tmp / "cache")
        o.hangs += r.hung
        got = log_rows(out) if (out / "train_log.csv").exists() else []
        steps_logged = [s for s, _ in got]
        if r.rc != 0 or len(steps_logged) != len(set(steps_logged)) or got != want:
            o.lost += 1
            o.notes.append(f"kill {k}: rc={r.rc} log {got} vs {want} {r.err[-300:]}")
    return o


def report_files(tmp: Path) -> Outcome:
    """Existing report files are refused without --overwrite, inputs always, before any work; missing
    folders are created."""
    o = Outcome()
    tmp.mkdir(parents=True, exist_ok=True)
    cache = tmp / "cache"
    imgs = make_images(tmp / "imgs", 3)
    existing = tmp / "existing.csv"
    existing.write_text("keep me")
    refused = [
        ["rerank", tmp / "imgs", "-q", "a red shape", "--csv", existing],
        ["rerank", tmp / "imgs", "-q", "a red shape", "--sheet", imgs[0], "--overwrite"],
        ["score", *imgs, "-t", "a red shape", "--plot", imgs[1], "--overwrite"],
        ["score", *imgs, "-t", "a red shape", "--plot", existing],
        ["embed", tmp / "imgs", "--out", imgs[2], "--overwrite"],
    ]
    before = snapshot(tmp, skip=(cache,))
    expect_errors(o, refused, cache)
    if snapshot(tmp, skip=(cache,)) != before:
        o.clobbered += 1
        o.notes.append("a refused run changed files")
    for args, made in [(["rerank", tmp / "imgs", "-q", "a red shape", "--csv", tmp / "new" / "r.csv"], tmp / "new" / "r.csv"),
                       (["score", *imgs, "-t", "x", "--plot", tmp / "new2" / "p.png"], tmp / "new2" / "p.png")]:
        o.runs += 1
        r = clipkit(["-q", *args], cache)
        if r.rc != 0 or not made.is_file():
            o.bad_exit += 1
            o.notes.append(f"{args[0]} into a new folder: rc={r.rc} {r.err[-200:]}")
    return o


def bad_inputs(tmp: Path) -> Outcome:
    """Exit 2 with one line for: NaN options, damaged cache (moved aside: exit 0), unusable cache
    folder (exit 0, no cache), damaged checkpoint, non-UTF-8 --texts."""
    o = Outcome()
    tmp.mkdir(parents=True, exist_ok=True)
    cache = tmp / "cache"
    imgs = make_images(tmp / "imgs", 3)
    two = []
    two.append(["rerank", tmp / "imgs", "-q", "a", "-q", "b", "--combine", "--weights", "1,nan"])
    two.append(["generate", "a red circle", "--clip-scale", "inf", "--out", tmp / "g"])
    (tmp / "texts.txt").write_bytes(b"a red circle\n\xff\xfe bad\n")
    two.append(["rerank", imgs[0], "--texts", tmp / "texts.txt"])
    ck = tmp / "run" / "checkpoint"
    ck.mkdir(parents=True)
    (ck / "state.json").write_text('{"step": 4')
    (ck / "model.safetensors").write_bytes(b"\x00" * 10)
    cfg = tmp / "tiny.json"
    cfg.write_text(json.dumps(TINY_CLIP_CFG))
    two.append(["train", "clip", "--model-config", cfg, "--out", tmp / "run", "--resume", "--steps", "8",
                "--batch-size", "4"])
    expect_errors(o, two, cache)
    # a damaged cache database: moved aside, rebuilt, the run succeeds
    ccache = tmp / "ccache"
    ok = clipkit(["-q", "rerank", tmp / "imgs", "-q", "a red shape", "--cache", ccache, "--json"], cache)
    dbs = list(ccache.glob("*.sqlite"))
    for db in dbs:
        db.write_bytes(b"garbage" * 100)
        for side in ("-wal", "-shm"):
            Path(str(db) + side).unlink(missing_ok=True)
    for args, check in [(["rerank", tmp / "imgs", "-q", "a red shape", "--cache", ccache, "--json"],
                         lambda r: list(ccache.glob("*.corrupt"))),
                        (["rerank", tmp / "imgs", "-q", "a red shape", "--cache", imgs[0], "--json"],
                         lambda r: "running without it" in r.err)]:
        o.runs += 1
        r = clipkit(args, cache)           # not -q: the warning is part of the contract
        o.hangs += r.hung
        if r.rc != 0 or json.loads(r.out)["results"] != json.loads(ok.out)["results"] or not check(r):
            o.bad_exit += 1
            o.notes.append(f"cache case: rc={r.rc} {r.err[-300:]}")
    return o


SCENARIOS = {
    "symlink planted under an output name (--overwrite)": symlink_outputs,
    "FIFO among the inputs / as the query": fifo_inputs,
    "report file exists / is an input / folder missing": report_files,
    "NaN/inf, damaged cache/checkpoint, non-UTF-8 texts": bad_inputs,
    "SIGKILL during embed, then rerun": embed_killed,
    "SIGKILL during rerank, then rerun": rerank_killed,
    "SIGKILL during train clip, then --resume": train_killed,
}
