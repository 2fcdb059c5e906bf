"""`clipkit embed`: one safetensors file, the same under `accelerate launch` with two CPU processes."""
import json
import subprocess
import sys

import pytest
import torch


@pytest.mark.slow
def test_embed_two_processes_equals_one(rerank_folder, tmp_path):
    d, _ = rerank_folder
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    base = [sys.executable, "-m", "clipkit.cli.main", "-q", "embed", str(d), "--workers", "0"]
    r1 = subprocess.run(base + ["--out", str(one)], capture_output=True, text=True)
    assert r1.returncode == 0, r1.stderr
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "clipkit.cli.main", "-q", "embed", str(d), "--workers", "0", "--out", str(two)]
    r2 = subprocess.run(launch, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-2000:]
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(one), "pt") as f1, safe_open(str(two), "pt") as f2:
        m1, m2 = f1.metadata(), f2.metadata()
    p1, p2 = json.loads(m1["paths"]), json.loads(m2["paths"])
    assert p1 == p2, ([x for x in p1 if x not in p2], [x for x in p2 if x not in p1], len(p1), len(p2))
    assert m2["processes"] == "2"
    assert len(json.loads(m1["skipped"])) == 4
    assert torch.allclose(load_file(str(one))["embeddings"], load_file(str(two))["embeddings"], atol=1e-5)
