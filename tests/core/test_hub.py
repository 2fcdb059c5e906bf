"""clipkit.core.hub: the hub helpers every model source and plugin loader shares."""
import os
import time

import pytest

from clipkit.core import hub
from clipkit.core.errors import ModelLoadError


class _Spec:
    def __init__(self, cached):
        self.raw, self.cached = "hf:org/name", cached

    def available(self):
        return self.cached, ""


def test_short_timeouts_are_set_but_never_override_the_user(monkeypatch):
    assert os.environ["HF_HUB_ETAG_TIMEOUT"]          # set when clipkit.core.hub was imported
    monkeypatch.delenv("HF_HUB_ETAG_TIMEOUT")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "99")
    hub.short_timeouts()
    assert os.environ["HF_HUB_ETAG_TIMEOUT"] == "5" and os.environ["HF_HUB_DOWNLOAD_TIMEOUT"] == "99"


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("ON", True), ("0", False), ("", False)])
def test_offline(monkeypatch, value, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub.offline() is expected


def test_one_line():
    assert hub.one_line(ValueError("first\nsecond")) == "first"
    assert hub.one_line(KeyError()) == "KeyError"
    long = hub.one_line(RuntimeError("x" * 500))
    assert len(long) == 200 and long.endswith("...")


def test_require_cached_or_online(monkeypatch):
    hub.require_cached_or_online(_Spec(True))          # cached: nothing to check
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set"):
        hub.require_cached_or_online(_Spec(False))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: (False, "example.org unreachable (refused)"))
    with pytest.raises(ModelLoadError) as e:
        hub.require_cached_or_online(_Spec(False))
    assert "the hub is unreachable (refused)" in str(e.value) and e.value.fix == hub.OFFLINE_FIX
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: (True, ""))
    hub.require_cached_or_online(_Spec(False))          # online: the loader downloads


def test_hub_reachable_fails_fast_on_a_closed_port(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    t = time.time()
    ok, why = hub.hub_reachable(timeout=1.0)
    assert not ok and why.startswith("127.0.0.1 unreachable") and time.time() - t < 5


def test_hub_cached_is_false_for_an_empty_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert hub.hub_cached("org/never-downloaded", ("config.json",)) is False
