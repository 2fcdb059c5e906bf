"""``clipkit models``: profiles, the model specs they use, and what is available offline."""
from __future__ import annotations

import click

from clipkit.cli.common import emit_json, fmt_table, json_option


@click.command()
@json_option
def models(as_json):
    """List the profiles, the model spec of each component, and whether it is available locally.

    \b
    Spec syntax (for --clip, --diffusion, --captioner):
      shapes                 bundled offline Shapes models
      openclip:ARCH/TAG      e.g. openclip:ViT-B-32/laion2b_s34b_b79k
      hf:ORG/NAME            a Hugging Face hub repository
      /path/to/dir           a local open_clip / transformers / diffusers / captioner directory
      /path/to/file.pt       an official ClipCap checkpoint (--captioner)
    """
    from dataclasses import asdict

    import clipkit.shapes.profile  # noqa: F401  (registers the bundled `shapes` profile)
    from clipkit.core.profiles import PROFILES, list_models
    entries = list_models()
    if as_json:       # the vocabulary (a word set) and the layouts (functions) are not settings
        emit_json({"profiles": {p.name: {**{k: v for k, v in asdict(p).items() if k not in ("vocabulary", "layouts")},
                                         "layouts": sorted(p.layouts)}
                                for p in PROFILES.values()},
                   "models": [asdict(e) for e in entries]})
        return
    rows = [[e.profile, e.component, e.spec, "yes" if e.available else "no", e.note] for e in entries]
    click.echo(fmt_table(["profile", "component", "spec", "available", "note"], rows))
