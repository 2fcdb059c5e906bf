"""`clipkit caption` through click's CliRunner, with a tiny random captioner on a tiny CLIP."""
import json

import pytest
import torch
from click.testing import CliRunner

from clipkit.cli.main import cli


@pytest.fixture(scope="module")
def tiny_captioner_dir(tmp_path_factory, tiny_openclip_dir):
    from clipkit.captioning.checkpoint import save_captioner
    from clipkit.captioning.model import CaptionerConfig, ClipCapModel
    from clipkit.captioning.tokenizer import train_bpe_tokenizer
    tok = train_bpe_tokenizer(["a red circle at the top left", "a small blue square on the right"] * 20, 300)
    torch.manual_seed(0)
    cfg = CaptionerConfig(clip_dim=32, prefix_length=3, clip_spec=str(tiny_openclip_dir),
                          decoder=dict(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64))
    return save_captioner(tmp_path_factory.mktemp("cap") / "captioner", ClipCapModel(cfg), tok)


@pytest.fixture()
def images(tmp_path):
    from clipkit.shapes.data import render_pil
    from clipkit.shapes.world import sample_scene
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    ims = render_pil([sample_scene(i) for i in range(3)], 32)
    ims[0].save(d / "a.png")
    ims[1].save(d / "b.png")
    ims[2].save(d / "sub" / "c.png")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return d


def run(*args):
    return CliRunner().invoke(cli, ["-q", *map(str, args)])


def test_caption_folder_lines_and_skips(tiny_captioner_dir, images):
    r = run("caption", images, "--captioner", tiny_captioner_dir, "--max-tokens", "6")
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 3
    for ln in lines:
        path, caption, score = ln.split("\t")
        assert path.endswith(".png") and -1.0 <= float(score) <= 1.0


def test_caption_json_candidates_are_reranked_by_clip(tiny_captioner_dir, images):
    r = run("caption", images / "a.png", images / "b.png", "--captioner", tiny_captioner_dir,
            "--strategy", "nucleus", "--candidates", "4", "--lm-weight", "0", "--max-tokens", "6", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["score"] == "cosine(image, caption)" and len(doc["results"]) == 2
    for res in doc["results"]:
        scores = [c["clip_score"] for c in res["candidates"]]
        assert len(scores) == 4 and res["score"] == max(scores)
    again = json.loads(run("caption", images / "a.png", images / "b.png", "--captioner", tiny_captioner_dir,
                           "--strategy", "nucleus", "--candidates", "4", "--lm-weight", "0",
                           "--max-tokens", "6", "--json").output)
    assert again["results"] == doc["results"]            # seeded


def test_caption_bad_inputs(tiny_captioner_dir, tmp_path, images):
    (tmp_path / "junk.txt").write_text("nope")
    r = run("caption", tmp_path / "junk.txt", "--captioner", tiny_captioner_dir)
    assert r.exit_code == 2 and "Error:" in r.output and len(r.output.strip().splitlines()) == 1
    torch.save({"conv.weight": torch.zeros(2)}, tmp_path / "not_clipcap.pt")
    r = run("caption", images, "--captioner", tmp_path / "not_clipcap.pt")
    assert r.exit_code == 2 and "not a ClipCap checkpoint" in r.output
    r = run("caption", images, "--captioner", tmp_path / "nowhere")
    assert r.exit_code == 2
    r = run("caption", images, "--captioner", tiny_captioner_dir, "--strategy", "greedy", "--candidates", "3")
    assert r.exit_code == 2


def test_caption_eval_against_references(tiny_captioner_dir, images, tmp_path):
    refs = {"a.png": ["a red circle at the top left"], "b": ["a small blue square on the right"]}
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    r = run("caption", images / "a.png", images / "b.png", "--captioner", tiny_captioner_dir,
            "--max-tokens", "6", "--eval", tmp_path / "refs.json", "--json")
    assert r.exit_code == 0, r.output
    ev = json.loads(r.output)["eval"]
    assert ev["n_images"] == 2 and 0 <= ev["bleu4"] <= 1 and "ref_clip_s" in ev


def test_caption_as_a_real_subprocess(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    examples = Path(__file__).resolve().parents[2] / "examples"
    p = subprocess.run([sys.executable, "-m", "clipkit", "caption", str(examples / "red_circle.png"), "--json"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert "red circle" in doc["results"][0]["caption"]
    p = subprocess.run([sys.executable, "-m", "clipkit", "caption", str(tmp_path / "missing.png")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("Error:")
    assert "Traceback" not in p.stderr
