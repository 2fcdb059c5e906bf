import pytest
import torch

from clipkit.core.errors import InputError
from clipkit.core.prompts import build_classifier, classify, parse_labels, resolve_templates


def test_templates_come_from_open_clip():
    from open_clip import zero_shot_metadata as zsm
    assert len(resolve_templates("openai")) == len(zsm.OPENAI_IMAGENET_TEMPLATES) == 80
    assert len(resolve_templates("simple")) == len(zsm.SIMPLE_IMAGENET_TEMPLATES)
    assert resolve_templates("a {} shape") == ["a {} shape"]


def test_template_file_and_errors(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("# comment\na photo of a {}.\n\nart of the {}\n")
    assert resolve_templates(str(f)) == ["a photo of a {}.", "art of the {}"]
    with pytest.raises(InputError, match="placeholder"):
        resolve_templates(["no placeholder"])
    with pytest.raises(InputError):
        resolve_templates("nonsense")
    with pytest.raises(InputError, match="duplicate"):
        parse_labels("cat,dog,cat")
    with pytest.raises(InputError, match="no labels"):
        parse_labels(" , ")


def test_ensemble_is_normalised_mean(tiny_scorer):
    tmpl = ["a {}", "a photo of a {}"]
    cls = build_classifier(tiny_scorer, ["cat", "dog"], tmpl)
    e = tiny_scorer.encode_texts(["a cat", "a photo of a cat"])
    ref = torch.nn.functional.normalize(e.mean(0), dim=0)
    assert torch.allclose(cls[0], ref, atol=1e-6)
    assert torch.allclose(cls.norm(dim=1), torch.ones(2), atol=1e-6)


def test_classify_shapes_colours(shapes_scorer):
    from clipkit.shapes.data import render_pil, single_object_scenes
    scenes = single_object_scenes("test", 21)
    res = classify(render_pil(scenes, 64), "red,green,blue,yellow,magenta,cyan,white",
                   templates="a {} shape", scorer=shapes_scorer)
    assert res.probs.shape == (21, 7)
    truth = [s.objects[0].color for s in scenes]
    assert sum(a == b for a, b in zip(res.top, truth)) >= 20


def test_classification_to_dict_names_paths_and_probabilities(tiny_scorer, tmp_path):
    from PIL import Image
    paths = []
    for i, c in enumerate([(255, 0, 0), (0, 0, 255)]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (32, 32), c).save(paths[-1])
    res = classify([str(p) for p in paths], "cat,dog", "a {}", scorer=tiny_scorer)
    d = res.to_dict()
    assert d["model"] == tiny_scorer.spec and d["labels"] == ["cat", "dog"] and d["templates"] == 1
    assert [r["path"] for r in d["results"]] == [str(p) for p in paths]
    for r, top, p in zip(d["results"], res.top, res.probs.tolist()):
        assert r["label"] == top and r["probs"] == {"cat": p[0], "dog": p[1]}
    pil = classify([Image.open(p) for p in paths], ["cat", "dog"], "a {}", scorer=tiny_scorer)
    assert pil.sources == [] and [r["path"] for r in pil.to_dict()["results"]] == [None, None]
