"""The studio: ``clipkit serve``'s one local page with tabs (DESIGN §8).

* **Generate**: a prompt (weighted parts ``"a:2 | b:-1"``, negatives), seed, steps, clip scale, best-of,
  an image prompt and an init image (uploads), strength; run by :func:`clipkit.api.generate` (the CLI's
  and the Python API's function: the same seed gives the same bytes), with a live step counter, the
  denoised previews and a Cancel that stops the job within one step.
* **Gallery**: every picture under ``--out`` with its sidecar; "same seed again" (the picture's seed
  alone, ``n=1, best_of=1``: the same bytes), "vary seed", a caption on demand, the PNG + sidecar.
* **Caption**: an uploaded image, captioned greedily and by beam search, each candidate with its CLIP score.
* **Rerank**: uploaded images ranked by a text query (the rerank plugin, core's scores and order).
* **Search**, with an index: the routes of :mod:`clipkit.search.server`.

Every model-heavy request is a job on one queue (:mod:`clipkit.studio.jobs`), run one at a time; the
page polls ``/api/jobs/<id>`` (long polls) for its place, step, preview and result. Outputs go only
under ``--out``: each generation into a folder of its own (``<time>-<job>/``), uploads kept for a
generation into ``uploads/`` (content-addressed), both through :mod:`clipkit.core.outputs`' safe writer.

Routes (errors: ``{"error": ...}`` with a 4xx status):

* ``GET  /api/info``                         tabs, models, defaults, limits (and the index's, with one)
* ``POST /api/generate``                     form or JSON -> 202 a job
* ``GET  /api/jobs``                         the queue: the running job and the waiting ones
* ``GET  /api/jobs/<id>?after=V&wait=S``     a job (waits up to S seconds for a version after V)
* ``GET  /api/jobs/<id>/preview.png``        its latest preview
* ``POST /api/jobs/<id>/cancel``             cancel it (waiting: dropped; running: stops within a step)
* ``GET  /api/gallery``                      the pictures under --out, newest first
* ``GET  /gallery/<id>/image.png|thumb|sidecar.json|download``   a picture, its thumbnail, sidecar, zip of both
* ``POST /api/gallery/<id>/again``           ``{"vary": false}`` -> 202 a job: the same seed again, or a new one
* ``POST /api/gallery/<id>/caption``         -> 202 a job: its caption
* ``POST /api/caption-image``                multipart ``image`` -> 202 a job: greedy + beam captions
* ``POST /api/rerank``                       multipart ``images`` (several) + ``query`` -> 202 a job: the ranking
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from clipkit.core.errors import InputError
from clipkit.search.server import MAX_ID, Api, register_search
from clipkit.search.web import HttpError, PixelBudget, ServeConfig, decode_image, install_web, int_arg, read_upload
from clipkit.studio.gallery import UPLOADS, THUMB, Gallery, GalleryMissing
from clipkit.studio.jobs import Job, JobQueue

log = logging.getLogger(__name__)

MAX_SEED = 2 ** 32
ID = re.compile(r"^[0-9a-f]{16}$")


@dataclass
class StudioConfig(ServeConfig):
    """The studio's settings (``clipkit serve``'s options)."""
    out: str = "studio-out"            # every output goes under this folder
    profile: str | None = None         # --profile (None: the default, shapes)
    clip: tuple = ()                   # --clip SPEC... (the guide CLIP(s); the first also reranks)
    diffusion: str | None = None       # --diffusion SPEC
    device: str = "auto"
    precision: str = "fp32"
    preview_every: int = 5             # a denoised preview at least every this many steps
    max_steps: int = 500
    max_best_of: int = 16
    max_n: int = 8
    max_files: int = 32                # images in one rerank request
    jobs_kept: int = 64
    poll_wait_s: float = 5.0           # longest long poll


class Models:
    """The models the studio's jobs use, loaded at first use on the job worker and kept."""

    def __init__(self, cfg: StudioConfig, known_scorers=()):
        self.cfg = cfg
        self.known = [s for s in known_scorers if s is not None]
        self._scorer = self._captioner = None
        self._diffusion: dict = {}

    def profile(self):
        from clipkit.core.profiles import DEFAULT_PROFILE, PROFILES, get_profile
        if (self.cfg.profile or DEFAULT_PROFILE) not in PROFILES:
            import clipkit.api  # noqa: F401  (registers the bundled profile; the CLI has already)
        return get_profile(self.cfg.profile)

    def diffusion_spec(self) -> str:
        spec = self.cfg.diffusion or self.profile().diffusion
        if spec is None:
            raise InputError(f"profile {self.profile().name!r} has no diffusion model: start the studio with "
                             "--diffusion SPEC")
        return spec

    def clip_specs(self) -> set:
        """Every CLIP the studio may guide with: --clip, and the profile's."""
        p = self.profile()
        return {*self.cfg.clip, p.clip, p.guide_spec, *p.init_clips}

    def diffusion(self):
        from clipkit.guidance.diffusion import load_diffusion
        spec = self.diffusion_spec()
        if spec not in self._diffusion:
            self._diffusion.clear()
            self._diffusion[spec] = load_diffusion(spec, device=self.cfg.device, precision=self.cfg.precision)
        return self._diffusion[spec]

    def scorer(self):
        from clipkit.core.scorer import load_scorer
        spec = self.cfg.clip[0] if self.cfg.clip else self.profile().clip
        if self._scorer is None:
            self._scorer = next((s for s in self.known if s.spec == spec), None) or \
                load_scorer(spec, device=self.cfg.device, precision=self.cfg.precision)
        return self._scorer

    def captioner(self):
        from clipkit.captioning.captioner import load_captioner
        if self.cfg.captioner is None:
            raise InputError("no captioner: start the studio with --captioner SPEC")
        if self._captioner is None:
            self._captioner = load_captioner(self.cfg.captioner, device=self.cfg.device, precision=self.cfg.precision)
        return self._captioner


def _number(src, name: str, default, lo: float, hi: float, integer: bool = False, lo_open: bool = False):
    raw = src.get(name)
    if raw is None or (isinstance(raw, str) and raw.strip() == ""):
        return default
    if isinstance(raw, bool):
        raise InputError(f"{name} must be a number, got {raw!r}")
    try:
        v = float(raw)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {str(raw)[:40]!r}") from None
    if not math.isfinite(v):
        raise InputError(f"{name} must be a finite number, got {str(raw)[:40]!r}")
    if integer:
        if v != int(v):
            raise InputError(f"{name} must be an integer, got {str(raw)[:40]!r}")
        v = int(v)
    if not (lo < v if lo_open else lo <= v) or not v <= hi:
        raise InputError(f"{name} must be {'above' if lo_open else 'at least'} {lo:g} and at most {hi:g}, got {v:g}")
    return v


def _text(src, name: str, max_len: int = 2000) -> str:
    raw = src.get(name)
    if raw is None:
        return ""
    if not isinstance(raw, str):
        raise InputError(f"{name} must be text")
    if len(raw) > max_len:
        raise InputError(f"{name} is longer than {max_len} characters")
    return raw


class Studio:
    """What the studio's routes do, independent of Flask."""

    def __init__(self, cfg: StudioConfig, models: Models, generate: Callable | None = None):
        self.cfg, self.models = cfg, models
        self.out = Path(cfg.out).expanduser()
        check_out_folder(self.out)
        self.gallery = Gallery(self.out)
        self.queue = JobQueue(cfg.jobs_kept)
        self.budget = PixelBudget(cfg.decode_budget)
        self.generate_fn = generate              # None: clipkit.api.generate (imported at the first job)

    # -- uploads -----------------------------------------------------------------------------------
    def decode(self, data: bytes, name: str, max_side: int | None = None):
        return decode_image(data, name, self.budget, max_side=max_side or self.cfg.max_side,
                            max_pixels=self.cfg.max_pixels, wait_s=self.cfg.decode_wait_s)

    def uploads_dir(self) -> Path:
        from clipkit.core.outputs import check_output_dir
        d = self.out / UPLOADS
        if os.path.islink(d):
            raise InputError(f"{d} is a symbolic link: refusing to write through it")
        check_output_dir(d, what="uploads folder")
        return d

    def save_upload(self, data: bytes, name: str) -> str:
        """An uploaded image kept for a generation: decoded (bounded), re-encoded as PNG under
        ``--out/uploads/<digest>.png`` by the safe writer (atomic; a link there is replaced, never
        followed). -> its path."""
        from clipkit.core.outputs import write_bytes_atomic
        im = self.decode(data, name)
        buf = io.BytesIO()
        im.save(buf, "PNG")
        png = buf.getvalue()
        path = self.uploads_dir() / f"{hashlib.sha256(png).hexdigest()[:24]}.png"
        st = os.lstat(path) if os.path.lexists(path) else None
        if st is None or not (os.path.isfile(path) and not os.path.islink(path) and st.st_size == len(png)):
            write_bytes_atomic(path, png, overwrite=True)
        return str(path)

    def check_upload_path(self, p) -> str:
        """A path a sidecar records for an init image or image prompt: only a regular file in --out/uploads."""
        uploads = os.path.realpath(self.out / UPLOADS)
        if not isinstance(p, str) or os.path.islink(p) or not os.path.isfile(p) or \
                os.path.dirname(os.path.realpath(p)) != uploads:
            raise InputError(f"the picture was made from {Path(str(p)).name}, which is not an upload of this "
                             "studio (in --out/uploads): regenerate it with clipkit generate")
        return p

    # -- generation --------------------------------------------------------------------------------
    def parse_generate(self, src, files) -> dict:
        """Form/JSON fields -> clipkit.generate's arguments (checked: a 400 before any job)."""
        cfg = self.cfg
        prompt = _text(src, "prompt").strip()
        negatives = [t.strip() for t in _text(src, "negative", 4000).splitlines() if t.strip()]
        if len(negatives) > 16:
            raise InputError("at most 16 negatives")
        keep = str(src.get("profile_negatives", "1")).lower() not in ("0", "false", "off", "no")
        if not keep:
            negatives = [""] + negatives              # the CLI's --negative '': drops the profile's
        opts = {"negative": negatives}
        seed = _number(src, "seed", None, 0, MAX_SEED - 1, integer=True)
        n = _number(src, "n", 1, 1, cfg.max_n, integer=True)
        opts["steps"] = _number(src, "steps", None, 1, cfg.max_steps, integer=True)
        opts["clip_scale"] = _number(src, "clip_scale", 0.2, 0, 1000)
        opts["best_of"] = _number(src, "best_of", None, 1, cfg.max_best_of, integer=True)
        image_prompts = []
        f = files.get("image_prompt") if files else None
        if f is not None and f.filename:
            data, name = read_upload(f, cfg.max_upload)
            w = _number(src, "image_prompt_weight", 1.0, -100, 100)
            image_prompts.append([self.save_upload(data, name), w])
        opts["image_prompts"] = image_prompts
        f = files.get("init_image") if files else None
        if f is not None and f.filename:
            data, name = read_upload(f, cfg.max_upload)
            opts["init_image"] = self.save_upload(data, name)
            opts["strength"] = _number(src, "strength", 0.5, 0, 1, lo_open=True)
        if not prompt and not image_prompts:
            raise InputError("give a prompt, or an image prompt to guide by an image alone")
        force = str(src.get("force", "0")).lower() in ("1", "true", "on", "yes")
        return {"prompts": [prompt] if prompt else [], "n": n, "seed": seed, "clip": list(cfg.clip) or None,
                "force": force, "options": {k: v for k, v in opts.items() if v is not None}}

    def regenerate_args(self, eid: str, vary: bool) -> dict:
        """A gallery picture's sidecar -> the arguments that make it again (``vary``: with a new seed)."""
        from clipkit.guidance.config import GenerateConfig
        e = self.gallery.get(eid)
        sc = self.gallery.sidecar(e)
        params = sc.get("parameters")
        if not isinstance(params, dict) or not isinstance(sc.get("seed"), int) or not isinstance(sc.get("prompt"), str):
            raise InputError(f"{e.rel}: its sidecar records no prompt, seed and parameters")
        if params.get("scorers"):
            raise InputError(f"{e.rel} was made with --scorer, which the studio does not load: use clipkit generate")
        models = sc.get("models") if isinstance(sc.get("models"), dict) else {}
        want = self.models.diffusion_spec()
        if models.get("diffusion") != want:
            raise InputError(f"{e.rel} was made with diffusion model {models.get('diffusion')!r}; this studio "
                             f"runs {want!r} (clipkit serve --diffusion ...)")
        clips = models.get("clip")
        clips = [clips] if isinstance(clips, str) else clips
        if not isinstance(clips, list) or not clips or not set(clips) <= self.models.clip_specs():
            raise InputError(f"{e.rel} was guided by {clips!r}, which this studio does not offer "
                             "(clipkit serve --clip ...)")
        names = {f.name for f in dataclasses.fields(GenerateConfig)}
        opts = {k: v for k, v in params.items() if k in names}
        prof = self.models.profile()
        if opts.get("layout") == (prof.layout if want == prof.diffusion else "off"):
            del opts["layout"]                    # the profile's own: as asked the first time (no warning)
        opts["negative"] = [""] + [t for t in (params.get("negative") or []) if isinstance(t, str)]
        ips = params.get("image_prompts") or []
        if not isinstance(ips, list) or not all(isinstance(ip, list) and len(ip) == 2 for ip in ips):
            raise InputError(f"{e.rel}: its sidecar's image_prompts are not [[path, weight], ...]")
        opts["image_prompts"] = [[self.check_upload_path(p), w] for p, w in ips]
        if params.get("init_image"):
            opts["init_image"] = self.check_upload_path(params["init_image"])
        if vary:
            seed = None
        else:
            seed = sc["seed"]                     # this picture's own seed, alone: the same bytes
            opts["best_of"], opts["drafts"] = 1, 1
        prompt = sc["prompt"]
        # force: the prompt was run once already (perhaps forced); the sidecar is the record of it
        return {"prompts": [prompt] if prompt else [], "n": 1, "seed": seed, "clip": clips, "force": True,
                "options": opts}

    def submit_generate(self, args: dict, label: str) -> Job:
        return self.queue.submit("generate", label, lambda job: self._run_generate(job, args))

    def _run_generate(self, job: Job, args: dict) -> dict:
        cfg = self.cfg
        run_dir = self.out / f"{time.strftime('%Y%m%d-%H%M%S')}-{job.id}"
        steps = args["options"].get("steps") or 25
        every = max(1, min(cfg.preview_every, steps // 4))

        def on_step(done: int, total: int):
            job.update(step=done, total=total)

        def on_preview(p):
            buf = io.BytesIO()
            p.image.save(buf, "PNG")
            job.update(preview=buf.getvalue(), preview_info={"step": p.step, "steps": p.steps, "seed": p.seed,
                                                             "prompt": p.prompt, "size": list(p.image.size)})

        def on_image(img):
            entry = self.gallery.describe(self.gallery.entry_for(img.path)) if img.path else None
            if entry is not None:
                job.update(images=job.images + [entry])
        generate = self.generate_fn
        if generate is None:
            from clipkit.api import generate
        res = generate(args["prompts"], args["n"], seed=args["seed"], profile=cfg.profile,
                               diffusion=self.models.diffusion(), clip=args["clip"], captioner=cfg.captioner,
                               device=cfg.device, precision=cfg.precision, out_dir=run_dir,
                               on_step=on_step, on_preview=on_preview, preview_every=every, on_image=on_image,
                               cancel=job.cancelled, force=args.get("force", False), **args["options"])
        return {"seed": res.seed, "candidates": res.candidates, "wall_s": round(res.wall_s, 3),
                "score": res.score_label(), "folder": run_dir.name, "images": job.images}

    # -- captions and reranks ----------------------------------------------------------------------
    def caption_image(self, im, name: str) -> dict:
        from clipkit.captioning.captioner import decode_config
        cap = self.models.captioner()
        greedy = cap.caption([im], decode_config("greedy"))[0]
        beam = cap.caption([im], decode_config("beam", beams=5, candidates=5))[0]
        cands = beam.candidates or []
        return {"name": name, "captioner": cfg_spec(cap),
                "greedy": {"caption": greedy.caption, "clip_score": greedy.clip_score, "logprob": greedy.logprob},
                "beam": {"caption": beam.caption, "clip_score": beam.clip_score, "logprob": beam.logprob,
                         "candidates": [c.to_dict() for c in cands]},
                "score": "cosine(image, caption) under the captioner's CLIP"}

    def gallery_caption(self, eid: str, job: Job) -> dict:
        from clipkit.captioning.captioner import decode_config
        e = self.gallery.get(eid)
        im = self.decode(self.gallery.png(e), e.rel)
        res = self.models.captioner().caption([im], decode_config("beam"))[0]
        d = {"caption": res.caption, "clip_score": res.clip_score}
        self.gallery.captions[e.key] = d
        return {"id": eid, **d}

    def rerank(self, images, names, query: str) -> dict:
        from clipkit.rerank import rerank
        res = rerank(images, query, self.models.scorer())
        rows = [{"rank": r.rank, "score": r.score, "index": int(r.path[1:]), "name": names[int(r.path[1:])]}
                for r in res.results]
        return {"query": query, "model": res.model, "score": "cosine(image, query)", "results": rows}

    def info(self) -> dict:
        from clipkit.guidance.defaults import DEFAULT_STEPS
        p = self.models.profile()
        diffusion = self.cfg.diffusion or p.diffusion
        own = diffusion == p.diffusion
        return {"profile": p.name, "description": p.description, "diffusion": diffusion,
                "clip": list(self.cfg.clip) or [p.guide_spec], "rerank_clip": (self.cfg.clip or (p.clip,))[0],
                "captioner": self.cfg.captioner, "out": self.out.name or str(self.out),
                "defaults": {"steps": DEFAULT_STEPS, "clip_scale": 0.2, "best_of": p.best_of if own else 1,
                             "n": 1, "strength": 0.5, "negative": list(p.negative) if own else []},
                "limits": {"steps": self.cfg.max_steps, "best_of": self.cfg.max_best_of, "n": self.cfg.max_n,
                           "files": self.cfg.max_files, "max_upload": self.cfg.max_upload,
                           "max_pixels": self.cfg.max_pixels}}


def check_out_folder(path: Path) -> None:
    """--out can be written: a writable folder, or one that can be made (made at the first write, so a
    studio that generated nothing leaves nothing behind). An InputError of one line otherwise."""
    if os.path.lexists(path):
        if not os.path.isdir(path):
            raise InputError(f"--out folder {path} exists and is not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise InputError(f"--out folder {path} is not writable")
        return
    parent = path.absolute().parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot create --out folder {path}: {parent} is not a writable folder")


def cfg_spec(cap) -> str | None:
    return getattr(cap, "spec", None)


def create_studio_app(config: StudioConfig | None = None, reader=None, search_scorer=None,
                      generate: Callable | None = None):
    """The studio's Flask app (``app.extensions["clipkit_studio"]`` is its :class:`Studio`; call
    ``studio.queue.close()`` when done). With ``reader`` (an opened index) and ``search_scorer`` (its
    CLIP), the search tab too. ``generate`` replaces :func:`clipkit.api.generate` (tests only)."""
    from flask import Flask, Response, jsonify, request

    cfg = config or StudioConfig()
    models = Models(cfg, known_scorers=[search_scorer])
    studio = Studio(cfg, models, generate)
    app = Flask(__name__, static_folder=None)
    app.extensions["clipkit_studio"] = studio
    install_web(app, cfg)
    api = None
    if reader is not None:
        def run_on_queue(fn):
            return studio.queue.run("caption", "caption (search)", lambda job: fn())
        api = Api(reader, search_scorer, cfg, lambda spec, device=None: models.captioner(), budget=studio.budget,
                  run=run_on_queue)
        reader.ann_index()
        app.extensions["clipkit_api"] = api
        register_search(app, api)

    def accepted(job: Job):
        return jsonify(studio.queue.view(job)), 202

    def gallery_entry(eid: str):
        if not ID.match(eid or ""):
            raise GalleryMissing(f"no picture {str(eid)[:40]!r} in the gallery")
        return studio.gallery.get(eid)

    def body() -> dict:
        b = request.get_json(silent=True) if request.is_json else None
        return b if isinstance(b, dict) else {}

    @app.errorhandler(GalleryMissing)
    def missing(e):
        return jsonify({"error": str(e.args[0]) if e.args else "not found"}), 404

    @app.get("/api/info")
    def info():
        tabs = ["generate", "gallery", "caption", "rerank"] + (["search"] if api is not None else [])
        d = {"tabs": tabs, "studio": studio.info(), "captioner": cfg.captioner, "max_upload": cfg.max_upload}
        if api is not None:
            d = {**api.info(), **d}
        return jsonify(d)

    @app.post("/api/generate")
    def generate_route():
        src = request.form if request.form or request.files else body()
        args = studio.parse_generate(src, request.files)
        label = args["prompts"][0] if args["prompts"] else "image prompt"
        return accepted(studio.submit_generate(args, label))

    @app.get("/api/jobs")
    def jobs():
        return jsonify(studio.queue.status())

    @app.get("/api/jobs/<job_id>")
    def job_view(job_id):
        job = studio.queue.get(job_id)
        after = int_arg(request.args, "after", -1, -1, MAX_ID)
        wait = min(float(int_arg(request.args, "wait", 0, 0, 60)), cfg.poll_wait_s)
        return jsonify(studio.queue.wait(job, after, wait) if wait > 0 and after >= 0 else studio.queue.view(job))

    @app.get("/api/jobs/<job_id>/preview.png")
    def job_preview(job_id):
        job = studio.queue.get(job_id)
        if job.preview is None:
            raise LookupError("no preview yet")
        return Response(job.preview, mimetype="image/png", headers={"Cache-Control": "no-store"})

    @app.post("/api/jobs/<job_id>/cancel")
    def job_cancel(job_id):
        return jsonify(studio.queue.cancel(studio.queue.get(job_id)))

    @app.get("/api/gallery")
    def gallery():
        limit = int_arg(request.args, "limit", 200, 1, 5000)
        entries = studio.gallery.scan()
        return jsonify({"total": len(entries), "out": studio.info()["out"],
                        "images": [studio.gallery.describe(e) for e in entries[:limit]]})

    @app.get("/gallery/<eid>/image.png")
    def gallery_image(eid):
        e = gallery_entry(eid)
        headers = {"Cache-Control": "no-cache"}
        if request.args.get("download"):
            headers["Content-Disposition"] = f'attachment; filename="{e.png.name}"'
        return Response(studio.gallery.png(e), mimetype="image/png", headers=headers)

    @app.get("/gallery/<eid>/thumb")
    def gallery_thumb(eid):
        e = gallery_entry(eid)
        cached = studio.gallery.thumbs.get(e.key)            # keyed by size and mtime: never stale
        if cached is None:
            data = studio.gallery.png(e)
            im = studio.decode(data, e.rel, max_side=THUMB)
            if im.size == studio_size(data):
                cached = (data, "image/png")                 # small already: the PNG itself
            else:
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=88)
                cached = (buf.getvalue(), "image/jpeg")
            if len(studio.gallery.thumbs) >= 1024:
                studio.gallery.thumbs.clear()                # bounded: a big gallery pages through it
            studio.gallery.thumbs[e.key] = cached
        return Response(cached[0], mimetype=cached[1], headers={"Cache-Control": "no-cache"})

    @app.get("/gallery/<eid>/sidecar.json")
    def gallery_sidecar(eid):
        e = gallery_entry(eid)
        return Response(studio.gallery.sidecar_bytes(e), mimetype="application/json",
                        headers={"Content-Disposition": f'attachment; filename="{e.sidecar.name}"'})

    @app.get("/gallery/<eid>/download")
    def gallery_download(eid):
        e = gallery_entry(eid)
        return Response(studio.gallery.bundle(e), mimetype="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="{e.png.stem}.zip"'})

    @app.post("/api/gallery/<eid>/again")
    def gallery_again(eid):
        e = gallery_entry(eid)
        vary = bool(body().get("vary", False) or request.args.get("vary") in ("1", "true"))
        args = studio.regenerate_args(e.id, vary)
        return accepted(studio.submit_generate(args, ("vary seed: " if vary else "same seed: ") + (args["prompts"] or
                                                                                                ["image prompt"])[0]))

    @app.post("/api/gallery/<eid>/caption")
    def gallery_caption(eid):
        e = gallery_entry(eid)
        if cfg.captioner is None:
            raise HttpError(503, "captioning unavailable: start the studio with --captioner SPEC")
        return accepted(studio.queue.submit("caption", f"caption {e.rel}",
                                            lambda job: studio.gallery_caption(e.id, job)))

    @app.post("/api/caption-image")
    def caption_image():
        if cfg.captioner is None:
            raise HttpError(503, "captioning unavailable: start the studio with --captioner SPEC")
        f = request.files.get("image")
        if f is None:
            raise InputError("POST an image as the multipart field 'image'")
        data, name = read_upload(f, cfg.max_upload)
        im = studio.decode(data, name)
        return accepted(studio.queue.submit("caption", f"caption {name}", lambda job: studio.caption_image(im, name)))

    @app.post("/api/rerank")
    def rerank():
        from clipkit.core.backends import check_texts
        query = check_texts([_text(request.form, "query", 1000)])[0]
        files = [f for f in request.files.getlist("images") if f.filename]
        if not files:
            raise InputError("POST images as the multipart field 'images' (several)")
        if len(files) > cfg.max_files:
            raise HttpError(413, f"at most {cfg.max_files} images in one rerank")
        images, names = [], []
        for f in files:
            data, name = read_upload(f, cfg.max_upload)
            images.append(studio.decode(data, name, max_side=512))
            names.append(name)
        return accepted(studio.queue.submit("rerank", f"rerank {len(images)} images: {query}",
                                            lambda job: studio.rerank(images, names, query)))

    return app


def studio_size(data: bytes) -> tuple[int, int] | None:
    """The pixel size a PNG's header declares (no decoding)."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:                 # noqa: BLE001 - not a readable image: no size
        return None
