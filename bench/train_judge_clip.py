"""Train the second, independent Shapes CLIP that bench/guidance.py uses as a judge (never as a guide).

    OMP_NUM_THREADS=1 python bench/train_judge_clip.py --out runs/judge_clip      # ~45 min on one CPU thread

From scratch, another seed (7) and another architecture than the bundled CLIP (32 px input, patch 4,
width 96, 4 layers; text width 64, 2 layers), so agreement with it is not the guide agreeing with
itself. Resumable (--resume). Reaches zero-shot colour 1.00, shape 0.94, size 1.00, position 1.00 (val).
"""
from __future__ import annotations

import argparse
import logging

JUDGE_CFG = {"embed_dim": 64,
             "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 96, "layers": 4, "head_width": 48},
             "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def main():
    from clipkit.core.train_clip import TrainClipConfig
    from clipkit.shapes.recipes import train_clip      # the Shapes data and evaluation
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/judge_clip")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    res = train_clip(TrainClipConfig(out_dir=args.out, model_cfg=JUDGE_CFG, steps=args.steps, batch_size=128, lr=1e-3,
                                     warmup=200, seed=7, render_sizes=(32,), eval_every=500, save_every=500,
                                     log_every=50, resume=args.resume), progress=False)
    print(res.model_dir, res.final_eval)


if __name__ == "__main__":
    main()
