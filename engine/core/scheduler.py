"""Continuous-batching scheduler: decides which sequences run this step; never touches tensors.

Each step has a token budget (max_num_batched_tokens). Running sequences are served first in
priority order (a decode costs 1 token, an unfinished prefill costs its next chunk); then waiting
sequences are admitted, with their prefix-cache hit, while budget, sequence slots and KV blocks
last. When a running sequence cannot get a KV block, the lowest-priority (latest) running
sequence is preempted by recompute: its blocks are freed and it goes back to waiting, keeping
its generated tokens, to be prefilled again later.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.core.block_manager import BlockManager
from engine.core.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens [num_computed, num_computed + num_new) run this step

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the last token, so a new token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def live_sequences(self) -> list[Sequence]:
        return self.running + self.waiting

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence (finished or aborted) and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self.num_preemptions += 1

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        queue = sorted(self.running, key=Sequence.sort_key)
        kept: list[Sequence] = []
        while queue:
            seq = queue.pop(0)
            num_new = min(seq.num_uncomputed_tokens, budget)
            if num_new <= 0:
                kept.append(seq)  # out of budget this step; keeps its blocks
                continue
            while not self.block_manager.allocate_slots(seq, num_new):
                victim = queue.pop() if queue else seq  # lowest priority / latest arrival
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.WAITING:
                continue  # preempted itself
            kept.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        self.running = kept
        if not out.preempted:
            self._admit_waiting(out, budget)
        # decodes first, then prefill chunks: the runner's batch layout
        out.scheduled.sort(key=lambda s: s.num_new_tokens != 1)
        return out

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        bm = self.block_manager
        self.waiting.sort(key=Sequence.sort_key)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cached = bm.find_cached_prefix(seq)
            num_new = min(seq.num_tokens - len(cached) * bm.block_size, budget)
            if not bm.can_admit(seq, cached, num_new):
                break
            bm.admit(seq, cached, num_new)
            self.waiting.pop(0)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
