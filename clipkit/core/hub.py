"""The Hugging Face hub, never waited on (DESIGN §2): short timeouts, ``HF_HUB_OFFLINE``, cache look-ups.

Every model source of :mod:`clipkit.core.registry` that reads the hub goes through these helpers, and
so do the plugins' loaders (for the fix of a failed download and the one-line message of an error):

* :func:`short_timeouts` — huggingface_hub reads its timeouts from the environment; set short ones
  (fail fast, never hang). Called when this module is imported, i.e. before huggingface_hub is.
* :func:`offline` — whether ``HF_HUB_OFFLINE`` is set.
* :func:`hub_reachable` — a TCP connect to the hub endpoint with a short timeout.
* :func:`hub_cached` — whether a repository's file is in the local hub cache.
* :func:`require_cached_or_online` — fail in seconds, with the fix, when a hub model can be neither
  read from the cache nor downloaded.
* :func:`one_line` — the first line of an exception, for :class:`~clipkit.core.errors.ModelLoadError`.
"""
from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from clipkit.core.errors import ModelLoadError

# Imported where used: huggingface_hub (heavy or optional; the paths that do not need them, and
# `clipkit --help`, start without them).

#: the fix of every failed hub load
OFFLINE_FIX = "check the network, or download it once and set HF_HUB_OFFLINE=1 to use the cache"


def short_timeouts() -> None:
    """Short hub timeouts, unless the user set their own (huggingface_hub reads these at call time)."""
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "20")


short_timeouts()   # before huggingface_hub is imported: some versions read these once


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for the cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """A TCP connect to the hub endpoint with a short timeout (huggingface_hub itself retries with
    back-off for ~30-60 s before giving up on an unreachable network) -> (reachable, why not)."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True, ""
    except OSError as e:
        return False, f"{host} unreachable ({e.strerror or type(e).__name__})"


def hub_cached(repo: str, filenames: tuple[str, ...]) -> bool:
    """Whether any of ``filenames`` of hub repository ``repo`` is in the local cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for f in filenames:
        hit = try_to_load_from_cache(repo, f)
        if isinstance(hit, str):
            return True
    return False


def require_cached_or_online(spec) -> None:
    """Fail in seconds, with the fix, when a hub model is neither cached nor downloadable.

    ``spec``: a :class:`~clipkit.core.registry.ModelSpec` (its ``raw`` string and ``available()``).
    """
    if spec.available()[0]:
        return
    if offline():
        raise ModelLoadError(spec.raw, "not in the local cache and HF_HUB_OFFLINE is set",
                             "download it once with a network, or unset HF_HUB_OFFLINE")
    ok, why = hub_reachable()
    if not ok:
        raise ModelLoadError(spec.raw, f"not in the local cache and the hub is {why.split(' ', 1)[1]}"
                             if " " in why else why, OFFLINE_FIX)


def one_line(e: BaseException) -> str:
    """An exception's first line (its type name when it has no message), at most 200 characters."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg if len(msg) < 200 else msg[:197] + "..."
