"""The waiting requests of one admission round, in SLA order, without re-sorting per pick.

Order: class (effective priority, preempted requests first), then among the tenants with requests
in that class the one with the smallest fair-share counter, then that tenant's earliest deadline,
then arrival. Counters move as the round admits requests: ``charge`` adds what an admission will
be charged this step, so a burst of admissions alternates tenants as VTC asks.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Iterable

from engine.core.sequence import Sequence


def tenant_of(seq: Sequence) -> str:
    return seq.tenant or ""


class WaitQueue:
    def __init__(self, seqs: Iterable[Sequence], counter: Callable[[str], float]) -> None:
        self._counter = counter
        self._extra: dict[str, float] = defaultdict(float)
        buckets: dict[tuple[int, bool], dict[str, list[Sequence]]] = defaultdict(lambda: defaultdict(list))
        for seq in seqs:
            buckets[(seq.effective_priority, seq.num_preemptions == 0)][tenant_of(seq)].append(seq)
        self._classes: list[dict[str, deque[Sequence]]] = [
            {t: deque(sorted(q, key=lambda s: (s.deadline_key, s.arrival_index))) for t, q in buckets[k].items()}
            for k in sorted(buckets)
        ]

    def peek(self) -> Sequence | None:
        while self._classes:
            tenants = self._classes[0]
            if tenants:
                best = min(tenants, key=lambda t: (self._counter(t) + self._extra[t],
                                                   tenants[t][0].deadline_key, tenants[t][0].arrival_index))
                return tenants[best][0]
            self._classes.pop(0)
        return None

    def pop(self, seq: Sequence) -> None:
        """Take out seq, which peek() just returned."""
        tenants = self._classes[0]
        queue = tenants[tenant_of(seq)]
        if queue.popleft() is not seq:
            raise ValueError(f"WaitQueue.pop: {seq.request_id} is not at the head of its tenant's queue")
        if not queue:
            del tenants[tenant_of(seq)]

    def charge(self, tenant: str, amount: float) -> None:
        self._extra[tenant] += amount
