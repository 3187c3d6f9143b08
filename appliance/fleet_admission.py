"""Admission across the fleet: find a compliant node that can meet the request's TTFT target, or
say why none can, and whose fault that is.

The router's choice (least loaded, prefix affinity) is asked first; when its TTFT estimate
(appliance/admission.py) is over the class's target, every other available compliant node is
asked in the router's order. Residency is the router's: only its nodes are ever asked. When none
can meet the target:

- the class says ``on_overload: queue``: the request waits, re-asked every ``QUEUE_POLL_S``, for at
  most ``deadline_ms - ttft_ms`` (after that, even an admitted request could not make its deadline);
- then, or at once for ``shed``: refused. Which answer depends on whether a tenant within its fair
  share would be served in time: the estimate is made again without the tenant's own queued
  tokens. Within the target then, the tenant's own backlog is what is in the way: 429
  ``sla_unattainable`` (it is over its fair share; other tenants are served). Over the target even
  so, the nodes are saturated for everyone of this class: 503 ``appliance_saturated``. Both carry
  ``Retry-After`` from the estimate.

Every decision and its estimates go into the request's audit record (``admission``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from appliance.admission import AdmissionController, AdmissionDecision
from appliance.router import Route, Router, RouteRefused
from policies import ResidencyRule

QUEUE_POLL_S = 0.05


class SlaTargets(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def priority(self) -> int: ...
    @property
    def ttft_ms(self) -> int: ...
    @property
    def deadline_ms(self) -> int: ...
    @property
    def on_overload(self) -> str: ...


@dataclass
class Admitted:
    route: Route
    decision: AdmissionDecision
    record: dict[str, Any] = field(default_factory=dict)


class AdmissionRefused(Exception):
    def __init__(self, status: int, code: str, message: str, retry_after_s: int, record: dict[str, Any],
                 node: str = "") -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.retry_after_s, self.record, self.node = retry_after_s, record, node


async def admit_across(router: Router, admission: AdmissionController, *, model: str, residency: ResidencyRule,
                       affinity: str | None, tenant: str, prompt_tokens: int, sla: SlaTargets,
                       max_queued_tokens: int = 0) -> Admitted:
    """The route and admission of a request (see the module doc); raises RouteRefused when no
    compliant node is available at all, AdmissionRefused when none can meet the target."""
    start = time.monotonic()
    queue_s = max(0.0, (sla.deadline_ms - sla.ttft_ms) / 1000.0) if sla.on_overload == "queue" else 0.0
    polls = 0
    while True:
        tried: dict[str, AdmissionDecision] = {}
        route: Route | None = router.route(model, residency, affinity)
        while route is not None:
            decision = admission.try_admit(route.node, tenant, sla.priority, prompt_tokens, sla.ttft_ms,
                                           max_queued_tokens)
            if decision.admitted:
                for name, refused in tried.items():
                    route.excluded[name] = (f"cannot meet the TTFT target now "
                                            f"(estimated {refused.estimated_ttft_ms:.0f} ms)")
                record = _record(sla, tried, decision.estimated_ttft_ms, start, polls)
                return Admitted(route, decision, record)
            if decision.reason:  # the tenant's own queue cap: no other node changes that
                raise AdmissionRefused(429, "queue_limit_exceeded", decision.reason, decision.retry_after_s,
                                       _record(sla, {route.node: decision}, None, start, polls), route.node)
            tried[route.node] = decision
            try:
                route = router.route(model, residency, None, exclude=frozenset(tried))
            except RouteRefused:
                route = None
        waited = time.monotonic() - start
        if waited + QUEUE_POLL_S <= queue_s:
            polls += 1
            await asyncio.sleep(QUEUE_POLL_S)
            continue
        raise _refusal(admission, tenant, prompt_tokens, sla, tried, start, polls)


def _refusal(admission: AdmissionController, tenant: str, prompt_tokens: int, sla: SlaTargets,
             tried: dict[str, AdmissionDecision], start: float, polls: int) -> AdmissionRefused:
    best_node, best = min(tried.items(), key=lambda item: item[1].estimated_ttft_ms)
    fresh = min(admission.fresh_estimate_ms(node, tenant, sla.priority, prompt_tokens) for node in tried)
    record = _record(sla, tried, None, start, polls)
    record["fair_share_estimate_ms"] = round(fresh, 1)
    retry = max(1, min(d.retry_after_s for d in tried.values()))
    queued = f" after queueing {time.monotonic() - start:.1f} s" if polls else ""
    if fresh <= sla.ttft_ms:
        return AdmissionRefused(
            429, "sla_unattainable",
            f"your requests queued ahead of this one keep it from its {sla.name} TTFT target of {sla.ttft_ms} ms "
            f"(estimated {best.estimated_ttft_ms:.0f} ms on the best of {len(tried)} node(s){queued}); other tenants "
            f"of the class are served within it: slow down or retry after Retry-After", retry, record, best_node)
    return AdmissionRefused(
        503, "appliance_saturated",
        f"no node your residency allows can meet the {sla.name} TTFT target of {sla.ttft_ms} ms now (estimated "
        f"{best.estimated_ttft_ms:.0f} ms on the best of {len(tried)} node(s){queued}); retry after Retry-After",
        retry, record, best_node)


def _record(sla: SlaTargets, tried: dict[str, AdmissionDecision], estimate_ms: float | None, start: float,
            polls: int) -> dict[str, Any]:
    record: dict[str, Any] = {"sla_class": sla.name, "ttft_target_ms": sla.ttft_ms,
                              "on_overload": sla.on_overload}
    if estimate_ms is not None:
        record["estimate_ms"] = round(estimate_ms, 1)
    if tried:
        record["refused_by"] = {n: round(d.estimated_ttft_ms, 1) for n, d in sorted(tried.items())}
    if polls:
        record["queued_ms"] = round((time.monotonic() - start) * 1000.0, 1)
    return record
