"""captioning.train: training a captioner on tiny data: embeddings once per image, bad lines skipped, resumable."""
import json

import pytest

from clipkit.captioning.train import TrainCaptionerConfig, read_caption_pairs
from clipkit.shapes.recipes import train_captioner     # with the Shapes data for data="shapes"
from clipkit.core.errors import InputError
from helpers import shapes_caption_folder as _shapes_folder   # tests/ is on sys.path (conftest.py)


def test_reads_jsonl_and_coco(tmp_path):
    path = _shapes_folder(tmp_path)
    pairs, skipped = read_caption_pairs(path)
    assert len(pairs) == 6 and all(len(c) == 3 for c in pairs.values()) and skipped == 3
    coco = {"images": [{"id": 1, "file_name": "img0.png"}, {"id": 2, "file_name": "img1.png"}],
            "annotations": [{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"},
                            {"image_id": 2, "caption": "c"}, {"image_id": 9, "caption": "d"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    pairs, skipped = read_caption_pairs(tmp_path / "coco.json")
    assert sorted(len(v) for v in pairs.values()) == [1, 2] and skipped == 1
    (tmp_path / "empty.jsonl").write_text("{oops\n")
    with pytest.raises(InputError, match="no usable"):
        read_caption_pairs(tmp_path / "empty.jsonl")


def test_train_on_jsonl_encodes_each_image_once_and_resumes(tmp_path, tiny_openclip_dir, monkeypatch):
    from clipkit.captioning.captioner import load_captioner
    from clipkit.core.scorer import ClipScorer
    path = _shapes_folder(tmp_path)
    seen = []
    orig = ClipScorer.encode_images

    def counting(self, images, *a, **kw):
        seen.append(len(images))
        return orig(self, images, *a, **kw)
    monkeypatch.setattr(ClipScorer, "encode_images", counting)
    cfg = TrainCaptionerConfig(out_dir=str(tmp_path / "run"), data=str(path), clip=str(tiny_openclip_dir),
                               epochs=2, batch_size=4, decoder_width=32, decoder_layers=1, decoder_heads=2,
                               vocab_size=280, prefix_length=3, warmup=2, save_every=1, export_dtype="fp32")
    res = train_captioner(cfg, progress=False)
    assert sum(seen) == 6                  # 6 images with 3 captions each: encoded once per image
    assert res.steps == 2 * 1              # 6 images, batch 4, drop_last -> 1 step per epoch
    out = tmp_path / "run"
    for f in ("train_log.csv", "train_curves.png", "model/clipcap_config.json", "model/model.safetensors",
              "model/tokenizer.json", "checkpoint/state.json", "clip_embeddings/all.safetensors"):
        assert (out / f).is_file(), f
    # a rerun reuses the cached embeddings; --resume continues from the checkpoint
    seen.clear()
    res2 = train_captioner(TrainCaptionerConfig(**{**cfg.__dict__, "epochs": 3, "resume": True}), progress=False)
    assert sum(seen) == 0 and res2.steps == 3
    cap = load_captioner(str(out / "model"), device="cpu")
    assert cap.scorer.spec == str(tiny_openclip_dir)
    res = cap.caption([str(tmp_path / "img0.png"), str(tmp_path / "img1.png")])
    assert len(res) == 2 and all(isinstance(r.caption, str) for r in res)


def test_shapes_recipe_learns_something(tmp_path):
    """A few hundred steps on Shapes embeddings lower the validation loss (the full recipe is the
    bundled model's; its measured quality is in its model card)."""
    cfg = TrainCaptionerConfig(out_dir=str(tmp_path / "s"), shapes_train=256, shapes_val=32, epochs=3,
                               batch_size=32, decoder_width=32, decoder_layers=1, decoder_heads=2,
                               vocab_size=300, val_decode=8, warmup=5, lr=3e-3)
    res = train_captioner(cfg, progress=False)
    import csv
    rows = list(csv.DictReader(open(tmp_path / "s" / "eval_log.csv")))
    assert len(rows) == 3
    assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"]) - 0.3
    assert "exact_attr" in res.final_eval


