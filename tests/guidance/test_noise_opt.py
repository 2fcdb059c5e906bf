"""guidance/noise_opt.py: initial-noise optimisation through a short differentiable DDIM chain."""
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

from clipkit.core.errors import InputError
from clipkit.guidance.noise_opt import (NoiseOptConfig, ddim_chain, gaussian_norm_nll, optimize_noise)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval().requires_grad_(False)


def model_of(unet):
    return lambda x, t: unet(x, t).sample


def redness(pixels):                                # a toy objective: want red images
    return (pixels[:, 1:] - pixels[:, :1]).mean(dim=(1, 2, 3))


def test_norm_regulariser_is_minimal_at_the_gaussian_shell():
    radii = torch.tensor([0.5, 0.9, 1.0, 1.1, 2.0])
    zs = torch.ones(5, 3, 8, 8) * radii.view(-1, 1, 1, 1)        # |z|^2 = d * r^2
    nll = gaussian_norm_nll(zs)
    assert int(nll.argmin()) == 2                                 # r = 1 (d - 2 ~ d)


def test_checkpointed_chain_is_the_plain_chain(unet):
    sched = DDIMScheduler(num_train_timesteps=100)
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    grads = []
    for ck in (True, False):
        zg = z.clone().requires_grad_(True)
        out = ddim_chain(model_of(unet), sched, 3, checkpointed=ck)(zg)
        redness((out + 1) / 2).sum().backward()
        grads.append((out.detach(), zg.grad))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6) and torch.allclose(grads[0][1], grads[1][1], atol=1e-6)


def test_optimisation_lowers_the_objective_and_is_deterministic(unet):
    sched = DDIMScheduler(num_train_timesteps=100)
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    chain = ddim_chain(model_of(unet), sched, 2)
    cfg = NoiseOptConfig(steps=6, lr=0.2, reg=0.1)
    r1 = optimize_noise(z, chain, redness, cfg)
    r2 = optimize_noise(z, chain, redness, cfg)
    assert torch.equal(r1.noise, r2.noise)
    assert len(r1.losses) == 7 and min(r1.losses) < r1.losses[0]
    best = redness((chain(r1.noise) + 1) / 2).mean()
    assert best <= r1.losses[0] + 1e-6                             # keep_best never returns worse noise
    assert not torch.equal(r1.noise, z)
    assert torch.equal(optimize_noise(z, chain, redness, NoiseOptConfig(steps=0)).noise, z)


def test_regulariser_keeps_the_noise_gaussian(unet):
    sched = DDIMScheduler(num_train_timesteps=100)
    z = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    chain = ddim_chain(model_of(unet), sched, 2)
    grow = lambda px: -px.abs().mean(dim=(1, 2, 3))                # rewards large values
    free = optimize_noise(z, chain, grow, NoiseOptConfig(steps=8, lr=0.5, reg=0.0, keep_best=False)).noise
    held = optimize_noise(z, chain, grow, NoiseOptConfig(steps=8, lr=0.5, reg=50.0, keep_best=False)).noise
    assert abs(held.std() - 1) < abs(free.std() - 1)


@pytest.mark.parametrize("bad", [dict(steps=-1), dict(steps=1.5), dict(chain_steps=0), dict(lr=float("nan")),
                                 dict(reg=-1.0)])
def test_bad_settings_are_input_errors(bad):
    with pytest.raises(InputError):
        NoiseOptConfig(**bad).validate()
