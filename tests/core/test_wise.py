"""core.wise: WiSE-FT alphas and the weight-space interpolation (wise_ft end to end runs in
tests/core/test_train_clip.py::test_flyp_on_an_image_folder_validates_resumes_and_exports_wise)."""
import pytest
import torch

from clipkit.core.errors import InputError
from clipkit.core.wise import check_alphas, interpolate_state


def test_check_alphas_sorted_unique_in_range():
    assert check_alphas([0.5, 0.25, 0.5, 1]) == [0.25, 0.5, 1.0]
    with pytest.raises(InputError, match="no WiSE-FT alphas"):
        check_alphas([])
    with pytest.raises(InputError, match="1.5 is outside"):
        check_alphas([0.5, 1.5])


def test_interpolate_state():
    init = {"w": torch.zeros(2, 2), "h": torch.ones(3, dtype=torch.float16), "n": torch.tensor(1)}
    ft = {"w": torch.full((2, 2), 4.0), "h": torch.full((3,), 3.0, dtype=torch.float16), "n": torch.tensor(7)}
    mid = interpolate_state(init, ft, 0.25)
    assert torch.equal(mid["w"], torch.ones(2, 2)) and mid["h"].dtype == torch.float32
    assert torch.allclose(mid["h"], torch.full((3,), 1.5)) and int(mid["n"]) == 7     # integer buffers: finetuned
    assert torch.equal(interpolate_state(init, ft, 0.0)["w"], init["w"])
    assert set(interpolate_state(init, ft, 1.0, keys={"w"})) == {"w"}
    with pytest.raises(InputError, match="'w' differs"):
        interpolate_state({"w": torch.zeros(3)}, ft, 0.5)
