"""The issue-15 user check: `clipkit generate PROMPT -n 4` run as a user runs it (a real subprocess,
no flags beyond -n, --seed and --out), on random prompts naming colour, shape and position; every
kept PNG is judged strictly by the oracle (exactly one object; colour, shape and position right).
``--two``: two-object prompts ("A at P1 and B at P2"), judged alike (exactly those two objects).

    python bench/cli_check.py [--prompts 8] [--prompt-seed 4242] [--seed 9000] [--out /tmp/cli_check] [--two]
"""
import argparse
import subprocess
import sys
from pathlib import Path

from PIL import Image

from clipkit.shapes.oracle import read_attributes, strict_match

from guidance import draw_prompts          # bench/ is the script's folder: on sys.path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-seed", type=int, default=4242)
    ap.add_argument("--seed", type=int, default=9000)
    ap.add_argument("--out", type=Path, default=Path("/tmp/cli_check"))
    ap.add_argument("--two", action="store_true", help="two-object prompts")
    args = ap.parse_args()
    expected, texts = draw_prompts(args.prompts, args.prompt_seed, True, args.two)
    ok = n = 0
    for i, (objs, prompt) in enumerate(zip(expected, texts)):
        out = args.out / str(i)
        r = subprocess.run([sys.executable, "-m", "clipkit", "-q", "generate", prompt, "-n", "4",
                            "--seed", str(args.seed + 100 * i), "--out", str(out), "--overwrite"],
                           capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"generate failed on {prompt!r}: {r.stderr.strip()}")
        hits = 0
        for png in sorted(out.glob("*.png")):
            with Image.open(png) as im:
                hits += strict_match(read_attributes(im), objs)        # the oracle reads PIL images
            n += 1
        ok += hits
        print(f"{prompt}: {hits}/4 strict", flush=True)
    print(f"strict: {ok}/{n} kept images ({ok / n:.2f})")


if __name__ == "__main__":
    main()
