import pytest


@pytest.fixture(scope="module", autouse=True)
def _guidance_one_thread(one_thread):
    # every guidance test runs on one thread (tests/conftest.py: one_thread)
    yield
