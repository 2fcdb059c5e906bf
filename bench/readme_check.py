"""Keep the README true (issue 28): every `clipkit ...` command line of README.md's command blocks is
parsed by clipkit's own click parser; the ones that run on the bundled models are run; every
`clipkit generate` example on the bundled profile is run over several seeds and each kept image is
judged strictly by the oracle (``clipkit.shapes.oracle.strict_match``: exactly the objects the
prompt names, each with the colour, shape and position it names, nothing else), next to the rate the
README claims on that line (if any).

    OMP_NUM_THREADS=1 python bench/readme_check.py [--images 8] [--only TEXT] [--out DIR] [--table FILE]
    python bench/readme_check.py --fast            # parse every command, run the cheap ones, generate at --steps 4

Kinds of lines: ``judge`` (a bundled generate example: run, judged by the oracle, must reach
--target strict unless the README claims a lower rate, and then that rate within --slack), ``run``
(runs on files the repository ships: exit code 0), ``parse`` (needs real models, a GPU or the user's
files: only parsed). Exit code 1 if any line fails. The table (markdown) goes to stdout and --table.
"""
from __future__ import annotations

import argparse
import contextlib
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# a line needs something this machine or repository does not have: parse it only
_EXTERNAL = re.compile(r"(--profile sd|openclip:|hf:|--device cuda|--device mps|photo\.jpg|photos?/|\bimgs/|"
                       r"\.pt\b|\.pth|\.idx|\bval/|captions\.jsonl|runs/|data/|accelerate|\bserve\b|"
                       r"shards/|\btrain\b)")
# commands cheap enough to run in the fast part (bundled CLIP on examples/, no generation)
_CHEAP = ("score", "classify", "caption", "rerank", "models")


@dataclass
class Line:
    text: str                     # the command line as written (continuations joined)
    argv: list[str]               # after "clipkit"
    comment: str                  # the trailing "# ..." comment
    kind: str = "parse"           # judge | run | parse
    notes: list[str] = field(default_factory=list)


def readme_lines(path: Path = README) -> list[Line]:
    """Every `clipkit ...` line (and `pip install ... && clipkit ...`) inside ```bash blocks."""
    text = path.read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for raw in block.replace("\\\n", " ").splitlines():
            code, _, comment = _split_comment(raw)
            code = code.strip()
            if "clipkit " not in code:
                continue
            code = code[code.index("clipkit "):] if not code.startswith("clipkit ") else code
            if not code.startswith("clipkit "):
                continue
            argv = shlex.split(code)[1:]
            out.append(Line(code, argv, comment.strip()))
    for ln in out:
        ln.kind = classify_line(ln)
    return out


def _split_comment(raw: str) -> tuple[str, str, str]:
    """Split at the first '#' outside quotes."""
    q = None
    for i, ch in enumerate(raw):
        if q:
            q = None if ch == q else q
        elif ch in "'\"":
            q = ch
        elif ch == "#" and (i == 0 or raw[i - 1].isspace()):
            return raw[:i], "#", raw[i + 1:]
    return raw, "", ""


def command_of(argv: list[str]) -> str | None:
    """The subcommand: the first word that is not a global option or its value."""
    it = iter(argv)
    for a in it:
        if a in ("--profile", "--device", "--precision"):
            next(it, None)
        elif not a.startswith("-"):
            return a
    return None


def classify_line(ln: Line) -> str:
    cmd = command_of(ln.argv)
    if _EXTERNAL.search(ln.text) or cmd in ("index", "search", "serve", "train", "embed", "eval"):
        return "parse"
    if cmd == "generate":
        return "judge"
    if cmd in _CHEAP:
        return "run"
    return "parse"


# ------------------------------------------------------------------------------------------ parse

def parse_check(argv: list[str]) -> str | None:
    """Parse a command line with clipkit's click parser (no command body runs): None, or the error."""
    import warnings

    import click

    from clipkit.cli.main import cli
    from clipkit.core.errors import ModelLoadError
    warnings.filterwarnings("ignore", "'protected_args'", DeprecationWarning)
    try:
        with contextlib.chdir(ROOT):                 # the README's paths are relative to the repository
            return _parse(cli, click, argv)
    except click.exceptions.Exit:
        return None
    except click.ClickException as e:
        return e.format_message()
    except ModelLoadError as e:              # a model spec that names a file this checkout lacks: parsed
        return None if "no such" in str(e) else str(e)


def _parse(cli, click, argv) -> None:
    """The group's options, then each (sub)command's: make_context parses and converts every value."""
    ctx = cli.make_context("clipkit", list(argv), resilient_parsing=False)
    group, args = cli, ctx.protected_args + ctx.args
    while isinstance(group, click.Group) and args:
        name, cmd, rest = group.resolve_command(ctx, args)
        ctx = cmd.make_context(name, rest, parent=ctx)
        group, args = cmd, ctx.protected_args + ctx.args if isinstance(cmd, click.Group) else []
    return None


# ------------------------------------------------------------------------------------------ judge

def _value(argv, opt):
    vals = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == opt]
    return vals


def _prompts(argv: list[str]) -> list[str]:
    """The positional prompts of a generate line."""
    import warnings

    from clipkit.cli.main import cli
    warnings.filterwarnings("ignore", "'protected_args'", DeprecationWarning)
    ctx = cli.make_context("clipkit", list(argv))
    args = ctx.protected_args + ctx.args
    _, cmd, rest = cli.resolve_command(ctx, args)
    sub = cmd.make_context("generate", rest, parent=ctx)
    return list(sub.params.get("prompts") or ())


def expected_objects(prompt: str, negatives: list[str]) -> tuple[list[dict], dict]:
    """What the oracle must read for ``prompt``: one dict per object (the colour, shape and position
    it names), and the attributes a negative or a negative-weight part forbids (``{"color": {...}}``)."""
    from clipkit.shapes.layout import find_position, split_objects
    from clipkit.shapes.world import COLOR_NAMES, SHAPES
    parts, forbid = [], {"color": set(), "shape": set()}

    def words(t):
        return set(re.findall(r"[a-z]+", t.lower()))

    def ban(t):
        w = words(t)
        forbid["color"].update(w & set(COLOR_NAMES))
        forbid["shape"].update(w & set(SHAPES))
    for part in prompt.split("|"):
        m = re.match(r"^(.*?):\s*(-?[0-9.]+)\s*$", part.strip())
        text, weight = (m.group(1), float(m.group(2))) if m else (part.strip(), 1.0)
        (parts.append(text) if weight > 0 else ban(text))
    for neg in negatives:
        m = re.match(r"^(.*?):\s*(-?[0-9.]+)\s*$", neg)
        ban(m.group(1) if m else neg)
    objs = []
    for text in parts:
        for phrase in split_objects(text):
            w = words(phrase)
            e = {}
            c = [x for x in COLOR_NAMES if x in w]
            s = [x for x in SHAPES if x in w]
            if c:
                e["color"] = c[0]
            if s:
                e["shape"] = s[0]
            p = find_position(phrase)
            if p:
                e["position"] = p
            objs.append(e)
    return objs, forbid


def judge_image(png: Path, expected: list[dict], forbid: dict) -> bool:
    from PIL import Image

    from clipkit.shapes.oracle import read_attributes, strict_match
    with Image.open(png) as im:
        found = read_attributes(im.convert("RGB"))
    if not strict_match(found, expected):
        return False
    return not any(getattr(o, k) in v for o in found for k, v in forbid.items())


def claimed_rate(comment: str) -> float | None:
    """The first 'NN%' of a line's comment (the README's claim for that example)."""
    m = re.search(r"(\d+(?:\.\d+)?)%", comment)
    return float(m.group(1)) / 100 if m else None


def ensure_inputs(argv: list[str], work: Path) -> list[str]:
    """Example inputs a line names that the README's snippets make: examples/render.png and
    examples/blue.png are shipped; a bare name is looked up under examples/."""
    out = []
    for a in argv:
        if a.endswith(".png") and not Path(a).exists() and (ROOT / "examples" / a).exists():
            a = str(ROOT / "examples" / a)
        elif a.endswith(".png") and not Path(a).is_absolute() and (ROOT / a).exists():
            a = str(ROOT / a)
        out.append(a)
    return out


def image_expectation(argv: list[str]) -> list[dict] | None:
    """An --image-prompt-only line: the render's colour and position, as the oracle reads them."""
    from PIL import Image

    from clipkit.shapes.oracle import read_attributes
    ims = _value(argv, "--image-prompt")
    if not ims:
        return None
    with Image.open(ims[0].rsplit(":", 1)[0] if not Path(ims[0]).exists() else ims[0]) as im:
        found = read_attributes(im.convert("RGB"))
    return [{"color": o.color, "position": o.position} for o in found]


def run_generate(ln: Line, images: int, out: Path, first_seed: int, extra: list[str], timeout: float):
    """Run a generate line with seeds first_seed, first_seed+1000, ... until ``images`` kept images;
    returns (hits, n, seconds, error)."""
    argv = ensure_inputs(ln.argv, out)
    negatives = _value(argv, "--negative")
    prompts = _prompts(argv)
    exp_img = image_expectation(argv)
    per_prompt = {}
    for p in prompts:
        per_prompt[p] = expected_objects(p, negatives)
    hits = n = 0
    t0 = time.time()
    r = 0
    out.mkdir(parents=True, exist_ok=True)
    while n < images:
        d = out / f"run{r}"
        cmd = [sys.executable, "-m", "clipkit", "-q", *[a for a in argv if a != "--json"],
               "--seed", str(first_seed + 1000 * r), "--out", str(d), "--overwrite", *extra]
        # a line's own --out/--seed: the last occurrence wins in click, so ours (appended) rule
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=out)
        if p.returncode:
            return hits, n, time.time() - t0, (p.stderr.strip().splitlines() or ["?"])[-1]
        import json
        for side in sorted(d.glob("*.json")):
            meta = json.loads(side.read_text())
            png = side.with_suffix(".png")
            prompt = meta.get("prompt", "")
            exp, forbid = per_prompt.get(prompt, (None, None))
            if exp is None:                          # an image-prompt-only run, or the sidecar names it otherwise
                exp, forbid = (exp_img, {}) if exp_img else next(iter(per_prompt.values()))
            ok = judge_image(png, exp, forbid)
            hits += ok
            n += 1
            ln.notes.append(f"{png.name}:{'ok' if ok else 'x'}")
        r += 1
    return hits, n, time.time() - t0, None


# ------------------------------------------------------------------------------------------ main

def judge_key(argv: list[str]) -> tuple:
    """A generate line without the options the check sets itself (seed, count, outputs): two lines
    with the same key are the same example, judged once."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--seed", "-n", "--out"):
            skip = True
        elif a not in ("--caption", "--overwrite", "--json"):
            out.append(a)
    return tuple(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8, help="kept images judged per generate example")
    ap.add_argument("--seed", type=int, default=7000, help="first seed (run r uses seed + 1000 r)")
    ap.add_argument("--target", type=float, default=0.9, help="strict rate a generate recipe must reach")
    ap.add_argument("--slack", type=float, default=0.15, help="a claimed lower rate may be missed by this much")
    ap.add_argument("--only", action="append", default=None, help="only lines containing this text (repeatable: any)")
    ap.add_argument("--skip", action="append", default=[], help="skip lines containing this text (repeatable)")
    ap.add_argument("--kinds", default="judge,run,parse")
    ap.add_argument("--fast", action="store_true", help="generate at --steps 4, 1 image, no rate check")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--table", type=Path, default=None, help="also write the table (markdown) here")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--readme", type=Path, default=README, help="the markdown file to check (default: README.md)")
    args = ap.parse_args(argv)
    kinds = set(args.kinds.split(","))
    out = args.out or Path(tempfile.mkdtemp(prefix="readme_check_"))
    out.mkdir(parents=True, exist_ok=True)
    rows, failed, judged = [], 0, {}
    header = "| example | kind | result | README's claim | ok |\n|---|---|---|---|---|"
    print(header, flush=True)
    if args.table:
        args.table.write_text(header + "\n")
    for i, ln in enumerate(readme_lines(args.readme)):
        if (args.only and not any(o in ln.text for o in args.only)) or any(o in ln.text for o in args.skip):
            continue
        key = judge_key(ln.argv)
        err = parse_check(ln.argv)
        if err:
            res, claim, ok = f"parse error: {err}", "", False
        elif ln.kind == "judge" and "judge" in kinds and key in judged:
            res, claim, ok = judged[key]
            res = f"same run as above: {res}"
        elif ln.kind == "judge" and "judge" in kinds:
            claim_v = claimed_rate(ln.comment)
            extra = ["--steps", "4", "-n", "1"] if args.fast else []
            hits, n, secs, gerr = run_generate(ln, 1 if args.fast else args.images, out / f"l{i}", args.seed,
                                               extra, args.timeout)
            if gerr:
                res, ok = f"error: {gerr}", False
            elif args.fast:
                res, ok = f"ran ({secs:.0f} s, --steps 4)", True
            else:
                need = args.target if claim_v is None else min(args.target, claim_v - args.slack)
                res, ok = f"{hits}/{n} strict ({secs:.0f} s)", hits / n >= need - 1e-9
            claim = f"{claim_v:.0%}" if claim_v is not None else f"(recipe: >= {args.target:.0%})"
            judged[key] = (res, claim, ok)
        elif ln.kind == "run" and "run" in kinds:
            argv_run = ensure_inputs(ln.argv, out)
            d = out / f"l{i}"
            d.mkdir(exist_ok=True)
            argv_run = [str(ROOT / a) if a.startswith("examples") else a for a in argv_run]
            t0 = time.time()
            p = subprocess.run([sys.executable, "-m", "clipkit", "-q", *argv_run], capture_output=True, text=True,
                               cwd=d, timeout=args.timeout)
            ok = p.returncode == 0
            res = f"exit {p.returncode} ({time.time() - t0:.0f} s)" + ("" if ok else f": {p.stderr.strip()[-200:]}")
            claim = "runs"
        else:
            res, claim, ok = "parses", "", True
        failed += not ok
        row = f"| `{ln.text[:110]}` | {ln.kind} | {res} | {claim} | {'yes' if ok else '**no**'} |"
        rows.append(row)
        print(row, flush=True)
        if ln.notes:
            print("    " + " ".join(ln.notes), flush=True)
        if args.table:
            with args.table.open("a") as f:
                f.write(row + "\n")
    print(f"{len(rows)} lines, {failed} failed (outputs under {out})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
