"""Best-of-N selection for `clipkit generate`, judged strictly by the oracle (issue 15).

    python bench/selection.py [--prompts 30] [--prompt-seed 0] [--seed 100] [--candidates 4] [--two]
                              [--weights 0.02 0.05 0.1 0.3] [--name-shape] [--negative TEXT:S ...]
                              [--clip SPEC] [--steps N] [--clip-scale S] [--views V] [--seed-stride N]
                              [--layout grid|off]

For each prompt (bench/guidance.py's draw), `generate` samples K candidates (prompt i: seeds seed +
STRIDE*i + k, STRIDE = K unless --seed-stride) with the API's defaults, or the sampler that --clip,
--steps, --clip-scale, --views and --layout set (one configuration per run; ``--layout grid``, the
bundled profile's CLI default, guides each object of a two-object prompt on its own); each selection rule keeps one,
and the oracle judges it strictly (`oracle.strict_match`: exactly the named objects, every
attribute right, nothing else). Rules:

* ``one sample``: candidate 0 alone (best-of-1), and the mean over all K candidates (one sample's rate);
* ``clip``: the score guidance optimises (`--best-of K`): the guiding CLIP's cosine with the prompt, less
  the negatives' hinge; with ``--layout grid``, its mean over the objects, each on the image with the
  other objects' cells erased;
* ``clip+w*end``: cosine + w * log P(the caption ends after the prompt | image) under the bundled
  captioner (`--select caption`): the captioner, a second model, says whether the image holds more
  than the prompt names (it would go on: "... and a blue square").

Every rule is also scored on the first k < K candidates, so the table is a success-versus-cost
curve: s/image is the generation time of the candidates a rule looked at (+ captioning), per kept
image. The oracle only judges; it never selects.
"""
from __future__ import annotations

import argparse
import time
from collections import Counter

import numpy as np
import torch

from clipkit.captioning.captioner import load_captioner
from clipkit.guidance.pipeline import generate
from clipkit.shapes.oracle import matches, read_attributes, strict_match

from guidance import draw_prompts          # bench/ is the script's folder: on sys.path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=30)
    ap.add_argument("--prompt-seed", type=int, default=0)
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--two", action="store_true")
    ap.add_argument("--name-shape", action="store_true", default=True)
    ap.add_argument("--weights", type=float, nargs="*", default=[0.02, 0.05, 0.1, 0.3])
    ap.add_argument("--text-weights", type=float, nargs="*", default=[],
                    help="also rank by cosine + w * log P(prompt, end | image) under the captioner")
    ap.add_argument("--negative", nargs="*", default=[],
                    help='negatives for every candidate, e.g. "{prompt} and another shape:4" (the bundled default)')
    ap.add_argument("--clip", default="shapes-noised", help="the guiding CLIP (default: the bundled guide)")
    ap.add_argument("--steps", type=int, default=None, help="default: the API's (25)")
    ap.add_argument("--clip-scale", type=float, default=None, help="default: the API's (0.2)")
    ap.add_argument("--views", type=int, default=None, help="default: the API's (4)")
    ap.add_argument("--layout", choices=["off", "grid"], default=None, help="default: the API's (off)")
    ap.add_argument("--seed-stride", type=int, default=None,
                    help="prompt i's candidates get seeds seed + STRIDE*i + k (default: --candidates; "
                         "8 gives the seeds of bench/early_selection.py --candidates 8)")
    args = ap.parse_args()
    K = args.candidates
    stride = K if args.seed_stride is None else args.seed_stride
    if stride < 1:
        ap.error("--seed-stride must be >= 1")
    sampler = {k: v for k, v in (("steps", args.steps), ("clip_scale", args.clip_scale), ("views", args.views),
                                 ("layout", args.layout)) if v is not None}
    expected, texts = draw_prompts(args.prompts, args.prompt_seed, args.name_shape, args.two)
    cap = load_captioner("shapes", device="cpu")
    rows = []                                  # per prompt: list of candidate dicts
    gen_s = cap_s = 0.0
    for i, (objs, prompt) in enumerate(zip(expected, texts)):
        t0 = time.time()
        res = generate(prompt, n=K, seed=args.seed + stride * i, device="cpu", negative=args.negative,
                       clip=args.clip, **sampler)
        gen_s += time.time() - t0
        cands = sorted(res.images, key=lambda g: g.seed)           # candidate k = seed + k
        t0 = time.time()
        lps = cap.token_logprobs([g.image for g in cands], [prompt] * K)
        end = torch.stack([lp[-1] for lp in lps])
        full = torch.stack([lp.sum() for lp in lps])               # log P(prompt, then the end | image)
        cap_s += time.time() - t0
        row = []
        for g, e, t in zip(cands, end.tolist(), full.tolist()):
            x = torch.from_numpy(np.asarray(g.image).copy()).permute(2, 0, 1).float() / 255
            found = read_attributes(x)
            row.append({"cos": g.clip_score, "end": e, "text": t, "strict": strict_match(found, objs), "n": len(found),
                        "lenient": matches(found, {k: objs[0][k] for k in ("color", "position")})})
        rows.append(row)
        print(f"{i}: {prompt}: " + " ".join(f"[{c['strict']:d} n{c['n']} cos{c['cos']:.2f} end{c['end']:.1f}]"
                                            for c in row), flush=True)
    n = len(rows)
    per_image = gen_s / (n * K)
    per_caption = cap_s / (n * K)
    rules = {"clip": lambda c: c["cos"]}
    for w in args.weights:
        rules[f"clip+{w:g}*end"] = (lambda w: lambda c: c["cos"] + w * c["end"])(w)
    rules["end"] = lambda c: c["end"]
    for w in args.text_weights:
        rules[f"clip+{w:g}*text"] = (lambda w: lambda c: c["cos"] + w * c["text"])(w)
    kind = "two" if args.two else "single"
    print(f"\n# selection: {n} {kind}-object prompts (prompt seed {args.prompt_seed}, seeds {args.seed}+), "
          f"guide {args.clip}, sampler {sampler or 'the API defaults'}, K up to {K}; "
          f"generation {per_image:.2f} s/image, captioner {per_caption:.3f} s/image "
          f"({torch.get_num_threads()} threads)\n")
    print("| rule | candidates | **strict** | lenient | objects 0/1/2/3+ | s per kept image |\n|---|---|---|---|---|---|")

    def line(name, k, pick, captioned):
        chosen = [pick(r[:k]) for r in rows]
        s = sum(c["strict"] for c in chosen)
        le = sum(c["lenient"] for c in chosen)
        h = Counter(min(c["n"], 3) for c in chosen)
        cost = k * (per_image + (per_caption if captioned else 0))
        print(f"| {name} | {k} | **{s / n:.2f} ({s}/{n})** | {le / n:.2f} | "
              f"{'/'.join(str(h[j]) for j in range(4))} | {cost:.2f} |", flush=True)
    line("one sample (candidate 0)", 1, lambda r: r[0], False)
    m = sum(c["strict"] for r in rows for c in r) / (n * K)
    print(f"| one sample (mean over all {K} candidates) | 1 | **{m:.2f}** | | | {per_image:.2f} |", flush=True)
    for k in range(2, K + 1):
        for name, f in rules.items():
            line(name, k, lambda r, f=f: max(r, key=f), name != "clip")


if __name__ == "__main__":
    main()
