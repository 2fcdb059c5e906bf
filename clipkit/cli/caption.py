"""``clipkit caption``: ClipCap captions for images (batched, KV-cached, optionally CLIP-reranked)."""
from __future__ import annotations

import click

from clipkit.cli.common import (FiniteFloat, ModelSpecType, batch_size_option, clip_option, emit_json, json_option,
                                resolve_spec)


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(readable=False))
@click.option("--captioner", "captioner_spec", type=ModelSpecType("captioner"), default=None, metavar="SPEC",
              help="shapes (bundled), a directory from `clipkit train captioner`, or an official ClipCap .pt.")
@click.option("--tokenizer", default=None, metavar="DIR",
              help="GPT-2 tokenizer for an official .pt (default: gpt2 from the hub cache).")
@click.option("--strategy", type=click.Choice(["greedy", "beam", "nucleus"]), default="beam", show_default=True,
              help="Decoding: greedy (the most likely next token), beam search (length-normalised log-prob), "
                   "or nucleus sampling (top-p, seeded).")
@click.option("--beams", type=click.IntRange(min=1), default=5, show_default=True,
              help="Beam width for --strategy beam.")
@click.option("--candidates", type=click.IntRange(min=1), default=1, show_default=True,
              help="Decode N candidates per image (beam or nucleus) and keep the best by CLIP score.")
@click.option("--lm-weight", type=FiniteFloat(min=0), default=0.1, show_default=True,
              help="Candidate ranking: cosine + W * mean token log-prob (0 = CLIP score only).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None,
              help="Token limit per caption (default: the checkpoint's; official ClipCap: 67; else 40).")
@click.option("--temperature", type=FiniteFloat(min=0, min_open=True), default=1.0, show_default=True,
              help="Softmax temperature for --strategy nucleus (lower: closer to greedy).")
@click.option("--top-p", type=FiniteFloat(min=0, max=1, min_open=True), default=0.9, show_default=True,
              help="Nucleus sampling: draw from the smallest set of tokens whose probability reaches P.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
              help="Nucleus sampling: also keep at most K tokens (0: no limit).")
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

    from clipkit.captioning.captioner import decode_config, load_captioner
    from clipkit.cli.common import load_images_tolerant, progress
    quiet = settings.quiet or as_json
    cfg = decode_config(strategy, beams, candidates, max_length=max_tokens, temperature=temperature,
                        top_p=top_p, top_k=top_k, seed=seed)
    spec = resolve_spec(settings, "captioner", captioner_spec)
    refs = None
    if refs_path:
        from clipkit.captioning.metrics import read_references
        refs = read_references(refs_path)
    loaded = load_images_tolerant(images, quiet=quiet)    # inputs first: a missing file fails before the model loads
    cap = load_captioner(spec, clip=clip_spec, device=settings.device, precision=settings.precision,
                         tokenizer=tokenizer, batch_size=batch_size)
    if stop_token is not None:
        cap.set_stop_token(stop_token)
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
           "results": [r.to_dict() for r in results], "skipped": loaded.skipped}
    if refs is not None:
        from clipkit.captioning.metrics import evaluate_captions, match_references
        matched = match_references([r.source for r in results], refs)
        keep = [(r, im) for r, im in zip(results, loaded.images) if r.source in matched]
        doc["eval"] = evaluate_captions({r.source: r.caption for r, _ in keep}, matched, scorer=cap.scorer,
                                        images={r.source: im for r, im in keep}).to_dict()
        if not as_json:
            click.echo("# eval: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in doc["eval"].items()))
    if as_json:
        emit_json(doc)
    if loaded.skipped:
        logging.getLogger("clipkit.cli").warning("%d file(s) skipped (unreadable)", len(loaded.skipped))
