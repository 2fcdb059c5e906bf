"""``clipkit caption``: ClipCap captions for images (batched, KV-cached, optionally CLIP-reranked)."""
from __future__ import annotations

import click

from clipkit.cli.common import FiniteFloat, batch_size_option, clip_option, emit_json, json_option, resolve_spec


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(readable=False))
@click.option("--captioner", "captioner_spec", default=None, metavar="SPEC",
              help="shapes (bundled), a directory from `clipkit train captioner`, or an official ClipCap .pt.")
@click.option("--tokenizer", default=None, metavar="DIR",
              help="GPT-2 tokenizer for an official .pt (default: gpt2 from the hub cache).")
@click.option("--strategy", type=click.Choice(["greedy", "beam", "nucleus"]), default="beam", show_default=True)
@click.option("--beams", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--candidates", type=click.IntRange(min=1), default=1, show_default=True,
              help="Decode N candidates per image (beam or nucleus) and keep the best by CLIP score.")
@click.option("--lm-weight", type=FiniteFloat(min=0), default=0.1, show_default=True,
              help="Candidate ranking: cosine + W * mean token log-prob (0 = CLIP score only).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None,
              help="Token limit per caption (default: the checkpoint's; official ClipCap: 67; else 40).")
@click.option("--temperature", type=FiniteFloat(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--top-p", type=FiniteFloat(min=0, max=1, min_open=True), default=0.9, show_default=True)
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for nucleus sampling.")
@click.option("--stop-token", default=None, metavar="TEXT",
              help="Also end a caption at this token (default: the checkpoint's; official ClipCap: '.').")
@click.option("--eval", "refs_path", type=click.Path(readable=False), default=None,
              help="Score the captions against references: JSON {image path or file name: [captions]}.")
@clip_option
@batch_size_option
@json_option
@click.pass_obj
def caption(settings, images, captioner_spec, tokenizer, strategy, beams, candidates, lm_weight, max_tokens,
            temperature, top_p, top_k, seed, stop_token, refs_path, clip_spec, batch_size, as_json):
    """Caption IMAGES (files or folders, walked recursively): one line per image (path, caption, score).

    The score is the cosine between the image and its caption under the captioner's CLIP.
    Unreadable files are reported and skipped (exit 0 with a warning count; 2 if none could be read).

    \b
    Examples:
      clipkit caption examples/
      clipkit caption img.png --strategy nucleus --candidates 8 --json
      clipkit caption val/ --eval refs.json
      clipkit caption photo.jpg --captioner coco_weights.pt --tokenizer ./gpt2 --clip openclip:ViT-B-32-quickgelu/openai
    """
    import logging

    from clipkit.captioning.captioner import load_captioner
    from clipkit.captioning.decode import DecodeConfig
    from clipkit.cli.common import load_images_tolerant, progress
    quiet = settings.quiet or as_json
    if strategy == "beam" and candidates > beams:
        beams = candidates
    cfg = DecodeConfig(strategy=strategy, beams=beams if strategy == "beam" else 1, candidates=candidates,
                       max_length=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                       seed=seed).validate()
    spec = resolve_spec(settings, "captioner", captioner_spec)
    refs = _read_refs(refs_path) if refs_path else None
    cap = load_captioner(spec, clip=clip_spec, device=settings.device, precision=settings.precision,
                         tokenizer=tokenizer, batch_size=batch_size)
    if stop_token is not None:
        cap.set_stop_token(stop_token)
    loaded = load_images_tolerant(images, quiet=quiet)
    results = []
    chunk = max(1, batch_size)
    steps = range(0, len(loaded.images), chunk)
    for i in progress(steps, "captioning", disable=quiet or len(loaded.images) <= chunk):
        res = cap.caption(loaded.images[i:i + chunk], cfg, lm_weight=lm_weight, batch_size=chunk)
        for r, p in zip(res, loaded.paths[i:i + chunk]):
            r.source = p
            results.append(r)
            if not as_json:
                click.echo(f"{p}\t{r.caption}\t{r.clip_score:.4f}")
    doc = {"captioner": spec, "clip": cap.scorer.spec, "score": "cosine(image, caption)",
           "decode": cap.decode_config(cfg).to_dict(), "lm_weight": lm_weight,
           "results": [{"path": r.source, "caption": r.caption, "score": r.clip_score, "logprob": r.logprob,
                        **({"candidates": [c.__dict__ for c in r.candidates]} if r.candidates else {})}
                       for r in results],
           "skipped": loaded.skipped}
    if refs is not None:
        doc["eval"] = _evaluate(cap, loaded, results, refs)
        if not as_json:
            click.echo("# eval: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in doc["eval"].items()))
    if as_json:
        emit_json(doc)
    if loaded.skipped:
        logging.getLogger("clipkit.cli").warning("%d file(s) skipped (unreadable)", len(loaded.skipped))


def _read_refs(path) -> dict[str, list[str]]:
    import json

    from clipkit.core.errors import InputError
    from clipkit.core.io import read_text_file
    try:
        doc = json.loads(read_text_file(path, "references"))
    except json.JSONDecodeError as e:
        raise InputError(f"cannot read references {path}: {e}") from None
    if not isinstance(doc, dict) or not all(isinstance(v, list) for v in doc.values()):
        raise InputError(f"{path}: expected a JSON object {{image: [reference captions]}}")
    return {k: [str(c) for c in v] for k, v in doc.items()}


def _evaluate(cap, loaded, results, refs) -> dict:
    from pathlib import Path

    from clipkit.captioning.metrics import evaluate_captions, ref_clip_s
    from clipkit.core.errors import InputError

    def key(p):
        for k in (p, Path(p).name, Path(p).stem):
            if k in refs:
                return k
        return None
    pairs = [(r, key(r.source)) for r in results]
    pairs = [(r, k) for r, k in pairs if k is not None]
    if not pairs:
        raise InputError("--eval: none of the images has references (keys: path, file name or stem)")
    cands = {r.source: r.caption for r, _ in pairs}
    m = evaluate_captions(cands, {r.source: refs[k] for r, k in pairs})
    out = {k: v for k, v in m.to_dict().items() if v is not None}
    imgs = [loaded.images[loaded.paths.index(r.source)] for r, _ in pairs]
    rc = ref_clip_s(cap.scorer, imgs, [r.caption for r, _ in pairs], [refs[k] for _, k in pairs])
    out["clip_s"] = float(rc.clip_s.mean())
    out["ref_clip_s"] = float(rc.ref_clip_s.mean())
    return out
