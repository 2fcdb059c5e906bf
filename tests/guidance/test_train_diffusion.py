import torch

from clipkit.guidance.train_diffusion import TrainDiffusionConfig, sample_ddim
from clipkit.shapes.recipes import train_diffusion     # the guidance trainer on Shapes renders

TINY_UNET = {"sample_size": 16, "in_channels": 3, "out_channels": 3, "layers_per_block": 1,
             "block_out_channels": [16, 32], "down_block_types": ["DownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 8}


def test_train_resume_export(tmp_path):
    cfg = TrainDiffusionConfig(out_dir=str(tmp_path / "d"), unet_cfg=TINY_UNET, steps=3, batch_size=4,
                               eval_every=3, eval_samples=4, eval_steps=2, save_every=2, log_every=1)
    res = train_diffusion(cfg, progress=False)
    assert res.steps == 3 and 0 <= res.final_eval["valid"] <= 1
    from diffusers import DDPMPipeline
    pipe = DDPMPipeline.from_pretrained(res.model_dir)
    assert pipe.unet.config.sample_size == 16
    cfg2 = TrainDiffusionConfig(**{**cfg.__dict__, "steps": 4, "resume": True})
    assert train_diffusion(cfg2, progress=False).steps == 4
    cfg3 = TrainDiffusionConfig(**{**cfg.__dict__, "out_dir": str(tmp_path / "e"), "init": res.model_dir,
                                   "device_data": True, "steps": 1})
    assert train_diffusion(cfg3, progress=False).steps == 1


def test_sample_ddim_seeded():
    from diffusers import DDPMScheduler, UNet2DModel
    torch.manual_seed(0)
    unet = UNet2DModel(**TINY_UNET)
    cfg = dict(DDPMScheduler().config)
    a = sample_ddim(unet, cfg, 2, 3, torch.Generator().manual_seed(1), "cpu")
    b = sample_ddim(unet, cfg, 2, 3, torch.Generator().manual_seed(1), "cpu")
    assert torch.equal(a, b) and a.shape == (2, 3, 16, 16)
