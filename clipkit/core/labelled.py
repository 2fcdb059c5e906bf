"""Labelled image sets: an ImageFolder (one subfolder per class, optionally inside ``train/``,
``val/``, ``test/``) or a list file (CSV ``path,label[,split]`` / JSONL ``{"path", "label",
"split"}``), with optional readable class names.

Layouts::

    DIR/cat/1.jpg DIR/dog/2.jpg                      -> one split, "all"
    DIR/train/cat/1.jpg DIR/val/... DIR/test/...     -> splits train / val / test (any subset)
    list.csv: path,label[,split]                     -> paths relative to the file's folder

Classes are the sorted folder names (or labels) over every split, so a class absent from one split
is still a candidate label there. Images are not opened here: unreadable files are found, skipped
and counted by whoever reads them.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from clipkit.core.errors import InputError
from clipkit.core.io import is_image_path, read_text_file, scan_images

log = logging.getLogger(__name__)

#: canonical split name -> folder names (or list-file values) accepted for it
SPLIT_ALIASES = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test",)}
ALL = "all"          # the one split of a folder (or list) without splits


def canonical_split(name: str) -> str | None:
    n = name.strip().lower()
    for canon, aliases in SPLIT_ALIASES.items():
        if n in aliases:
            return canon
    return None


@dataclass
class LabelledSplit:
    name: str
    paths: list[str]
    labels: list[int]                 # class index of each path

    def __len__(self):
        return len(self.paths)

    def counts(self, n_classes: int) -> list[int]:
        out = [0] * n_classes
        for y in self.labels:
            out[y] += 1
        return out


@dataclass
class LabelledSet:
    root: str                          # the folder or list file
    classes: list[str]                 # folder names / labels, sorted
    names: list[str]                   # readable names, same order (--class-names; default: classes)
    splits: dict[str, LabelledSplit] = field(default_factory=dict)

    @property
    def has_splits(self) -> bool:
        return ALL not in self.splits

    def split(self, name: str) -> LabelledSplit:
        key = canonical_split(name) or name.strip().lower()
        if key == ALL and self.has_splits:           # everything, split layout or not
            return LabelledSplit(ALL, [p for s in self.splits.values() for p in s.paths],
                                 [y for s in self.splits.values() for y in s.labels])
        if key not in self.splits:
            have = ", ".join(self.splits)
            raise InputError(f"{self.root} has no {name!r} split (it has: {have})")
        return self.splits[key]

    def eval_split(self, requested: str | None = None) -> LabelledSplit:
        """``requested``, else ``test``, else ``val``, else the whole set."""
        if requested:
            return self.split(requested)
        for name in ("test", "val", ALL):
            if name in self.splits:
                return self.splits[name]
        raise InputError(f"{self.root} has no test, val or unsplit images to evaluate on "
                         f"(splits: {', '.join(self.splits)}); pick one with --split")


# --------------------------------------------------------------------------------------------
# Class names
# --------------------------------------------------------------------------------------------

def read_class_names(path, classes: list[str]) -> list[str]:
    """Readable names from a JSON object ``{"folder": "name"}`` or ``folder,name`` lines (``#``
    comments allowed). Classes without an entry keep their folder name (a warning says which)."""
    text = read_text_file(path, "class-names file")
    mapping: dict[str, str] = {}
    if text.lstrip().startswith("{"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"class-names file {path}: bad JSON ({e.msg}, line {e.lineno})") from None
        if not all(isinstance(v, str) for v in doc.values()):
            raise InputError(f"class-names file {path}: expected {{\"folder\": \"readable name\"}} strings")
        mapping = {str(k): v for k, v in doc.items()}
    else:
        for n, row in enumerate(csv.reader(io.StringIO(text)), 1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if len(row) < 2:
                raise InputError(f"class-names file {path}, line {n}: expected 'folder,name' "
                                 "(or a JSON object {\"folder\": \"name\"})")
            mapping[row[0].strip()] = ",".join(row[1:]).strip()
    names = []
    for c in classes:
        name = mapping.get(c, c).strip()
        if not name:
            raise InputError(f"class-names file {path}: empty name for class {c!r}")
        names.append(name)
    missing = [c for c in classes if c not in mapping]
    unknown = sorted(set(mapping) - set(classes))
    if missing:
        log.warning("class-names file %s has no name for %d classes (%s): their folder names are used",
                    path, len(missing), ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    if unknown:
        log.warning("class-names file %s names %d classes that are not in the data (%s)",
                    path, len(unknown), ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else ""))
    seen: dict[str, str] = {}
    for c, name in zip(classes, names):
        if name.lower() in seen:
            raise InputError(f"classes {seen[name.lower()]!r} and {c!r} have the same name {name!r}: "
                             "zero-shot prompts could not tell them apart")
        seen[name.lower()] = c
    return names


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def _subdirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _class_dirs(d: Path, top: Path) -> list[Path]:
    """The class folders of ``d`` (inside the dataset ``top``), without symbolic links that lead back
    into the dataset's own tree: to ``d``, ``top`` or an ancestor (the images would be counted again
    under the link's name), or into another class folder (another label for the same images). Each
    one skipped is named in a warning."""
    subs = _subdirs(d)
    real = {c: os.path.realpath(c) for c in subs}
    kept_real = [real[c] for c in subs if not os.path.islink(c)]
    out = []
    for c in subs:
        if os.path.islink(c):
            r = real[c]
            why = None
            if _within(os.path.realpath(d), r) or _within(os.path.realpath(top), r):
                why = "the dataset folder or one above it"
            elif any(_within(r, k) for k in kept_real):
                other = next(k for k in kept_real if _within(r, k))
                why = f"class folder {os.path.basename(other)}"
            if why:
                log.warning("%s: skipped class folder %s: a symbolic link to %s (its images would be "
                            "counted again under another label)", d, c.name, why)
                continue
            kept_real.append(r)
        out.append(c)
    return out


def _class_folders(d: Path, top: Path | None = None) -> dict[str, list[str]]:
    loose = [p for p in d.iterdir() if p.is_file() and not p.name.startswith(".") and is_image_path(p)]
    if loose:
        log.warning("%s: %d images outside the class folders are ignored (e.g. %s)", d, len(loose), loose[0].name)
    return {c.name: [str(p) for p in scan_images([c])] for c in _class_dirs(d, top or d)}


def _from_folder(root: Path) -> tuple[dict[str, dict[str, list[str]]], bool]:
    """-> ({split: {class: [paths]}}, whether the layout has splits)."""
    sub = _subdirs(root)
    if not sub:
        raise InputError(f"{root} has no class folders: expected DIR/<class>/<image> "
                         "(or DIR/train|val|test/<class>/<image>)")
    split_dirs = {canonical_split(p.name): p for p in sub if canonical_split(p.name)}
    if not split_dirs:
        return {ALL: _class_folders(root)}, False
    others = [p.name for p in sub if not canonical_split(p.name)]
    if others:
        raise InputError(f"{root} mixes split folders ({', '.join(p.name for p in split_dirs.values())}) "
                         f"with other folders ({', '.join(others[:3])}): put every class inside train/, "
                         "val/ or test/, or none of them")
    out = {}
    for canon in SPLIT_ALIASES:
        if canon in split_dirs:
            out[canon] = _class_folders(split_dirs[canon], root)
    return out, True


def _from_list(path: Path) -> dict[str, dict[str, list[str]]]:
    """CSV ``path,label[,split]`` (an optional header row) or JSONL ``{"path"|"image", "label", "split"?}``."""
    text = read_text_file(path, "image list")
    rows: list[tuple[str, str, str | None, int]] = []
    bad = 0
    if path.suffix.lower() == ".jsonl":
        for n, ln in enumerate(text.splitlines(), 1):
            if not ln.strip():
                continue
            try:
                d = json.loads(ln)
                p, y = d.get("path", d.get("image")), d["label"]
                if not isinstance(p, str) or not isinstance(y, (str, int)) or not str(y).strip():
                    raise TypeError
                rows.append((p, str(y).strip(), d.get("split"), n))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                bad += 1
    else:
        for n, row in enumerate(csv.reader(io.StringIO(text)), 1):
            if not row or not "".join(row).strip():
                continue
            if n == 1 and [c.strip().lower() for c in row[:2]] in (["path", "label"], ["image", "label"]):
                continue                                            # header
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                bad += 1
                continue
            rows.append((row[0].strip(), row[1].strip(), row[2].strip() if len(row) > 2 and row[2].strip()
                         else None, n))
    if bad:
        log.warning("%s: %d malformed lines skipped (expected path,label[,split])", path, bad)
    if not rows:
        raise InputError(f"{path}: no usable 'path,label' rows")
    with_split = {r[2] is not None for r in rows}
    if len(with_split) > 1:
        raise InputError(f"{path}: some rows have a split column and some do not")
    out: dict[str, dict[str, list[str]]] = {}
    for p, y, s, n in rows:
        if s is None:
            key = ALL
        else:
            key = canonical_split(str(s))
            if key is None:
                raise InputError(f"{path}, line {n}: split {s!r} is not train, val or test")
        ip = Path(p) if Path(p).is_absolute() else path.parent / p
        out.setdefault(key, {}).setdefault(y, []).append(str(ip))
    return out


def load_labelled(source, class_names=None) -> LabelledSet:
    """An ImageFolder directory or a CSV/JSONL list -> :class:`LabelledSet`.

    Errors (one line): no such path, no class folders, one class only, split folders mixed with
    class folders, a malformed list or class-names file. Warnings: empty classes, images outside
    class folders, class-name entries that match no class.
    """
    root = Path(source)
    if root.is_dir():
        per_split, _ = _from_folder(root)
    elif root.is_file():
        per_split = _from_list(root)
    else:
        raise InputError(f"{root}: no such folder or list file")
    classes = sorted({c for s in per_split.values() for c in s})
    if len(classes) < 2:
        raise InputError(f"{root} has {len(classes)} class{'es' if len(classes) != 1 else ''} "
                         f"({', '.join(classes) or 'none'}): classification needs at least 2")
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for name, per_class in per_split.items():
        pairs = sorted((p, index[c]) for c, ps in per_class.items() for p in ps)
        splits[name] = LabelledSplit(name, [p for p, _ in pairs], [y for _, y in pairs])
        empty = [c for c in classes if c in per_class and not per_class[c]]
        if empty:
            where = f" in {name}/" if name != ALL else ""
            log.warning("%s: %d class folder%s%s without images (%s): still a candidate label",
                        root, len(empty), "s" if len(empty) > 1 else "", where, ", ".join(empty[:5]))
    names = read_class_names(class_names, classes) if class_names else list(classes)
    if not any(len(s) for s in splits.values()):
        raise InputError(f"{root}: the class folders hold no image files")
    return LabelledSet(str(root), classes, names, splits)
