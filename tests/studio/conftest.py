"""Fixtures of the studio tests: a studio app over a temporary --out folder (bundled models)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def studio_app(tmp_path_factory, one_thread):
    from clipkit.studio import StudioConfig, create_studio_app
    out = tmp_path_factory.mktemp("studio") / "out"
    app = create_studio_app(StudioConfig(out=str(out), captioner="shapes", max_upload=2 << 20, max_request=6 << 20))
    app.testing = False                       # errors go through the handlers, as in production
    yield app
    app.extensions["clipkit_studio"].queue.close()


@pytest.fixture()
def client(studio_app):
    return studio_app.test_client()
