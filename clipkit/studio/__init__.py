"""The studio: ``clipkit serve``'s local page (generate, gallery, caption, rerank, search; DESIGN §8).

It sits above the plugins (it joins guidance, captioning, rerank and search through
:func:`clipkit.api.generate` and their public functions), like the CLI and :mod:`clipkit.api`.

* :mod:`clipkit.studio.app`      the Flask app and what its routes do
* :mod:`clipkit.studio.jobs`     the job queue: one model-heavy job at a time, progress, previews, cancel
* :mod:`clipkit.studio.gallery`  the pictures under ``--out`` with their sidecars
"""
from clipkit.studio.app import StudioConfig, create_studio_app  # noqa: F401
