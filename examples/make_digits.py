"""Write scikit-learn's handwritten digits (1,797 8x8 greyscale images, bundled with scikit-learn,
no download) as an ImageFolder with a seeded, stratified train/val/test split:

    OUT/train/0/0007.png ... OUT/val/... OUT/test/...      (white ink on black, upscaled to --size px)
    OUT/class_names.json                                   {"0": "zero", ..., "9": "nine"}

    python examples/make_digits.py data/digits                       # 60% / 15% / 25%
    clipkit eval data/digits --class-names data/digits/class_names.json
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def split_indices(labels, val: float, test: float, seed: int) -> dict[str, list[int]]:
    """Stratified: each class is shuffled with ``seed`` and cut into test, val and train (the rest)."""
    rng = random.Random(seed)
    out = {"train": [], "val": [], "test": []}
    for c in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == c]
        rng.shuffle(idx)
        n_test, n_val = round(len(idx) * test), round(len(idx) * val)
        out["test"] += idx[:n_test]
        out["val"] += idx[n_test:n_test + n_val]
        out["train"] += idx[n_test + n_val:]
    return {k: sorted(v) for k, v in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="output folder (must not exist, or be empty)")
    ap.add_argument("--size", type=int, default=32, help="image side in pixels (bicubic upscaling of 8x8)")
    ap.add_argument("--val", type=float, default=0.15, help="fraction of each class for val")
    ap.add_argument("--test", type=float, default=0.25, help="fraction of each class for test")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not (args.size >= 8 and 0 <= args.val < 1 and 0 < args.test < 1 and args.val + args.test < 1):
        ap.error("need --size >= 8 and fractions with val + test < 1")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        ap.error(f"{args.out} exists and is not an empty folder")

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = [int(y) for y in digits.target]
    for split, idx in split_indices(labels, args.val, args.test, args.seed).items():
        for i in idx:
            px = (digits.images[i] / 16.0 * 255.0).round().clip(0, 255).astype(np.uint8)   # 0..16 -> 0..255
            im = Image.fromarray(px, mode="L").resize((args.size, args.size), Image.BICUBIC).convert("RGB")
            d = args.out / split / str(labels[i])
            d.mkdir(parents=True, exist_ok=True)
            im.save(d / f"{i:04d}.png")
        print(f"{split}: {len(idx)} images", file=sys.stderr)
    (args.out / "class_names.json").write_text(json.dumps({str(k): v for k, v in enumerate(NAMES)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
