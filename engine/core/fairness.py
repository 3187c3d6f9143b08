"""Fair share between tenants by tokens served: Virtual Token Counters ("Fairness in Serving
LLMs", Sheng et al., OSDI'24).

Each tenant has a counter of the weighted tokens it was served (computed prompt tokens times
``input_weight`` plus generated tokens times ``output_weight``). Among waiting requests of one
priority the scheduler admits the tenant with the smallest counter. A tenant that becomes active
(its first live request while it had none) has its counter lifted to the smallest counter of the
tenants already active, so idling earns no credit to burst later; with no other tenant active it
keeps its counter. Requests without a tenant share the anonymous tenant "".

``served`` counts the raw tokens (unweighted, never lifted) per tenant: what stats export.
"""

from __future__ import annotations

from collections import Counter


class FairShare:
    def __init__(self, input_weight: float = 1.0, output_weight: float = 2.0) -> None:
        self.input_weight = input_weight
        self.output_weight = output_weight
        self.counters: dict[str, float] = {}
        self.served: Counter[str] = Counter()
        self._live: Counter[str] = Counter()  # tenant -> live (waiting or running) requests

    def counter(self, tenant: str) -> float:
        return self.counters.get(tenant, 0.0)

    def activate(self, tenant: str) -> None:
        """A request of tenant entered the scheduler."""
        if self._live[tenant] == 0:
            active = [self.counter(t) for t, n in self._live.items() if n > 0 and t != tenant]
            if active:
                self.counters[tenant] = max(self.counter(tenant), min(active))
            else:
                self.counters.setdefault(tenant, 0.0)
        self._live[tenant] += 1

    def deactivate(self, tenant: str) -> None:
        """A request of tenant left the scheduler (finished, aborted, expired)."""
        left = self._live[tenant] - 1
        if left > 0:
            self._live[tenant] = left
        else:
            del self._live[tenant]

    def charge(self, tenant: str, prompt_tokens: int, output_tokens: int) -> None:
        if prompt_tokens <= 0 and output_tokens <= 0:
            return
        self.counters[tenant] = (self.counter(tenant) + self.input_weight * prompt_tokens
                                 + self.output_weight * output_tokens)
        self.served[tenant] += prompt_tokens + output_tokens

    def active_tenants(self) -> list[str]:
        return sorted(self._live)
