"""What an index is built from: folders, file lists and webdataset tar shards.

* a **folder** is walked recursively (:func:`clipkit.core.io.scan_images`); an image ``a.png`` with
  a sidecar ``a.txt`` beside it gets that text as its caption;
* a **file list** (``.txt``, ``.lst``, ``.list``, ``.tsv``) names one image (or folder) per line,
  optionally followed by a tab and a caption; relative paths are relative to the list's folder;
  blank lines and lines starting with ``#`` are ignored;
* a **tar shard** (``.tar``; brace patterns such as ``shard-{000..009}.tar`` are expanded) is read
  with webdataset's own tar iterator and key grouping (``0001.jpg`` + ``0001.txt`` = one sample with
  a caption; ``.json`` with a ``caption`` field works too). Only local regular files are opened.

Every item gets a display path (absolute; ``SHARD.tar#MEMBER`` for a shard member) that is unique
in the index and is the tie-breaker of the ranking order.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from clipkit.core.errors import InputError

LIST_SUFFIXES = (".txt", ".lst", ".list", ".tsv")
SHARD_SUFFIXES = (".tar",)
CAPTION_KEYS = ("txt", "caption", "text")
#: Extensions (webdataset keys) tried as the image of a sample, in this order.
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "img", "image")
MAX_CAPTION = 2000          # characters kept of a caption
MAX_MEMBER_BYTES = 64 << 20  # an image member larger than this is skipped, not read


@dataclass
class FileEntry:
    path: str                     # absolute path as found (links not resolved: the display path)
    caption: str | None = None


@dataclass
class Sources:
    files: list[FileEntry] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)          # absolute paths of tar shards
    skipped: list[dict] = field(default_factory=list)        # [{path, reason}] found while listing


def expand_sources(sources) -> Sources:
    """SOURCE arguments -> image files (with captions) and tar shards, each once, in a stable order."""
    out = Sources()
    seen_files: set[str] = set()
    seen_shards: set[str] = set()
    items = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    if not items:
        raise InputError("no sources given (folders, file lists or .tar shards)")
    for src in items:
        for s in _braces(str(src)):
            _expand_one(Path(s), out, seen_files, seen_shards, depth=0)
    return out


def _braces(s: str) -> list[str]:
    if "{" in s and ".." in s and not os.path.lexists(s):
        from braceexpand import braceexpand          # webdataset's dependency
        return list(braceexpand(s))
    return [s]


def _expand_one(p: Path, out: Sources, seen_files, seen_shards, depth: int, caption: str | None = None) -> None:
    from clipkit.core.io import is_image_path, scan_images
    if not os.path.lexists(p):
        raise InputError(f"no such file or folder: {p}")
    if p.is_dir():
        for f in scan_images([p]):
            a = os.path.abspath(f)
            if a not in seen_files:
                seen_files.add(a)
                out.files.append(FileEntry(a, sidecar_caption(f)))
        return
    suffix = p.suffix.lower()
    if suffix in SHARD_SUFFIXES:
        a = os.path.abspath(p)
        if a not in seen_shards:
            seen_shards.add(a)
            out.shards.append(a)
        return
    if suffix in LIST_SUFFIXES and not is_image_path(p):
        if depth > 0:
            raise InputError(f"file list {p} is named inside another file list (lists do not nest)")
        _read_list(p, out, seen_files, seen_shards)
        return
    if is_image_path(p) or depth > 0:
        a = os.path.abspath(p)
        if a not in seen_files:
            seen_files.add(a)
            out.files.append(FileEntry(a, caption if caption is not None else sidecar_caption(p)))
        return
    raise InputError(f"{p}: not an image, a folder, a file list ({', '.join(LIST_SUFFIXES)}) or a .tar shard")


def _read_list(p: Path, out: Sources, seen_files, seen_shards) -> None:
    from clipkit.core.io import read_text_file
    base = p.parent
    for n, line in enumerate(read_text_file(p, "file list").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, caption = line.partition("\t")
        entry = Path(name.strip())
        entry = entry if entry.is_absolute() else base / entry
        if not os.path.lexists(entry):
            out.skipped.append({"path": str(entry), "reason": f"no such file (line {n} of {p})"})
            continue
        _expand_one(entry, out, seen_files, seen_shards, depth=1,
                    caption=_clean(caption) if caption.strip() else None)


@lru_cache(maxsize=4096)
def _listing(folder: str) -> frozenset:
    try:
        return frozenset(os.listdir(folder))
    except OSError:
        return frozenset()


def sidecar_caption(image: Path) -> str | None:
    """The text of ``stem.txt`` (or ``stem.caption``) beside an image, if there is one."""
    from clipkit.core.io import read_text_file
    names = _listing(str(image.parent))
    for ext in (".txt", ".caption"):
        side = image.stem + ext
        if side in names:
            try:
                return _clean(read_text_file(image.parent / side, "caption", max_bytes=64 << 10))
            except InputError:
                return None
    return None


def _clean(text: str) -> str | None:
    text = " ".join(text.split())[:MAX_CAPTION]
    return text or None


# ---- tar shards ---------------------------------------------------------------------------------

@dataclass
class TarSample:
    path: str                  # SHARD#MEMBER: the display path
    member: str                # member name of the image inside the tar
    data: bytes | None         # the image bytes (None: no image in the sample, see reason)
    caption: str | None
    reason: str | None = None


def member_path(shard: str, member: str) -> str:
    return f"{shard}#{member}"


def iter_shard(shard: str) -> Iterator[TarSample]:
    """The samples of one shard, in tar order (webdataset's tar iterator and key grouping over a
    local regular file we opened ourselves: no URL handlers, no pipes). A corrupt tail ends the
    shard with a sample whose ``reason`` says why."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    from clipkit.core.errors import ImageLoadError
    from clipkit.core.io import open_regular
    errors: list[str] = []

    def handler(exn) -> bool:
        errors.append(f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}")
        return False                                    # stop this shard; what was read is kept

    try:
        fh = open_regular(shard)
    except ImageLoadError as e:
        yield TarSample(shard, "", None, None, e.reason)
        return
    with fh:
        stream = tar_file_expander([{"url": shard, "stream": fh}], handler=handler)
        for s in group_by_keys(stream, handler=handler):
            key = s["__key__"]
            img_key = next((k for k in IMAGE_KEYS if k in s), None)
            caption = _sample_caption(s)
            if img_key is None:
                exts = sorted(k for k in s if not k.startswith("__"))
                yield TarSample(member_path(shard, key), key, None, caption,
                                f"no image in sample (members: {', '.join(exts) or 'none'})")
                continue
            member = f"{key}.{img_key}"
            data = s[img_key]
            if len(data) > MAX_MEMBER_BYTES:
                yield TarSample(member_path(shard, member), member, None, caption,
                                f"member larger than {MAX_MEMBER_BYTES >> 20} MiB")
                continue
            yield TarSample(member_path(shard, member), member, data, caption)
    if errors:
        yield TarSample(shard, "", None, None, f"unreadable tar ({errors[0]})")


def _sample_caption(s: dict) -> str | None:
    for k in CAPTION_KEYS:
        if k in s:
            try:
                return _clean(s[k].decode("utf-8", errors="replace"))
            except AttributeError:
                return None
    if "json" in s:
        try:
            meta = json.loads(s["json"])
            if isinstance(meta, dict) and isinstance(meta.get("caption"), str):
                return _clean(meta["caption"])
        except (ValueError, UnicodeDecodeError):
            return None
    return None


class TarReader:
    """Random access to members of indexed shards (for thumbnails): one header scan per shard,
    remembered while the shard's size and mtime stay the same."""

    def __init__(self, max_shards: int = 16):
        self._tables: dict[tuple, dict[str, tuple[int, int]]] = {}
        self.max_shards = max_shards

    def read(self, shard: str, member: str, expect: tuple[int, int] | None = None) -> bytes:
        """The bytes of ``member``; ``expect`` = (size, mtime_ns) the shard had when indexed (a shard
        changed since is refused). Raises InputError."""
        from clipkit.core.errors import ImageLoadError
        from clipkit.core.io import open_regular
        try:
            fh = open_regular(shard)
        except ImageLoadError as e:
            raise InputError(f"cannot read {shard}: {e.reason}") from None
        with fh:
            st = os.fstat(fh.fileno())
            if expect is not None and (st.st_size, st.st_mtime_ns) != tuple(expect):
                raise InputError(f"{shard} changed since it was indexed (run `clipkit index add`)")
            key = (shard, st.st_size, st.st_mtime_ns)
            table = self._tables.get(key)
            if table is None:
                try:
                    with tarfile.open(fileobj=fh, mode="r:") as tf:
                        table = {m.name: (m.offset_data, m.size) for m in tf.getmembers() if m.isreg()}
                except (tarfile.TarError, OSError) as e:
                    raise InputError(f"cannot read {shard}: {e}") from None
                if len(self._tables) >= self.max_shards:
                    self._tables.pop(next(iter(self._tables)))
                self._tables[key] = table
            if member not in table:
                raise InputError(f"{member} is not in {shard}")
            off, size = table[member]
            if size > MAX_MEMBER_BYTES:
                raise InputError(f"{member} in {shard} is larger than {MAX_MEMBER_BYTES >> 20} MiB")
            fh.seek(off)
            return fh.read(size)


def write_shard(path, samples: dict[str, dict[str, bytes]]) -> Path:
    """Write a small webdataset shard: ``{key: {ext: bytes}}`` (tests and examples)."""
    import webdataset as wds
    path = Path(path)
    with wds.TarWriter(str(path)) as w:
        for key, members in samples.items():
            w.write({"__key__": key, **members})
    return path


def pil_bytes(im, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()
