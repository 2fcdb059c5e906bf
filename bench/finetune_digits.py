"""Evaluate and fine-tune the bundled Shapes CLIP on scikit-learn's handwritten digits (offline).

    OMP_NUM_THREADS=1 python bench/finetune_digits.py --out runs/digits_bench --docs docs   # BENCHMARKS.md

Steps (each a real `clipkit` command, run as a subprocess, timed):
 1. examples/make_digits.py -> an ImageFolder (train 1,078 / val 269 / test 450, 32 px, seed 0)
 2. `clipkit eval` zero-shot before fine-tuning; `clipkit eval --linear-probe` on frozen features
 3. `clipkit train clip --data DIGITS --init shapes --wise 0.25,0.5,0.75,0.9` (FLYP + WiSE-FT; the
    report measures every alpha on the digits test split and on Shapes colour/shape zero-shot)
 4. `clipkit eval` of the fine-tuned model (confusion matrix -> --docs), and of the best WiSE-FT model
 5. speed: images/s of `clipkit eval` vs `clipkit classify` on the same 450 test images, as whole
    commands and in one process (the work after the model is loaded), alternating, best of 3
Prints a markdown report and writes OUT/report.json (`--speed-only`: step 5 alone, OUT/speed.json).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def clipkit(*args, capture_json=True) -> tuple[dict | str, float]:
    cmd = [sys.executable, "-m", "clipkit.cli.main", "-q", *map(str, args)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return (json.loads(r.stdout) if capture_json else r.stdout), dt


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/digits_bench"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--eval-every", type=int, default=40)
    ap.add_argument("--wise", default="0.25,0.5,0.75,0.9")
    ap.add_argument("--docs", type=Path, default=None, help="copy the confusion matrices and WiSE plot here")
    ap.add_argument("--skip-train", action="store_true", help="reuse OUT/ft (report only)")
    ap.add_argument("--speed-only", action="store_true", help="only step 5 (eval vs classify speed)")
    args = ap.parse_args()
    out = args.out
    data = out / "digits"
    names = data / "class_names.json"
    report: dict = {"threads": os.environ.get("OMP_NUM_THREADS", "default")}
    if not data.exists():
        subprocess.run([sys.executable, str(ROOT / "examples" / "make_digits.py"), str(data)], check=True)
    if args.speed_only:
        report["speed"] = speed(data, names)
        (out / "speed.json").write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
        return

    # 2. before: zero-shot and the linear probe on frozen features
    zs, t = clipkit("eval", data, "--class-names", names, "--json", "--plot", out / "cm_before.png", "--overwrite")
    report["zero_shot_before"] = {"top1": zs["top1"], "top5": zs["top5"], "balanced": zs["balanced_accuracy"],
                                  "wall_s": round(t, 1)}
    lp, t = clipkit("eval", data, "--linear-probe", "--json")
    report["linear_probe"] = {"top1": lp["top1"], "C": lp["linear_probe"]["C"], "wall_s": round(t, 1)}
    lp10, t = clipkit("eval", data, "--linear-probe", "--shots", "10", "--json")
    report["linear_probe_10shot"] = {"top1": lp10["top1"], "C": lp10["linear_probe"]["C"]}

    # 3. FLYP fine-tuning + WiSE-FT
    ft = out / "ft"
    train_cmd = ["train", "clip", "--data", data, "--class-names", names, "--init", "shapes", "--out", ft,
                 "--steps", args.steps, "--batch-size", args.batch_size, "--lr", args.lr,
                 "--eval-every", args.eval_every, "--save-every", args.steps, "--wise", args.wise, "--json"]
    if args.skip_train:
        res = {"wise": json.loads((ft / "wise.json").read_text())}
        t = float("nan")
    else:
        res, t = clipkit(*train_cmd)
    report["train_command"] = "clipkit train clip " + " ".join(map(str, train_cmd[2:]))
    rows = [ln.split(",") for ln in (ft / "train_log.csv").read_text().splitlines()[1:]]
    report["train"] = {"wall_s_total": round(t, 1), "steps": args.steps,
                       "samples_per_s": float(rows[-1][-1]) if rows else None,
                       "eval_log": (ft / "eval_log.csv").read_text().splitlines()}
    report["wise"] = [{"alpha": r["alpha"], "digits_top1": r["top1"], **{f"shapes_{k}": v for k, v in
                                                                         r["reference"].items()}}
                      for r in res["wise"]["rows"]]

    # 4. after: the fine-tuned model, and the best WiSE-FT model keeping Shapes colour >= 95%
    after, _ = clipkit("eval", data, "--clip", ft / "model", "--class-names", names, "--json",
                       "--plot", out / "cm_after.png", "--overwrite")
    report["zero_shot_after"] = {"top1": after["top1"], "top5": after["top5"], "balanced": after["balanced_accuracy"]}
    keep = [r for r in res["wise"]["rows"] if r["reference"].get("color", 0) >= 0.95]
    if keep:
        best = max(keep, key=lambda r: r["top1"])
        report["wise_pick"] = {"alpha": best["alpha"], "digits_top1": best["top1"],
                               "shapes_color": best["reference"]["color"]}

    # 5. speed: eval vs classify on the same 450 test images
    report["speed"] = speed(data, names)

    (out / "report.json").write_text(json.dumps(report, indent=2))
    if args.docs:
        import shutil
        args.docs.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "cm_after.png", args.docs / "digits_confusion_finetuned.png")
        shutil.copy(out / "cm_before.png", args.docs / "digits_confusion_zero_shot.png")
        shutil.copy(ft / "wise.png", args.docs / "digits_wise.png")
    print(json.dumps(report, indent=2))
    print("\n| model | digits test top-1 | Shapes colour | Shapes shape |\n|---|---|---|---|")
    for r in report["wise"]:
        print(f"| alpha {r['alpha']:g} | {r['digits_top1']:.3f} | {r.get('shapes_color', float('nan')):.3f} | "
              f"{r.get('shapes_shape', float('nan')):.3f} |")


def speed(data: Path, names: Path, repeats: int = 3) -> dict:
    """images/s of `clipkit eval` vs `clipkit classify` on DATA/test (same model and batch size):
    whole commands (start-up and model loading included), then the same work in one process after
    the model is loaded (classify: read every image, ensemble the labels, encode; eval: the same
    through :func:`clipkit.core.evaluate.evaluate`). Alternating runs, best of ``repeats``."""
    from clipkit.cli.common import load_images_tolerant
    from clipkit.core.evaluate import evaluate
    from clipkit.core.prompts import build_classifier
    from clipkit.core.scorer import load_scorer
    test = data / "test"
    n = sum(1 for _ in test.rglob("*.png"))
    labels = list(json.loads(names.read_text()).values())
    cmds = {"classify": ["classify", test, "--labels", ",".join(labels), "--json"],
            "eval": ["eval", data, "--class-names", names, "--json"]}
    wall = {k: [] for k in cmds}
    for _ in range(repeats):
        for k, cmd in cmds.items():
            wall[k].append(clipkit(*cmd)[1])
    sc = load_scorer("shapes", device="cpu")
    inproc = {"classify": [], "eval": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        loaded = load_images_tolerant([test], quiet=True)
        _ = sc.encode_images(loaded.images) @ build_classifier(sc, labels, "simple").T
        inproc["classify"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        evaluate(data, sc, class_names=names)
        inproc["eval"].append(time.perf_counter() - t0)
    return {"images": n, **{f"{k}_command": {"best_s": round(min(v), 2), "images_per_s": round(n / min(v), 1)}
                            for k, v in wall.items()},
            **{f"{k}_in_process": {"best_s": round(min(v), 2), "images_per_s": round(n / min(v), 1)}
               for k, v in inproc.items()}}


if __name__ == "__main__":
    main()
