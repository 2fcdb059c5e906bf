"""The approximate-nearest-neighbour structure: a FAISS inverted file picked under a memory budget.

Every index is a FAISS ``IndexIVF`` over inner products of L2-normalised vectors (= cosine):

* up to ``flat_max`` vectors it has **one** list, i.e. an exact scan (``IVF1,SQfp16``);
* above, ``nlist`` ~ sqrt(N) lists (a power of two) and a codec, the most accurate one whose
  estimated memory fits ``max_memory`` (autofaiss' rule, simplified):
  ``SQfp16`` (2*D bytes/vector: the stored fp16 embedding itself), ``SQ8`` (D bytes), then
  ``PQ{m}x8`` (m bytes) for m = D/4, D/8, D/16.

An IVF is appendable without retraining (new vectors go to the list of their nearest centroid) and
supports removal by id, which HNSW does not; that is why the codec is IVF at every size. The trained
(empty) structure is saved on its own; the per-vector codes (FAISS "standalone" codes, which carry
the list number) are saved per segment beside the embeddings, so appending writes only the new
codes, and opening an index re-assembles the lists (a copy, no distances). With ``SQfp16`` the code
of a vector *is* its fp16 embedding (``by_residual`` off), so only the list numbers are saved and
the code bodies are read from the embeddings: one copy of the vectors on disk.
``nprobe`` is tuned at build time: the smallest power of two that reaches ``target_recall``
(recall@10 against an exact scan) on held-out queries: vectors of the index that were not in the
k-means training sample (a training vector sits closer to its centroid than a new query does).
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator

import numpy as np

from clipkit.core.errors import InputError

log = logging.getLogger(__name__)

#: Codecs, most accurate first: name -> bytes per vector for dimension d (None: not for this d).
CODECS = ("SQfp16", "SQ8", "PQ4", "PQ8", "PQ16")
ID_BYTES = 8                      # FAISS stores an int64 id beside every code
MIN_POINTS_PER_CENTROID = 39      # FAISS warns below this many training points per centroid
TRAIN_POINTS_PER_CENTROID = 64    # k-means training sample: 64 points per list (cost ~ N_train * nlist * D)


@dataclass
class AnnConfig:
    """How the ANN structure is chosen; saved in the index manifest."""
    max_memory: int | None = None     # bytes the in-RAM structure may use (codes + ids + centroids); None: no limit
    flat_max: int = 20_000            # up to this many vectors: one list, an exact scan
    target_recall: float = 0.95       # recall@10 vs an exact scan that the tuned nprobe reaches
    retrain_growth: float = 4.0       # `add` retrains the quantiser once the data outgrows its training set this much
    retune_growth: float = 2.0        # `add` re-tunes nprobe once the items grew this much since the last tuning
    codec: str | None = None          # force a codec (SQfp16, SQ8, PQ{D/4}...); None: the budget decides
    nlist: int | None = None          # force the number of lists; None: ~sqrt(N)
    seed: int = 0                     # k-means and tuning samples

    def validate(self) -> "AnnConfig":
        if self.max_memory is not None and self.max_memory <= 0:
            raise InputError(f"max_memory must be positive, got {self.max_memory}")
        if self.flat_max < 0:
            raise InputError(f"flat_max must be >= 0, got {self.flat_max}")
        if not 0 < self.target_recall <= 1:
            raise InputError(f"target_recall must be in (0, 1], got {self.target_recall}")
        if self.retrain_growth <= 1:
            raise InputError(f"retrain_growth must be > 1, got {self.retrain_growth}")
        if self.retune_growth <= 1:
            raise InputError(f"retune_growth must be > 1, got {self.retune_growth}")
        if self.nlist is not None and self.nlist < 1:
            raise InputError(f"nlist must be >= 1, got {self.nlist}")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "AnnConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class AnnPlan:
    """The structure picked for N vectors of dimension D."""
    codec: str            # SQfp16 | SQ8 | PQ{m}
    nlist: int            # 1 = exact scan
    dim: int
    n: int                # vectors it was planned (and trained) for
    code_bytes: int       # bytes per vector in the lists (without the id)
    memory: int           # estimated bytes in RAM at n vectors

    @property
    def factory(self) -> str:
        codec = f"PQ{self.codec[2:]}x8" if self.codec.startswith("PQ") else self.codec
        return f"IVF{self.nlist},{codec}"

    @property
    def kind(self) -> str:
        return "flat" if self.nlist == 1 else "ivf"

    def to_dict(self) -> dict:
        return {**asdict(self), "factory": self.factory, "kind": self.kind}

    @classmethod
    def from_dict(cls, d: dict) -> "AnnPlan":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def code_bytes(codec: str, dim: int) -> int | None:
    """Bytes per vector of a codec at dimension ``dim`` (None when the codec does not apply)."""
    if codec == "SQfp16":
        return 2 * dim
    if codec == "SQ8":
        return dim
    if codec.startswith("PQ"):
        try:
            m = dim // int(codec[2:])
        except ValueError:
            raise InputError(f"unknown codec {codec!r}; choose {', '.join(CODECS)} (PQk: D/k bytes)") from None
        return m if m >= 1 and dim % int(codec[2:]) == 0 else None
    raise InputError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)} (PQk: D/k bytes per vector)")


def estimate_memory(n: int, dim: int, codec: str, nlist: int) -> int:
    """RAM of the structure: codes + ids in the lists, the coarse centroids (fp32), PQ codebooks."""
    cb = code_bytes(codec, dim) or 0
    pq_tables = 256 * dim * 4 if codec.startswith("PQ") else 0
    return n * (cb + ID_BYTES) + nlist * dim * 4 + pq_tables


def default_nlist(n: int) -> int:
    """~sqrt(N) lists, a power of two, with >= 39 training points each (FAISS' minimum)."""
    if n <= 1:
        return 1
    nl = 2 ** round(math.log2(math.sqrt(n)))
    while nl > 1 and n < MIN_POINTS_PER_CENTROID * nl:
        nl //= 2
    return int(max(1, min(nl, 65536)))


def plan_index(n: int, dim: int, cfg: AnnConfig) -> AnnPlan:
    """Pick the structure for ``n`` vectors of dimension ``dim`` under ``cfg`` (autofaiss-style)."""
    cfg.validate()
    nlist = cfg.nlist or (1 if n <= cfg.flat_max else default_nlist(n))
    codecs = [cfg.codec] if cfg.codec else list(CODECS)
    tried = []
    for codec in codecs:
        cb = code_bytes(codec, dim)
        if cb is None:
            continue
        if codec.startswith("PQ") and n < MIN_POINTS_PER_CENTROID * 256:
            continue                       # a PQ codebook needs ~10k training vectors
        mem = estimate_memory(n, dim, codec, nlist)
        tried.append((codec, mem))
        if cfg.max_memory is None or mem <= cfg.max_memory:
            return AnnPlan(codec, nlist, dim, n, cb, mem)
    if not tried:
        raise InputError(f"codec {cfg.codec!r} does not apply to {n} vectors of dimension {dim}")
    best = min(m for _, m in tried)
    raise InputError(f"--max-memory {_fmt_bytes(cfg.max_memory)} is too small for {n} vectors of dimension "
                     f"{dim}: the smallest structure ({min(tried, key=lambda t: t[1])[0]}) needs "
                     f"{_fmt_bytes(best)}")


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "unlimited"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise InputError(f"the search plugin needs faiss ({e}); pip install faiss-cpu") from None
    return faiss


def new_index(plan: AnnPlan):
    """An untrained FAISS index for ``plan`` (inner product; SQ codecs on the vectors themselves)."""
    faiss = _faiss()
    index = faiss.index_factory(plan.dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.codec.startswith("SQ"):
        faiss.extract_index_ivf(index).by_residual = False   # codes of x itself: SQfp16 codes == fp16(x)
    return index


def train(plan: AnnPlan, sample: np.ndarray, seed: int = 0):
    """Train the coarse quantiser (k-means, ``nlist`` centroids) and the codec on ``sample`` [S, D] fp32."""
    faiss = _faiss()
    index = new_index(plan)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.seed = seed
    ivf.cp.niter = 10                 # k-means iterations: 10 is within 1% of FAISS' default 25 here
    if hasattr(ivf, "pq"):
        ivf.pq.cp.seed = seed
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    short = MIN_POINTS_PER_CENTROID * plan.nlist - len(sample)
    if short > 0 and plan.nlist == 1:        # one list: its centroid is the mean whatever the count;
        sample = np.concatenate([sample] * (1 + -(-short // len(sample))))   # repeat it, no FAISS warning
    index.train(sample)
    return index


def train_sample_size(plan: AnnPlan) -> int:
    return max(plan.nlist * TRAIN_POINTS_PER_CENTROID, 256 * 64 if plan.codec.startswith("PQ") else 0)


def encode(index, x: np.ndarray) -> np.ndarray:
    """[B, D] fp32 -> [B, sa_code_size] uint8 standalone codes (list number + code)."""
    return index.sa_encode(np.ascontiguousarray(x, dtype=np.float32))


def extract_ivf(index):
    return _faiss().extract_index_ivf(index)


def is_sqfp16(ivf) -> bool:
    """Whether the codes of this IVF are its vectors in fp16 (SQfp16 without residuals)."""
    faiss = _faiss()
    ivf = faiss.downcast_index(ivf)
    return isinstance(ivf, faiss.IndexIVFScalarQuantizer) and ivf.sq.qtype == faiss.ScalarQuantizer.QT_fp16 \
        and not ivf.by_residual


@dataclass
class SegmentCodes:
    """One segment's stored codes, for :func:`assemble`."""
    codes: np.ndarray                 # [rows, C] uint8: standalone codes, or only the list numbers (ccs bytes)
    body: np.ndarray | None           # None: the code bodies follow the list numbers in ``codes``;
                                      # else [rows, D] fp16 rows whose bytes are the bodies (SQfp16)
    start: int                        # first id
    visible: np.ndarray               # [rows] bool
    name: str = "codes"               # the file of ``codes``, for errors
    body_name: str = "embeddings"     # the file of ``body``, for errors


def assemble(index, segments: list[SegmentCodes], chunk: int = 262144) -> None:
    """Fill the lists of a trained, empty ``index`` from stored codes, allocating each list exactly
    once at its final size (appending entry by entry grows FAISS' list vectors geometrically: up to
    2x the memory); ids in each list come out ascending. A list number out of range, or codes of the
    wrong width, is an InputError naming the file."""
    faiss = _faiss()
    ivf = faiss.extract_index_ivf(index)
    ccs, nlist, cs = ivf.coarse_code_size(), ivf.nlist, ivf.code_size
    fp16 = is_sqfp16(ivf)               # code bodies are fp16 vectors: a NaN/inf one is a damaged file
    inv = ivf.invlists
    # 1. the list number of every visible row (the first ccs bytes of its code, little-endian)
    per = []
    for seg in segments:
        width = ccs if seg.body is not None else ccs + cs
        if seg.codes.shape[1] != width or (seg.body is not None and seg.body.dtype.itemsize * seg.body.shape[1] != cs):
            raise InputError(f"index file {seg.name} is damaged (rows of {seg.codes.shape[1]} bytes, the "
                             f"structure needs {width}); rebuild the index")
        keep = np.nonzero(seg.visible)[0]
        lists = np.zeros(len(keep), dtype=np.int64)
        for a, b in batches(len(keep), chunk):
            head = np.asarray(seg.codes[keep[a:b], :ccs]) if ccs else None
            for byte in range(ccs):
                lists[a:b] |= head[:, byte].astype(np.int64) << (8 * byte)
        if len(lists) and lists.max() >= nlist:
            raise InputError(f"index file {seg.name} is damaged (list number {int(lists.max())} of a structure "
                             f"with {nlist} lists); rebuild the index")
        per.append((seg, keep, lists))
    counts = np.bincount(np.concatenate([p[2] for p in per]) if per else np.zeros(0, np.int64),
                         minlength=nlist)
    # 2. one exact allocation per list
    for li in np.nonzero(counts)[0]:
        inv.resize(int(li), int(counts[li]))
    # 3. copy the codes (without their list number) into place, chunk by chunk, grouped by list
    fill = np.zeros(nlist, dtype=np.int64)
    for seg, keep, lists in per:
        for a, b in batches(len(keep), chunk):
            rows, ls = keep[a:b], lists[a:b]
            o = np.argsort(ls, kind="stable")
            if seg.body is None:
                c = np.ascontiguousarray(np.asarray(seg.codes[rows])[o][:, ccs:])
            else:
                c = np.ascontiguousarray(np.asarray(seg.body[rows])[o]).view(np.uint8)
            if fp16 and len(c) and (c.view(np.uint16) & 0x7FFF).max() >= 0x7C00:   # exponent all ones: NaN/inf
                bad = ((c.view(np.uint16) & 0x7C00) == 0x7C00).any(axis=1)
                if bad.any():
                    raise InputError(f"index file {seg.name if seg.body is None else seg.body_name} is damaged "
                                     f"(row {int(rows[o][np.argmax(bad)])} is not finite); rebuild the index")
            ids = np.ascontiguousarray(rows[o] + seg.start, dtype=np.int64)
            ls = ls[o]
            cuts = np.concatenate([[0], np.flatnonzero(np.diff(ls)) + 1, [len(ls)]])
            for s, e in zip(cuts[:-1], cuts[1:]):
                li = int(ls[s])
                inv.update_entries(li, int(fill[li]), int(e - s), faiss.swig_ptr(ids[s:e]), faiss.swig_ptr(c[s:e]))
                fill[li] += e - s
    total = int(counts.sum())
    ivf.ntotal = total
    index.ntotal = total


def set_nprobe(index, nprobe: int) -> None:
    ivf = _faiss().extract_index_ivf(index)
    ivf.nprobe = int(max(1, min(nprobe, ivf.nlist)))


def memory_bytes(index) -> int:
    """Bytes the structure holds in RAM now: list codes + ids, coarse centroids, PQ tables."""
    faiss = _faiss()
    ivf = faiss.extract_index_ivf(index)
    inv = ivf.invlists
    n = sum(inv.list_size(i) for i in range(ivf.nlist))
    extra = 256 * ivf.d * 4 if hasattr(ivf, "pq") else 0
    return n * (ivf.code_size + ID_BYTES) + ivf.quantizer.ntotal * ivf.d * 4 + extra


def serialize(index) -> bytes:
    return _faiss().serialize_index(index).tobytes()


def deserialize(data: bytes):
    return _faiss().deserialize_index(np.frombuffer(data, dtype=np.uint8))


def exact_topk(chunks: Iterable[tuple[np.ndarray, np.ndarray]], q: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids by inner product: ``chunks`` yields (ids [B], vectors [B, D]); -> [Q, k] ids,
    best first (FAISS' blocked BLAS + heap per chunk, then a merge of 2k candidates per query)."""
    faiss = _faiss()
    q = np.ascontiguousarray(q, dtype=np.float32)
    best_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(q), k), -1, dtype=np.int64)
    for ids, x in chunks:
        x = np.ascontiguousarray(x, dtype=np.float32)
        kk = min(k, len(x))
        s, j = faiss.knn(q, x, kk, metric=faiss.METRIC_INNER_PRODUCT)
        s_all = np.concatenate([best_s, s], axis=1)
        i_all = np.concatenate([best_i, np.where(j >= 0, np.asarray(ids, dtype=np.int64)[np.maximum(j, 0)], -1)], axis=1)
        top = np.argpartition(-s_all, k - 1, axis=1)[:, :k]
        best_s = np.take_along_axis(s_all, top, axis=1)
        best_i = np.take_along_axis(i_all, top, axis=1)
    return np.take_along_axis(best_i, np.argsort(-best_s, axis=1, kind="stable"), axis=1)   # best first


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean |found ∩ truth| / |truth| over queries (ids; -1 = nothing)."""
    hits = sum(len(set(f[f >= 0]) & set(t[t >= 0])) for f, t in zip(found, truth))
    return hits / max(1, sum(int((t >= 0).sum()) for t in truth))


@dataclass
class Tuning:
    nprobe: int
    recall: float                  # recall@k at that nprobe on the tuning queries
    queries: int


def tune_nprobe(index, queries: np.ndarray, truth: np.ndarray, target: float, k: int = 10,
                self_ids: np.ndarray | None = None) -> Tuning:
    """The smallest power-of-two nprobe whose recall@k reaches ``target``. ``truth``: exact top ids
    ([Q, k], or [Q, k+1] with ``self_ids``: queries that are vectors of the index, whose own id is
    dropped from both sides so that finding itself does not count)."""
    faiss = _faiss()
    ivf = faiss.extract_index_ivf(index)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    kk = k + (1 if self_ids is not None else 0)
    truth = _drop_self(truth, self_ids, k)
    nprobe = 1
    while True:
        ivf.nprobe = nprobe
        _, found = index.search(q, kk)
        rec = recall_at(_drop_self(found, self_ids, k), truth)
        if rec >= target or nprobe >= ivf.nlist:
            return Tuning(nprobe, rec, len(queries))
        nprobe = min(nprobe * 2, ivf.nlist)


def _drop_self(ids: np.ndarray, self_ids: np.ndarray | None, k: int) -> np.ndarray:
    if self_ids is None:
        return ids[:, :k]
    out = np.full((len(ids), k), -1, dtype=np.int64)
    for r, (row, me) in enumerate(zip(ids, self_ids)):
        row = row[row != me][:k]
        out[r, :len(row)] = row
    return out


def batches(n: int, size: int) -> Iterator[tuple[int, int]]:
    for s in range(0, n, size):
        yield s, min(n, s + size)
