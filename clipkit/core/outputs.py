"""Output files that are safe to write: checked before the work, atomic, never through a link.

The rules (DESIGN §3), in one place for every command:

1. **Validated before the work starts** (:func:`check_output_file`, :func:`check_output_dir`): the
   parent folder exists or is created, it is writable, an existing file is refused without
   ``overwrite``, and an output that is one of the inputs is refused always.
2. **Written atomically** (:func:`write_atomic`, :func:`atomic_dir`): the bytes go to a fresh temporary
   file (``O_EXCL``) in the *resolved* output folder, which is then renamed onto the final name. A
   killed run leaves the previous file or the new one, never half a file (SQLite's and git's rule).
3. **Never through a symbolic link**: ``rename`` replaces a link planted under the output's name
   itself, never the file it points to, so nothing is written outside the folder the user named.
   Append-mode logs are opened with ``O_NOFOLLOW``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

from clipkit.core.errors import InputError
from clipkit.core.io import is_image_path


def _real_parent(path: Path, create: bool = True) -> Path:
    parent = path.parent if str(path.parent) else Path(".")
    if create:
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise InputError(f"cannot write {path}: {parent} exists and is not a folder") from None
        except OSError as e:
            raise InputError(f"cannot create folder {parent} for {path}: {e.strerror or e}") from None
    return Path(os.path.realpath(parent))


def _is_input(out: Path, inputs: Iterable) -> bool:
    """Whether ``out`` names (or, through a link, is) one of the inputs, or an existing image inside
    an input folder (it would be read as an input)."""
    real_out = {os.path.realpath(out), str(_real_parent(out, create=False) / out.name)}
    for i in inputs:
        ri = os.path.realpath(i)
        if ri in real_out:
            return True
        if os.path.isdir(ri) and os.path.lexists(out) and is_image_path(out) \
                and any(r.startswith(ri.rstrip(os.sep) + os.sep) for r in real_out):
            return True
    return False


def check_not_input(path, inputs: Iterable, what: str = "output") -> None:
    """An output that is one of the inputs (or, through a link, is one; or an image inside an input
    folder) is refused always, ``--overwrite`` or not: an InputError naming it."""
    if _is_input(Path(path), inputs):
        raise InputError(f"{what} {path} is one of the inputs: choose another file name")


def check_output_file(path, *, overwrite: bool = False, inputs: Iterable = (), what: str = "output") -> Path:
    """Validate an output file before any work: -> the path. Raises :class:`InputError` (one line)."""
    p = Path(path)
    if p.name in ("", ".", ".."):
        raise InputError(f"{what} {path!r} is not a file name")
    parent = _real_parent(p)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {what} {p}: folder {p.parent} is not writable")
    check_not_input(p, inputs, what)
    if os.path.lexists(p):
        if os.path.isdir(p) and not os.path.islink(p):
            raise InputError(f"{what} {p} is a folder: give a file name")
        if not overwrite:
            raise InputError(f"refusing to overwrite {p}: pass --overwrite or choose another name")
    return p


def check_output_dir(path, *, what: str = "output folder") -> Path:
    """Create (if needed) and validate an output folder before any work; -> its resolved path."""
    p = Path(path)
    if os.path.lexists(p) and not os.path.isdir(p):
        raise InputError(f"{what} {p} exists and is not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = next((a for a in p.parents if os.path.lexists(a) and not os.path.isdir(a)), None)
        if blocker is not None:
            raise InputError(f"cannot create {what} {p}: {blocker} is a file, not a folder") from None
        raise InputError(f"cannot create {what} {p}: {e.strerror or e}") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise InputError(f"{what} {p} is not writable")
    return Path(os.path.realpath(p))


def _commit(tmp: Path, target: Path, overwrite: bool) -> None:
    """Rename ``tmp`` onto ``target`` (same folder). Without ``overwrite`` an existing name, even one
    that appeared during the run, is refused (``link`` fails instead of replacing)."""
    if overwrite:
        if os.path.isdir(target) and not os.path.islink(target):
            raise InputError(f"cannot write {target}: it is a folder")
        os.replace(tmp, target)              # replaces a symlink itself, never the file it points to
        return
    try:
        os.link(tmp, target, follow_symlinks=False)
    except FileExistsError:
        raise InputError(f"refusing to overwrite {target} (it appeared during the run): pass --overwrite") from None
    except OSError:                          # a filesystem without hard links
        if os.path.lexists(target):
            raise InputError(f"refusing to overwrite {target}: pass --overwrite") from None
        os.replace(tmp, target)
        return
    os.unlink(tmp)


def write_atomic(path, write: Callable[[Path], object], *, overwrite: bool = False) -> Path:
    """Write a file atomically: ``write(tmp_path)`` fills a fresh temporary file (same suffix, so
    format-by-extension savers work) in the resolved folder of ``path``, which is then renamed onto
    ``path``. -> the final path."""
    p = Path(path)
    parent = _real_parent(p)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{p.stem}.", suffix=f".tmp{p.suffix}")
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        _commit(tmp, parent / p.name, overwrite)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return p


def write_bytes_atomic(path, data: bytes, *, overwrite: bool = False) -> Path:
    return write_atomic(path, lambda t: t.write_bytes(data), overwrite=overwrite)


def write_text_atomic(path, text: str, *, overwrite: bool = False) -> Path:
    return write_atomic(path, lambda t: t.write_text(text, encoding="utf-8"), overwrite=overwrite)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def old_dir(path: Path) -> Path:
    return path.with_name(path.name + ".old")


def remove_path(path) -> None:
    """Remove a file, a symbolic link (itself, never what it points to) or a folder tree; a missing
    ``path`` is not an error."""
    p = Path(path)
    if os.path.islink(p) or (os.path.lexists(p) and not os.path.isdir(p)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
    elif os.path.isdir(p):
        shutil.rmtree(p, ignore_errors=True)


def recover_dir(path) -> None:
    """Finish an interrupted :func:`atomic_dir` swap: if ``path`` is missing but its previous version
    (``path.old``, a real folder) is there, put it back; a leftover ``.old`` beside a good ``path``
    is removed, and so is an ``.old`` that is not a folder (a file, a symbolic link: never followed,
    never taken for the previous version)."""
    p = Path(path)
    old = old_dir(p)
    if not os.path.lexists(old):
        return
    if os.path.islink(old) or not os.path.isdir(old) or os.path.lexists(p):
        remove_path(old)
    else:
        os.replace(old, p)


@contextlib.contextmanager
def atomic_dir(path, *, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder atomically: yields a fresh private temporary folder beside ``path``; on success
    it replaces ``path`` (the previous version is kept as ``path.old`` until the new one is in place,
    so an interrupted swap is repaired by :func:`recover_dir`). On error the temporary folder goes."""
    p = Path(path)
    parent = _real_parent(p)
    target = parent / p.name
    recover_dir(target)
    if os.path.lexists(target) and not overwrite:
        raise InputError(f"refusing to overwrite {p}: pass --overwrite or choose another folder")
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{p.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if os.path.islink(target) or os.path.isfile(target):
            os.unlink(target)                # a link is replaced, never followed
        if os.path.lexists(target):
            os.replace(target, old_dir(target))
            os.replace(tmp, target)
            shutil.rmtree(old_dir(target), ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def open_log(path, append: bool):
    """Open a log file for writing text without following a symlink (``O_NOFOLLOW``)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if append else os.O_TRUNC)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if os.path.islink(path):
            raise InputError(f"refusing to write {path}: it is a symbolic link") from None
        raise InputError(f"cannot write {path}: {e.strerror or e}") from None
    return os.fdopen(fd, "a" if append else "w", newline="", encoding="utf-8")
