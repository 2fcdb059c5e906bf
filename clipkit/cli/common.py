"""Pieces shared by the CLI commands: model options, tolerant image loading, JSON output."""
from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click

log = logging.getLogger("clipkit.cli")

NOTICE = ("note: using the bundled 'shapes' demo models, which know only the Shapes world; "
          "use --profile sd or --clip SPEC for real models")


class FiniteFloat(click.FloatRange):
    """A float option that rejects NaN and infinity at parse time (and, optionally, a range:
    ``FiniteFloat(min=0, min_open=True)``); FloatRange alone lets NaN through every bound."""
    name = "float"

    def _describe_range(self) -> str:
        # click prints "x<=None" for an unbounded range; say nothing instead
        return "" if self.min is None and self.max is None else super()._describe_range()

    def get_metavar(self, *args, **kwargs):
        return "FLOAT"

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv


class FloatList(click.ParamType):
    """Comma-separated finite numbers, e.g. ``2,1,0.5``."""
    name = "numbers"

    def __init__(self, min: float | None = None):
        self.min = min

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return list(value)
        out = []
        for part in str(value).split(","):
            try:
                v = float(part)
            except ValueError:
                self.fail(f"expected comma-separated numbers (e.g. 2,1), got {value!r}", param, ctx)
            if not math.isfinite(v):
                self.fail(f"{part.strip()!r} in {value!r} is not a finite number", param, ctx)
            if self.min is not None and v < self.min:
                self.fail(f"{part.strip()!r} in {value!r} is below {self.min:g}", param, ctx)
            out.append(v)
        return out


class ImagePromptType(click.ParamType):
    """``PATH[:WEIGHT]`` (``weighted=False``: ``PATH``) naming a regular file, checked at parse time;
    the value is ``(path, weight)`` (or the path). The image itself is decoded, time-bound, before
    any model loads (``clipkit.guidance.pipeline.read_image``)."""
    name = "path"

    def __init__(self, weighted: bool = True):
        self.weighted = weighted

    def convert(self, value, param, ctx):
        if isinstance(value, tuple) or (not self.weighted and not isinstance(value, str)):
            return value
        from clipkit.core.errors import InputError
        from clipkit.core.objectives import parse_weighted_path
        try:
            path, weight = parse_weighted_path(value) if self.weighted else (value, 1.0)
        except InputError as e:
            self.fail(str(e), param, ctx)
        p = Path(path).expanduser()
        if not p.exists():
            self.fail(f"{path}: no such file", param, ctx)
        if not p.is_file():
            self.fail(f"{path}: not a regular file", param, ctx)
        return (path, weight) if self.weighted else path


class CutScheduleType(click.ParamType):
    """``VIEWS+CUTOUTS,...`` (``clipkit.guidance.wrapper.parse_cut_schedule``), checked at parse time."""
    name = "schedule"

    def convert(self, value, param, ctx):
        from clipkit.core.errors import InputError
        from clipkit.guidance.wrapper import parse_cut_schedule
        try:
            parse_cut_schedule(value)
        except InputError as e:
            self.fail(str(e), param, ctx)
        return value


class ModelSpecType(click.ParamType):
    """A model spec for one kind of model (``ModelSpecType("diffusion")``), checked at parse time by the
    registry's own parser (``clipkit.core.registry.parse_spec``): syntax and the source's kind only, nothing
    is loaded and the network is not touched. The value stays the string the user typed; a bad one
    raises the registry's ModelLoadError, which the CLI prints as the same one line as a failed load
    (``Error: cannot load model ...``, exit 2)."""
    name = "spec"

    def __init__(self, component: str = "clip"):
        self.component = component

    def convert(self, value, param, ctx):
        from clipkit.core.registry import parse_spec
        parse_spec(value, self.component)
        return value


def scheduler_choice() -> click.Choice:
    """The sampler scheduler names (``clipkit.guidance.schedulers.SCHEDULER_NAMES``) as a click choice.
    Called by ``generate`` when its module loads; that table imports neither torch nor diffusers."""
    from clipkit.guidance.schedulers import SCHEDULER_NAMES
    return click.Choice(SCHEDULER_NAMES)


def check_report_outputs(csv_path, sheet, overwrite: bool, inputs) -> None:
    """Validate ``--csv`` and ``--sheet`` before any work (see clipkit.core.outputs)."""
    from pathlib import Path

    from clipkit.core.outputs import check_output_file
    for opt, path in (("--csv", csv_path), ("--sheet", sheet)):
        if path:
            check_output_file(path, overwrite=overwrite, inputs=inputs, what=opt)
    if csv_path and sheet and Path(csv_path).resolve() == Path(sheet).resolve():
        raise click.UsageError("--csv and --sheet name the same file")


def plural(n: int, noun: str) -> str:
    """'1 template', '2 templates'."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def check_inputs_exist(paths, what: str = "input", all_needed: bool = False) -> None:
    """Fail (InputError, exit 2) before any model loads when the named inputs are not there: when
    none of ``paths`` exists, or (``all_needed``) when any one is missing. Unreadable files that do
    exist are left to the tolerant loaders (reported and skipped)."""
    from clipkit.core.errors import InputError
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing and (all_needed or len(missing) == len(paths)):
        raise InputError(f"{what} {missing[0]}: no such file or folder"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def clip_option(f):
    return click.option("--clip", "clip_spec", type=ModelSpecType("clip"), default=None, metavar="SPEC",
                        help="CLIP model: shapes, openclip:ARCH/TAG, hf:ORG/NAME or a directory "
                             "(overrides --profile).")(f)


def batch_size_option(f):
    return click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
                        help="Images/texts per forward pass.")(f)


def json_option(f):
    return click.option("--json", "as_json", is_flag=True,
                        help="Print one JSON document on stdout and nothing else there.")(f)


def profile_of(settings):
    """The profile ``--profile`` names (or the default), with the bundled one registered."""
    import clipkit.shapes.profile  # noqa: F401  (registers the bundled `shapes` profile)
    from clipkit.core.profiles import get_profile
    return get_profile(settings.profile)


def resolve_spec(settings, component: str, override: str | None) -> str:
    """The model spec for a component: --COMPONENT, else --profile, else the default (with a notice)."""
    if override:
        return override
    if settings.profile is None and not settings.quiet:
        click.echo(NOTICE, err=True)
    profile = profile_of(settings)
    spec = getattr(profile, component) or (profile.clip if component == "guide" else None)
    if spec is None:
        raise click.UsageError(f"profile {settings.profile!r} has no default {component}: "
                               f"pass --{component} SPEC")
    return spec


def make_scorer(settings, clip_spec: str | None, batch_size: int = 64, num_workers: int = 0):
    from clipkit.core.scorer import load_scorer
    spec = resolve_spec(settings, "clip", clip_spec)
    return load_scorer(spec, device=settings.device, precision=settings.precision,
                       batch_size=batch_size, num_workers=num_workers)


@dataclass
class LoadedImages:
    paths: list[str] = field(default_factory=list)
    images: list = field(default_factory=list)                    # RGB PIL images
    skipped: list[dict] = field(default_factory=list)             # [{path, reason}]


def load_images_tolerant(paths, quiet: bool = False) -> LoadedImages:
    """Expand folders and open every image; unreadable ones are reported and skipped.

    Raises InputError when nothing could be read (the CLI exits 2).
    """
    from clipkit.core.errors import ImageLoadError, InputError
    from clipkit.core.io import load_image, scan_images
    out = LoadedImages()
    files = scan_images(paths)
    for p in progress(files, "reading images", disable=quiet or len(files) < 50):
        try:
            out.images.append(load_image(p))
            out.paths.append(str(p))
        except ImageLoadError as e:
            out.skipped.append({"path": str(p), "reason": e.reason})
            log.warning("skipped %s: %s", p, e.reason)
    if not out.images:
        what = "no image files found" if not files else f"none of the {len(files)} files could be read"
        raise InputError(what)
    if out.skipped:
        log.warning("%d of %d files skipped", len(out.skipped), len(files))
    return out


def show_progress(quiet: bool = False) -> bool:
    """Whether to draw progress bars: not with -q/--json, and only on a terminal (a redirected
    stderr gets no bars)."""
    return not quiet and sys.stderr.isatty()


def progress(iterable, desc: str, disable: bool = False, total: int | None = None):
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, disable=not show_progress(disable),
                file=sys.stderr, leave=False)


def _finite(obj):
    """``obj`` with every NaN or infinite float replaced by None (JSON's null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def emit_json(obj) -> None:
    """Print one JSON document: always valid JSON (a non-finite number is written as null, never as
    the bare ``NaN``/``Infinity`` tokens Python's json would write)."""
    try:
        text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(obj), indent=2, ensure_ascii=False, allow_nan=False)
    click.echo(text)


def fmt_table(header: list[str], rows: list[list], widths: list[int] | None = None) -> str:
    """Plain aligned table for terminals."""
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = widths or [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
