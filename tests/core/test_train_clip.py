import json

import pytest
import torch
from PIL import Image

from clipkit.core.errors import InputError
from clipkit.core.augment import augment_robust
from clipkit.core.train_clip import TrainClipConfig, clip_loss, read_captions_jsonl
from clipkit.shapes.recipes import train_clip     # the core trainer, with the Shapes data for data="shapes"
from helpers import TINY_TRAIN_CFG as TINY   # tests/ is on sys.path (conftest.py)


def test_clip_loss_is_the_paper_objective():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    t = torch.tensor(2.0)
    loss, _, _ = clip_loss(img, txt, t)
    logits = t.exp() * img @ txt.T
    ref = 0
    for i in range(6):   # per-row / per-column CE written out
        ref += -torch.log_softmax(logits[i], 0)[i] / 12 - torch.log_softmax(logits[:, i], 0)[i] / 12
    assert torch.allclose(loss, ref, atol=1e-5)
    perfect, a_i, a_t = clip_loss(img, img, torch.tensor(4.6))
    assert a_i == 1 and a_t == 1 and perfect < loss


def test_augment_keeps_range_and_shape():
    x = torch.rand(8, 3, 32, 32)
    y = augment_robust(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1 and not torch.equal(x, y)


def test_train_shapes_resume_and_export(tmp_path):
    cfg = TrainClipConfig(out_dir=str(tmp_path / "run"), model_cfg=TINY, steps=4, batch_size=8,
                          eval_every=4, save_every=2, log_every=1, render_sizes=(24,))
    res = train_clip(cfg, progress=False)
    assert res.steps == 4 and set(res.final_eval) == {"color", "shape", "size", "position"}
    rows = (tmp_path / "run" / "train_log.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("step,loss")
    assert (tmp_path / "run" / "train_curves.png").is_file()
    from clipkit.core.scorer import load_scorer
    sc = load_scorer(res.model_dir, device="cpu")
    assert sc.encode_texts(["a red circle"]).shape == (1, 16)
    cfg2 = TrainClipConfig(**{**cfg.__dict__, "steps": 6, "resume": True})
    assert train_clip(cfg2, progress=False).steps == 6
    assert len((tmp_path / "run" / "train_log.csv").read_text().splitlines()) == 7


def test_captions_jsonl_skips_and_counts(tmp_path, caplog):
    Image.new("RGB", (30, 30), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (30, 30), (0, 0, 255)).save(tmp_path / "b.png")
    lines = [json.dumps({"image": "a.png", "caption": "red"}), "{broken",
             json.dumps({"image": "missing.png", "caption": "x"}),
             json.dumps({"image": "b.png", "caption": "  "}), json.dumps({"image": "b.png", "caption": "blue"})]
    f = tmp_path / "captions.jsonl"
    f.write_text("\n".join(lines))
    pairs, stats = read_captions_jsonl(f)
    assert len(pairs) == 2 and (stats.broken_json, stats.missing_image, stats.empty_caption) == (1, 1, 1)
    res = train_clip(TrainClipConfig(out_dir=str(tmp_path / "ft"), data=str(f), model_cfg=TINY, steps=2,
                                     batch_size=2, save_every=2), progress=False)
    assert res.steps == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{nope\n")
    with pytest.raises(InputError, match="no usable"):
        read_captions_jsonl(bad)


def test_resume_without_checkpoint_is_clear(tmp_path):
    with pytest.raises(InputError, match="no checkpoint"):
        train_clip(TrainClipConfig(out_dir=str(tmp_path), model_cfg=TINY, steps=1, batch_size=2, resume=True))


def test_train_only_exports_an_overlay_of_the_base(tmp_path):
    """A partial fine-tune saves only the weights it trained and loads on top of its base: the frozen
    text tower gives the same text embeddings, the fine-tuned image layers different image embeddings."""
    from safetensors import safe_open

    from clipkit.core.registry import clip_training_info, is_noise_aware
    from clipkit.core.scorer import load_scorer
    base = train_clip(TrainClipConfig(out_dir=str(tmp_path / "base"), model_cfg=TINY, steps=2, batch_size=8,
                                      render_sizes=(24,), eval_every=100), progress=False).model_dir
    trained = ("visual.conv1", "visual.transformer.resblocks.0.")
    res = train_clip(TrainClipConfig(out_dir=str(tmp_path / "ft"), init=base, train_only=trained, noise_aware=True,
                                     steps=3, batch_size=8, lr=1e-2, warmup=1, render_sizes=(24,), eval_every=100),
                     progress=False)
    with safe_open(f"{res.model_dir}/open_clip_model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert keys and all(k.startswith(trained) for k in keys)
    assert "visual.conv1.weight" in keys and not any(k.startswith("transformer.") for k in keys)
    b, o = load_scorer(base, device="cpu"), load_scorer(res.model_dir, device="cpu")
    texts = ["a red circle", "a blue square at the top"]
    assert torch.equal(b.encode_texts(texts), o.encode_texts(texts))
    x = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(b.encode_images(x), o.encode_images(x), atol=1e-4)
    bsd, osd = b.backend.module.state_dict(), o.backend.module.state_dict()
    assert torch.equal(bsd["visual.proj"], osd["visual.proj"])
    assert not torch.equal(bsd["visual.conv1.weight"], osd["visual.conv1.weight"])
    assert is_noise_aware(res.model_dir) and not is_noise_aware(base)
    assert clip_training_info(res.model_dir)["noise_schedule"] == "shapes"     # the x_t schedule's source


def test_overlay_that_does_not_fit_its_base_is_a_clear_error(tmp_path):
    from clipkit.core.errors import ModelLoadError
    from clipkit.core.registry import load_clip
    base = train_clip(TrainClipConfig(out_dir=str(tmp_path / "base"), model_cfg=TINY, steps=1, batch_size=4,
                                      render_sizes=(24,), eval_every=100), progress=False).model_dir
    ft = train_clip(TrainClipConfig(out_dir=str(tmp_path / "ft"), init=base, train_only=("visual.conv1",),
                                    steps=1, batch_size=4, render_sizes=(24,), eval_every=100), progress=False)
    cfg = json.loads((tmp_path / "ft" / "model" / "open_clip_config.json").read_text())
    cfg["clipkit"]["base"] = "shapes"                       # a base the weights do not fit
    (tmp_path / "ft" / "model" / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="do not fit"):
        load_clip(ft.model_dir)
    with pytest.raises(InputError, match="matches no parameter"):
        train_clip(TrainClipConfig(out_dir=str(tmp_path / "x"), init=base, train_only=("nope.",), steps=1,
                                   batch_size=4, render_sizes=(24,)), progress=False)


# ---------------------------------------------------------------------------------------------
# Labelled data: FLYP fine-tuning, validation, resume, WiSE-FT
# ---------------------------------------------------------------------------------------------



def test_clip_loss_with_classes_makes_same_class_pairs_positives():
    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    t = torch.tensor(1.5)
    plain = clip_loss(img, txt, t)[0]
    assert torch.allclose(clip_loss(img, txt, t, torch.arange(4))[0], plain)     # distinct classes: CLIP loss
    cls = torch.tensor([0, 0, 1, 1])
    logits = t.exp() * img @ txt.T
    target = torch.tensor([[.5, .5, 0, 0], [.5, .5, 0, 0], [0, 0, .5, .5], [0, 0, .5, .5]])
    ref = (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.T.log_softmax(1)).sum(1).mean()) / 2
    assert torch.allclose(clip_loss(img, txt, t, cls)[0], ref, atol=1e-6)
    # accuracy counts the right class, whichever caption of it: here each image's best text is its
    # own embedding, placed at a same-class partner's position
    _, a_i, a_t = clip_loss(img, img[[1, 0, 3, 2]], t, cls)
    assert a_i == 1 and a_t == 1


def test_flyp_on_an_image_folder_validates_resumes_and_exports_wise(tmp_path, tiny_init):
    from helpers import make_colour_folder
    from safetensors.torch import load_file

    from clipkit.core.train_clip import data_kind
    data = make_colour_folder(tmp_path / "colours", {"train": 3, "val": 1, "test": 1}, size=24)
    assert data_kind(str(data)) == "labelled" and data_kind("shapes") == "shapes"
    seen = []

    def reference(scorer):
        seen.append(scorer.spec)
        return {"score": 0.5}
    cfg = TrainClipConfig(out_dir=str(tmp_path / "ft"), data=str(data), init=tiny_init, steps=3, batch_size=4,
                          lr=1e-3, eval_every=2, save_every=2, log_every=1, templates="a {} disc",
                          wise=(0.5,), reference="test task")
    res = train_clip(cfg, progress=False, reference=reference)
    out = tmp_path / "ft"
    rows = (out / "eval_log.csv").read_text().splitlines()
    assert rows[0] == "step,val_top1,val_balanced_accuracy,val_loss"
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "2", "3"]          # the zero-shot start, then every 2
    assert set(res.final_eval) == {"val_top1", "val_balanced_accuracy", "val_loss"}
    assert (out / "eval_curves.png").is_file() and (out / "train_curves.png").is_file()
    # WiSE-FT: alpha 0 (the init), 0.5 (exported), 1 (the fine-tuned model), each measured twice
    assert [r["alpha"] for r in res.wise["rows"]] == [0.0, 0.5, 1.0] and res.wise["split"] == "test"
    assert seen == [tiny_init, str(out / "wise-0.5"), str(out / "model")]
    assert all(r["reference"] == {"score": 0.5} for r in res.wise["rows"])
    assert {p.name for p in out.iterdir()} >= {"wise.json", "wise.csv", "wise.png", "wise-0.5", "model"}
    init_sd = load_file(f"{tiny_init}/open_clip_model.safetensors")
    ft_sd = load_file(str(out / "model" / "open_clip_model.safetensors"))
    mid = load_file(str(out / "wise-0.5" / "open_clip_model.safetensors"))
    k = "visual.conv1.weight"
    assert not torch.equal(init_sd[k], ft_sd[k].float())
    assert torch.allclose(mid[k].float(), (init_sd[k] + ft_sd[k].float()) / 2, atol=2e-3)   # fp16 export
    # resume: the log keeps one row per step
    cfg2 = TrainClipConfig(**{**cfg.__dict__, "steps": 4, "resume": True, "wise": None})
    assert train_clip(cfg2, progress=False).steps == 4
    assert [r.split(",")[0] for r in (out / "eval_log.csv").read_text().splitlines()[1:]] == ["0", "2", "3", "4"]


def test_labelled_training_errors(tmp_path, tiny_init):
    from helpers import make_colour_folder
    no_train = make_colour_folder(tmp_path / "nt", {"val": 1, "test": 1}, size=24)
    with pytest.raises(InputError, match="no train split"):
        train_clip(TrainClipConfig(out_dir=str(tmp_path / "a"), data=str(no_train), init=tiny_init, steps=1,
                                   batch_size=2), progress=False)
    ok = make_colour_folder(tmp_path / "ok", {"train": 1}, size=24)
    with pytest.raises(InputError, match="--wise"):
        train_clip(TrainClipConfig(out_dir=str(tmp_path / "b"), data=str(ok), model_cfg=TINY, steps=1,
                                   batch_size=2, wise=(0.5,)), progress=False)
    with pytest.raises(InputError, match="outside"):
        train_clip(TrainClipConfig(out_dir=str(tmp_path / "c"), data=str(ok), init=tiny_init, steps=1,
                                   batch_size=2, wise=(1.5,)), progress=False)


# ---------------------------------------------------------------------------------------------
# The noise-aware schedule: the diffusion model's own scheduler
# ---------------------------------------------------------------------------------------------

def _diffusers_dir(path, scheduler_config: dict | None):
    path.mkdir()
    (path / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    if scheduler_config is not None:
        (path / "scheduler").mkdir()
        (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config))
    return str(path)


def test_noise_schedule_is_the_diffusion_models_own(tmp_path):
    from diffusers import DDPMScheduler

    from clipkit.core.errors import ModelLoadError
    from clipkit.core.augment import ddpm_alphas_cumprod
    assert TrainClipConfig().noise_schedule == "shapes"
    bundled = ddpm_alphas_cumprod()                # the bundled Shapes DDPM: linear, 1000 steps
    assert torch.equal(bundled, ddpm_alphas_cumprod("shapes"))
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)    # the schedule hard-coded before
    assert bundled.shape == (1000,) and torch.allclose(bundled, torch.cumprod(1 - betas, 0).float(), rtol=0, atol=1e-6)
    # another model's scheduler (any scheduler class: its schedule keys are read) -> its schedule
    other = _diffusers_dir(tmp_path / "cos", {"_class_name": "DDIMScheduler", "beta_schedule": "squaredcos_cap_v2",
                                              "num_train_timesteps": 500, "set_alpha_to_one": False})
    cos = ddpm_alphas_cumprod(other)
    assert cos.shape == (500,) and not torch.allclose(cos, bundled[:500], atol=1e-3)
    assert torch.equal(cos, DDPMScheduler(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2").alphas_cumprod)
    with pytest.raises(ModelLoadError, match="scheduler"):
        ddpm_alphas_cumprod(_diffusers_dir(tmp_path / "none", None))
    with pytest.raises(ModelLoadError):
        ddpm_alphas_cumprod("no-such-model")


def test_noise_schedule_errors_before_training_and_in_the_cli(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from clipkit.cli.main import cli
    from clipkit.core.errors import ModelLoadError
    from helpers import assert_one_line_error
    bad = _diffusers_dir(tmp_path / "bad", None)
    with pytest.raises(ModelLoadError, match="scheduler"):
        train_clip(TrainClipConfig(out_dir=str(tmp_path / "x"), model_cfg=TINY, steps=1, batch_size=4,
                                   noise_aware=True, noise_schedule=bad), progress=False)
    assert not (tmp_path / "x").exists()
    run = lambda *a: CliRunner().invoke(cli, ["-q", "train", "clip", *map(str, a)])   # noqa: E731
    assert "--noise-schedule" in run("--help").output
    assert_one_line_error(run("--out", tmp_path / "a", "--noise-schedule", "shapes"), "--noise-aware")
    seen = {}

    def fake(cfg, progress=True, reference=None):
        seen["cfg"] = cfg
        raise SystemExit(0)
    monkeypatch.setattr("clipkit.shapes.recipes.train_clip", fake)
    run("--out", tmp_path / "b", "--noise-aware", "--noise-schedule", bad)
    assert seen["cfg"].noise_schedule == bad
    run("--out", tmp_path / "c", "--noise-aware")
    assert seen["cfg"].noise_schedule == "shapes"
