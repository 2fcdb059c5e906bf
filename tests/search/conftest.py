"""The search tests' ``scorer`` (the bundled Shapes CLIP). The corpus and its index (``corpus``,
``built``) are session fixtures of tests/conftest.py, shared with the CLI tests of index/search/serve."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def scorer(shapes_scorer):
    return shapes_scorer
