import logging

import numpy as np
import pytest
import torch
from helpers import make_colour_folder

from clipkit.core.errors import InputError
from clipkit.core.evaluate import (class_embeddings, compute_metrics, evaluate, few_shot, sweep_C)


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return make_colour_folder(tmp_path_factory.mktemp("colours"))


def test_metrics_by_hand():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1]])
    labels = torch.tensor([0, 1, 1, 2, 0])
    m = compute_metrics(scores, labels, ["a", "b", "c"], ["A", "B", "C"])
    assert m.confusion == [[2, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert m.top1 == pytest.approx(0.8) and m.top5_k == 3 and m.top5 == 1.0
    assert m.balanced_accuracy == pytest.approx((1 + 0.5 + 1) / 3)
    assert m.per_class[1] == {"class": "b", "name": "B", "images": 2, "correct": 1, "accuracy": 0.5}
    empty = compute_metrics(scores[:2], labels[:2], ["a", "b", "c"], ["A", "B", "C"])
    assert empty.per_class[2]["accuracy"] is None and empty.balanced_accuracy == 1.0


def test_zero_shot_on_colours_with_the_shapes_clip(colours, shapes_scorer):
    res = evaluate(colours, shapes_scorer, templates="a {} shape")
    assert res.split == "test" and res.method == "zero-shot" and res.templates == 1
    assert res.metrics.images == 9 and res.metrics.top1 == 1.0 and res.skipped == []
    d = res.to_dict()
    assert d["classes"][0] == {"class": "blue", "name": "blue"} and d["linear_probe"] is None


def test_linear_probe_and_shots(colours, shapes_scorer):
    res = evaluate(colours, shapes_scorer, linear_probe=True)
    p = res.probe
    assert res.method == "linear-probe" and res.metrics.top1 == 1.0
    assert p.val_source == "val" and p.train_images == 18 and p.refit_on == "train+val" and len(p.sweep) >= 7
    k1 = evaluate(colours, shapes_scorer, linear_probe=True, shots=1, seed=3)
    assert k1.probe.shots == 1 and k1.probe.train_images == 3 + 6
    with pytest.raises(InputError, match="fitted on train"):
        evaluate(colours, shapes_scorer, linear_probe=True, split="train")
    with pytest.raises(InputError, match="--linear-probe"):
        evaluate(colours, shapes_scorer, shots=2)


def test_probe_without_val_holds_out_part_of_train(tmp_path, shapes_scorer):
    root = make_colour_folder(tmp_path / "d", {"train": 5, "test": 1})
    res = evaluate(root, shapes_scorer, linear_probe=True)
    assert res.probe.val_source.startswith("20% of train") and res.probe.refit_on == "train"
    flat = make_colour_folder(tmp_path / "flat", {"": 2})
    with pytest.raises(InputError, match="needs a train split"):
        evaluate(flat, shapes_scorer, linear_probe=True)


def test_sweep_is_the_papers_binary_search():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 4))
    y = (X[:, 0] > 0).astype(int)
    C, sweep = sweep_C(X[:40], y[:40], X[40:], y[40:])
    logs = [round(float(np.log10(s["C"])), 4) for s in sweep]
    assert logs[:7] == [-6, -4, -2, 0, 2, 4, 6]                      # every second decade first
    assert len(logs) == len(set(logs)) and min(abs(a - b) for a in logs for b in logs if a != b) == 0.125
    best = max(s["val_accuracy"] for s in sweep)
    assert C == min(s["C"] for s in sweep if s["val_accuracy"] == best)     # ties: the stronger L2


def test_few_shot_is_seeded_and_per_class(caplog):
    labels = [0] * 5 + [1] * 5 + [2] * 1
    a = few_shot(labels, 2, seed=0)
    assert a == few_shot(labels, 2, seed=0) and a != few_shot(labels, 2, seed=1)
    assert [labels[i] for i in a].count(0) == 2 and [labels[i] for i in a].count(2) == 1
    with caplog.at_level(logging.WARNING):
        few_shot(labels, 2, seed=0)
    assert "fewer than 2" in caplog.text


def test_unreadable_images_are_skipped_and_counted(tmp_path, tiny_openclip_dir):
    from clipkit.core.scorer import load_scorer
    root = make_colour_folder(tmp_path / "d", {"test": 2})
    (root / "test" / "red" / "bad.png").write_bytes(b"not a png")
    (root / "test" / "blue" / "empty.jpg").write_bytes(b"")
    res = evaluate(root, load_scorer(str(tiny_openclip_dir), device="cpu"))
    assert res.metrics.images == 6 and len(res.skipped) == 2
    assert {s["reason"] for s in res.skipped} == {"empty file", "not an image Pillow can identify"}
    for p in root.rglob("*.png"):
        p.write_bytes(b"x")
    with pytest.raises(InputError, match="none of the 8 images"):
        evaluate(root, load_scorer(str(tiny_openclip_dir), device="cpu"))


def test_class_names_beyond_the_context(tiny_openclip_dir, caplog):
    from clipkit.core.scorer import load_scorer
    sc = load_scorer(str(tiny_openclip_dir), device="cpu")          # 77-token context
    long = "very " * 80
    with caplog.at_level(logging.WARNING):
        w = class_embeddings(sc, ["cat", long + "long dog"], "a photo of a {}.")
    assert w.shape[0] == 2
    assert caplog.text.count("truncated") == 1 and "1 class prompts" in caplog.text
    with pytest.raises(InputError, match="identical prompts after truncation"):
        class_embeddings(sc, [long + "cat", long + "dog"], "a photo of a {}.")
