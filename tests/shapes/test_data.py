"""shapes.data: deterministic caption datasets, scene lists per split, PIL renders, collation."""
import torch

from clipkit.shapes.data import ShapesCaptions, collate, render_pil, single_object_scenes, two_object_scenes


def test_captions_dataset_is_deterministic_and_epoch_changes_captions():
    ds = ShapesCaptions("train", length=20)
    a, b = ds[3], ShapesCaptions("train", length=20)[3]
    assert len(ds) == 20 and torch.equal(a["params"], b["params"]) and a["caption"] == b["caption"]
    assert not torch.equal(ds[3]["params"], ShapesCaptions("val", length=20)[3]["params"])   # splits differ
    assert ShapesCaptions("train", length=20, offset=3)[0]["caption"] == a["caption"]
    caps = {i: ds[i]["caption"] for i in range(20)}
    later = ShapesCaptions("train", length=20, epoch=5)
    assert any(later[i]["caption"] != caps[i] for i in range(20))


def test_tokenizer_and_collate():
    ds = ShapesCaptions("train", length=4, tokenizer=lambda caps: torch.tensor([[len(caps[0]), 1, 2]]))
    batch = collate([ds[i] for i in range(3)])
    assert batch["params"].shape[0] == 3 and len(batch["caption"]) == 3
    assert batch["tokens"].tolist()[0] == [len(batch["caption"][0]), 1, 2]
    assert "tokens" not in collate([ShapesCaptions(length=1)[0]])


def test_scene_lists_and_renders():
    one, two = single_object_scenes("test", 5), two_object_scenes("test", 5)
    assert all(len(s.objects) == 1 for s in one) and all(len(s.objects) == 2 for s in two)
    assert single_object_scenes("test", 3, offset=2) == one[2:5]
    ims = render_pil(one[:2], 48)
    assert [im.size for im in ims] == [(48, 48)] * 2 and ims[0].mode == "RGB"
