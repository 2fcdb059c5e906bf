"""The ANN of an index being written (``index build`` / ``index add``): train the coarse quantiser
on a sample, or keep it while it still fits the data; encode every segment's rows (SQfp16: only
their list numbers, the code body is the fp16 row itself); tune ``nprobe`` to the target recall
against an exact scan on held-out vectors (not in the training sample), again when the items grew
``retune_growth`` times since the last tuning (:class:`~clipkit.search.ann.AnnConfig`)."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from clipkit.search import ann
from clipkit.search.manifest import Manifest, Segment
from clipkit.search.segments import NpyAppender, check_unit, load_rows, read_quantizer

log = logging.getLogger(__name__)

TUNE_QUERIES = 500               # held-out vectors the nprobe tuning measures recall@10 on


def _outgrown(plan: ann.AnnPlan, n: int, cfg: ann.AnnConfig) -> str | None:
    """Why the quantiser must be retrained for ``n`` vectors (None: it still fits)."""
    if plan.kind == "flat" and n > cfg.flat_max:
        return f"{n} vectors exceed the exact-scan limit ({cfg.flat_max})"
    if plan.kind == "ivf" and n > cfg.retrain_growth * plan.n:
        return f"{n} vectors outgrew the quantiser trained on {plan.n} (x{cfg.retrain_growth:g})"
    if cfg.max_memory is not None and ann.estimate_memory(n, plan.dim, plan.codec, plan.nlist) > cfg.max_memory:
        return "the memory budget no longer fits"
    if cfg.codec and cfg.codec != plan.codec:
        return f"codec changed to {cfg.codec}"
    return None


def emb_rows(folder: Path, seg: Segment, dim: int):
    """``seg``'s fp16 embeddings, memory-mapped after :func:`~clipkit.search.segments.load_rows`' checks."""
    return load_rows(folder / seg.emb, np.float16, seg.rows, dim)


def update_ann(folder: Path, m: Manifest, cfg: ann.AnnConfig, mask: np.ndarray, gen: int,
                new_segments: list[Segment]) -> tuple[bool, float | None]:
    """Give every segment codes under a quantiser that fits ``m.alive`` items, and ``nprobe`` a value
    tuned on held-out vectors; -> (retrained, recall measured now or None)."""
    from clipkit.core.outputs import write_bytes_atomic
    old = ann.AnnPlan.from_dict(m.ann) if m.ann else None
    why = "first build" if old is None else _outgrown(old, m.alive, cfg)
    rng = np.random.default_rng(cfg.seed)
    if why is None:                                   # encode only the new rows, with the current quantiser
        index = read_quantizer(folder, m)             # (records the quantiser's sha256 if format 1 had none)
        for seg in new_segments:
            _encode_segment(folder, index, seg, gen, m.dim)
        sqfp16 = ann.is_sqfp16(ann.extract_ivf(index))
        for seg in m.segments:                        # format 1: SQfp16 codes -> list numbers (one copy)
            if sqfp16 and not seg.lists_only:
                _lists_from_codes(folder, index, seg, gen)
        tuned_n = m.ann.get("tuned_n", old.n)
        if old.nlist == 1 or m.alive < cfg.retune_growth * tuned_n:
            return False, None
        log.info("re-tuning nprobe (%d items, tuned at %d)", m.alive, tuned_n)
        held = np.nonzero(mask)[0]
        new_ids = held[held >= m.ann.get("trained_rows", 0)]        # rows added since training: held out
        nprobe, recall = _tune(folder, m, index, mask, cfg, rng, new_ids if len(new_ids) >= 50 else held)
        m.ann.update(nprobe=nprobe, recall=round(recall, 4), tuned_n=m.alive, tuned_on="held-out vectors")
        return False, recall
    log.info("training the ANN structure (%s)", why)
    plan = ann.plan_index(m.alive, m.dim, cfg)
    alive_ids = np.nonzero(mask)[0]
    sample = np.sort(rng.choice(alive_ids, size=min(len(alive_ids), ann.train_sample_size(plan)), replace=False))
    index = ann.train(plan, _gather(folder, m.segments, sample, m.dim), cfg.seed)
    quantizer = f"ivf-g{gen}.faiss"
    data = ann.serialize(index)
    write_bytes_atomic(folder / quantizer, data, overwrite=True)
    for seg in m.segments:
        _encode_segment(folder, index, seg, gen, m.dim)
    m.ann = {**plan.to_dict(), "quantizer": quantizer, "quantizer_sha256": hashlib.sha256(data).hexdigest(),
             "nprobe": 1, "recall": 1.0, "trained_generation": gen, "trained_rows": m.rows, "reason": why,
             "tuned_n": m.alive, "tuned_on": "exact scan"}
    if plan.nlist > 1:
        # tune on vectors the k-means never saw: a training vector sits closer to its centroid than a
        # new query does, and tuning on those promises more recall than users get
        held = np.setdiff1d(alive_ids, sample, assume_unique=True)
        enough = len(held) >= min(50, len(alive_ids))
        nprobe, recall = _tune(folder, m, index, mask, cfg, rng, held if enough else alive_ids)
        m.ann.update(nprobe=nprobe, recall=round(recall, 4),
                     tuned_on="held-out vectors" if enough else "index vectors (all in the training sample)")
    return True, m.ann["recall"]


def _tune(folder: Path, m: Manifest, index, mask: np.ndarray, cfg: ann.AnnConfig, rng,
          pool: np.ndarray) -> tuple[int, float]:
    """nprobe reaching ``cfg.target_recall`` recall@10 against an exact scan, measured with up to
    TUNE_QUERIES vectors of ``pool`` as queries (their own id excluded from both sides)."""
    full = ann.deserialize(ann.serialize(index))
    ann.assemble(full, _segment_codes(folder, m, mask))
    qids = np.sort(rng.choice(pool, size=min(len(pool), TUNE_QUERIES), replace=False))
    q = _gather(folder, m.segments, qids, m.dim)
    k = min(10, int(mask.sum()) - 1)
    truth = ann.exact_topk(_iter(folder, m.segments, mask, m.dim), q, k + 1)
    t = ann.tune_nprobe(full, q, truth, cfg.target_recall, k=k, self_ids=qids)
    return t.nprobe, t.recall


def _segment_codes(folder: Path, m: Manifest, mask: np.ndarray) -> list[ann.SegmentCodes]:
    return [ann.SegmentCodes(load_rows(folder / s.codes, np.uint8, s.rows),
                             emb_rows(folder, s, m.dim) if s.lists_only else None, s.start,
                             mask[s.start:s.start + s.rows], str(folder / s.codes), str(folder / s.emb))
            for s in m.segments]


def _gather(folder: Path, segments: list[Segment], ids: np.ndarray, dim: int) -> np.ndarray:
    out = np.empty((len(ids), dim), dtype=np.float32)
    starts = np.array([s.start for s in segments])
    seg = np.searchsorted(starts, ids, side="right") - 1
    for s in np.unique(seg):
        sel = np.nonzero(seg == s)[0]
        rows = ids[sel] - segments[s].start
        out[sel] = check_unit(np.asarray(emb_rows(folder, segments[s], dim)[rows], dtype=np.float32),
                              folder / segments[s].emb, rows)
    return out


def _iter(folder: Path, segments: list[Segment], mask: np.ndarray, dim: int, chunk: int = 65536):
    for seg in segments:
        emb = emb_rows(folder, seg, dim)
        for a, b in ann.batches(seg.rows, chunk):
            keep = np.nonzero(mask[seg.start + a:seg.start + b])[0]
            if len(keep):
                yield keep + seg.start + a, check_unit(np.asarray(emb[a:b][keep], dtype=np.float32),
                                                       folder / seg.emb, keep + a)


def _encode_segment(folder: Path, index, seg: Segment, gen: int, dim: int) -> None:
    """Write ``seg``'s codes under ``index``: with SQfp16 only the list numbers (``lists-*``; the body
    of each code is the fp16 row), else FAISS standalone codes (``codes-*``)."""
    ivf = ann.extract_ivf(index)
    ccs = ivf.coarse_code_size()
    lists_only = ann.is_sqfp16(ivf)
    name = f"{'lists' if lists_only else 'codes'}-{int(seg.emb[4:10]):06d}-g{gen}.npy"
    emb = emb_rows(folder, seg, dim)
    out = NpyAppender(folder / name, np.uint8, ccs if lists_only else index.sa_code_size())
    for a, b in ann.batches(seg.rows, 65536):
        x = check_unit(np.asarray(emb[a:b], dtype=np.float32), folder / seg.emb, a)
        if lists_only and ccs == 0:
            out.append(np.zeros((b - a, 0), np.uint8))
        else:
            codes = ann.encode(index, x)
            out.append(codes[:, :ccs] if lists_only else codes)
    out.close()
    seg.codes, seg.codes_sha256 = name, out.sha256


def _lists_from_codes(folder: Path, index, seg: Segment, gen: int) -> None:
    """A format-1 segment's SQfp16 codes file -> its list numbers (the bodies are its fp16 rows)."""
    ccs = ann.extract_ivf(index).coarse_code_size()
    codes = load_rows(folder / seg.codes, np.uint8, seg.rows, index.sa_code_size())
    name = f"lists-{int(seg.emb[4:10]):06d}-g{gen}.npy"
    out = NpyAppender(folder / name, np.uint8, ccs)
    for a, b in ann.batches(seg.rows, 262144):
        out.append(np.asarray(codes[a:b, :ccs]))
    out.close()
    seg.codes, seg.codes_sha256 = name, out.sha256
