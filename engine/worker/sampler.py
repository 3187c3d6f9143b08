"""Batched sampling: penalties, min_tokens, greedy / temperature, top-k, top-p, min-p, seeds."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from engine.core.sequence import Sequence
from engine.guided import GuidedDecoding
from engine.ops import cpu_native


@dataclass
class SampleResult:
    token_id: int
    logprobs: dict[int, float] | None  # sampled token + top-N alternatives (raw model logprobs)


def _apply_penalties(row: torch.Tensor, seq: Sequence) -> None:
    """In-place on one row of logits [V]."""
    p = seq.params
    device = row.device
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.all_token_ids)), dtype=torch.int64, device=device)
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and seq.output_token_ids:
        out = torch.tensor(seq.output_token_ids, dtype=torch.int64, device=device)
        counts = torch.bincount(out, minlength=row.shape[0]).to(row.dtype)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


def _filter(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Apply top-k, top-p and min-p to temperature-scaled logits [R, V]; masked entries -> -inf."""
    vocab = logits.shape[1]
    top_k = [s.params.top_k if s.params.top_k > 0 else vocab for s in seqs]
    top_p = [s.params.top_p for s in seqs]
    min_p = [s.params.min_p for s in seqs]
    if all(k >= vocab for k in top_k) and all(p >= 1.0 for p in top_p) and all(m <= 0 for m in min_p):
        return logits
    dev = logits.device
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [R, V]
    ranks = torch.arange(vocab, device=dev)[None, :]
    mask = ranks >= torch.tensor(top_k, device=dev)[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(mask, float("-inf")), dim=-1)
    cum_before = probs.cumsum(dim=-1) - probs
    mask |= cum_before > torch.tensor(top_p, device=dev, dtype=probs.dtype)[:, None]
    mask |= probs < torch.tensor(min_p, device=dev, dtype=probs.dtype)[:, None] * probs[:, :1]
    mask[:, 0] = False  # always keep the most likely token
    sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...], guided: GuidedDecoding | None = None) -> None:
        self.eos_token_ids = eos_token_ids
        self.guided = guided  # structured output: the engine's compiled grammars and masks
        self._matchers: weakref.WeakKeyDictionary[Sequence, Any] = weakref.WeakKeyDictionary()

    @torch.inference_mode()  # the engine's logits are inference tensors; nothing here needs autograd
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], *, scratch: bool = False) -> list[SampleResult]:
        """logits: float32 [S, V], one row per sequence that samples this step. They are not
        modified unless `scratch` says the caller has no further use for them (the engine's step
        does so: penalties and bans are then applied in place instead of on a copy)."""
        want_logprobs = any(s.params.logprobs is not None for s in seqs)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        raw = logits
        logits = self._constrain(logits, seqs, in_place=scratch)
        guided = [i for i, s in enumerate(seqs) if s.params.guided is not None]
        matchers = []
        if guided:  # structured output: only tokens that continue the document (EOS once it is complete)
            if not scratch and logits.data_ptr() == raw.data_ptr():
                logits = logits.clone()
            matchers = self._mask_guided(logits, seqs, guided)
        tokens = cpu_native.argmax(logits)  # greedy for every row; random rows overwritten below
        rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if rows:
            sub_seqs = [seqs[i] for i in rows]
            temps = torch.tensor([s.params.temperature for s in sub_seqs], device=logits.device)
            sub = _filter(logits[rows] / temps[:, None], sub_seqs)
            probs = torch.softmax(sub, dim=-1)
            noise = torch.empty_like(probs)
            for j, s in enumerate(sub_seqs):
                noise[j].exponential_(generator=s.generator)  # per-request stream when seeded
            tokens[rows] = (probs / noise).argmax(dim=-1)  # exponential race == categorical draw
        token_list: list[int] = tokens.tolist()
        for i, m in zip(guided, matchers, strict=True):  # the matcher follows the token drawn
            if not m.is_stopped():
                m.consume_token(token_list[i])
        if raw_logprobs is None:  # the common case: no per-row work at all
            return [SampleResult(t, None) for t in token_list]
        results = []
        for i, seq in enumerate(seqs):
            lp: dict[int, float] | None = None
            n = seq.params.logprobs
            if n is not None:
                row = raw_logprobs[i]
                lp = {token_list[i]: float(row[token_list[i]])}
                if n > 0:
                    vals, idx = row.topk(n)
                    for v, t in zip(vals.tolist(), idx.tolist(), strict=True):
                        lp.setdefault(t, v)
            results.append(SampleResult(token_list[i], lp))
        return results

    def _mask_guided(self, logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> list[Any]:
        """Mask the guided rows in place; returns their matchers (made on a sequence's first step)."""
        if self.guided is None:
            raise RuntimeError("a guided request reached a Sampler built without the engine's GuidedDecoding")
        matchers = []
        for i in rows:
            seq = seqs[i]
            m = self._matchers.get(seq)
            if m is None:
                assert seq.params.guided is not None
                m = self.guided.start(seq.params.guided, seq.output_token_ids, seq.request_id)
                self._matchers[seq] = m
            matchers.append(m)
        self.guided.apply_masks(logits, rows, matchers)
        eos = self.eos_token_ids[0]
        for i, m in zip(rows, matchers, strict=True):
            if m.is_stopped():  # complete (or failed): end here even if min_tokens banned EOS
                logits[i].fill_(float("-inf"))
                logits[i, eos] = 0.0
        return matchers

    def _constrain(self, logits: torch.Tensor, seqs: list[Sequence], in_place: bool) -> torch.Tensor:
        """Penalties and min_tokens bans; unless in_place, on a copy made only when some row needs one."""
        ban_rows: list[int] = []
        ban_cols: list[int] = []
        penalised: list[int] = []
        for i, seq in enumerate(seqs):
            p = seq.params
            if p.needs_penalties:
                penalised.append(i)
            if seq.num_output_tokens < p.min_tokens:
                banned = list(p.stop_token_ids or [])
                if not p.ignore_eos:
                    banned += self.eos_token_ids
                ban_rows += [i] * len(banned)
                ban_cols += banned
        if not penalised and not ban_rows:
            return logits
        if not in_place:
            logits = logits.clone()
        for i in penalised:
            _apply_penalties(logits[i], seqs[i])
        if ban_rows:
            logits[ban_rows, ban_cols] = float("-inf")
        return logits
