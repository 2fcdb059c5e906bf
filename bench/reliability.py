"""Fault-injection table: every scenario of tests/reliability/faults.py, through the real CLI
(subprocesses), repeated; prints fault | runs | hangs | lost results | writes outside | ...

    python bench/reliability.py --repeat 3          # the table in BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "reliability"))
import faults  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each scenario (kill points differ)")
    ap.add_argument("--only", default=None, help="substring of a scenario name")
    args = ap.parse_args()
    faults.MODE = "subprocess"
    rows = []
    for name, fn in faults.SCENARIOS.items():
        if args.only and args.only not in name:
            continue
        total, t0 = faults.Outcome(), time.time()
        for r in range(args.repeat):
            with tempfile.TemporaryDirectory() as tmp:
                kw = {"seed": 100 + r} if "SIGKILL" in name else {}
                total.add(fn(Path(tmp), **kw))
        rows.append((name, total, time.time() - t0))
        print(f"# {name}: {total.runs} runs, {time.time() - t0:.0f} s {'; '.join(total.notes)[:300]}",
              file=sys.stderr, flush=True)
    head = ["fault", "runs", "hangs", "lost results", "writes outside --out", "overwritten w/o --overwrite",
            "wrong exit/message"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, o, _ in rows:
        print(f"| {name} | {o.runs} | {o.hangs} | {o.lost} | {o.outside} | {o.clobbered} | {o.bad_exit} |")


if __name__ == "__main__":
    main()
