"""The studio's gallery: every generated image under the ``--out`` folder with its sidecar.

A picture is ``<slug>-<seed>.png`` with ``<slug>-<seed>.json`` beside it (what ``clipkit generate``
writes), in ``--out`` itself or one folder down (the studio writes each job into a folder of its
own). Pictures are named by an opaque id (a digest of their path under ``--out``); a request never
names a path. Symbolic links are never followed (neither folders nor files), the ``uploads`` folder
(init images and image prompts) is not a gallery, and files are read only while they are regular
files inside ``--out``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

from clipkit.core.errors import InputError

UPLOADS = "uploads"
MAX_PNG = 64 << 20
MAX_SIDECAR = 1 << 20
THUMB = 256


class GalleryMissing(LookupError):
    pass


@dataclass(frozen=True)
class Entry:
    id: str
    rel: str            # posix path under the root
    png: Path
    sidecar: Path
    size: int
    mtime_ns: int
    sidecar_stat: tuple = ()        # (size, mtime_ns) of the sidecar

    @property
    def key(self) -> tuple:
        """Changes with either file: what caches (digests, thumbnails, sidecars, captions) are keyed by."""
        return (self.rel, self.size, self.mtime_ns, *self.sidecar_stat)


def read_regular(path: Path, max_bytes: int, root: str | None = None) -> bytes:
    """A regular file's bytes, never through a symbolic link (``O_NOFOLLOW``) and, with ``root``, only
    inside it (the real path of its folder). Raises :class:`GalleryMissing`."""
    if root is not None and not (os.path.realpath(path.parent) + os.sep).startswith(root.rstrip(os.sep) + os.sep):
        raise GalleryMissing(f"{path.name} is not inside the output folder")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise GalleryMissing(f"cannot read {path.name}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise GalleryMissing(f"{path.name} is not a regular file")
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise GalleryMissing(f"{path.name} is larger than {max_bytes >> 20} MiB")
    return data


class Gallery:
    def __init__(self, root):
        self.root = Path(root)
        self.real = os.path.realpath(self.root)
        self.lock = threading.Lock()
        self.entries: dict[str, Entry] = {}
        self.digests: dict[tuple, str] = {}
        self.sidecars: dict[tuple, dict] = {}
        self.captions: dict[tuple, dict] = {}
        self.thumbs: dict[tuple, tuple[bytes, str]] = {}

    @staticmethod
    def entry_id(rel: str) -> str:
        return hashlib.sha256(rel.encode("utf-8", "surrogateescape")).hexdigest()[:16]

    def _folders(self):
        yield self.root, ""
        try:
            with os.scandir(self.root) as it:
                subs = sorted(e.name for e in it if e.is_dir(follow_symlinks=False)
                              and not e.name.startswith(".") and e.name != UPLOADS)
        except OSError:
            return
        for name in subs:
            yield self.root / name, name + "/"

    def scan(self) -> list[Entry]:
        """Every picture with a sidecar, newest first."""
        found: dict[str, Entry] = {}
        for folder, prefix in self._folders():
            try:
                with os.scandir(folder) as it:
                    files = {e.name: e for e in it if e.is_file(follow_symlinks=False)}
            except OSError:
                continue
            for name, e in files.items():
                if not name.endswith(".png") or name.startswith(".") or name[:-4] + ".json" not in files:
                    continue
                try:
                    st = e.stat(follow_symlinks=False)
                    sc = files[name[:-4] + ".json"].stat(follow_symlinks=False)
                except OSError:
                    continue
                rel = prefix + name
                eid = self.entry_id(rel)
                found[eid] = Entry(eid, rel, folder / name, folder / (name[:-4] + ".json"), st.st_size, st.st_mtime_ns,
                                   (sc.st_size, sc.st_mtime_ns))
        with self.lock:
            self.entries = found
        return sorted(found.values(), key=lambda e: (-e.mtime_ns, e.rel))

    def get(self, eid: str) -> Entry:
        with self.lock:
            e = self.entries.get(eid)
        if e is None:
            self.scan()
            with self.lock:
                e = self.entries.get(eid)
        if e is None:
            raise GalleryMissing(f"no picture {str(eid)[:40]!r} in the gallery")
        try:                                     # as the files are now (the caches key by it)
            st, sc = os.lstat(e.png), os.lstat(e.sidecar)
        except OSError:
            raise GalleryMissing(f"{e.rel} is gone") from None
        if not (stat.S_ISREG(st.st_mode) and stat.S_ISREG(sc.st_mode)):
            raise GalleryMissing(f"{e.rel} is not a regular file")
        return Entry(e.id, e.rel, e.png, e.sidecar, st.st_size, st.st_mtime_ns, (sc.st_size, sc.st_mtime_ns))

    def entry_for(self, path) -> Entry:
        """The entry of a file just written under the root."""
        rel = Path(os.path.relpath(os.path.realpath(path), self.real)).as_posix()
        self.scan()
        return self.get(self.entry_id(rel))

    # -- contents -------------------------------------------------------------------------------
    def png(self, e: Entry) -> bytes:
        return read_regular(e.png, MAX_PNG, self.real)

    def sidecar_bytes(self, e: Entry) -> bytes:
        return read_regular(e.sidecar, MAX_SIDECAR, self.real)

    def sidecar(self, e: Entry) -> dict:
        d = self.sidecars.get(e.key)
        if d is None:
            try:
                d = json.loads(self.sidecar_bytes(e))
            except (ValueError, UnicodeDecodeError):
                raise InputError(f"{e.rel}: its sidecar is not JSON") from None
            if not isinstance(d, dict):
                raise InputError(f"{e.rel}: its sidecar is not a JSON object")
            self.sidecars[e.key] = d
        return d

    def digest(self, e: Entry) -> str:
        h = self.digests.get(e.key)
        if h is None:
            h = hashlib.sha256(self.png(e)).hexdigest()
            self.digests[e.key] = h
        return h

    def rel_path(self, p) -> str:
        """A path a sidecar records, relative to the root when inside it (else its name)."""
        if not isinstance(p, str):
            return str(p)
        real = os.path.realpath(p)
        if (real + os.sep).startswith(self.real.rstrip(os.sep) + os.sep):
            return Path(os.path.relpath(real, self.real)).as_posix()
        return Path(p).name

    def describe(self, e: Entry) -> dict:
        """What the page shows of a picture (no absolute path)."""
        try:
            sc = self.sidecar(e)
        except (InputError, GalleryMissing) as err:
            sc = {"error": str(err)}
        params = sc.get("parameters") if isinstance(sc.get("parameters"), dict) else {}
        keep = ("steps", "clip_scale", "best_of", "drafts", "scheduler", "layout", "cfg_scale", "size", "strength")
        shown = {k: params[k] for k in keep if params.get(k) is not None}
        shown["negative"] = params.get("negative") or []
        if isinstance(params.get("image_prompts"), list) and params["image_prompts"]:
            shown["image_prompts"] = [[self.rel_path(ip[0]), ip[1]] for ip in params["image_prompts"]
                                      if isinstance(ip, (list, tuple)) and len(ip) == 2]
        if params.get("init_image"):
            shown["init_image"] = self.rel_path(params["init_image"])
        base = f"/gallery/{e.id}"
        d = {"id": e.id, "name": e.rel, "prompt": sc.get("prompt"), "seed": sc.get("seed"),
             "clip_score": sc.get("clip_score"), "score": sc.get("score"), "rank": sc.get("rank"),
             "candidates": sc.get("candidates"), "models": sc.get("models"), "size": sc.get("size"),
             "selection": sc.get("selection"), "parameters": shown, "bytes": e.size,
             "mtime": e.mtime_ns / 1e9, "sha256": None,
             "image": f"{base}/image.png", "thumb": f"{base}/thumb", "sidecar": f"{base}/sidecar.json",
             "download": f"{base}/download", "caption": self.captions.get(e.key)}
        try:
            d["sha256"] = self.digest(e)
        except GalleryMissing:
            pass
        return d

    def bundle(self, e: Entry) -> bytes:
        """The PNG and its sidecar in one zip (the download)."""
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
            z.writestr(e.png.name, self.png(e))
            z.writestr(e.sidecar.name, self.sidecar_bytes(e))
        return buf.getvalue()
