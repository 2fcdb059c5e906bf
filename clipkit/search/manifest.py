"""The index on disk: its layout, the format constants, the manifest (read with every field
checked, written atomically), and the model an index was built with (spec, preprocessing, weights).

An index is a folder::

    INDEX/manifest.json          the commit point: index id, generation, model (spec, weights digest,
                                 preprocessing), segments (rows, file digests), the ANN plan (codec,
                                 nlist, tuned nprobe), the typed configs
    INDEX/emb-000001.npy         L2-normalised fp16 embeddings [rows, D] of one segment (memory-mapped):
                                 the one copy of the vectors (exact re-scoring reads it; with the
                                 SQfp16 codec it is also the body of every FAISS code)
    INDEX/lists-000001-g1.npy    the segment's inverted-list numbers [rows, ccs] uint8 under the
                                 quantiser of gen 1 (SQfp16: the code is list number + the fp16 row)
    INDEX/codes-000001-g1.npy    instead of lists-*, for SQ8/PQ codecs (and indexes of format 1): the
                                 FAISS standalone codes [rows, C] uint8 (list number + code)
    INDEX/ivf-g1.faiss           the trained, empty FAISS structure (coarse centroids, codec tables)
    INDEX/meta.sqlite            items(id, path, real, size, mtime, caption, shard, member, added, removed),
                                 generations(gen, index_id, rows, alive, dim)

Ids are row numbers across the segments and never change. An item is visible at generation G when
``added <= G`` and it was not ``removed`` at or before G, so a writer (``index add``) prepares a new
segment, new codes and new metadata rows tagged G+1 while readers keep using G, and commits by
replacing ``manifest.json`` atomically; files and rows of an uncommitted generation are cleaned up
by the next writer (:func:`~clipkit.search.segments.recover`). Writers take an exclusive lock on
``INDEX/.lock``.

The metadata database is :mod:`clipkit.search.meta`, the segment files, the quantiser and the
writers' lock and recovery :mod:`clipkit.search.segments`, the reader :mod:`clipkit.search.store`.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from clipkit.core.errors import ImageLoadError, InputError, ModelLoadError
from clipkit.search import ann

FORMAT = "clipkit-index"
VERSION = 2                      # 2: index identity, lists-* files (one copy of the vectors); 1 still opens
MANIFEST = "manifest.json"
META = "meta.sqlite"
LOCK = ".lock"
EMB_NAME = re.compile(r"^emb-\d{6}\.npy$")
CODES_NAME = re.compile(r"^(codes|lists)-\d{6}-g\d+\.npy$")
IVF_NAME = re.compile(r"^ivf-g\d+\.faiss$")
MAX_DIM = 1 << 16
REBUILD = "rebuild the index (clipkit index build ... --overwrite)"


@dataclass
class Segment:
    emb: str            # fp16 [rows, D] .npy
    codes: str          # lists-*.npy: list numbers [rows, ccs] (the code body is the fp16 row), or
                        # codes-*.npy: FAISS standalone codes [rows, C] uint8, under the current quantiser
    start: int          # first id
    rows: int
    emb_sha256: str = ""     # sha256 of the data after the .npy header ("" in format 1)
    codes_sha256: str = ""

    @property
    def lists_only(self) -> bool:
        return self.codes.startswith("lists-")


@dataclass
class Manifest:
    model: str                        # CLIP spec the embeddings come from (a local directory: absolute)
    preprocess: dict                  # its preprocessing (PreprocessConfig.to_dict())
    dim: int
    ann: dict                         # AnnPlan.to_dict() + quantizer(+_sha256), nprobe, recall, tuned_n, trained_generation
    config: dict                      # AnnConfig (asdict)
    segments: list[Segment] = field(default_factory=list)
    generation: int = 1
    rows: int = 0                     # ids handed out so far (alive + removed)
    alive: int = 0                    # searchable items
    sources: list[str] = field(default_factory=list)
    created: str = ""
    updated: str = ""
    index_id: str = ""                # random id, also in meta.sqlite's generations table ("" in format 1)
    weights: str = ""                 # sha256 of the CLIP's weights as loaded at `precision` ("": unknown)
    precision: str = ""
    format: str = FORMAT
    version: int = VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        d = dict(d)
        d["segments"] = [Segment(**{k: v for k, v in s.items() if k in Segment.__dataclass_fields__})
                         for s in d.get("segments", [])]
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _canon(d) -> str:
    return json.dumps(d, sort_keys=True)


def read_manifest(path) -> Manifest:
    """The manifest of the index folder ``path``, every field checked (types, ranges, file names, the
    segments adding up); anything else is an InputError naming the file."""
    p = Path(path)
    mf = p / MANIFEST
    if not p.is_dir():
        raise InputError(f"{p} is not an index folder (build one with `clipkit index build`)")
    if not os.path.lexists(mf):
        raise InputError(f"{p} is not a clipkit index (no {MANIFEST}; build one with `clipkit index build`)")
    from clipkit.core.io import read_text_file
    try:
        d = json.loads(read_text_file(mf, "index manifest"))
    except ValueError as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{mf} is damaged ({e}); {REBUILD}") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise InputError(f"{mf} is not a clipkit index manifest")
    v = d.get("version")
    if not _is_int(v) or v < 1:
        raise InputError(f"{mf} is damaged (version {v!r}); {REBUILD}")
    if v > VERSION:
        raise InputError(f"{p} was written by a newer clipkit (index format {v}); upgrade clipkit")
    try:
        m = Manifest.from_dict(d)
    except (TypeError, AttributeError) as e:
        raise InputError(f"{mf} is damaged ({e}); {REBUILD}") from None
    why = _manifest_problem(m)
    if why:
        raise InputError(f"{mf} is damaged ({why}); {REBUILD}")
    return m


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _manifest_problem(m: Manifest) -> str | None:
    """What is wrong with a parsed manifest (None: nothing)."""
    if not isinstance(m.model, str) or not m.model.strip():
        return f"model {m.model!r} is not a model spec"
    if not isinstance(m.preprocess, dict):
        return "preprocess is not an object"
    if not _is_int(m.dim) or not 1 <= m.dim <= MAX_DIM:
        return f"dim {m.dim!r} is not an integer in 1..{MAX_DIM}"
    if not _is_int(m.generation) or m.generation < 1:
        return f"generation {m.generation!r} is not a positive integer"
    if not _is_int(m.rows) or m.rows < 1:
        return f"rows {m.rows!r} is not a positive integer"
    if not _is_int(m.alive) or not 0 <= m.alive <= m.rows:
        return f"alive {m.alive!r} is not an integer in 0..rows"
    if not isinstance(m.sources, list) or not all(isinstance(x, str) for x in m.sources):
        return "sources is not a list of paths"
    for k in ("created", "updated", "index_id", "weights", "precision"):
        if not isinstance(getattr(m, k), str):
            return f"{k} is not a string"
    if m.version >= 2 and not re.fullmatch(r"[0-9a-f]{32}", m.index_id):
        return f"index_id {m.index_id!r} is not an index id"
    if not isinstance(m.segments, list) or not m.segments:
        return "no segments"
    total = 0
    for s in m.segments:
        if not isinstance(s.emb, str) or not EMB_NAME.match(s.emb):
            return f"segment file name {s.emb!r}"
        if not isinstance(s.codes, str) or not CODES_NAME.match(s.codes):
            return f"codes file name {s.codes!r}"
        if not _is_int(s.start) or s.start != total:
            return f"segment {s.emb} starts at {s.start!r}, not {total}"
        if not _is_int(s.rows) or s.rows < 1:
            return f"segment {s.emb} has {s.rows!r} rows"
        if not isinstance(s.emb_sha256, str) or not isinstance(s.codes_sha256, str):
            return f"segment {s.emb} digests are not strings"
        total += s.rows
    if total != m.rows:
        return f"rows {m.rows} but the segments hold {total}"
    a = m.ann
    if not isinstance(a, dict):
        return "ann is not an object"
    for k in ("nlist", "dim", "n", "code_bytes", "memory", "nprobe"):
        if not _is_int(a.get(k)) or a[k] < (0 if k == "memory" else 1):
            return f"ann.{k} {a.get(k)!r} is not a positive integer"
    if a["dim"] != m.dim:
        return f"ann.dim {a['dim']} differs from dim {m.dim}"
    if a["nprobe"] > a["nlist"]:
        return f"ann.nprobe {a['nprobe']} exceeds nlist {a['nlist']}"
    codec = a.get("codec")
    try:
        cb = ann.code_bytes(codec, m.dim) if isinstance(codec, str) else None
    except InputError:
        cb = None
    if cb is None or cb != a["code_bytes"]:
        return f"ann.codec {codec!r} for dimension {m.dim}"
    if not isinstance(a.get("quantizer"), str) or not IVF_NAME.match(a["quantizer"]):
        return f"ann.quantizer {a.get('quantizer')!r}"
    if a.get("recall") is not None and not (_is_num(a["recall"]) and 0 <= a["recall"] <= 1):
        return f"ann.recall {a['recall']!r} is not in [0, 1]"
    if not isinstance(a.get("quantizer_sha256", ""), str):
        return "ann.quantizer_sha256 is not a string"
    if any(s.lists_only and codec != "SQfp16" for s in m.segments):
        return f"lists-only codes with codec {codec}"
    c = m.config
    if not isinstance(c, dict):
        return "config is not an object"
    types = {"max_memory": (_is_int, True), "flat_max": (_is_int, False), "target_recall": (_is_num, False),
             "retrain_growth": (_is_num, False), "retune_growth": (_is_num, False), "codec": (lambda v: isinstance(v, str), True),
             "nlist": (_is_int, True), "seed": (_is_int, False)}
    for k, (ok, nullable) in types.items():
        if k in c and not ((nullable and c[k] is None) or ok(c[k])):
            return f"config.{k} {c[k]!r}"
    try:
        ann.AnnConfig.from_dict(c).validate()
    except InputError as e:
        return f"config: {e}"
    return None


def write_manifest(folder, m: Manifest) -> None:
    from clipkit.core.outputs import write_text_atomic
    m.updated = now()
    write_text_atomic(Path(folder) / MANIFEST, json.dumps(m.to_dict(), indent=1), overwrite=True)


def new_index_id() -> str:
    return uuid.uuid4().hex


def regular_file(path, what: str = "index file") -> None:
    """Refuse anything but a regular file (a FIFO, socket or device would block or never end), with
    core's one check (:func:`clipkit.core.io.open_regular`)."""
    from clipkit.core.io import open_regular
    try:
        open_regular(path).close()
    except ImageLoadError as e:
        raise InputError(f"cannot read {what} {path}: {e.reason}; {REBUILD}") from None


# ---- the model an index was built with ----------------------------------------------------------

def canonical_spec(spec: str) -> str:
    """The spec an index records: a local model directory as an absolute path (a relative one would
    name another model, or none, from another working directory); others as written."""
    from clipkit.core.registry import parse_spec
    try:
        s = parse_spec(spec, "clip")
    except Exception:
        return spec
    if s.source.bundled or s.kind in ("openclip", "hf"):
        return spec
    return os.path.abspath(s.target) if isinstance(s.target, str) and os.path.exists(s.target) else spec


def same_model(a: str, b: str) -> bool:
    """Whether two specs name the same model (a local directory by its real path)."""
    if a == b:
        return True
    ca, cb = canonical_spec(a), canonical_spec(b)
    if ca == cb:
        return True
    return os.path.isabs(ca) and os.path.isabs(cb) and os.path.realpath(ca) == os.path.realpath(cb)


def check_spec(where, m: Manifest, spec: str, preprocess) -> None:
    """Refuse a CLIP spec or preprocessing other than the index's (see
    :meth:`~clipkit.search.store.IndexReader.check_model`)."""
    pp = preprocess.to_dict() if hasattr(preprocess, "to_dict") else preprocess
    if not same_model(spec, m.model):
        raise ModelLoadError(spec, f"index {where} was built with CLIP {m.model!r}, whose "
                             "embeddings are not comparable", f"drop --clip, or pass --clip {m.model}")
    if _canon(json.loads(json.dumps(pp))) != _canon(m.preprocess):
        raise ModelLoadError(spec, f"index {where} was built with other preprocessing "
                             f"({m.preprocess}) for this CLIP", "rebuild the index")


def check_scorer(where, m: Manifest, scorer) -> None:
    """:func:`check_spec`, then the weights: a model whose weights differ from those the index was
    built with (a directory changed in place) is refused. Weights are compared at the precision the
    index was built with (fp16 weights are another digest of the same model)."""
    check_spec(where, m, scorer.spec, scorer.preprocess)
    if m.weights and getattr(scorer, "precision", None) == m.precision:
        digest = getattr(scorer, "weights_digest", None)
        if digest is not None and digest != m.weights:
            raise ModelLoadError(scorer.spec, f"its weights (sha256 {digest[:12]}) are not those index {where} "
                                 f"was built with (sha256 {m.weights[:12]}): the model changed since",
                                 "rebuild the index with `clipkit index build ... --overwrite`, or restore the model")
