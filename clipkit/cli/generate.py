"""``clipkit generate``: CLIP-guided diffusion with best-of-M CLIP reranking; PNG + JSON sidecar per image."""
from __future__ import annotations

import sys

import click

from clipkit.cli.common import (CutScheduleType, FiniteFloat, FloatList, ImagePromptType, ModelSpecType, emit_json,
                                fmt_table, json_option, progress, scheduler_choice)


@click.command()
@click.argument("prompts", nargs=-1, metavar="PROMPT...")
@click.option("-n", "n", type=int, default=4, show_default=True, help="Images kept per prompt.")
@click.option("--steps", type=int, default=None,
              help="Denoising steps of the schedule (default 25; with --init-image, about 25/strength, so that 25 "
                   "run: an img2img run takes the last int(steps x strength) of them, as in diffusers).")
@click.option("--clip-scale", type=FiniteFloat(), default=0.2, show_default=True,
              help="CLIP guidance strength, 0 = unguided: the RMS distance (pixels in [-1, 1]) each guided "
                   "step moves the denoised estimate along the CLIP gradient.")
@click.option("--cfg-scale", type=FiniteFloat(), default=None,
              help="Classifier-free guidance scale for text-conditioned (latent, --profile sd) models "
                   "(default 7.5 there); an error with the unconditional pixel models.")
@click.option("--cutouts", type=int, default=0, show_default=True,
              help="Random crops per step that CLIP also sees (on top of 4 jittered views).")
@click.option("--seed", type=int, default=None,
              help="First seed (default: random, printed and saved); candidate k uses SEED+k.")
@click.option("--best-of", "best_of", type=click.IntRange(min=1), default=None,
              help="Draw M candidates per kept image; keep the N best by CLIP score (default: the profile's on "
                   "its own diffusion model: 3 for shapes, 1 otherwise).")
@click.option("--drafts", type=click.IntRange(min=1), default=1, show_default=True,
              help="Start D trajectories per candidate; after --draft-steps steps keep the best by the same "
                   "score on their denoised previews and finish only those (early selection: more tries for "
                   "little more time).")
@click.option("--draft-steps", type=click.IntRange(min=1), default=13, show_default=True,
              help="Steps every draft runs before the choice.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Sample up to this many of a prompt's candidates (and drafts) together, one network and CLIP "
                   "call per step for all (split evenly); 1 = each alone, as diffusers' pipelines do with a batch "
                   "of one (a batch differs from that by float rounding, which can move a pixel by one level).")
@click.option("--views", type=click.IntRange(min=1), default=4, show_default=True,
              help="Augmented views of the image the CLIP sees per guided step (its loss averaged over them).")
@click.option("--guide-stop", type=FiniteFloat(min=0, max=1), default=None,
              help="Guide while t/T >= this (0 = to the end; default: the guide target's, 0 for x_t guidance, "
                   "0.3 for the x0 estimate); the steps after it run the plain model.")
@click.option("--select", type=click.Choice(["clip", "caption"]), default=None,
              help="How --best-of keeps its N: clip = the guiding CLIP's cosine; caption = that cosine plus "
                   "the captioner's log-probability that the caption ends right after the prompt (penalises "
                   "images holding more than the prompt names). Default: the profile's on its own diffusion "
                   "model (caption for shapes), else clip.")
@click.option("--captioner", "captioner_spec", type=ModelSpecType("captioner"), default=None, metavar="SPEC",
              help="Captioner for --select caption (default: the profile's).")
@click.option("--guide-target", type=click.Choice(["auto", "x0", "xt"]), default="auto", show_default=True,
              help="What the CLIP sees: x0 = the denoised estimate (any CLIP); xt = the noisy sample itself "
                   "(GLIDE-style: a noise-aware CLIP from `clipkit train clip --noise-aware`; pixel models); "
                   "auto = xt when the CLIP is noise-aware and the model is pixel-space, else x0.")
@click.option("--scheduler", type=scheduler_choice(), default="ddim", show_default=True,
              help="Sampler (a diffusers scheduler built from the model's own noise schedule).")
@click.option("--size", type=int, default=None, help="Image side in pixels (default: the model's own, 32 for shapes).")
@click.option("--out", "out_dir", type=click.Path(readable=False), default="generated", show_default=True,
              help="Output directory for <slug>-<seed>.png and <slug>-<seed>.json (a name an earlier run left "
                   "becomes <slug>-<seed>-2.png, -3, ...: nothing is replaced).")
@click.option("--overwrite", is_flag=True,
              help="Write <slug>-<seed>.png over an existing file (default: take the next free name).")
@click.option("--force", is_flag=True,
              help="Run even a prompt the profile's models know none of the words of (default: exit 2 before "
                   "sampling; the bundled models know only shapes, colours, sizes and positions).")
@click.option("--caption", "caption_images", is_flag=True,
              help="Also caption each kept image with the profile's captioner (or --captioner) and print what it "
                   "sees (a judge independent of the guiding CLIP).")
@click.option("--diffusion", "diffusion_spec", type=ModelSpecType("diffusion"), default=None, metavar="SPEC",
              help="Diffusion model: shapes, hf:ORG/NAME or a diffusers pipeline directory (overrides --profile).")
@click.option("--clip", "clip_specs", type=ModelSpecType("clip"), multiple=True, metavar="SPEC",
              help="CLIP that guides and scores: shapes-noised (the bundled profile's noise-aware guide), "
                   "shapes, openclip:ARCH/TAG, hf:ORG/NAME or a directory (overrides --profile). Repeat for "
                   "an ensemble: each CLIP sees the image with its own preprocessing.")
@click.option("--clip-weights", type=FloatList(min=0), default=None, metavar="W1,W2,...",
              help="One weight per --clip (default: equal; normalised to sum 1).")
@click.option("--negative", "negatives", multiple=True, metavar="TEXT[:STRENGTH]",
              help="Push away from TEXT (repeatable; strength default 1): CLIP's pairwise choice \"the prompt, "
                   "not TEXT\"; {prompt} in TEXT stands for the prompt. Latent models also use it as the "
                   "classifier-free negative prompt. On its own diffusion model a profile adds its "
                   "negatives (shapes: \"{prompt} and another shape:4\", which keeps images to what the "
                   "prompt names); --negative '' drops them.")
@click.option("--layout", type=click.Choice(["grid", "off"]), default=None,
              help="grid: a prompt of objects joined by 'and', each naming its own cell of a 3x3 grid (\"a red "
                   "circle at the top left and a blue square on the right\"), guides each object on its own: on "
                   "the image with the other objects' cells erased, with the negatives applied per object (not "
                   "with weighted parts, --image-prompt, --scorer or cutouts: then the prompt guides as one "
                   "text). off: the prompt guides as one text. Default: the profile's on its own diffusion model "
                   "(grid for shapes), else off.")
@click.option("--scorer", "scorer_specs", multiple=True,
              metavar="SPEC[:WEIGHT]",
              help="An image scorer added to what guidance and best-of maximise (repeatable; weight default "
                   "1): aesthetic:PATH, a LAION aesthetic-predictor head (linear or MLP, .pth or "
                   ".safetensors) on the first --clip's image embeddings. Preference models that are CLIPs guide "
                   "as --clip: PickScore (a transformers CLIPModel directory), HPSv2 "
                   "(openclip:ViT-H-14/HPS_v2_compressed.pt).")
@click.option("--image-prompt", "image_prompts", type=ImagePromptType(), multiple=True, metavar="PATH[:WEIGHT]",
              help="Guide towards an image's CLIP embedding (repeatable; weight default 1). With image "
                   "prompts only, the PROMPT may be left out.")
@click.option("--init-image", type=ImagePromptType(weighted=False), default=None, metavar="PATH",
              help="Start from this image noised to --strength of the trajectory (img2img); guidance still applies. "
                   "On the bundled profile's own model, without --clip, shapes-noised and shapes guide together "
                   "(the noise-aware guide alone adds shapes instead of recolouring).")
@click.option("--strength", type=FiniteFloat(min=0, max=1, min_open=True), default=0.5, show_default=True,
              help="With --init-image: how much of the trajectory is run (1 = from pure noise, the image is ignored).")
@click.option("--cut-schedule", type=CutScheduleType(), default=None, metavar="V+C,...",
              help="Disco-style cuts: VIEWS+CUTOUTS for equal parts of the trajectory, from noise to clean "
                   "(e.g. 8+0,4+4,2+8); overrides the 4 views and --cutouts.")
@click.option("--tv-scale", type=FiniteFloat(min=0), default=0.0, show_default=True,
              help="Total-variation penalty on the denoised estimate (smoother images).")
@click.option("--range-scale", type=FiniteFloat(min=0), default=0.0, show_default=True,
              help="Penalty on the denoised estimate's squared excess outside the pixel range.")
@click.option("--sat-scale", type=FiniteFloat(min=0), default=0.0, show_default=True,
              help="Saturation penalty: the absolute excess outside the pixel range (Disco's sat_scale).")
@json_option
@click.pass_obj
def generate(settings, prompts, n, steps, clip_scale, cfg_scale, cutouts, seed, best_of, drafts, draft_steps,
             batch_size, views, guide_stop, select, captioner_spec,
             guide_target, scheduler, size, out_dir, overwrite, diffusion_spec, clip_specs, clip_weights, negatives,
             layout, scorer_specs,
             image_prompts, init_image, strength, cut_schedule, tv_scale, range_scale, sat_scale, force,
             caption_images, as_json):
    """Generate images for each PROMPT (quote each one) with CLIP-guided diffusion.

    Writes OUT/<slug>-<seed>.png and a JSON sidecar with every parameter, the model specs, the seed
    and the final CLIP score: the cosine similarity of the saved image with its prompt under the
    guiding CLIP (what guidance optimises, so it flatters; judge with another CLIP). Existing files
    are never replaced without --overwrite (a taken name becomes <slug>-<seed>-2.png, -3, ...), and every
    target is checked before anything is generated. The same command (seed and options) writes the
    same bytes again; `clipkit generate PROMPT -n 1 --best-of 1 --seed S` regenerates the image of
    seed S (bit for bit with --batch-size 1; else up to a pixel level from float rounding).

    \b
    A PROMPT may weight parts, Disco-style: "a red circle:2 | a square:-1" (parts separated by
    " | ", each with an optional :WEIGHT, default 1; negative weights push away).

    \b
    Examples:
      clipkit generate "a red circle at the top left"
      clipkit generate "a red circle at the top left" -n 2 --seed 0 --caption
      clipkit generate "a shape at the top left" --negative "a red shape"
      clipkit generate "a red circle" --negative "{prompt} and another shape:4" --negative "a blue shape:2"
      clipkit generate --image-prompt render.png -n 2
      clipkit generate "a green square at the bottom right" --init-image blue.png --strength 0.5
      clipkit generate "a red circle" --clip shapes-noised --clip shapes --clip-weights 1,0.5
      clipkit generate "a red circle" --clip shapes --scorer aesthetic:head.safetensors:0.1
      clipkit generate "a blue square" "a green triangle" -n 2 --best-of 4 --seed 0 --out shapes/
      clipkit generate "a red square at the bottom left" -n 1 --best-of 4 --select caption
      clipkit generate "a church" -n 1 --diffusion hf:google/ddpm-church-256 --clip openclip:ViT-B-32/openai
    """
    import dataclasses

    from clipkit.api import generate as do_generate
    from clipkit.cli.common import resolve_spec
    if not prompts and not image_prompts:
        raise click.UsageError("give a PROMPT, or --image-prompt PATH to guide by an image alone")
    # the notice once, when the default profile is implicit; the profile's defaults are the library's
    diffusion = resolve_spec(settings, "diffusion", diffusion_spec)
    captioner = resolve_spec(dataclasses.replace(settings, quiet=True), "captioner", captioner_spec) \
        if select == "caption" or captioner_spec or caption_images else None
    bars = []

    def on_step(done: int, total: int):
        if not bars:
            bars.append(progress(None, "generating", disable=settings.quiet or as_json, total=total))
        bars[0].update(1)

    def on_image(im):
        """Each kept image as soon as its prompt's candidates are ranked (stderr; the table follows)."""
        if not (settings.quiet or as_json):
            from tqdm.auto import tqdm
            tqdm.write(f"ready: {im.path or im.prompt} (score {im.clip_score:.4f}, seed {im.seed})", file=sys.stderr)
    try:
        res = do_generate(list(prompts), n, seed=seed, profile=settings.profile, diffusion=diffusion, force=force,
                          clip=list(clip_specs) or None, select=select, captioner=captioner, device=settings.device,
                          precision=settings.precision, out_dir=out_dir, overwrite=overwrite, on_step=on_step,
                          on_image=on_image, threads=settings.threads, batch_size=batch_size, views=views,
                          guide_stop=guide_stop, steps=steps, clip_scale=clip_scale, cfg_scale=cfg_scale, cutouts=cutouts,
                          best_of=best_of, drafts=drafts, draft_steps=draft_steps, scheduler=scheduler, size=size,
                          guide_target=guide_target, negative=list(negatives),
                          image_prompts=[list(ip) for ip in image_prompts], clip_weights=clip_weights,
                          init_image=init_image, strength=strength, scorers=list(scorer_specs), layout=layout,
                          cut_schedule=cut_schedule, tv_scale=tv_scale, range_scale=range_scale, sat_scale=sat_scale)
    finally:
        for b in bars:
            b.close()
    captions = None
    if caption_images:
        from clipkit.captioning.captioner import caption
        captions = [c.caption for c in caption([im.image for im in res.images], captioner, device=settings.device)]
    if as_json:
        doc = res.to_dict()
        for d, c in zip(doc["images"], captions or ()):
            d["caption"] = c
        emit_json(doc)
        return
    click.echo(f"# {len(res.images)} image(s) in {res.out_dir} (seed {res.seed}, {res.candidates} candidate(s) "
               f"per prompt, {res.wall_s:.1f} s); score = {res.score_label()}")
    rows = [[im.path, f"{im.clip_score:.4f}", im.seed, im.prompt] for im in res.images]
    if captions is not None:
        rows = [r + [c] for r, c in zip(rows, captions)]
    click.echo(fmt_table(["image", "score", "seed", "prompt"] + (["the captioner sees"] if captions else []), rows))
