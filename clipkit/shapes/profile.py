"""The bundled ``shapes`` profile: the Shapes world's models, the words they know, its 3x3 layout
grid and the `generate` defaults measured on it (BENCHMARKS.md). Importing this module registers
it (:func:`clipkit.core.profiles.register_profile`); the CLI and :mod:`clipkit.api` do."""
from __future__ import annotations

from clipkit.core.profiles import Profile, register_profile
from clipkit.shapes.layout import split_layout
from clipkit.shapes.world import vocabulary

SHAPES = register_profile(Profile(
    "shapes", "shapes", "shapes", "shapes", "bundled, offline demo models; they know only the Shapes world",
    guide="shapes-noised", vocabulary=frozenset(vocabulary()),
    best_of=3, select="caption",                        # strict 98/100 held out vs 93/100 for one sample
    negative=("{prompt} and another shape:4",),         # the count guard: see BENCHMARKS.md
    init_clips=("shapes-noised", "shapes"),             # recolours better than the guide alone (BENCHMARKS)
    layout="grid",                                      # two-object prompts: each object guided on its own
    layouts={"grid": split_layout}))
