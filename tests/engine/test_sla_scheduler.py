"""SLA scheduling with real Sequences and a real BlockManager (no model): EDF within a class,
preemption by a better class for slots or KV blocks (the victim keeps its place and its cached
prefix), aging, VTC fair share between tenants, deadlines, FCFS mode and policy validation."""

from __future__ import annotations

import math

import pytest

from engine.core.block_manager import BlockManager
from engine.core.scheduler import Scheduler
from engine.core.scheduling_policy import SchedulingPolicy
from engine.core.sequence import Sequence, SequenceStatus
from engine.core.step_cost import StepCostModel
from engine.sampling_params import SamplingParams
from tests.engine.helpers import make_seq

BS = 4


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _sched(num_blocks: int = 64, max_num_seqs: int = 8, budget: int = 64, policy: SchedulingPolicy | None = None,
           clock: Clock | None = None, wall: Clock | None = None) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS), max_num_seqs, budget, policy,
                     clock=clock or Clock(), wall_clock=wall or Clock(1000.0))


def _seq(rid: str, n: int = 3, max_tokens: int = 16, **kw: object) -> Sequence:
    base = 1000 * (sum(map(ord, rid)) % 30)  # distinct prompts: no accidental prefix sharing
    return make_seq(rid, list(range(base, base + n)), params=SamplingParams(max_tokens=max_tokens), **kw)


def _step(sched: Scheduler) -> dict[str, int]:
    """Schedule, pretend to run, append a token where one is sampled, and finish sequences that
    reached max_tokens (as the engine does)."""
    out = sched.schedule()
    got = {s.seq.request_id: s.num_new_tokens for s in out.scheduled}
    for item in out.scheduled:
        samples = item.samples
        item.seq.num_computed_tokens += item.num_new_tokens
        if samples:
            item.seq.output_token_ids.append(7)
    for item in out.scheduled:
        sched.block_manager.cache_computed_blocks(item.seq)
    for item in out.scheduled:
        seq = item.seq
        if seq.num_output_tokens >= seq.params.max_tokens:
            seq.status = SequenceStatus.FINISHED
            sched.remove(seq)
    sched.block_manager.check_integrity(sched.live_sequences())
    return got


# ---- earliest deadline first within a class ---------------------------------------------------
def test_edf_within_class_at_admission_budget_and_kv_preemption() -> None:
    # admission: one slot; priority first, then the earliest deadline, then arrival
    sched = _sched(max_num_seqs=1)
    sched.add(_seq("p1-nodeadline", priority=1))
    sched.add(_seq("p0-late", priority=0, deadline=1300.0))
    sched.add(_seq("p0-early", priority=0, deadline=1200.0))
    assert list(_step(sched)) == ["p0-early"]

    # token budget: running sequences are served in EDF order when the budget is short
    sched = _sched(budget=5)
    late, early = _seq("late", n=5, deadline=1300.0), _seq("early", n=5, deadline=1200.0)
    sched.add(late)
    assert _step(sched) == {"late": 5}
    sched.add(early)
    assert _step(sched) == {"late": 1, "early": 4}  # late decodes; early prefills with what is left
    assert _step(sched) == {"early": 1, "late": 1}
    late.params = early.params = SamplingParams(max_tokens=1000)
    late.deadline, early.deadline = 1300.0, 1200.0
    sched.max_num_batched_tokens = 1
    assert _step(sched) == {"early": 1}  # one token of budget: the earlier deadline gets it

    # KV shortage: the victim is the running sequence with the latest deadline of the worst class
    sched = _sched(num_blocks=6, budget=64)
    a, b, c = _seq("a", n=7, deadline=1100.0), _seq("b", n=7, deadline=1300.0), _seq("c", n=7, deadline=1200.0)
    for s in (a, b, c):
        sched.add(s)
    assert _step(sched) == {"a": 7, "b": 7, "c": 7}  # 2 blocks each: cache full
    assert _step(sched) == {"a": 1, "b": 1, "c": 1}  # 8th token fits
    got = _step(sched)  # all need a third block: "b" (latest deadline) goes first
    assert "b" not in got and b in sched.waiting and b.num_preemptions == 1
    assert sched.preemptions_by_reason["kv_cache"] >= 1


# ---- preemption by a better class ------------------------------------------------------------
def test_higher_class_preempts_for_a_slot_and_victim_keeps_its_place() -> None:
    sched = _sched(max_num_seqs=2)
    lo1, lo2 = _seq("lo1", priority=2, max_tokens=50), _seq("lo2", priority=2, max_tokens=50)
    sched.add(lo1)
    sched.add(lo2)
    _step(sched)
    _step(sched)
    hi = _seq("hi", priority=0, max_tokens=3)
    same = _seq("lo3-same-class", priority=2)
    sched.add(same)
    assert _step(sched) == {"lo1": 1, "lo2": 1}  # same class never preempts
    sched.add(hi)
    got = _step(sched)
    assert got == {"lo1": 1, "hi": 3}  # lo2, the latest of the worst class, gave its slot
    assert lo2 in sched.waiting and lo2.num_preemptions == 1 and lo2.output_token_ids == [7, 7, 7]
    assert sched.preemptions_by_reason == {"priority_slot": 1}
    # a later arrival of lo2's class with an earlier deadline still queues behind the preempted lo2
    urgent = _seq("lo4-urgent", priority=2, deadline=1001.0)
    sched.add(urgent)
    while hi.status is not SequenceStatus.FINISHED:
        _step(sched)
    assert "lo2" in _step(sched) and urgent in sched.waiting


def test_higher_class_preempts_for_kv_blocks_only_when_that_makes_room() -> None:
    sched = _sched(num_blocks=6, max_num_seqs=8)
    lo1, lo2 = _seq("lo1", n=7, priority=1, max_tokens=50), _seq("lo2", n=7, priority=1, max_tokens=50)
    mid = _seq("mid", n=7, priority=0, max_tokens=50)
    for s in (lo1, lo2, mid):
        sched.add(s)
    _step(sched)  # three 7-token prompts: all 6 blocks taken, room for one more token each
    # a request of class 0 needs 2 blocks; the worse class holds 4: preempting lo2 (the latest) frees
    # enough, lo1 keeps running
    hi = _seq("hi", n=5, priority=0, max_tokens=2)
    sched.add(hi)
    got = _step(sched)
    assert "hi" in got and lo2 in sched.waiting and lo1.status is SequenceStatus.RUNNING
    assert sched.preemptions_by_reason["priority_kv_cache"] == 1

    # nothing is preempted when all worse-class victims together cannot free enough blocks
    sched = _sched(num_blocks=6, max_num_seqs=8)
    big = _seq("big-p0", n=15, priority=0, max_tokens=50)
    small = _seq("small-p1", n=7, priority=1, max_tokens=50)
    sched.add(big)
    sched.add(small)
    _step(sched)  # 4 + 2 blocks: full
    huge = _seq("huge-p0", n=20, priority=0, max_tokens=2)  # needs 5 blocks; "small" frees only 2
    sched.add(huge)
    got = _step(sched)
    assert "huge-p0" not in got and small.status is SequenceStatus.RUNNING and sched.num_preemptions == 0


def test_preempted_request_reprefill_hits_its_cached_prefix() -> None:
    bm_blocks = 32
    sched = _sched(num_blocks=bm_blocks, max_num_seqs=1)
    lo = _seq("lo", n=10, priority=1, max_tokens=40)
    sched.add(lo)
    for _ in range(7):
        _step(sched)  # prompt 10 + 6 outputs = 16 tokens computed: 4 full blocks published
    assert lo.num_computed_tokens == 16 and lo.num_cached_tokens == 0
    hi = _seq("hi", n=3, priority=0, max_tokens=2)
    sched.add(hi)
    assert _step(sched) == {"hi": 3}
    assert lo.num_computed_tokens == 0 and lo.num_preemptions == 1
    while hi.status is not SequenceStatus.FINISHED:
        _step(sched)
    got = _step(sched)
    # 17 tokens (10 prompt + 7 outputs); the 4 full blocks of the first 16 are hits: 1 recomputed
    assert lo.num_cached_tokens == 16 and got == {"lo": 1}
    # recompute is not served twice: lo was charged its 10 prompt tokens once, plus its outputs
    assert sched.fair.served[""] == 10 + lo.num_output_tokens + 3 + hi.num_output_tokens


# ---- aging ------------------------------------------------------------------------------------
def _hold_the_only_slot(sched: Scheduler) -> Sequence:
    holder = _seq("holder", priority=0, max_tokens=1000)
    sched.add(holder)
    _step(sched)
    return holder


def _release(sched: Scheduler, seq: Sequence) -> None:
    seq.status = SequenceStatus.FINISHED
    sched.remove(seq)


def test_aging_raises_a_waiting_request_one_class_per_max_wait_up_to_class_0() -> None:
    clock = Clock(0.0)
    sched = _sched(max_num_seqs=1, policy=SchedulingPolicy(max_wait_s=10.0), clock=clock)
    holder = _hold_the_only_slot(sched)  # every slot taken: nothing else is admitted meanwhile
    old = _seq("batch", priority=2, arrival_time=0.0)
    newer = _seq("standard", priority=1, arrival_time=4.0)
    fresh0 = _seq("interactive", priority=0, arrival_time=24.0, deadline=1060.0)
    clock.now = 9.0
    sched.add(old)
    sched.add(newer)
    assert _step(sched) == {"holder": 1}
    assert (old.effective_priority, newer.effective_priority) == (2, 1)
    clock.now = 15.0
    _step(sched)
    assert (old.effective_priority, newer.effective_priority) == (1, 0)  # 15 s and 11 s waited
    clock.now = 24.0
    sched.add(fresh0)
    clock.now = 200.0
    assert _step(sched) == {"holder": 1}  # class 0 now, but no class-0 request is preempted
    assert old.effective_priority == 0 and old.priority_boost == 20  # capped at class 0, not below
    # within class 0 the deadline still orders: the interactive request, then the aged ones by arrival
    order = []
    for _ in range(3):
        _release(sched, sched.running[0])
        order.append(next(iter(_step(sched))))
    assert order == ["interactive", "batch", "standard"]
    assert holder.status is SequenceStatus.FINISHED


def test_no_starvation_under_a_steady_stream_of_a_better_class() -> None:
    def run(policy: SchedulingPolicy) -> int | None:
        clock = Clock(0.0)
        sched = _sched(max_num_seqs=1, policy=policy, clock=clock)
        batch = _seq("batch", priority=2, arrival_time=0.0, max_tokens=1)
        sched.add(batch)
        for i in range(80):  # a class-1 request arrives every second and runs ~1 s
            sched.add(_seq(f"std{i}", n=2, priority=1, arrival_time=clock.now, max_tokens=1))
            if "batch" in _step(sched):
                return i
            clock.now += 1.0
        return None

    assert run(SchedulingPolicy(max_wait_s=None)) is None  # without aging: starved
    got = run(SchedulingPolicy(max_wait_s=10.0))
    assert got is not None and got <= 12  # one class up after 10 s: ahead of the later class-1 arrivals


def test_aged_running_request_keeps_its_class() -> None:
    clock = Clock(0.0)
    sched = _sched(max_num_seqs=1, clock=clock)
    holder = _hold_the_only_slot(sched)
    batch = _seq("batch", priority=2, arrival_time=0.0, max_tokens=50)
    sched.add(batch)
    clock.now = 25.0
    _step(sched)  # aged to class 0 while waiting
    _release(sched, holder)
    assert _step(sched) == {"batch": 3}
    std = _seq("std", priority=1, arrival_time=25.0)
    sched.add(std)
    assert _step(sched) == {"batch": 1}  # class 1 does not preempt the aged request
    # nor does an aged request preempt a running one of its own class (or of a class it aged past)
    _release(sched, batch)
    _release(sched, std)  # gone before it ran
    young = _seq("young-batch", priority=2, arrival_time=30.0, max_tokens=50)
    sched.add(young)
    _step(sched)
    assert sched.running == [young]
    clock.now = 60.0
    old = _seq("old-batch", priority=2, arrival_time=20.0)
    sched.add(old)
    assert _step(sched) == {"young-batch": 1} and old.effective_priority == 0
    assert sched.num_preemptions == 0


# ---- fair share between tenants (VTC) ----------------------------------------------------------
def test_vtc_alternates_tenants_of_one_class_and_lifts_a_new_tenant() -> None:
    sched = _sched(max_num_seqs=1)
    for i in range(4):
        sched.add(_seq(f"A{i}", n=4, tenant="A", max_tokens=2))
    for i in range(2):
        sched.add(_seq(f"B{i}", n=4, tenant="B", max_tokens=2))
    order: list[str] = []
    while sched.has_work():
        got = _step(sched)
        if got and got[next(iter(got))] > 1:  # a prefill: an admission
            order.append(next(iter(got)))
        if len(order) == 2 and "C" not in sched.fair.counters:
            # C arrives with a zero counter while A and B have been served: lifted to the smallest
            lowest = min(sched.fair.counter("A"), sched.fair.counter("B"))
            sched.add(_seq("C0", n=4, tenant="C", max_tokens=2))
            assert sched.fair.counter("C") == lowest > 0
    assert order == ["A0", "B0", "C0", "A1", "B1", "A2", "A3"]
    # each request: 4 prompt tokens + 2 outputs; weights 1 and 2
    assert dict(sched.fair.served) == {"A": 24, "B": 12, "C": 6}
    assert sched.fair.counter("A") == 4 * (4 + 2 * 2)


def test_vtc_alternates_tenants_within_one_step_and_skips_prefix_cache_hits() -> None:
    sched = _sched(max_num_seqs=4, budget=64)
    for i in range(4):
        sched.add(_seq(f"A{i}", n=4, tenant="A", max_tokens=2, deadline=1100.0 + i))
    for i in range(2):
        sched.add(_seq(f"B{i}", n=4, tenant="B", max_tokens=2, deadline=1200.0 + i))
    # four slots in one step: admissions alternate, although every A has the earlier deadline
    assert list(_step(sched)) == ["A0", "B0", "A1", "B1"]
    assert sched.fair.served == {"A": 2 * (4 + 1), "B": 2 * (4 + 1)}

    # a prefix-cache hit is not service: a second request with the same 9-token prompt computes
    # only the token after its 2 cached blocks
    sched = _sched()
    first = make_seq("first", list(range(9)), tenant="C", params=SamplingParams(max_tokens=1))
    sched.add(first)
    _step(sched)
    again = make_seq("again", list(range(9)), tenant="C", params=SamplingParams(max_tokens=1))
    sched.add(again)
    assert _step(sched) == {"again": 1} and again.num_cached_tokens == 8
    assert sched.fair.served["C"] == (9 + 1) + (1 + 1)
    assert sched.fair.counter("C") == (9 + 2) + (1 + 2)


def test_vtc_bounds_service_difference_between_backlogged_tenants() -> None:
    """Tenant A queues 30 requests before B's 30 arrive: under VTC their weighted service stays
    within the bound 2 * (w_in * prompt + w_out * max_tokens) * max_num_seqs at every step; under FCFS
    it does not."""
    prompt, out, seqs = 6, 4, 2
    bound = 2 * (1 * prompt + 2 * out) * seqs

    def worst_gap(policy: SchedulingPolicy) -> float:
        sched = _sched(max_num_seqs=seqs, policy=policy)
        for t in ("A", "B"):
            for i in range(30):
                sched.add(_seq(f"{t}{i}", n=prompt, tenant=t, max_tokens=out))
        gap = 0.0
        served = sched.fair.served
        while sched.has_work() and min(served["A"], served["B"]) < 60 * (prompt + out) // 3:
            _step(sched)
            weighted = {t: sched.fair.counter(t) for t in ("A", "B")}
            gap = max(gap, abs(weighted["A"] - weighted["B"]))
        return gap

    assert worst_gap(SchedulingPolicy()) <= bound
    assert worst_gap(SchedulingPolicy(mode="fcfs")) > 5 * bound


# ---- deadlines --------------------------------------------------------------------------------
def test_expire_takes_out_late_requests_waiting_and_running_and_frees_blocks() -> None:
    wall = Clock(1000.0)
    sched = _sched(num_blocks=16, max_num_seqs=1, wall=wall)
    run = _seq("running", n=9, deadline=1005.0, tenant="t1", max_tokens=50)
    wait = _seq("waiting", n=9, deadline=1010.0, tenant="t2")
    keep = _seq("no-deadline", n=3)
    for s in (run, wait, keep):
        sched.add(s)
    _step(sched)
    assert sched.running == [run] and sched.block_manager.num_free_blocks == 13
    assert sched.expire() == []
    wall.now = 1005.0  # at the deadline: late
    assert sched.expire() == [run] and sched.running == [] and sched.block_manager.num_free_blocks == 16
    wall.now = 1010.5
    assert sched.expire() == [wait] and sched.waiting == [keep]
    assert sched.num_deadline_misses == 2 and sched.deadline_misses_by_state == {"running": 1, "waiting": 1}
    assert sched.fair.active_tenants() == [""]
    assert _step(sched) == {"no-deadline": 3}


# ---- TPOT targets cap a step's batch ------------------------------------------------------------
def test_step_cost_model_fits_fixed_and_per_token_cost() -> None:
    model = StepCostModel()
    for n in (1, 2, 3):
        model.observe(n * 50, 0.02 + 0.001 * n * 50)
    assert model.max_tokens_within(0.1) is None  # too few steps to say
    model.observe(200, 0.02 + 0.001 * 200)
    base, per_token = model.fit() or (0.0, 0.0)
    assert math.isclose(base, 0.02, abs_tol=1e-9) and math.isclose(per_token, 0.001)
    assert model.max_tokens_within(0.1) == 80 and model.max_tokens_within(0.01) == 0
    flat = StepCostModel()  # decode-only steps: the fixed cost cannot be told apart, so it counts per token
    for _ in range(5):
        flat.observe(4, 0.04)
    assert flat.max_tokens_within(0.1) == 10


def _decoding_with_a_long_prompt_waiting(tpot_target_s: float | None, policy: SchedulingPolicy | None = None,
                                         ) -> dict[str, int]:
    sched = _sched(num_blocks=128, budget=512, policy=policy)
    for _ in range(8):
        sched.cost.observe(100, 0.02 + 0.001 * 100)
        sched.cost.observe(300, 0.02 + 0.001 * 300)
    chat = _seq("chat", n=3, max_tokens=100, tpot_target_s=tpot_target_s)
    sched.add(chat)
    _step(sched)
    sched.add(_seq("long", n=300, max_tokens=4))
    return _step(sched)


def test_tpot_target_of_a_decoding_request_caps_the_prefill_chunk() -> None:
    assert _decoding_with_a_long_prompt_waiting(None) == {"chat": 1, "long": 300}
    # 100 ms per token at 20 ms + 1 ms per token: 80 tokens in a step, its own decode included
    assert _decoding_with_a_long_prompt_waiting(0.1) == {"chat": 1, "long": 79}
    # a target below the fixed cost: the prefill still progresses by MIN_PREFILL_TOKENS
    assert _decoding_with_a_long_prompt_waiting(0.015) == {"chat": 1, "long": 16}
    assert _decoding_with_a_long_prompt_waiting(0.1, SchedulingPolicy(mode="fcfs")) == {"chat": 1, "long": 300}


# ---- FCFS mode and requests without SLA fields -------------------------------------------------
def test_fcfs_mode_ignores_priority_deadline_and_tenant() -> None:
    wall = Clock(1000.0)
    sched = _sched(max_num_seqs=1, policy=SchedulingPolicy(mode="fcfs"), wall=wall)
    first = _seq("first", priority=5, tenant="A", max_tokens=2)
    sched.add(first)
    _step(sched)
    sched.add(_seq("urgent", priority=0, deadline=1001.0, tenant="B"))
    sched.add(_seq("second", priority=5, tenant="A"))
    assert _step(sched) == {"first": 1}  # no preemption for priority
    wall.now = 2000.0
    assert sched.expire() == []  # deadlines not enforced
    assert _step(sched) == {"urgent": 3}  # arrival order
    assert sched.preemptions_by_reason == {}


def test_requests_without_sla_fields_run_first_come_first_served() -> None:
    sched = _sched(max_num_seqs=2)
    seqs = [_seq(f"r{i}", max_tokens=3) for i in range(5)]
    for s in seqs:
        sched.add(s)
    admitted: list[str] = []
    while sched.has_work():
        got = _step(sched)
        admitted += [rid for rid, n in got.items() if n > 1]
    assert admitted == [f"r{i}" for i in range(5)] and sched.num_preemptions == 0


# ---- bad configuration --------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mode": "edf"}, "scheduling mode must be one of ['sla', 'fcfs']; got 'edf'"),
    ({"max_wait_s": 0.0}, "max_wait_s must be None (no aging) or a finite number > 0; got 0.0"),
    ({"max_wait_s": math.nan}, "max_wait_s must be None"),
    ({"input_weight": -1.0}, "input_weight must be a finite number >= 0; got -1.0"),
    ({"output_weight": math.inf}, "output_weight must be a finite number >= 0; got inf"),
    ({"input_weight": 0.0, "output_weight": 0.0}, "at least one must be > 0"),
])
def test_bad_policy_is_refused_with_what_was_expected(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        SchedulingPolicy(**kwargs)  # type: ignore[arg-type]
    assert message in str(info.value)
