"""Typed errors. The library raises these; the CLI turns them into one ``Error: ...`` line and exit code 2."""
from __future__ import annotations


class ClipkitError(Exception):
    """Base class: a problem the user can fix (bad input, missing model). CLI exit code 2."""


class InputError(ClipkitError, ValueError):
    """Bad arguments or data (empty text, bad option value, unreadable captions file...)."""


class ModelLoadError(ClipkitError):
    """A model spec that cannot be resolved or loaded. The message names the spec and the fix."""

    def __init__(self, spec: str, reason: str, fix: str | None = None):
        self.spec, self.reason, self.fix = spec, reason, fix
        msg = f"cannot load model {spec!r}: {reason}"
        if fix:
            msg += f" ({fix})"
        super().__init__(msg)


class ImageLoadError(ClipkitError):
    """An image file that cannot be decoded. Carries the path and the reason."""

    def __init__(self, path, reason: str, permanent: bool = True):
        # permanent: the reason is a property of the file's bytes (corrupt, not an image), so a cache
        # may remember it; False for what may pass (a timeout, a permission, a FIFO, a size limit)
        self.path, self.reason, self.permanent = str(path), reason, permanent
        super().__init__(f"cannot read image {self.path}: {reason}")


class Cancelled(ClipkitError):
    """A long job stopped because its caller asked (a ``cancel()`` callback returned True); what was
    finished before is kept (written files stay)."""
