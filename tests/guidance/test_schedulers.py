"""The scheduler table: every name builds its diffusers class on the model's own noise schedule."""
import pytest
import torch

from clipkit.core.errors import InputError
from clipkit.guidance.schedulers import SCHEDULER_NAMES, SCHEDULERS, count_timesteps, make_scheduler

CONFIG = dict(num_train_timesteps=100, beta_start=0.001, beta_end=0.02, beta_schedule="linear",
              prediction_type="v_prediction", clip_sample=True)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_every_name_keeps_the_training_schedule(name):
    from diffusers import DDPMScheduler
    ref = DDPMScheduler.from_config(CONFIG)
    s = make_scheduler(name, CONFIG)
    assert type(s).__name__ == SCHEDULERS[name][0]
    assert s.config.prediction_type == "v_prediction" and s.config.num_train_timesteps == 100
    assert torch.allclose(s.alphas_cumprod, ref.alphas_cumprod)


def test_latent_switches_off_clipping_and_pndm_warm_up():
    assert make_scheduler("ddim", CONFIG).config.clip_sample is True
    assert make_scheduler("ddim", CONFIG, latent=True).config.clip_sample is False
    assert make_scheduler("pndm", CONFIG, latent=True).config.skip_prk_steps is True
    assert make_scheduler("dpmpp", CONFIG).config.algorithm_type == "dpmsolver++"


def test_unknown_name_and_timestep_count():
    with pytest.raises(InputError, match="unknown scheduler 'heun'"):
        make_scheduler("heun", CONFIG)
    assert count_timesteps("ddim", CONFIG, 10, "spec") == 10
    with pytest.raises(InputError, match="cannot run 1000 steps"):
        count_timesteps("ddim", CONFIG, 1000, "spec")
