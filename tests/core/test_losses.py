"""Embedding distances: the spherical distance theta^2 / 2 and 1 - cos, in fp32."""
import math

import pytest
import torch

from clipkit.core.errors import InputError
from clipkit.core.losses import cosine_dist, get_loss, spherical_dist


@pytest.mark.parametrize("theta", [0.0, 0.3, math.pi / 2, 2.5, math.pi])
def test_spherical_dist_is_half_the_squared_angle(theta):
    a = torch.tensor([1.0, 0.0, 0.0])
    b = torch.tensor([math.cos(theta), math.sin(theta), 0.0]) * 3.0        # length does not matter
    assert spherical_dist(a, b).item() == pytest.approx(theta ** 2 / 2, abs=1e-5)
    assert cosine_dist(a, b).item() == pytest.approx(1 - math.cos(theta), abs=1e-5)


def test_broadcasting_and_fp32_from_half():
    a = torch.randn(4, 1, 8, generator=torch.Generator().manual_seed(0))
    b = torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(1))
    assert spherical_dist(a, b).shape == (4, 3)
    d = spherical_dist(a.half(), b.half())
    assert d.dtype == torch.float32 and torch.allclose(d, spherical_dist(a, b), atol=2e-3)


def test_get_loss():
    assert get_loss("spherical") is spherical_dist and get_loss("cosine") is cosine_dist
    with pytest.raises(InputError, match="spherical, cosine"):
        get_loss("l2")
