"""Our open_clip artifact layout: full models and overlays (only the changed weights + the base spec)."""
import json

import pytest
import torch

from clipkit.core.artifacts import apply_overlay, overlay_base, save_openclip_dir


def _net(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def test_full_save_writes_config_and_fp16_weights(tmp_path):
    from safetensors.torch import load_file
    out = save_openclip_dir(_net(0), {"embed_dim": 2}, {"size": 8}, tmp_path / "m", dtype=torch.float16,
                            extra={"training": {"steps": 3}})
    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert cfg == {"model_cfg": {"embed_dim": 2}, "preprocess_cfg": {"size": 8}, "clipkit": {"training": {"steps": 3}}}
    sd = load_file(str(out / "open_clip_model.safetensors"))
    assert set(sd) == {"0.weight", "0.bias", "1.weight", "1.bias"} and sd["0.weight"].dtype == torch.float16
    assert overlay_base(out) is None and overlay_base(tmp_path / "missing") is None


def test_overlay_round_trip(tmp_path):
    tuned, base = _net(1), _net(2)
    out = save_openclip_dir(tuned, {}, {}, tmp_path / "o", keys=["0.weight", "0.bias"], base="shapes")
    assert overlay_base(out) == "shapes"
    assert apply_overlay(base, out) == ["0.bias", "0.weight"]
    assert torch.equal(base[0].weight, tuned[0].weight)
    assert not torch.equal(base[1].weight, tuned[1].weight)          # weights outside the overlay kept


def test_overlay_that_does_not_fit_is_refused(tmp_path):
    out = save_openclip_dir(_net(1), {}, {}, tmp_path / "o", keys=["1.weight"], base="shapes")
    other = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 5))
    with pytest.raises(ValueError, match="do not fit"):
        apply_overlay(other, out)
