"""Memory of `clipkit serve` under concurrent huge uploads: the decode budget at work.

    python bench/serve_memory.py                      # 8 concurrent uploads of a 9400x9400 PNG
    python bench/serve_memory.py --uploads 8 --side 9400 --budgets 100,100000

For each decode budget (``clipkit serve --decode-budget MPIX``) it starts the studio in its own process
(bundled models), captions one small image (so the captioner is loaded: the baseline), then posts the
same PNG (a flat 9400x9400 RGB picture: ~250 KiB on the wire, 88.4 Mpx, just under the 89.5 Mpx guard,
265 MB decoded) to ``/api/caption-image`` from N threads at once, and reads the server's peak resident
memory (``VmHWM`` in /proc/PID/status) and its resident memory sampled every 20 ms. It prints one table
row per budget: the default (100 Mpx: about one such picture decoded at a time, each downscaled to
1024 px a side right after decoding) and an effectively unbounded one (every upload decoded at once).
Linux only (/proc).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
import zlib


def flat_png(width: int, height: int) -> bytes:
    """A valid black RGB PNG compressed row by row (never held decoded)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    comp, row = zlib.compressobj(9), b"\0" * (3 * width + 1)
    per = max(1, (1 << 22) // len(row))
    parts, done = [], 0
    while done < height:
        n = min(per, height - done)
        parts.append(comp.compress(row * n))
        done += n
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def multipart(field: str, name: str, data: bytes) -> tuple[bytes, str]:
    b = uuid.uuid4().hex
    body = (f"--{b}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{b}--\r\n".encode()
    return body, f"multipart/form-data; boundary={b}"


def post_image(base: str, data: bytes, name: str) -> tuple[int, dict]:
    body, ctype = multipart("image", name, data)
    req = urllib.request.Request(base + "api/caption-image", data=body, headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def wait_job(base: str, job: dict) -> dict:
    while job.get("state") not in ("done", "failed", "cancelled"):
        with urllib.request.urlopen(f"{base}api/jobs/{job['id']}?after={job['version']}&wait=5", timeout=60) as r:
            job = json.loads(r.read())
    return job


def status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def run(budget_mpix: int, png: bytes, uploads: int, small: bytes) -> dict:
    out = tempfile.mkdtemp(prefix="serve_memory_")
    p = subprocess.Popen([sys.executable, "-m", "clipkit", "-q", "serve", "--port", "0", "--out", out,
                          "--decode-budget", str(budget_mpix), "--max-upload", "10"],
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = p.stderr.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        if not m:
            raise SystemExit(f"the server did not start: {line}{p.stderr.read()[-2000:]}")
        base = f"http://127.0.0.1:{m.group(1)}/"
        code, job = post_image(base, small, "small.png")            # warm up: the captioner loads
        assert code == 202, job
        wait_job(base, job)
        baseline = status_kb(p.pid, "VmRSS")
        samples, stop = [], threading.Event()

        def sample():
            while not stop.is_set():
                samples.append(status_kb(p.pid, "VmRSS"))
                time.sleep(0.02)
        sampler = threading.Thread(target=sample)
        sampler.start()
        results: list = [None] * uploads
        t0 = time.perf_counter()

        def one(i):
            code, job = post_image(base, png, f"big{i}.png")
            results[i] = (code, wait_job(base, job)["state"] if code == 202 else job.get("error"))
        threads = [threading.Thread(target=one, args=(i,)) for i in range(uploads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        stop.set()
        sampler.join()
        with urllib.request.urlopen(base + "api/info", timeout=30) as r:
            alive = r.status == 200
        return {"budget": budget_mpix, "baseline_mb": baseline / 1024, "peak_rss_mb": max(samples) / 1024,
                "vmhwm_mb": status_kb(p.pid, "VmHWM") / 1024, "wall_s": wall,
                "ok": sum(1 for c, s in results if c == 202 and s == "done"), "uploads": uploads, "alive": alive}
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--uploads", type=int, default=8)
    ap.add_argument("--side", type=int, default=9400)
    ap.add_argument("--budgets", default="100,100000", help="decode budgets in Mpx, comma-separated")
    args = ap.parse_args()
    png = flat_png(args.side, args.side)
    small = flat_png(64, 64)
    print(f"# {args.uploads} concurrent uploads of a {args.side}x{args.side} PNG ({len(png) / 1024:.0f} KiB, "
          f"{args.side * args.side / 1e6:.1f} Mpx, {3 * args.side * args.side / 1e6:.0f} MB decoded) to "
          "/api/caption-image of `clipkit serve` (bundled models, CPU)")
    print("| decode budget | RSS before (MB) | peak RSS (MB, sampled) | peak RSS (MB, VmHWM) | wall (s) | captioned "
          "| serving after |")
    print("|---|---|---|---|---|---|---|")
    for b in (int(x) for x in args.budgets.split(",")):
        r = run(b, png, args.uploads, small)
        label = f"{b} Mpx" + (" (default)" if b == 100 else " (unbounded)" if b >= 10_000 else "")
        print(f"| {label} | {r['baseline_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['vmhwm_mb']:.0f} | "
              f"{r['wall_s']:.1f} | "
              f"{r['ok']}/{r['uploads']} | {'yes' if r['alive'] else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
