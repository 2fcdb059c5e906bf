"""clipkit: one CLIP scoring core, three plugins (guided diffusion, prefix captioning, reranking).

Only the public API lives here, and it is imported lazily so that ``import clipkit``
(and ``clipkit --help``) stays instant and never imports torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "load_scorer": "clipkit.core.scorer",
    "ClipScorer": "clipkit.core.scorer",
    "classify": "clipkit.core.prompts",
    "evaluate": "clipkit.core.evaluate",
    "list_models": "clipkit.core.profiles",
    "load_captioner": "clipkit.captioning.captioner",
    "Captioner": "clipkit.captioning.captioner",
    "caption": "clipkit.captioning.captioner",
    "load_image": "clipkit.core.io",
    "ClipkitError": "clipkit.core.errors",
    "ModelLoadError": "clipkit.core.errors",
    "ImageLoadError": "clipkit.core.errors",
    "InputError": "clipkit.core.errors",
    "generate": "clipkit.api",
    "rerank": "clipkit.rerank",          # the subpackage itself, callable: see clipkit/rerank/__init__.py
    "rank_texts": "clipkit.rerank.rank",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'clipkit' has no attribute {name!r}")
    if module == f"{__name__}.{name}":       # a callable subpackage: once imported, Python binds
        return importlib.import_module(module)  # clipkit.<name> to it anyway, so it is the public object
    return getattr(importlib.import_module(module), name)


def __dir__():
    return __all__
