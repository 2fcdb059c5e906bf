"""The ClipCap model: a mapper turns a CLIP image embedding into K prefix vectors for GPT-2.

Two mappers (FIELD_NOTES C), with the parameter layout of the official code so that its
checkpoints import by renaming keys only:

* ``mlp``: Linear -> Tanh -> Linear, ``clip_dim -> (width*K)/2 -> width*K``; GPT-2 fine-tuned.
* ``transformer``: a linear map to ``clip_length`` tokens, concatenated with a learned constant of K
  tokens, through a small transformer; the outputs at the constant's positions are the prefix.
  GPT-2 frozen.

The loss is cross-entropy on caption tokens only: prefix positions and padding get label -100 (the
official code pads with token 0 and ignores id 0, which also ignores the real "!" token).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipkit.core.errors import InputError

# Imported where used: transformers (heavy or optional; the paths that do not need them, and
# `clipkit --help`, start without them).

MAPPERS = ("mlp", "transformer")


@dataclass
class CaptionerConfig:
    """Everything needed to rebuild a ClipCap model; saved inside every checkpoint."""
    mapper: str = "mlp"                 # mlp | transformer
    clip_dim: int = 512                 # CLIP embedding size (512 for ViT-B/32)
    prefix_length: int = 10             # K prefix vectors fed to GPT-2
    clip_length: int = 10               # transformer mapper: tokens the CLIP embedding is mapped to
    mapper_layers: int = 8              # transformer mapper depth
    mapper_heads: int = 8
    mlp_hidden: int | None = None       # mlp mapper hidden width; None = width * K // 2 (official)
    normalize_prefix: bool = True       # L2-normalise the CLIP embedding first (official: raw for the
                                        # MLP checkpoints, normalised for transformer_weights.pt)
    train_decoder: bool | None = None   # fine-tune GPT-2; None = True for mlp, False for transformer
    clip_spec: str | None = "shapes"    # the CLIP whose image embeddings this was trained on (None: unknown)
    decoder: dict = field(default_factory=dict)   # GPT2Config.to_dict() (or a few fields of it)
    stop_token: str | None = None       # extra stop string besides EOS (official: ".")
    stop_at_eos: bool = True            # EOS ends a caption (official decoding stops at stop_token only)
    max_tokens: int | None = None       # default decode length when the caller sets none (official: 67)

    def validate(self) -> "CaptionerConfig":
        if self.mapper not in MAPPERS:
            raise InputError(f"unknown mapper {self.mapper!r}; choose {' or '.join(MAPPERS)}")
        if self.prefix_length < 1 or self.clip_length < 1 or self.clip_dim < 1:
            raise InputError("prefix_length, clip_length and clip_dim must be >= 1")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InputError("max_tokens must be >= 1")
        return self

    @property
    def decoder_trainable(self) -> bool:
        return self.mapper == "mlp" if self.train_decoder is None else self.train_decoder

    def to_dict(self) -> dict:
        return asdict(self)


# ---- mappers (official parameter names) -------------------------------------------------------

class MLPMapper(nn.Module):
    def __init__(self, clip_dim: int, width: int, prefix_length: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or (width * prefix_length) // 2
        self.prefix_length, self.width = prefix_length, width
        self.model = nn.Sequential(nn.Linear(clip_dim, hidden), nn.Tanh(),
                                   nn.Linear(hidden, width * prefix_length))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).view(x.shape[0], self.prefix_length, self.width)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.to_queries = nn.Linear(dim, dim, bias=False)
        self.to_keys_values = nn.Linear(dim, dim * 2, bias=False)
        self.project = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.heads
        q = self.to_queries(x).reshape(b, n, h, c // h).transpose(1, 2)
        kv = self.to_keys_values(x).reshape(b, n, 2, h, c // h)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.project(out.transpose(1, 2).reshape(b, n, c))


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class _Layer(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.mlp = _MLP(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _Transformer(nn.Module):
    def __init__(self, dim: int, heads: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList([_Layer(dim, heads) for _ in range(layers)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class TransformerMapper(nn.Module):
    def __init__(self, clip_dim: int, width: int, prefix_length: int, clip_length: int,
                 layers: int = 8, heads: int = 8):
        super().__init__()
        self.clip_length = clip_length
        self.transformer = _Transformer(width, heads, layers)
        self.linear = nn.Linear(clip_dim, clip_length * width)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x).view(x.shape[0], self.clip_length, -1)
        const = self.prefix_const.unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.transformer(torch.cat([x, const], dim=1))[:, self.clip_length:]


# ---- the model --------------------------------------------------------------------------------

class ClipCapModel(nn.Module):
    """Mapper + ``GPT2LMHeadModel``. ``forward`` returns the caption-token loss and logits."""

    def __init__(self, cfg: CaptionerConfig, gpt: nn.Module | None = None):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel
        self.cfg = cfg.validate()
        if gpt is None:
            gpt = GPT2LMHeadModel(GPT2Config(**cfg.decoder))
        self.gpt = gpt
        width = gpt.config.n_embd
        if cfg.mapper == "mlp":
            self.mapper = MLPMapper(cfg.clip_dim, width, cfg.prefix_length, cfg.mlp_hidden)
        else:
            self.mapper = TransformerMapper(cfg.clip_dim, width, cfg.prefix_length, cfg.clip_length,
                                            cfg.mapper_layers, cfg.mapper_heads)
        if not cfg.decoder_trainable:
            self.gpt.requires_grad_(False)

    @property
    def width(self) -> int:
        return self.gpt.config.n_embd

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.cfg.decoder_trainable:
            self.gpt.eval()      # frozen GPT-2: no dropout either
        return self

    def prefix(self, clip_embeds: torch.Tensor) -> torch.Tensor:
        """CLIP embeddings [B, D] -> prefix embeddings [B, K, width]. With ``normalize_prefix`` the
        embedding is divided by its L2 norm first (the official transformer notebook's
        ``prefix / prefix.norm(2, -1)``)."""
        if clip_embeds.dim() != 2 or clip_embeds.shape[-1] != self.cfg.clip_dim:
            raise InputError(f"the captioner's mapper takes {self.cfg.clip_dim}-d CLIP embeddings [B, "
                             f"{self.cfg.clip_dim}], got {list(clip_embeds.shape)}; use the CLIP it was "
                             f"trained with ({self.cfg.clip_spec or 'unknown'})")
        x = clip_embeds.to(self.mapper_dtype)
        if self.cfg.normalize_prefix:
            x = F.normalize(x, dim=-1)
        return self.mapper(x)

    @property
    def mapper_dtype(self) -> torch.dtype:
        return next(self.mapper.parameters()).dtype

    def forward(self, clip_embeds: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> "CaptionLoss":
        """``input_ids``/``attention_mask`` [B, T] are the caption tokens (ending with EOS), right-padded."""
        prefix = self.prefix(clip_embeds)
        b, k = prefix.shape[:2]
        tok = self.gpt.get_input_embeddings()(input_ids)
        embeds = torch.cat([prefix.to(tok.dtype), tok], dim=1)
        mask = torch.cat([attention_mask.new_ones(b, k), attention_mask], dim=1)
        out = self.gpt(inputs_embeds=embeds, attention_mask=mask)
        # position k-1+j predicts caption token j; padding is not supervised
        logits = out.logits[:, k - 1:-1]
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=-100)
        return CaptionLoss(loss, logits, (labels != -100).sum())


@dataclass
class CaptionLoss:
    loss: torch.Tensor       # mean cross-entropy over caption tokens
    logits: torch.Tensor     # [B, T, V] caption-token predictions
    n_tokens: torch.Tensor   # supervised tokens in the batch
