"""core.preprocess: the differentiable torch path agrees with the PIL path (open_clip and transformers
configs, real photographs), and PreprocessConfig's dict form (cache keys) is stable."""
import pytest
import torch
from PIL import Image

from clipkit.core.preprocess import pil_to_tensor, torch_preprocess


@pytest.mark.parametrize("size", [(97, 131), (224, 224), (300, 180), (512, 512)])
def test_torch_path_matches_pil_path_on_photos(photos, size, shapes_scorer, tiny_openclip_dir):
    """The differentiable path must agree with the PIL path on real photographs, for open_clip
    configs and for transformers CLIPImageProcessor configs (torchvision resize, floored crop)."""
    from clipkit.core.preprocess import PreprocessConfig, from_hf_image_processor
    cfgs = (PreprocessConfig(image_size=224), shapes_scorer.preprocess,
            from_hf_image_processor({}),                                   # CLIPImageProcessor defaults
            from_hf_image_processor({"size": {"shortest_edge": 256}, "crop_size": 224}),
            from_hf_image_processor({"size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 30},
                                     "resample": 2, "image_mean": 0.5, "image_std": 0.5}))
    for name, photo in photos.items():
        im = photo.resize(size, Image.BICUBIC)
        x = torch.from_numpy(__import__("numpy").asarray(im).copy()).permute(2, 0, 1)[None].float() / 255
        for cfg in cfgs:
            a = pil_to_tensor(im, cfg)[None]
            b = torch_preprocess(x, cfg)
            # pixel level (normalised units): small mean difference
            assert a.shape == b.shape and (a - b).abs().mean() < 0.03, (name, size, cfg)
        ea = shapes_scorer.encode_images([im])
        eb = shapes_scorer.embed_pixels(x).detach()
        assert float((ea * eb).sum()) >= 0.995, (name, size)


def test_preprocess_config_dict_keeps_its_legacy_form():
    """Cache keys hash ``to_dict()``: configs of the original five fields keep their dict; the
    transformers fields appear (and change the key) only when set, and round-trip."""
    from clipkit.core.preprocess import OPENAI_MEAN, OPENAI_STD, PreprocessConfig, from_hf_image_processor
    assert PreprocessConfig(image_size=48).to_dict() == {
        "image_size": 48, "mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic", "resize_mode": "shortest"}
    hf = from_hf_image_processor({"size": {"shortest_edge": 40}, "crop_size": 32, "image_mean": 0.5, "image_std": 0.5})
    d = hf.to_dict()
    assert d["crop_offset"] == "floor" and d["resize_backend"] == "torchvision" and d["resize_size"] == 40
    assert PreprocessConfig.from_dict(__import__("json").loads(__import__("json").dumps(d))) == hf
    with pytest.raises(ValueError, match="nearest"):
        PreprocessConfig(interpolation="nearest")
