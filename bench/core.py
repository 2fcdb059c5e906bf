"""Speed of the scoring core, measured side by side in one run.

    python bench/core.py [--images 128] [--batch 32]

1. Encode throughput: ClipScorer vs calling the backend (open_clip) directly, same ViT-B/32-sized
   model (random weights: speed does not depend on them) and batch. Target ratio >= 0.97.
2. End-to-end scoring of a folder of JPEGs: ``ClipScorer.score(paths, texts)`` (DataLoader workers)
   vs the CLIPProcessor + CLIPModel loop that tutorials show, same transformers ViT-B/32 model, with
   the max |cosine difference| between the two.
3. ``clipkit --help`` wall time (target < 0.3 s).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def timeit(fn, repeat=3):
    fn()  # warm-up
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def encode_throughput(n, batch):
    import open_clip

    from clipkit.core.backends import OpenClipBackend
    from clipkit.core.preprocess import normalize
    from clipkit.core.clip_loading import openclip_preprocess
    from clipkit.core.scorer import ClipScorer
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    tok = open_clip.get_tokenizer("ViT-B-32")
    scorer = ClipScorer(OpenClipBackend(model, tok, openclip_preprocess(model), "ViT-B-32 (random)"),
                        batch_size=batch)
    x = torch.rand(n, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    texts = [f"a photo of a thing number {i}" for i in range(n * 4)]

    @torch.inference_mode()
    def direct_images():
        for i in range(0, n, batch):
            torch.nn.functional.normalize(model.encode_image(normalize(x[i:i + batch], scorer.preprocess)), dim=-1)

    @torch.inference_mode()
    def direct_texts():
        for i in range(0, len(texts), batch):
            torch.nn.functional.normalize(model.encode_text(tok(texts[i:i + batch])), dim=-1)

    rows = []
    for name, ours, ref, count in [("images", lambda: scorer.encode_images(x), direct_images, n),
                                   ("texts", lambda: scorer.encode_texts(texts), direct_texts, len(texts))]:
        # interleave to share machine noise
        t_ref, t_ours = timeit(ref), timeit(ours)
        rows.append((name, count / t_ours, count / t_ref, t_ref / t_ours))
    return rows


def folder_scoring(n, batch, workers):
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    from clipkit.core.scorer import load_scorer
    from helpers import make_hf_clip_dir  # noqa: F401  (tokenizer files writer)
    from helpers import write_clip_tokenizer_files
    tmp = Path(tempfile.mkdtemp())
    mdir = tmp / "model"
    mdir.mkdir()
    torch.manual_seed(0)
    CLIPModel(CLIPConfig()).save_pretrained(mdir)              # ViT-B/32 architecture
    write_clip_tokenizer_files(mdir)
    from transformers import CLIPImageProcessor, CLIPTokenizer
    CLIPTokenizer(str(mdir / "vocab.json"), str(mdir / "merges.txt")).save_pretrained(mdir)
    CLIPImageProcessor(crop_size={"height": 224, "width": 224}, size={"shortest_edge": 224}).save_pretrained(mdir)
    from skimage import data
    photos = [getattr(data, k)() for k in ("astronaut", "chelsea", "coffee", "rocket")]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        im = Image.fromarray(photos[i % 4]).resize((640, 480))
        arr = np.clip(np.asarray(im, dtype=np.int16) + rng.integers(-8, 8, (480, 640, 3)), 0, 255).astype(np.uint8)
        p = tmp / f"{i:05d}.jpg"
        Image.fromarray(arr).save(p, quality=90)
        paths.append(p)
    texts = ["a photo of a cat", "a photo of a rocket", "a cup of coffee", "an astronaut"]

    model = CLIPModel.from_pretrained(mdir).eval()
    proc = CLIPProcessor.from_pretrained(mdir)

    def tutorial():
        out = []
        with torch.no_grad():
            for i in range(0, n, batch):
                ims = [Image.open(p).convert("RGB") for p in paths[i:i + batch]]
                inputs = proc(text=texts, images=ims, return_tensors="pt", padding=True)
                o = model(**inputs)
                out.append(o.logits_per_image / model.logit_scale.exp())
        return torch.cat(out)

    def tutorial_per_image():
        # the loop of the transformers CLIP docs: one image per call, texts encoded with every image
        out = []
        with torch.no_grad():
            for p in paths:
                inputs = proc(text=texts, images=Image.open(p).convert("RGB"), return_tensors="pt", padding=True)
                o = model(**inputs)
                out.append(o.logits_per_image / model.logit_scale.exp())
        return torch.cat(out)

    scorer = load_scorer(str(mdir), device="cpu", batch_size=batch, num_workers=workers)

    def ours():
        return scorer.similarity(paths, texts)

    t_ref = timeit(tutorial, 2)
    t_single = timeit(tutorial_per_image, 1)
    t_ours = timeit(ours, 2)
    diff = float((tutorial() - ours()).abs().max())
    return n / t_ours, n / t_ref, t_ref / t_ours, diff, n / t_single, t_single / t_ours


def help_time():
    ts = []
    for _ in range(7):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "clipkit", "--help"], capture_output=True, check=True)
        ts.append(time.perf_counter() - t)
    bare = []
    for _ in range(7):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], capture_output=True, check=True)
        bare.append(time.perf_counter() - t)
    return statistics.median(ts), statistics.median(bare)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--parts", default="encode,folder,help", help="comma-separated subset to run")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    print(f"# core benchmark (torch {torch.__version__}, {torch.get_num_threads()} threads, CPU)\n")
    if "encode" in parts:
        print("| encode (ViT-B/32, batch %d) | clipkit /s | backend direct /s | ratio |\n|---|---|---|---|" % args.batch)
        for name, ours, ref, ratio in encode_throughput(args.images, args.batch):
            print(f"| {name} | {ours:.1f} | {ref:.1f} | {ratio:.3f} |")
    if "folder" in parts:
        folder(args)
    if "help" in parts:
        h, bare = help_time()
        print(f"\n`clipkit --help`: {h * 1000:.0f} ms median of 7 (bare `python -c pass`: {bare * 1000:.0f} ms)")


def folder(args):
    ours, ref, ratio, diff, single, ratio1 = folder_scoring(args.images, args.batch, args.workers)
    print(f"\n| score a folder of {args.images} JPEGs (640x480) x 4 texts | images/s | clipkit speed-up |\n|---|---|---|")
    print(f"| clipkit ClipScorer.score (num_workers={args.workers}, batch {args.batch}) | {ours:.1f} | |")
    print(f"| CLIPProcessor + CLIPModel, one image per call (the docs' loop) | {single:.1f} | {ratio1:.2f}x |")
    print(f"| CLIPProcessor + CLIPModel, batches of {args.batch} | {ref:.1f} | {ratio:.2f}x |")
    print(f"\nmax abs cosine difference clipkit vs CLIPModel: {diff:.2e}")


if __name__ == "__main__":
    main()
