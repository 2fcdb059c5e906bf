"""Speed of the main job, `clipkit generate PROMPT -n 4`, against diffusers' own unguided sampler, and
the strict quality of each speed lever (issue: the default generate <= 2.0x DDIMPipeline's wall time).

    python bench/generate_speed.py speed [--reps 3] [--levers NAME ...] [--threads-check]
    python bench/generate_speed.py quality --lever NAME [--prompts 40] [--prompt-seed 1] [--seed 1000] [--two]
    python bench/generate_speed.py profile [--lever NAME]

``speed``: whole processes, run one after another and alternated (baseline, lever 1, lever 2, ...,
baseline, lever 1, ...), ``--reps`` rounds; each cell is the median wall time of its runs, each ratio the
median over rounds of (lever / the baseline of the same round). The baseline is a separate python
process that loads the bundled UNet and scheduler with diffusers and runs ``DDIMPipeline(batch_size=4,
num_inference_steps=25, eta=0)`` unguided (torch's default threads, as a user runs it; ``--baseline-threads
1`` adds the same with one torch thread). Every lever runs the real CLI (``python -m clipkit -q generate
PROMPT -n 4 --seed S --out DIR --overwrite`` plus its flags). The machine's load (``os.getloadavg``)
is printed beside every run and the table.

``quality``: a lever's strict quality on held-out prompts, through ``clipkit.generate`` (the CLI's
defaults and bytes): prompt i (bench/guidance.py's draw, naming colour, shape and position; ``--two``:
two objects) is generated with ``n=1`` (so best-of-3 keeps one of three candidates, as
BENCHMARKS' "default" rows) from seed ``seed + 4 i``, and the oracle judges the kept image strictly
(exactly the objects named, every attribute right, nothing else). One torch thread.

``profile``: where one default run spends its time (imports, model loads, UNet, CLIP forward and
backward, selection), by wall clock in one process; the UNet runs after the CLIP, not beside it, so
that each part is timed alone (``--overlap``: as clipkit runs it).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

PROMPT = "a red circle at the top left"

#: lever name -> (global CLI options, `clipkit generate PROMPT -n 4` flags, the same as API options)
LEVERS: dict[str, tuple[list[str], list[str], dict]] = {
    "default": ([], [], {}),
    "before: one candidate at a time, torch's threads": (["--threads", "0"], ["--batch-size", "1"],
                                                         {"batch_size": 1, "threads": 0}),
    "one candidate at a time (1 thread)": ([], ["--batch-size", "1"], {"batch_size": 1}),
    "torch's threads (2 here)": (["--threads", "0"], [], {"threads": 0}),
    "select by the guide's score alone": ([], ["--select", "clip"], {"select": "clip"}),
    "guide while t/T >= 0.3": ([], ["--guide-stop", "0.3"], {"guide_stop": 0.3}),
    "guide while t/T >= 0.2": ([], ["--guide-stop", "0.2"], {"guide_stop": 0.2}),
    "20 DDIM steps": ([], ["--steps", "20"], {"steps": 20}),
    "15 DPM-Solver++ steps": ([], ["--steps", "15", "--scheduler", "dpmpp"], {"steps": 15, "scheduler": "dpmpp"}),
    "2 views": ([], ["--views", "2"], {"views": 2}),
    "drafts: 12 -> 4 at step 8": ([], ["--best-of", "1", "--drafts", "3", "--draft-steps", "8"],
                                  {"best_of": 1, "drafts": 3, "draft_steps": 8}),
    "best-of 2": ([], ["--best-of", "2"], {"best_of": 2}),
}

BASELINE = r"""
import time, sys
t0 = time.time()
import torch
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel
from clipkit.core.registry import bundled_path
p = bundled_path("shapes", "diffusion")
pipe = DDIMPipeline(unet=UNet2DModel.from_pretrained(p / "unet"), scheduler=DDIMScheduler.from_pretrained(p / "scheduler"))
pipe.set_progress_bar_config(disable=True)
t1 = time.time()
pipe(batch_size=4, num_inference_steps=25, eta=0.0, generator=torch.Generator().manual_seed(0))
print(f"load {t1 - t0:.2f} s, sample {time.time() - t1:.2f} s", file=sys.stderr)
"""


def load() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def timed(cmd: list[str], env: dict | None = None) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t
    if r.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr.strip()}")
    return wall


def speed(args) -> None:
    arms: list[tuple[str, tuple, dict]] = [("baseline: DDIMPipeline, unguided, 4 x 25 steps", ([], []), {})]
    if args.baseline_threads:
        arms.append(("baseline, 1 torch thread", ([], []), {"OMP_NUM_THREADS": "1"}))
    for name in args.levers:
        arms.append((name, LEVERS[name][:2], {}))
    out = Path(tempfile.mkdtemp(prefix="generate_speed_"))
    times: dict[str, list[float]] = {a[0]: [] for a in arms}
    loads: list[str] = [load()]
    print(f"# {len(arms)} arms x {args.reps} rounds, alternated; load {loads[0]} (1/5/15 min) on "
          f"{os.cpu_count()} cores", flush=True)
    for rnd in range(args.reps):
        for i, (name, flags, env) in enumerate(arms):
            if i == 0 or name.startswith("baseline"):
                cmd = [sys.executable, "-c", BASELINE]
            else:
                cmd = [sys.executable, "-m", "clipkit", "-q", *flags[0], "generate", args.prompt, "-n", "4",
                       "--seed", str(args.seed), "--out", str(out / str(i)), "--overwrite", *flags[1]]
            w = timed(cmd, env)
            times[name].append(w)
            loads.append(load())
            print(f"round {rnd + 1}: {name}: {w:.1f} s (load {loads[-1]})", flush=True)
    base = times[arms[0][0]]
    one = times[arms[1][0]] if args.baseline_threads else None
    print(f"\nload before/after: {loads[0]} / {loads[-1]} (1/5/15-min averages, {os.cpu_count()} cores)\n")
    print("| arm | flags | wall s (median of %d) | per round | x baseline (median of per-round ratios) |%s"
          % (args.reps, " x baseline on 1 thread |" if one else ""))
    print("|---|---|---|---|---|" + ("---|" if one else ""))
    for name, flags, env in arms:
        ratio = statistics.median(t / b for t, b in zip(times[name], base))
        shown = " ".join([*flags[0], *flags[1]]) or ("OMP_NUM_THREADS=1" if env else "-")
        rounds = ", ".join(f"{t:.0f}" for t in times[name])
        extra = f" {statistics.median(t / b for t, b in zip(times[name], one)):.2f} |" if one else ""
        print(f"| {name} | `{shown}` | {statistics.median(times[name]):.1f} | {rounds} | **{ratio:.2f}** |{extra}")


def quality(args) -> None:
    import numpy as np
    import torch
    sys.path.insert(0, str(Path(__file__).parent))
    from guidance import draw_prompts

    import clipkit
    from clipkit.shapes.oracle import read_attributes, strict_match
    torch.set_num_threads(1)
    opts = {}
    for name in args.lever:
        opts.update(LEVERS[name][2] if name in LEVERS else json.loads(name))
    expected, texts = draw_prompts(args.prompts, args.prompt_seed, True, args.two)
    ok, counts, t_all, rows = 0, Counter(), 0.0, []
    for i, (objs, prompt) in enumerate(zip(expected, texts)):
        t = time.perf_counter()
        res = clipkit.generate(prompt, n=1, seed=args.seed + 4 * i, **{"threads": 1, **opts})
        t_all += time.perf_counter() - t
        im = res.images[0]
        x = torch.from_numpy(np.asarray(im.image).copy()).permute(2, 0, 1).float() / 255
        found = read_attributes(x)
        hit = bool(strict_match(found, objs))
        ok += hit
        counts[min(len(found), 3)] += 1
        rows.append({"prompt": prompt, "seed": im.seed, "strict": hit, "objects": len(found)})
        print(f"{i}: {prompt}: {'ok' if hit else 'MISS'} (seed {im.seed}, {len(found)} objects) "
              f"[{ok}/{i + 1}, {t_all / (i + 1):.1f} s/prompt, load {load()}]", flush=True)
    n = len(texts)
    kind = "two-object" if args.two else "single-object"
    print(f"\n| lever | prompts | strict | objects 0/1/2/3+ | s per prompt (1 thread) |\n|---|---|---|---|---|")
    print(f"| {' + '.join(args.lever)} | {n} {kind} (prompt seed {args.prompt_seed}, seeds {args.seed} + 4i) | "
          f"**{ok}/{n} ({ok / n:.2f})** | {'/'.join(str(counts[j]) for j in range(4))} | {t_all / n:.1f} |")
    if args.record:
        Path(args.record).write_text(json.dumps({"lever": args.lever, "opts": opts, "two": args.two,
                                                 "prompt_seed": args.prompt_seed, "seed": args.seed,
                                                 "rows": rows, "strict": ok, "n": n}, indent=1))


def profile(args) -> None:
    """Wall-clock split of one default run in this process: imports, loads, UNet, CLIP, selection."""
    t0 = time.perf_counter()
    import torch
    t_torch = time.perf_counter()
    import clipkit.api
    import clipkit.cli.generate  # noqa: F401
    import open_clip  # noqa: F401  (what loading a bundled CLIP imports)
    t_imp = time.perf_counter()
    from clipkit.captioning import captioner as cap_mod
    from clipkit.core import scorer as scorer_mod
    from clipkit.guidance import backends, diffusion, pipeline
    spent: Counter = Counter()

    def timer(obj, attr, key):
        fn = getattr(obj, attr)

        def wrapped(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t
        setattr(obj, attr, wrapped)
    timer(scorer_mod, "load_scorer", "load: CLIPs")
    timer(pipeline, "load_scorer", "load: CLIPs")
    timer(pipeline, "load_diffusion", "load: diffusion")
    timer(cap_mod, "load_captioner", "load: captioner (+ its CLIP)")
    timer(clipkit.api, "load_captioner", "load: captioner (+ its CLIP)")
    timer(backends.PixelDiffusion, "_model", "sampling: UNet forward")
    timer(cap_mod.CaptionEndSelector, "__call__", "selection: captioner")
    from clipkit.guidance import wrapper
    orig_views = wrapper.GuidedDenoiser.views_loss

    def views_loss(self, *a, **k):
        t = time.perf_counter()
        try:
            return orig_views(self, *a, **k)
        finally:
            spent["sampling: CLIP forward (views)"] += time.perf_counter() - t
    wrapper.GuidedDenoiser.views_loss = views_loss
    orig_grad = torch.autograd.grad

    def grad(*a, **k):
        t = time.perf_counter()
        try:
            return orig_grad(*a, **k)
        finally:
            spent["sampling: CLIP backward"] += time.perf_counter() - t
    torch.autograd.grad = grad
    from clipkit.guidance.methods import xt
    xt.OVERLAP = args.overlap            # off by default here: with it, the UNet's time hides under the CLIP's
    opts = {}
    for name in args.lever:
        opts.update(LEVERS[name][2])
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        first = []
        threads = []
        res = clipkit.api.generate(PROMPT, n=4, seed=0, out_dir=out, on_step=lambda d, n: threads.append(
                                   torch.get_num_threads()) if d == 1 else None,
                                   on_image=lambda im: first.append(time.perf_counter() - t0), **opts)
        t_gen = time.perf_counter() - t
    total = time.perf_counter() - t0
    shown = {"imports: torch": t_torch - t0, "imports: clipkit, diffusers, open_clip": t_imp - t_torch}
    shown.update(spent)
    sampled = sum(v for k, v in spent.items() if k.startswith("sampling"))
    other = t_gen - sum(spent.values())
    shown["sampling: rest (steps, views, scheduler, ranking, PNG)"] = other
    print(f"# profile of clipkit.generate({PROMPT!r}, n=4) {' + '.join(args.lever) or '(defaults)'}: "
          f"{threads[0]} torch thread(s), UNet beside the CLIP: {'on' if args.overlap else 'off'}, "
          f"load {load()}; {res.candidates} candidates")
    print("| part | s | share |\n|---|---|---|")
    for k, v in shown.items():
        print(f"| {k} | {v:.2f} | {v / total:.0%} |")
    print(f"| **total (process so far)** | **{total:.2f}** | |")
    print(f"\nfirst image ready at {first[0]:.1f} s, last at {first[-1]:.1f} s; sampling {sampled:.1f} s")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--reps", type=int, default=3)
    s.add_argument("--levers", nargs="*", default=["default"], choices=list(LEVERS))
    s.add_argument("--baseline-threads", action="store_true", help="also the baseline on one torch thread")
    s.add_argument("--prompt", default=PROMPT)
    s.add_argument("--seed", type=int, default=0)
    q = sub.add_parser("quality")
    q.add_argument("--lever", nargs="*", default=["default"],
                   help="lever names (LEVERS) or JSON objects of generate options, applied in order")
    q.add_argument("--prompts", type=int, default=40)
    q.add_argument("--prompt-seed", type=int, default=1)
    q.add_argument("--seed", type=int, default=1000)
    q.add_argument("--two", action="store_true")
    q.add_argument("--record", default=None)
    p = sub.add_parser("profile")
    p.add_argument("--lever", nargs="*", default=[])
    p.add_argument("--overlap", action="store_true", help="run the UNet beside the CLIP (the default in clipkit)")
    args = ap.parse_args()
    {"speed": speed, "quality": quality, "profile": profile}[args.mode](args)


if __name__ == "__main__":
    main()
