"""ClipScorer: one interface over every CLIP backend.

Embeddings are always L2-normalised fp32 ``[N, D]``; similarities are fp32 cosines. Images can be
PIL images, paths, or float tensors in [0, 1]. ``embed_pixels`` / ``loss_and_grad`` are the
differentiable path used by guidance.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from clipkit.core.backends import ClipBackend, check_texts
from clipkit.core.errors import InputError
from clipkit.core.io import load_image
from clipkit.core.losses import get_loss
from clipkit.core.preprocess import PreprocessConfig, pil_to_tensor, torch_preprocess
from clipkit.core.dist import partial_state
from clipkit.core.registry import load_clip
from clipkit.core.cache import weights_digest

log = logging.getLogger(__name__)

Images = Union[torch.Tensor, Sequence[Union[str, os.PathLike, Image.Image]]]
# fp64 is for numerical checks (gradient tests); the CLI offers fp32/fp16/bf16.
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> accelerate's choice for this process (CUDA/MPS/CPU, the right GPU per rank)."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return partial_state().device
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r} (auto, cpu, cuda, cuda:N, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but no CUDA GPU is available (use --device cpu)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError("device 'mps' requested but MPS is not available (use --device cpu)")
    return dev


def resolve_dtype(precision: str) -> torch.dtype:
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise InputError(f"unknown precision {precision!r}; choose fp32, fp16 or bf16") from None


@dataclass
class Scores:
    """Image x text scores. ``similarity`` is the raw cosine; the others are named extras."""
    similarity: torch.Tensor   # [N, M] cosine, fp32
    logit_scale: float

    @property
    def logits(self) -> torch.Tensor:      # [N, M] logit_scale * cos (what CLIP's softmax sees)
        return self.similarity * self.logit_scale

    @property
    def probs(self) -> torch.Tensor:       # [N, M] softmax over the texts
        return self.logits.softmax(dim=-1)

    @property
    def clip_s(self) -> torch.Tensor:      # [N, M] CLIP-S = 2.5 * max(cos, 0) (Hessel et al. 2021)
        return 2.5 * self.similarity.clamp(min=0)


@dataclass
class LossGrad:
    loss: torch.Tensor         # [B] loss per image (mean over texts)
    grad: torch.Tensor         # d loss.sum() / d x, same shape as x
    similarity: torch.Tensor   # [B, M] cosine of each image with each text (detached)


class _ImageFiles(Dataset):
    def __init__(self, items, cfg: PreprocessConfig):
        self.items, self.cfg = list(items), cfg

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return pil_to_tensor(load_image(self.items[i]), self.cfg)


class ClipScorer:
    """Encode and score with any CLIP backend.

    Args:
        backend: a loaded :class:`~clipkit.core.backends.ClipBackend`.
        device: ``auto``/``cpu``/``cuda``/``mps`` or a torch.device.
        precision: weights and activations in ``fp32``, ``fp16`` or ``bf16``; scores are fp32 always.
        batch_size: images/texts per forward pass.
        num_workers: DataLoader workers that decode and resize image files.
    """

    def __init__(self, backend: ClipBackend, device="cpu", precision: str = "fp32",
                 batch_size: int = 64, num_workers: int = 0):
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.backend = backend
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(precision)
        self.precision = precision
        self.batch_size = batch_size
        self.num_workers = num_workers
        backend.module.to(self.device, self.dtype).eval().requires_grad_(False)
        self._text_cache: dict[str, torch.Tensor] = {}
        # scores are fp32 whatever the model precision (fp64 stays fp64 for gradient checks)
        self.score_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32

    # ---- properties --------------------------------------------------------------------------
    @property
    def spec(self) -> str:
        return self.backend.spec

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.backend.preprocess

    @property
    def weights_digest(self) -> str:
        """sha256 of the loaded weights (:func:`clipkit.core.cache.weights_digest`), computed once:
        what the embedding cache is keyed by (a spec names a model; its weights are the model)."""
        if getattr(self, "_weights_digest", None) is None:
            self._weights_digest = weights_digest(self.backend.module)
        return self._weights_digest

    @property
    def logit_scale(self) -> float:
        return self.backend.logit_scale()

    @property
    def context_length(self) -> int:
        return self.backend.context_length

    # ---- encoding ----------------------------------------------------------------------------
    def _image_batches(self, images: Images, batch_size: int):
        if isinstance(images, torch.Tensor):
            if images.ndim == 3:
                images = images[None]
            for i in range(0, len(images), batch_size):
                yield torch_preprocess(images[i:i + batch_size].to(self.score_dtype), self.preprocess)
            return
        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        items = list(images)
        if not items:
            raise InputError("no images given")
        if all(isinstance(im, Image.Image) for im in items) or self.num_workers == 0:
            for i in range(0, len(items), batch_size):
                yield torch.stack([pil_to_tensor(load_image(im), self.preprocess)
                                   for im in items[i:i + batch_size]])
            return
        loader = DataLoader(_ImageFiles(items, self.preprocess), batch_size=batch_size,
                            num_workers=self.num_workers, shuffle=False)
        yield from loader

    def _encode_pixels(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        feats = self.backend.encode_image(pixels.to(self.device, self.dtype)).to(self.score_dtype)
        return F.normalize(feats, dim=-1) if normalize else feats

    @torch.inference_mode()
    def encode_pixel_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        """Already-preprocessed (normalised) pixels [B,3,S,S] -> normalised embeddings."""
        return self._encode_pixels(pixels)

    @torch.inference_mode()
    def encode_images(self, images: Images, batch_size: int | None = None,
                      normalize: bool = True) -> torch.Tensor:
        """PIL images, paths, or a float tensor [B,3,H,W] in [0,1] -> normalised fp32 [N, D]
        (``normalize=False``: the raw projections, which ClipCap checkpoints were trained on)."""
        bs = batch_size or self.batch_size
        out = [self._encode_pixels(px, normalize) for px in self._image_batches(images, bs)]
        return torch.cat(out)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int | None = None) -> torch.Tensor:
        """Strings -> normalised fp32 [M, D]. Over-long texts are truncated with a warning."""
        texts = check_texts(texts)
        bs = batch_size or self.batch_size
        out = []
        for i in range(0, len(texts), bs):
            feats = self.backend.encode_text(texts[i:i + bs])
            out.append(F.normalize(feats.to(self.score_dtype), dim=-1))
        return torch.cat(out)

    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """Like :meth:`encode_texts`, memoised per text (guidance asks for the same prompt every step)."""
        texts = check_texts(texts)
        missing = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if missing:
            for t, e in zip(missing, self.encode_texts(missing)):
                self._text_cache[t] = e
        return torch.stack([self._text_cache[t] for t in texts])

    # ---- scoring -----------------------------------------------------------------------------
    def score(self, images: Images, texts: Sequence[str]) -> Scores:
        img = self.encode_images(images)
        txt = self.encode_texts(texts)
        return Scores(img @ txt.T, self.logit_scale)

    def similarity(self, images: Images, texts: Sequence[str]) -> torch.Tensor:
        """Cosine similarity [N, M] in fp32."""
        return self.score(images, texts).similarity

    def logits(self, images: Images, texts: Sequence[str]) -> torch.Tensor:
        return self.score(images, texts).logits

    def probs(self, images: Images, texts: Sequence[str]) -> torch.Tensor:
        return self.score(images, texts).probs

    def clip_s(self, images: Images, texts: Sequence[str]) -> torch.Tensor:
        return self.score(images, texts).clip_s

    # ---- differentiable path -----------------------------------------------------------------
    def embed_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable: pixels [B,3,H,W] in [0,1] (any size) -> normalised fp32 [B, D]."""
        return self._encode_pixels(torch_preprocess(x, self.preprocess))

    def _targets(self, texts) -> torch.Tensor:
        if isinstance(texts, torch.Tensor):
            return F.normalize(texts.to(self.device, self.score_dtype), dim=-1)
        return self.text_embeddings(texts).to(self.device)

    def loss_and_grad(self, x: torch.Tensor, texts, loss: str = "spherical") -> LossGrad:
        """CLIP loss of each image against the texts (mean over texts), and d(sum of losses)/dx.

        ``texts`` is a list of strings or a tensor of text embeddings [M, D] (or [B, M, D] for a
        different target set per image).
        """
        loss_fn = get_loss(loss)
        target = self._targets(texts)
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            emb = self.embed_pixels(x)                                    # [B, D]
            tgt = target if target.ndim == 3 else target[None]            # [B|1, M, D]
            per_text = loss_fn(emb[:, None, :], tgt)                      # [B, M]
            losses = per_text.mean(dim=1)                                 # [B]
            (grad,) = torch.autograd.grad(losses.sum(), x)
        sim = (emb.detach()[:, None, :] * tgt).sum(-1)
        return LossGrad(losses.detach(), grad, sim)

    def similarity_grad(self, x: torch.Tensor, texts) -> LossGrad:
        """Gradient of the mean cosine similarity w.r.t. pixels (loss = -cos)."""
        lg = self.loss_and_grad(x, texts, loss="cosine")
        return LossGrad(-(lg.loss - 1), -lg.grad, lg.similarity)


def load_scorer(spec: str = "shapes", device="auto", precision: str = "fp32",
                batch_size: int = 64, num_workers: int = 0) -> ClipScorer:
    """Load a CLIP model by spec (see :mod:`clipkit.core.registry`) and wrap it in a ClipScorer."""
    resolve_dtype(precision)
    return ClipScorer(load_clip(spec), device=device, precision=precision,
                      batch_size=batch_size, num_workers=num_workers)
