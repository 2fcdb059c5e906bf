"""Helpers of the studio tests: images made cheaply (a huge flat PNG written with zlib directly, never
held decoded) and a job poller."""
from __future__ import annotations

import struct
import time
import zlib


def flat_png(width: int, height: int, mode: str = "RGB") -> bytes:
    """A valid PNG of ``width`` x ``height`` black pixels ("RGB" or "1"-bit), compressed row by row:
    a few hundred KiB for 88 Mpx, written in a second or two, never held decoded."""
    kind, row_bytes = {"RGB": (2, 3 * width), "1": (0, (width + 7) // 8)}[mode]
    depth = 1 if mode == "1" else 8

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    comp = zlib.compressobj(9)
    row = b"\0" * (row_bytes + 1)                 # filter byte 0 + the row
    parts = []
    block = row * max(1, (1 << 22) // len(row))
    rows_per_block = len(block) // len(row)
    done = 0
    while done < height:
        n = min(rows_per_block, height - done)
        parts.append(comp.compress(block if n == rows_per_block else row * n))
        done += n
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, depth, kind, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def wait_job(client, job: dict, timeout: float = 120.0, on_update=None) -> dict:
    """Long-poll a job until it finishes; ``on_update(job)`` sees every version."""
    end = time.monotonic() + timeout
    while job["state"] not in ("done", "failed", "cancelled"):
        assert time.monotonic() < end, f"job {job['id']} still {job['state']} after {timeout} s"
        r = client.get(f"/api/jobs/{job['id']}?after={job['version']}&wait=5")
        assert r.status_code == 200, r.data
        job = r.get_json()
        if on_update is not None:
            on_update(job)
    return job
