"""Continuous-batching scheduler: decides which sequences run this step; never touches tensors.

Each step has a token budget (max_num_batched_tokens). Running sequences are served first in
their order (a decode costs 1 token, an unfinished prefill costs its next chunk); then waiting
sequences are admitted, with their prefix-cache hit, while budget, sequence slots and KV blocks
last. When a running sequence cannot get a KV block, the last running sequence in that order is
preempted by recompute: its blocks are freed (its full computed blocks stay in the prefix cache,
so its re-prefill hits them) and it goes back to waiting, keeping its generated tokens and its
place (arrival order, and it goes before the others of its class).

The order and the SLA rules come from the SchedulingPolicy (see engine.core.scheduling_policy):
under "sla" (the default) requests order by effective priority (aging raises it), preempted
first, fair-share counter of their tenant (engine.core.fairness), deadline, arrival; a waiting
request of a better class preempts running requests of a worse class when slots or blocks are
short; expire() takes out requests past their deadline (the engine calls it before each step and
ends them). Under "fcfs" the order is arrival alone.
Requests that carry no priority, deadline or tenant are scheduled FCFS under either mode.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.core.block_manager import BlockManager
from engine.core.fairness import FairShare
from engine.core.scheduling_policy import SchedulingPolicy
from engine.core.sequence import Sequence, SequenceStatus
from engine.core.spec_decode import draft_for
from engine.core.step_cost import StepCostModel
from engine.core.wait_queue import WaitQueue, tenant_of

# preemption reasons (stats): a running sequence needed a KV block; a waiting request of a better
# class needed a sequence slot; it needed KV blocks
PREEMPT_KV_CACHE, PREEMPT_PRIORITY_SLOT, PREEMPT_PRIORITY_KV = "kv_cache", "priority_slot", "priority_kv_cache"
MIN_PREFILL_TOKENS = 16  # a TPOT cap still leaves a step this many tokens beyond its decodes


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens [num_computed, num_computed + num_new) run this step, drafts included
    draft: tuple[int, ...] = ()  # speculative tokens after the sequence's last token (engine.core.spec_decode)

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the last token, so a new token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens - len(self.draft) == self.seq.num_tokens


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
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        policy: SchedulingPolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,  # Sequence.arrival_time's clock (aging)
        wall_clock: Callable[[], float] = time.time,  # Sequence.deadline's clock
        speculative_tokens: int = 0,  # drafts per decoding sequence and step (0 = off)
    ) -> None:
        self.speculative_tokens = speculative_tokens
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = policy if policy is not None else SchedulingPolicy()
        self.clock = clock
        self.wall_clock = wall_clock
        self.fair = FairShare(self.policy.input_weight, self.policy.output_weight)
        self.cost = StepCostModel()  # the engine reports each step's tokens and time
        self._step_limit = max_num_batched_tokens
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.preemptions_by_reason: Counter[str] = Counter()
        self.num_deadline_misses = 0
        self.deadline_misses_by_state: Counter[str] = Counter()  # "waiting" | "running" when it expired

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self.fair.activate(tenant_of(seq))

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
        else:
            self.block_manager.free(seq)
            return
        self.block_manager.free(seq)
        self.fair.deactivate(tenant_of(seq))

    # ---- order --------------------------------------------------------------------------
    def _running_key(self, seq: Sequence) -> tuple[int, bool, float, int]:
        return seq.sort_key() if self.policy.sla else (0, False, 0.0, seq.arrival_index)

    def _waiting_key(self, seq: Sequence) -> tuple[int, bool, float, float, int]:
        if not self.policy.sla:
            return (0, False, 0.0, 0.0, seq.arrival_index)
        return (seq.effective_priority, seq.num_preemptions == 0, self.fair.counter(tenant_of(seq)),
                seq.deadline_key, seq.arrival_index)

    def _age(self) -> None:
        """Raise a waiting request one class per full max_wait_s it has waited since arrival."""
        if self.policy.max_wait_s is None:
            return
        now = self.clock()
        for seq in self.waiting:
            levels = int((now - seq.arrival_time) // self.policy.max_wait_s)
            if levels > seq.priority_boost:
                seq.priority_boost = levels

    def expire(self) -> list[Sequence]:
        """Take out every request whose deadline has passed (waiting or running), freeing its blocks;
        the engine ends them with finish reason "deadline". Nothing expires under "fcfs"."""
        if not self.policy.sla:
            return []
        now = self.wall_clock()
        expired: list[Sequence] = []
        for queue, state in ((self.running, "running"), (self.waiting, "waiting")):
            late = [s for s in queue if s.deadline is not None and s.deadline <= now]
            for seq in late:
                queue.remove(seq)
                self.block_manager.free(seq)
                self.fair.deactivate(tenant_of(seq))
                expired.append(seq)
                self.num_deadline_misses += 1
                self.deadline_misses_by_state[state] += 1
        return expired

    def _preempt(self, seq: Sequence, reason: str) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self.num_preemptions += 1
        self.preemptions_by_reason[reason] += 1

    # ---- the step -----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        if self.policy.sla:
            self._age()
        budget = self._step_limit = self._step_budget()
        queue = sorted(self.running, key=self._running_key)
        kept: list[Sequence] = []
        while queue:
            seq = queue.pop(0)
            num_new = min(seq.num_uncomputed_tokens, budget)
            if num_new <= 0:
                kept.append(seq)  # out of budget this step; keeps its blocks
                continue
            draft: tuple[int, ...] = ()
            if self.speculative_tokens and num_new == 1 and budget > 1:
                draft = tuple(draft_for(seq, min(self.speculative_tokens, budget - 1)))
                if draft and not self.block_manager.allocate_slots(seq, 1 + len(draft)):
                    draft = ()  # no blocks for the drafts: decode plainly rather than preempt
            while not self.block_manager.allocate_slots(seq, num_new):
                victim = queue.pop() if queue else seq  # last in order: lowest class, latest
                self._preempt(victim, PREEMPT_KV_CACHE)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.WAITING:
                continue  # preempted itself
            kept.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new + len(draft), draft))
            budget -= num_new + len(draft)
        self.running = kept
        if not out.preempted:
            self._admit_waiting(out)
        self._charge(out)
        # decodes first, then prefill chunks and drafted decodes: the runner's batch layout
        out.scheduled.sort(key=lambda s: s.num_new_tokens != 1)
        return out

    def _step_budget(self) -> int:
        """max_num_batched_tokens; under "sla", capped so that the step ends within the tightest TPOT
        target of the running requests already decoding (from the step cost model), but never
        below one token per running sequence plus MIN_PREFILL_TOKENS, so prefills still progress."""
        if not self.policy.sla:
            return self.max_num_batched_tokens
        targets = [s.tpot_target_s for s in self.running if s.tpot_target_s is not None and s.num_output_tokens > 0]
        if not targets:
            return self.max_num_batched_tokens
        cap = self.cost.max_tokens_within(min(targets))
        if cap is None:
            return self.max_num_batched_tokens
        return min(self.max_num_batched_tokens, max(cap, len(self.running) + MIN_PREFILL_TOKENS))

    def _admit_waiting(self, out: SchedulerOutput) -> None:
        bm = self.block_manager
        sla = self.policy.sla
        budget = self._step_limit - out.num_batched_tokens
        queue: WaitQueue | None = None  # SLA order, built at the first admission: a blocked step stays O(n)
        if not sla:
            self.waiting.sort(key=self._waiting_key)  # arrival order; nearly sorted already
        while self.waiting and budget > 0:
            if not sla:
                seq: Sequence | None = self.waiting[0]
            else:
                seq = min(self.waiting, key=self._waiting_key) if queue is None else queue.peek()
            if seq is None:
                break
            cached = bm.find_cached_prefix(seq)
            num_new = min(seq.num_tokens - len(cached) * bm.block_size, budget)
            if len(self.running) < self.max_num_seqs and bm.can_admit(seq, cached, num_new):
                if not sla:
                    self.waiting.pop(0)
                else:
                    if queue is None:
                        queue = WaitQueue(self.waiting, self.fair.counter)
                        queue.peek()
                    queue.pop(seq)  # later picks see the tenant's counter with this admission in it
                    samples = len(cached) * bm.block_size + num_new == seq.num_tokens
                    queue.charge(tenant_of(seq), self.policy.input_weight * num_new
                                 + (self.policy.output_weight if samples else 0.0))
                bm.admit(seq, cached, num_new)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                out.scheduled.append(ScheduledSeq(seq, num_new))
                budget -= num_new
                continue
            if not sla:
                return
            self._drop_admitted()
            if not self._make_room(seq, out):
                return
            queue = None  # the victims joined the waiting list
            budget = self._step_limit - out.num_batched_tokens
        self._drop_admitted()

    def _drop_admitted(self) -> None:
        self.waiting = [s for s in self.waiting if s.status is SequenceStatus.WAITING]

    def _make_room(self, seq: Sequence, out: SchedulerOutput) -> bool:
        """Preempt running requests of a worse class than seq (by priority and by aged priority: a
        request raised by aging is admitted earlier but takes no running request's place), worst
        first, until seq fits a slot and KV blocks; True if it fits now. Nothing is preempted when
        even all of them would not free enough blocks."""
        bm = self.block_manager
        victims = sorted((r for r in self.running  # worse by class and by aged class: aging never preempts
                          if r.priority > seq.priority and r.effective_priority > seq.effective_priority),
                         key=self._running_key)
        if not victims:
            return False
        cached = bm.find_cached_prefix(seq)
        most = min(seq.num_tokens - len(cached) * bm.block_size, self._step_limit)
        freeable = bm.num_free_blocks + sum(len(v.block_table) for v in victims)
        if bm.blocks_needed(len(cached) * bm.block_size + most) - len(cached) > freeable:
            return False
        while victims:
            victim = victims.pop()
            slot_short = len(self.running) >= self.max_num_seqs
            self.running.remove(victim)
            out.scheduled = [s for s in out.scheduled if s.seq is not victim]  # its tokens go back to the budget
            self._preempt(victim, PREEMPT_PRIORITY_SLOT if slot_short else PREEMPT_PRIORITY_KV)
            out.preempted.append(victim)
            cached = bm.find_cached_prefix(seq)
            budget = self._step_limit - out.num_batched_tokens
            num_new = min(seq.num_tokens - len(cached) * bm.block_size, budget)
            if len(self.running) < self.max_num_seqs and bm.can_admit(seq, cached, num_new):
                return True
        return False

    def _charge(self, out: SchedulerOutput) -> None:
        """Count this step's service per tenant: prompt tokens computed for the first time (not
        prefix-cache hits, not recompute after preemption) and the token each sampling chunk makes."""
        for item in out.scheduled:
            seq = item.seq
            start = max(seq.num_computed_tokens, seq.num_prompt_tokens_charged)
            end = min(seq.num_computed_tokens + item.num_new_tokens, seq.num_prompt_tokens)
            prompt = max(0, end - start)
            seq.num_prompt_tokens_charged = max(seq.num_prompt_tokens_charged, end)
            self.fair.charge(tenant_of(seq), prompt, 1 if item.samples else 0)
