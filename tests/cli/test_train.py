"""`clipkit train clip|captioner` under `accelerate launch` with two CPU processes (the in-process
training itself: tests/core/test_train_clip.py, tests/captioning/test_train.py)."""
import json

import pytest

from helpers import shapes_caption_folder   # tests/ is on sys.path (conftest.py)


@pytest.mark.slow
def test_clip_accelerate_launch_two_cpu_processes(tmp_path):
    import subprocess
    import sys
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "clipkit.cli.main", "-q", "train", "clip", "--out", str(out), "--steps", "2",
           "--batch-size", "4", "--eval-every", "2", "--save-every", "2", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout)
    assert doc["steps"] == 2 and doc["processes"] == 2
    from clipkit.core.scorer import load_scorer
    assert load_scorer(str(out / "model"), device="cpu").encode_texts(["a red circle"]).shape[0] == 1


@pytest.mark.slow
def test_clip_accelerate_launch_two_cpu_processes_image_folder(tmp_path, tiny_init):
    import subprocess
    import sys

    from helpers import make_colour_folder
    data = make_colour_folder(tmp_path / "colours", {"train": 4, "val": 1}, size=24)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "clipkit.cli.main", "-q", "train", "clip", "--data", str(data), "--init", tiny_init,
           "--out", str(out), "--steps", "2", "--batch-size", "3", "--eval-every", "2", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout)
    assert doc["steps"] == 2 and doc["processes"] == 2 and "val_top1" in doc["final_eval"]
    assert (out / "model" / "open_clip_model.safetensors").is_file()


def test_captioner_accelerate_launch_two_cpu_processes(tmp_path, tiny_openclip_dir):
    import subprocess
    import sys
    path = shapes_caption_folder(tmp_path)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "clipkit.cli.main", "-q", "train", "captioner", "--data", str(path), "--clip",
           str(tiny_openclip_dir), "--out", str(out), "--epochs", "2", "--batch-size", "2", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout)
    # 6 images, 2 per process per step, 2 processes: 1 step per epoch
    assert doc["processes"] == 2 and doc["steps"] == 2
    assert (out / "model" / "model.safetensors").is_file()
