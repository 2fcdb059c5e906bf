"""Early selection for `clipkit generate` (issue 15): choose among K candidates part-way through the
trajectory, finish only the chosen, judged strictly by the oracle.

    OMP_NUM_THREADS=1 python bench/early_selection.py --prompts 30 --prompt-seed 0 --seed 100 \
        --candidates 8 --record runs/early_dev.json
    python bench/early_selection.py --analyse runs/early_dev.json [runs/early_test.json ...]

Record: every candidate of the default `generate` configuration is sampled to the end (each on its
own seed, so a candidate continued alone after an early choice ends exactly as here); after the
DDIM steps listed in --at, its x_t is scored by the guiding noise-aware CLIP (cosine with the prompt)
and its x0 estimate by the bundled captioner (log P(end of caption | x0, prompt)) and the clean CLIP.
The final image's strict verdict, cosine and end score are recorded too. The oracle only judges.

Analyse: for each rule (a score at step s), keep the best `keep` of the first k candidates at step s,
finish them, pick one by the final score (the guide's cosine, or + 0.05 x the captioner's end term).
Cost in units of one default sample: k * (s + 1) / steps + keep * (steps - s - 1) / steps (the
preview is the x0 estimate of step s's network output; + the captioner, ~0.5% per call).
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import torch

from clipkit.core.scorer import load_scorer
from clipkit.guidance.backends import tensor_to_pil
from clipkit.guidance.config import GenerateConfig, MAX_SEED
from clipkit.guidance.diffusion import load_diffusion
from clipkit.guidance.prompting import build_objective, check_parts
from clipkit.guidance.schedulers import make_scheduler
from clipkit.guidance.parametrisation import abar_at, split_output
from clipkit.guidance.sampling import sample
from clipkit.guidance.wrapper import GuidedDenoiser
from clipkit.shapes.oracle import read_attributes, strict_match

from guidance import draw_prompts          # bench/ is the script's folder: on sys.path


def record(args):
    from clipkit.captioning.captioner import load_captioner
    guide = load_scorer("shapes-noised", device="cpu")
    clean = load_scorer("shapes", device="cpu")
    cap = load_captioner("shapes", device="cpu")
    pipe = load_diffusion("shapes", device="cpu")
    cfg = pipe.check(GenerateConfig().resolve_target(True, pipe.guide_targets))
    gcfg = cfg.guidance()
    expected, texts = draw_prompts(args.prompts, args.prompt_seed, True, args.two)
    K, at = args.candidates, sorted(args.at)
    rows, t_all = [], time.time()
    for i, (objs, prompt) in enumerate(zip(expected, texts)):
        tg = guide.text_embeddings([prompt])
        tc = clean.text_embeddings([prompt])
        # the guidance objective, with --negative (e.g. the bundled count guard) when given
        objective = build_objective(check_parts(prompt, GenerateConfig(negative=args.negative)), [], [guide], size=32)
        target = objective.terms[0][1]
        cands = []
        for k in range(K):
            seed = args.seed + K * i + k
            sched = make_scheduler(cfg.scheduler, pipe.scheduler_config)
            g = GuidedDenoiser(pipe._model, sched, objective, gcfg,
                               generator=torch.Generator().manual_seed(seed + MAX_SEED))
            xs = {}

            def cb(j, t, x, xs=xs):
                if j + 1 in at:
                    xs[j + 1] = x.clone()
            x = sample(g, sched, (1, 3, 32, 32), cfg.steps, torch.Generator().manual_seed(seed),
                       after_step=g.after_step, callback=cb)
            final = ((x[0] + 1) / 2).clamp(0, 1)
            final = torch.from_numpy(__import__("numpy").array(tensor_to_pil(final))).permute(2, 0, 1).float() / 255
            c = {"seed": seed, "final": score(final, prompt, objs, target, clean, tc, cap)}
            ts = list(sched.timesteps)
            for s, xt in xs.items():
                with torch.no_grad():
                    cos_xt = float(guide.embed_pixels((xt + 1) / 2) @ tg[0])
                    tn = ts[s]
                    a = abar_at(g.abar, tn, 1, "cpu")
                    _, x0 = split_output(pipe._model(xt, tn).float(), xt, a, "epsilon")
                x0 = ((x0[0].clamp(-1, 1) + 1) / 2)
                c[str(s)] = {"xt": cos_xt, **score(x0, prompt, objs, target, clean, tc, cap)}
            cands.append(c)
        rows.append({"prompt": prompt, "objects": objs, "candidates": cands})
        print(f"{i}: {prompt}: " + " ".join(f"[{c['final']['strict']:d} {c['final']['n']}]" for c in cands),
              f"({time.time() - t_all:.0f} s)", flush=True)
        with open(args.record, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f)


def score(img, prompt, objs, target, clean, tc, cap) -> dict:
    """img [3,H,W] in [0,1] -> oracle verdict and model scores. ``cos``: what generate ranks by (the
    guide's cosine, less the negatives' hinge when there are negatives); ``plain``: the cosine alone."""
    found = read_attributes(img)
    with torch.no_grad():
        e = torch.nn.functional.normalize(target.embed(img[None]).float(), dim=-1)
        plain = float(target._weighted_cos(e)[0])
        cos = plain
        if target.negatives is not None:          # the hinge of ClipTarget / score_images
            cos -= float(target.hinge(e @ target.negatives.T, torch.tensor([plain]))[0])
        cos_clean = float(clean.embed_pixels(img[None]) @ tc[0])
    end = float(cap.end_logprob(img[None], [prompt])[0])
    return {"strict": bool(strict_match(found, objs)), "n": len(found), "cos": cos, "plain": plain,
            "clean": cos_clean, "end": end}


RULES = {
    "xt cos": lambda c, s: c[s]["xt"],
    "x0 guide cos": lambda c, s: c[s]["cos"],
    "x0 clean cos": lambda c, s: c[s]["clean"],
    "x0 clean+0.05*end": lambda c, s: c[s]["clean"] + 0.05 * c[s]["end"],
    "x0 guide+0.05*end": lambda c, s: c[s]["cos"] + 0.05 * c[s]["end"],
    "xt+0.05*end": lambda c, s: c[s]["xt"] + 0.05 * c[s]["end"],
    "x0 end": lambda c, s: c[s]["end"],
}


FINAL = {"clip": lambda c: c["final"]["cos"], "clip+0.05*end": lambda c: c["final"]["cos"] + 0.05 * c["final"]["end"],
         "clean": lambda c: c["final"]["clean"], "clip+clean": lambda c: c["final"]["cos"] + c["final"]["clean"],
         "clip+clean+0.05*end": lambda c: c["final"]["cos"] + c["final"]["clean"] + 0.05 * c["final"]["end"]}


def analyse(paths, steps=25, rules=None, keeps=(1, 2, 3), ks=(4, 5, 6, 7, 8)):
    for p in paths:
        d = json.load(open(p))
        rows = d["rows"]
        n, K = len(rows), len(rows[0]["candidates"])
        at = sorted(int(s) for s in rows[0]["candidates"][0] if s not in ("seed", "final"))
        print(f"\n# {p}: {n} prompts, {K} candidates, early steps {at}\n")
        print("| rule | step | candidates | kept to the end | **strict** | objects 1/2/3+ | cost (x one sample) |")
        print("|---|---|---|---|---|---|---|")

        def line(name, s, k, keep, pick):
            chosen = [pick(r["candidates"][:k]) for r in rows]
            ok = sum(c["final"]["strict"] for c in chosen)
            h = Counter(min(c["final"]["n"], 3) for c in chosen)
            # drafts run s + 1 network steps (the x0 preview is step s's output), the kept go on
            cost = k * (s + 1) / steps + keep * (steps - s - 1) / steps if s else k
            print(f"| {name} | {s or '-'} | {k} | {keep} | **{ok / n:.2f} ({ok}/{n})** | "
                  f"{h[1]}/{h[2]}/{h[3]} | {cost:.2f} |")
        line("first", 0, 1, 1, lambda cs: cs[0])
        for fname, final in FINAL.items():
            for k in range(2, K + 1):
                line(f"best-of by final {fname}", 0, k, k, lambda cs, final=final: max(cs, key=final))
        for s in at:
            for name, f in RULES.items():
                if rules and name not in rules:
                    continue
                for fname, final in FINAL.items():
                    for k in ks:
                        if k > K:
                            continue
                        for keep in keeps:
                            def pick(cs, f=f, keep=keep, s=str(s), final=final):
                                top = sorted(cs, key=lambda c: -f(c, s))[:keep]
                                return max(top, key=final)
                            line(f"{name}; final {fname}" if keep > 1 else name, s, k, keep, pick)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=30)
    ap.add_argument("--prompt-seed", type=int, default=0)
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--two", action="store_true")
    ap.add_argument("--at", type=int, nargs="*", default=[3, 5, 8, 12])
    ap.add_argument("--record")
    ap.add_argument("--negative", nargs="*", default=[],
                    help='negatives of every candidate, e.g. "{prompt} and another shape:4" (the bundled default)')
    ap.add_argument("--analyse", nargs="*")
    ap.add_argument("--rules", nargs="*", default=None, help="early rules to print (default: all)")
    args = ap.parse_args()
    if args.analyse:
        analyse(args.analyse, rules=args.rules)
    else:
        record(args)


if __name__ == "__main__":
    main()
