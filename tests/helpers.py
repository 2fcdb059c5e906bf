"""Tiny random CLIP models built from configs under a fixed seed (never a hub id)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_OPENCLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_PREPROCESS = {"size": 32, "mean": [0.48145466, 0.4578275, 0.40821073],
                   "std": [0.26862954, 0.26130258, 0.27577711],
                   "interpolation": "bicubic", "resize_mode": "shortest"}


def make_openclip_dir(path: Path, seed: int = 0) -> Path:
    from clipkit.core.artifacts import build_openclip, save_openclip_dir
    torch.manual_seed(seed)
    model = build_openclip(TINY_OPENCLIP_CFG)
    return save_openclip_dir(model, TINY_OPENCLIP_CFG, TINY_PREPROCESS, path)


def write_clip_tokenizer_files(path: Path) -> None:
    """vocab.json + merges.txt for transformers' CLIPTokenizer, derived from the CLIP BPE file
    that ships inside the open_clip wheel (so the real tokenizer works offline)."""
    from open_clip.tokenizer import SimpleTokenizer
    tok = SimpleTokenizer()
    # open_clip names the specials <start_of_text>/<end_of_text>; transformers expects OpenAI's names.
    rename = {tok.decoder[tok.sot_token_id]: "<|startoftext|>", tok.decoder[tok.eot_token_id]: "<|endoftext|>"}
    vocab = {rename.get(k, k): v for k, v in tok.encoder.items()}
    (path / "vocab.json").write_text(json.dumps(vocab))
    merges = sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for (a, b), _ in merges) + "\n")


def make_hf_clip_dir(path: Path, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=32)
    CLIPModel(cfg).save_pretrained(path)
    write_clip_tokenizer_files(path)
    CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt")).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": 32, "width": 32}, "size": {"shortest_edge": 32},
        "do_center_crop": True, "do_normalize": True, "do_resize": True, "resample": 3,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "CLIPImageProcessor"}))
    return path
