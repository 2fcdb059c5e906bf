"""Loading a diffusion model spec into a backend, through the one model registry.

The guidance plugin registers its two backends' loaders by the ``_class_name`` of a diffusers
``model_index.json`` (:func:`clipkit.core.registry.register_diffusion_loader`); a user registers
more the same way, for a pipeline class of their own.
"""
from __future__ import annotations

import json

from clipkit.core import hub
from clipkit.core.errors import ModelLoadError
from clipkit.core.registry import diffusion_loader, parse_spec, register_diffusion_loader
from clipkit.core.scorer import resolve_device, resolve_dtype
from clipkit.guidance.backends import DiffusionBackend, load_pixel
from clipkit.guidance.latent import load_latent

register_diffusion_loader("DDPMPipeline", load_pixel)
register_diffusion_loader("DDIMPipeline", load_pixel)
register_diffusion_loader("StableDiffusionPipeline", load_latent)      # latent: CFG + CLIP guidance


def load_diffusion(spec: str = "shapes", device="cpu", precision: str = "fp32") -> DiffusionBackend:
    """Resolve a diffusion model spec -> a :class:`DiffusionBackend`.

    ``shapes`` (bundled), a local diffusers pipeline directory (``model_index.json``) or ``hf:ORG/NAME``.
    Failures raise :class:`ModelLoadError` naming the spec and the fix; hub loads fail fast offline.
    """
    s = parse_spec(spec, "diffusion")
    device, dtype = resolve_device(device), resolve_dtype(precision)
    r = s.resolve()             # a directory or a hub repo id; hub checks done (fails fast offline)
    try:
        class_name = json.loads(r.file("model_index.json").read_text()).get("_class_name", "?")
    except Exception as e:
        raise ModelLoadError(r.raw, hub.one_line(e), r.fix("check the directory")) from e
    loader = diffusion_loader(class_name, r.raw)
    try:
        return loader(r.location, r.raw, r.local_only, device=device, dtype=dtype)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(r.raw, hub.one_line(e), r.fix("check the pipeline's unet/ and scheduler/ folders")) from e
