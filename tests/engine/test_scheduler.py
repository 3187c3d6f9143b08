"""Scheduler: token budget, chunked prefill, priority/deadline order, preemption, abort."""

from __future__ import annotations

from engine.core.block_manager import BlockManager
from engine.core.scheduler import Scheduler
from engine.core.sequence import Sequence
from tests.engine.helpers import make_seq

BS = 4


def _step(sched: Scheduler) -> dict[str, int]:
    """Schedule, pretend to run, and append a token for sequences that sampled."""
    out = sched.schedule()
    got = {s.seq.request_id: s.num_new_tokens for s in out.scheduled}
    for item in out.scheduled:
        samples = item.samples
        item.seq.num_computed_tokens += item.num_new_tokens
        if samples:
            item.seq.output_token_ids.append(7)
    sched.block_manager.check_integrity(sched.live_sequences())
    return got


def test_chunked_prefill_mixed_with_decode() -> None:
    sched = Scheduler(BlockManager(32, BS), max_num_seqs=8, max_num_batched_tokens=6)
    a = make_seq("a", list(range(3)))
    sched.add(a)
    assert _step(sched) == {"a": 3}
    sched.add(make_seq("b", list(range(100, 110))))
    assert _step(sched) == {"a": 1, "b": 5}  # decode first, then a 5-token chunk
    assert _step(sched) == {"a": 1, "b": 5}
    assert _step(sched) == {"a": 1, "b": 1}  # b finished prefill last step: now it decodes


def test_priority_then_deadline_then_arrival() -> None:
    sched = Scheduler(BlockManager(32, BS), max_num_seqs=1, max_num_batched_tokens=64)
    sched.add(make_seq("late-low", [1], priority=5))
    sched.add(make_seq("deadline-far", [1], priority=1, deadline=200.0))
    sched.add(make_seq("deadline-near", [1], priority=1, deadline=100.0))
    assert list(_step(sched)) == ["deadline-near"]


def test_preemption_frees_lowest_priority_latest() -> None:
    bm = BlockManager(4, BS)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    hi = make_seq("hi", list(range(7)), priority=0)
    lo = make_seq("lo", list(range(20, 27)), priority=1)
    sched.add(hi)
    sched.add(lo)
    assert _step(sched) == {"hi": 7, "lo": 7}  # 2 blocks each: cache full
    assert _step(sched) == {"hi": 1, "lo": 1}  # 8th token fits in each second block
    got = _step(sched)  # both need a third block: "lo" is preempted for "hi"
    assert got == {"hi": 1}
    assert lo.num_computed_tokens == 0 and lo in sched.waiting and lo.num_preemptions == 1
    assert lo.output_token_ids == [7, 7]  # kept: recomputed later as part of the prompt


def test_remove_frees_blocks_at_once() -> None:
    bm = BlockManager(8, BS)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    seq: Sequence = make_seq("a", list(range(10)))
    sched.add(seq)
    _step(sched)
    assert bm.num_free_blocks == 5
    sched.remove(seq)
    assert bm.num_free_blocks == 8 and not sched.has_work()
