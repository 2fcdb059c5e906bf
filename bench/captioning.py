"""Captioning quality and speed of a captioner on the Shapes test split.

    python bench/captioning.py                       # bundled captioner, 500 single + 300 two-object scenes
    python bench/captioning.py --grid docs/captioning_grid.png --parts quality,speed,train

Quality: each caption is parsed back into objects (clipkit.shapes.parse) and compared with the
scene's ground truth (exact = every attribute of every object right); BLEU-4 and CIDEr-D against the
scene's describing captions; CLIP-S under the bundled CLIP. Strategies: greedy, beam 5, beam 5 with
5 candidates reranked by CLIP, nucleus with 8 samples reranked by CLIP.

Speed (same model, same images, one run): captions/s of batched beam search with the KV cache at
batch 32 vs the official algorithm (one image at a time, GPT-2 re-run over the whole sequence every
step, no cache); and training samples/s of the captioner recipe.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def scenes(n_single: int, n_two: int):
    from clipkit.shapes.data import single_object_scenes, two_object_scenes
    return single_object_scenes("test", n_single), two_object_scenes("test", n_two, offset=100_000)


def quality(cap, single, two, size: int) -> list[dict]:
    from clipkit.captioning.decode import DecodeConfig
    from clipkit.captioning.metrics import evaluate_captions
    from clipkit.shapes.parse import ATTRIBUTES, caption_matches, describing_captions
    from clipkit.shapes.render import render_scenes
    strategies = {
        "greedy": (DecodeConfig(strategy="greedy"), 0.0),
        "beam 5": (DecodeConfig(strategy="beam", beams=5), 0.0),
        "beam 5, 5 cands, CLIP rerank": (DecodeConfig(strategy="beam", beams=5, candidates=5), 0.1),
        "nucleus p=0.9, 8 cands, CLIP rerank": (DecodeConfig(strategy="nucleus", candidates=8, seed=0), 0.1),
    }
    rows = []
    groups = {"single": single, "two": two}
    embeds = {g: cap.image_embeddings(render_scenes(sc, size)) for g, sc in groups.items()}
    for name, (cfg, w) in strategies.items():
        row = {"strategy": name}
        for g, sc in groups.items():
            t = time.time()
            res = cap.caption_embeddings(embeds[g], cfg, lm_weight=w, batch_size=32)
            row[f"{g}_s"] = time.time() - t
            m = [caption_matches(r.caption, s) for r, s in zip(res, sc)]
            row[f"{g}_exact"] = sum(x["exact"] for x in m) / len(m)
            for a in ATTRIBUTES:
                row[f"{g}_{a}"] = sum(x[a] for x in m) / len(m)
            met = evaluate_captions({i: r.caption for i, r in enumerate(res)},
                                    {i: describing_captions(s) for i, s in enumerate(sc)})
            row[f"{g}_bleu4"], row[f"{g}_cider"] = met.bleu4, met.cider_d
            row[f"{g}_clip"] = sum(r.clip_score for r in res) / len(res)
            row[f"{g}_example"] = res[0].caption
        rows.append(row)
    return rows


def speed(cap, single, size: int, n: int = 32, beams: int = 5) -> dict:
    from clipkit.captioning.decode import DecodeConfig, decode, reference_beam_search
    from clipkit.shapes.render import render_scenes
    model, eos = cap.model, cap.eos_id
    emb = cap.image_embeddings(render_scenes(single[:n], size))
    prefix = model.prefix(emb.to(cap.device))
    cfg = DecodeConfig(strategy="beam", beams=beams)
    decode(model.gpt, prefix[:2], eos, cfg)                      # warm-up
    t = time.time()
    fast = decode(model.gpt, prefix, eos, cfg)
    t_fast = time.time() - t
    t = time.time()
    slow = [reference_beam_search(model.gpt, prefix[i:i + 1], eos, beams=beams)[0] for i in range(n)]
    t_slow = time.time() - t
    same = sum(a[0].tokens == b.tokens for a, b in zip(fast, slow))
    return {"images": n, "beams": beams, "batched_kv_caps_per_s": n / t_fast,
            "official_loop_caps_per_s": n / t_slow, "speedup": t_slow / t_fast, "identical_captions": same}


def train_speed(steps: int = 40) -> dict:
    """Samples/s of the bundled recipe's training step (mapper + tiny GPT-2, batch 64) on this machine."""
    from clipkit.captioning.tokenizer import encode_captions
    from clipkit.captioning.train import TrainCaptionerConfig, build_model
    from clipkit.shapes.parse import describing_captions
    from clipkit.shapes.world import sample_scene
    cfg = TrainCaptionerConfig()
    caps = [describing_captions(sample_scene(i))[0] for i in range(512)]
    model, tok = build_model(cfg, 128, caps)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids, mask = encode_captions(tok, caps[:cfg.batch_size], cfg.max_tokens)
    emb = torch.randn(cfg.batch_size, 128)
    for i in range(steps + 5):
        if i == 5:
            t = time.time()
        loss = model(emb, ids, mask).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return {"batch": cfg.batch_size, "samples_per_s": steps * cfg.batch_size / (time.time() - t)}


def grid(cap, path: Path, size: int, n: int = 12):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clipkit.captioning.decode import DecodeConfig
    from clipkit.shapes.data import render_pil
    from clipkit.shapes.world import sample_scene, split_seed
    sc = [sample_scene(split_seed("test", 500_000 + i)) for i in range(n)]
    ims = render_pil(sc, 96)
    res = cap.caption(ims, DecodeConfig(strategy="beam", beams=5, candidates=5), lm_weight=0.1)
    cols = 4
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(3.2 * cols, 3.0 * ((n + cols - 1) // cols)))
    for ax, im, r in zip(axes.flat, ims, res):
        ax.imshow(im)
        ax.set_title("\n".join(_wrap(r.caption, 30)), fontsize=8)
        ax.axis("off")
    fig.suptitle("bundled Shapes captioner (beam 5, 5 candidates reranked by CLIP)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def _wrap(text, width):
    import textwrap
    return textwrap.wrap(text, width) or [""]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--captioner", default="shapes")
    ap.add_argument("--single", type=int, default=500)
    ap.add_argument("--two", type=int, default=300)
    ap.add_argument("--size", type=int, default=64, help="render size of the test images")
    ap.add_argument("--parts", default="quality,speed,train")
    ap.add_argument("--grid", type=Path, default=None)
    args = ap.parse_args()
    from clipkit.captioning.captioner import load_captioner
    torch.manual_seed(0)
    cap = load_captioner(args.captioner, device="cpu")
    single, two = scenes(args.single, args.two)
    parts = args.parts.split(",")
    print(f"# captioner {args.captioner}; torch threads {torch.get_num_threads()}")
    if "quality" in parts:
        rows = quality(cap, single, two, args.size)
        print(f"\n## quality ({args.single} single-object, {args.two} two-object test scenes, {args.size}px)\n")
        print("| strategy | single exact | colour | shape | size | position | BLEU-4 | CIDEr-D | CLIP cos "
              "| two-object exact | BLEU-4 | CIDEr-D | s (single) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['strategy']} | {r['single_exact']:.3f} | {r['single_color']:.3f} | {r['single_shape']:.3f} "
                  f"| {r['single_size']:.3f} | {r['single_position']:.3f} | {r['single_bleu4']:.3f} "
                  f"| {r['single_cider']:.3f} | {r['single_clip']:.3f} | {r['two_exact']:.3f} | {r['two_bleu4']:.3f} "
                  f"| {r['two_cider']:.3f} | {r['single_s']:.1f} |")
        print("\nexamples: " + "; ".join(f"{r['strategy']}: {r['single_example']!r}" for r in rows))
    if "speed" in parts:
        s = speed(cap, single, args.size)
        print(f"\n## decoding speed (beam {s['beams']}, {s['images']} images)\n")
        print("| method | captions/s |\n|---|---|")
        print(f"| official algorithm: one image at a time, no KV cache | {s['official_loop_caps_per_s']:.2f} |")
        print(f"| clipkit: batch 32, KV cache | {s['batched_kv_caps_per_s']:.2f} |")
        print(f"\nspeedup {s['speedup']:.1f}x; identical captions {s['identical_captions']}/{s['images']}")
    if "train" in parts:
        t = train_speed()
        print(f"\n## training step: {t['samples_per_s']:.0f} samples/s (batch {t['batch']}, mapper + tiny GPT-2)")
    if args.grid:
        grid(cap, args.grid, args.size)
        print(f"\ngrid written to {args.grid}")


if __name__ == "__main__":
    main()
