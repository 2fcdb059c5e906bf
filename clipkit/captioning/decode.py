"""Batched decoding from prefix embeddings with GPT-2's KV cache: greedy, beam, nucleus/top-k.

The official ClipCap code decodes one image at a time and re-runs GPT-2 over the whole sequence at
every step. Here every image of a batch (and every beam or sample of every image) advances together,
and each step feeds GPT-2 one new token per row against the cached keys/values.

Beam search follows the official ``generate_beam`` rule, batched: a finished beam is frozen (it can
only "continue" with a zero-cost pad and its length stops growing), and beams are ranked by their
length-normalised log-probability ``sum_logp / length ** length_penalty``.

Stopping: EOS and the ``stop_ids`` end a sequence; with ``stop_at_eos=False`` only the ``stop_ids``
do (the official ClipCap decoders stop at the '.' token alone and run at most 67 tokens), and an EOS
the model emits is an ordinary token.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import asdict, dataclass, replace

import torch

from clipkit.core.errors import InputError

STRATEGIES = ("greedy", "beam", "nucleus")
DEFAULT_MAX_LENGTH = 40       # new tokens when neither the caller nor the checkpoint sets a limit


@dataclass
class DecodeConfig:
    strategy: str = "beam"          # greedy | beam | nucleus
    beams: int = 5                  # beam width
    candidates: int = 1             # sequences returned per image (beam: best n beams; nucleus: n samples)
    max_length: int | None = None   # new tokens at most; None = the checkpoint's default (official
                                    # ClipCap: 67), else DEFAULT_MAX_LENGTH
    length_penalty: float = 1.0     # beam ranking: sum_logp / length ** length_penalty
    temperature: float = 1.0        # nucleus
    top_p: float = 0.9              # nucleus: smallest set with cumulative probability >= top_p
    top_k: int = 0                  # nucleus: keep the k most likely tokens (0 = off)
    seed: int | None = 0            # nucleus sampling seed (ignored when a generator is passed)

    def validate(self) -> "DecodeConfig":
        if self.strategy not in STRATEGIES:
            raise InputError(f"unknown strategy {self.strategy!r}; choose {', '.join(STRATEGIES)}")
        if self.beams < 1 or self.candidates < 1 or (self.max_length is not None and self.max_length < 1):
            raise InputError("beams, candidates and max_length must be >= 1")
        if self.strategy == "beam" and self.candidates > self.beams:
            raise InputError(f"beam search returns at most --beams sequences: candidates "
                             f"{self.candidates} > beams {self.beams}")
        if self.strategy == "greedy" and self.candidates > 1:
            raise InputError("greedy decoding gives one caption per image; use beam or nucleus "
                             "for several candidates")
        if not (self.temperature > 0) or not (0 < self.top_p <= 1) or self.top_k < 0:
            raise InputError("need temperature > 0, 0 < top_p <= 1 and top_k >= 0")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def with_max_length(self, default: int | None) -> "DecodeConfig":
        """A copy whose ``max_length`` is set: the caller's, else ``default``, else DEFAULT_MAX_LENGTH."""
        n = self.max_length if self.max_length is not None else (default or DEFAULT_MAX_LENGTH)
        return replace(self, max_length=n)


@dataclass
class Hypothesis:
    tokens: list[int]     # generated token ids, the final EOS excluded (a stop token is kept)
    logprob: float        # sum of token log-probabilities (EOS included)
    length: int           # tokens scored (EOS included)

    @property
    def mean_logprob(self) -> float:
        return self.logprob / max(1, self.length)


def _stop_mask(tokens: torch.Tensor, stop_ids: torch.Tensor) -> torch.Tensor:
    return (tokens[:, None] == stop_ids[None]).any(-1)


def _stop_tensor(eos_id: int, stop_ids, stop_at_eos: bool, device) -> torch.Tensor:
    ids = sorted({*stop_ids, *([eos_id] if stop_at_eos else [])})
    return torch.tensor(ids, dtype=torch.long, device=device)


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p      # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return logits


def _cache_of(out):
    # transformers >= 5.2x names the KV cache ``cache`` (``past_key_values`` is deprecated)
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@functools.lru_cache(maxsize=None)
def _cache_kwarg(model_type: type) -> str:
    return "cache" if "cache" in inspect.signature(model_type.forward).parameters else "past_key_values"


def _first_step(gpt, prefix: torch.Tensor):
    out = gpt(inputs_embeds=prefix, use_cache=True)
    return out.logits[:, -1].float(), _cache_of(out)


def _step(gpt, tokens: torch.Tensor, cache):
    out = gpt(input_ids=tokens[:, None], use_cache=True, **{_cache_kwarg(type(gpt)): cache})
    return out.logits[:, -1].float(), _cache_of(out)


def _collect(seqs: torch.Tensor, logp: torch.Tensor, lengths: torch.Tensor, eos_id: int,
             strip_eos: bool = True) -> list[Hypothesis]:
    out = []
    for row, lp, n in zip(seqs.tolist(), logp.tolist(), lengths.tolist()):
        toks = row[:n]
        if strip_eos and toks and toks[-1] == eos_id:
            toks = toks[:-1]
        out.append(Hypothesis(toks, lp, n))
    return out


@torch.inference_mode()
def decode(gpt, prefix: torch.Tensor, eos_id: int, cfg: DecodeConfig, stop_ids=(),
           generator: torch.Generator | None = None, stop_at_eos: bool = True) -> list[list[Hypothesis]]:
    """Decode captions for a batch of prefixes [B, K, width]; returns B lists of ``cfg.candidates``
    sequences, best first (nucleus: in sampling order). ``eos_id`` also pads finished rows; it ends a
    sequence unless ``stop_at_eos`` is False (then only ``stop_ids`` do)."""
    cfg = cfg.with_max_length(None).validate()
    if cfg.strategy == "beam" and cfg.beams > 1:
        return _beam(gpt, prefix, eos_id, cfg, stop_ids, stop_at_eos)
    n = cfg.candidates if cfg.strategy == "nucleus" else 1
    if cfg.strategy == "nucleus" and generator is None and cfg.seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
    b = prefix.shape[0]
    prefix = prefix.repeat_interleave(n, dim=0)
    stops = _stop_tensor(eos_id, stop_ids, stop_at_eos, prefix.device)
    logits, cache = _first_step(gpt, prefix)
    rows = prefix.shape[0]
    seqs = torch.full((rows, cfg.max_length), eos_id, dtype=torch.long, device=prefix.device)
    logp = torch.zeros(rows, device=prefix.device)
    lengths = torch.zeros(rows, dtype=torch.long, device=prefix.device)
    done = torch.zeros(rows, dtype=torch.bool, device=prefix.device)
    for t in range(cfg.max_length):
        lsm = logits.log_softmax(-1)
        if cfg.strategy == "nucleus":
            probs = _filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(prefix.device)
        else:
            nxt = lsm.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
        seqs[:, t] = nxt
        logp += torch.where(done, torch.zeros_like(logp), lsm.gather(1, nxt[:, None]).squeeze(1))
        lengths += (~done).long()
        done |= _stop_mask(nxt, stops)
        if bool(done.all()) or t == cfg.max_length - 1:
            break
        logits, cache = _step(gpt, nxt, cache)
    flat = _collect(seqs, logp, lengths, eos_id, stop_at_eos)
    return [flat[i * n:(i + 1) * n] for i in range(b)]


def _beam(gpt, prefix: torch.Tensor, eos_id: int, cfg: DecodeConfig, stop_ids,
          stop_at_eos: bool = True) -> list[list[Hypothesis]]:
    b, k = prefix.shape[0], cfg.beams
    dev = prefix.device
    stops = _stop_tensor(eos_id, stop_ids, stop_at_eos, dev)
    logits, cache = _first_step(gpt, prefix)
    lsm = logits.log_softmax(-1)                                     # [B, V]
    vocab = lsm.shape[-1]
    scores, first = lsm.topk(k, dim=-1)                              # [B, k]
    cache.batch_repeat_interleave(k)
    seqs = torch.full((b * k, cfg.max_length), eos_id, dtype=torch.long, device=dev)
    seqs[:, 0] = first.reshape(-1)
    scores = scores.reshape(-1)
    lengths = torch.ones(b * k, dtype=torch.long, device=dev)
    done = _stop_mask(seqs[:, 0], stops)
    offsets = (torch.arange(b, device=dev) * k)[:, None]             # first row of each image
    for t in range(1, cfg.max_length):
        if bool(done.all()):
            break
        logits, cache = _step(gpt, seqs[:, t - 1], cache)
        lsm = logits.log_softmax(-1)
        # a finished beam continues only with EOS at zero cost, and its length stays fixed
        frozen = torch.full_like(lsm, float("-inf"))
        frozen[:, eos_id] = 0.0
        lsm = torch.where(done[:, None], frozen, lsm)
        new_len = lengths + (~done).long()
        total = scores[:, None] + lsm                                # [B*k, V]
        norm = total / new_len.float()[:, None] ** cfg.length_penalty
        best, idx = norm.view(b, k * vocab).topk(k, dim=-1)          # [B, k]
        src = (idx // vocab + offsets).reshape(-1)                   # source row per new beam
        tok = (idx % vocab).reshape(-1)
        scores = total.view(b, k * vocab).gather(1, idx).reshape(-1)
        lengths = new_len[src]
        was_done = done[src]
        seqs = seqs[src]
        seqs[:, t] = torch.where(was_done, torch.full_like(tok, eos_id), tok)
        done = was_done | _stop_mask(tok, stops)
        cache.reorder_cache(src)
    norm = scores / lengths.float() ** cfg.length_penalty
    order = norm.view(b, k).argsort(dim=-1, descending=True)
    flat = _collect(seqs, scores, lengths, eos_id, stop_at_eos)
    return [[flat[i * k + j] for j in order[i, :cfg.candidates].tolist()] for i in range(b)]


@torch.inference_mode()
def reference_beam_search(gpt, prefix: torch.Tensor, eos_id: int, beams: int = 5, max_length: int = 40,
                          stop_ids=(), length_penalty: float = 1.0) -> list[Hypothesis]:
    """The official ``generate_beam`` algorithm for ONE prefix [1, K, width], without a KV cache:
    GPT-2 re-reads the whole sequence at every step. For tests and the throughput benchmark only."""
    stops = {eos_id, *stop_ids}
    emb = gpt.get_input_embeddings()
    logits = gpt(inputs_embeds=prefix).logits[:, -1].float().log_softmax(-1)
    scores, first = logits[0].topk(beams)
    seqs = [[t] for t in first.tolist()]
    lengths = [1] * beams
    done = [t in stops for t in first.tolist()]
    scores = scores.tolist()
    for _ in range(1, max_length):
        if all(done):
            break
        cand = []
        for b in range(beams):
            if done[b]:
                cand.append((scores[b] / lengths[b] ** length_penalty, b, eos_id, scores[b], lengths[b], True))
                continue
            x = torch.cat([prefix, emb(torch.tensor([seqs[b]], device=prefix.device))], dim=1)
            lp = gpt(inputs_embeds=x).logits[0, -1].float().log_softmax(-1)
            top, idx = lp.topk(beams)
            for v, t in zip(top.tolist(), idx.tolist()):
                s = scores[b] + v
                cand.append((s / (lengths[b] + 1) ** length_penalty, b, t, s, lengths[b] + 1, t in stops))
        cand.sort(key=lambda c: -c[0])
        new = cand[:beams]
        seqs = [seqs[c[1]] + [c[2]] if not done[c[1]] else seqs[c[1]] for c in new]
        scores = [c[3] for c in new]
        lengths = [c[4] for c in new]
        done = [c[5] for c in new]
    order = sorted(range(beams), key=lambda b: -scores[b] / lengths[b] ** length_penalty)
    out = []
    for b in order:
        toks = seqs[b]
        if toks and toks[-1] == eos_id:
            toks = toks[:-1]
        out.append(Hypothesis(toks, scores[b], lengths[b]))
    return out
