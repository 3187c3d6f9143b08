"""Admission across the fleet (appliance/fleet_admission.py) over a real registry, Fleet and Router:
another compliant node when the first cannot meet the TTFT target, 429 for a tenant over its fair
share and 503 when the nodes are saturated for everyone, queueing for classes that say so, and
never a node outside the tenant's residency."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.admission import AdmissionController
from appliance.config import FleetSettings
from appliance.db import open_database
from appliance.fleet import Fleet
from appliance.fleet_admission import AdmissionRefused, admit_across
from appliance.metrics import GatewayMetrics
from appliance.nodes import NodeRegistry
from appliance.router import Router
from policies import ResidencyRule

SITE_A = ResidencyRule(regions=["*"], sites=["a"], classifications=["*"])


@dataclass(frozen=True)
class Sla:
    name: str = "interactive"
    priority: int = 10
    ttft_ms: int = 1000
    deadline_ms: int = 1000
    on_overload: str = "shed"


class StandIn:
    is_running = True


async def _stats(_client: Any, _timeout: float) -> dict[str, Any]:
    return {"waiting": 0, "running": 0}


def _router(tmp_path: Path) -> Router:
    registry = NodeRegistry(open_database(f"sqlite:///{tmp_path / 'db.sqlite'}"))
    for name, site in (("a1", "a"), ("a2", "a"), ("b1", "b")):
        registry.add(name, f"https://{name}:9443", {"region": "eu", "site": site, "classification": "x"}, ["m"])
    fleet = Fleet(registry, FleetSettings(), lambda node: StandIn(), lambda e, d: None,  # type: ignore[arg-type,return-value]
                  GatewayMetrics(), prober=_stats)
    asyncio.run(fleet.refresh())
    return Router(fleet)


def _learned(nodes: tuple[str, ...] = ("a1", "a2", "b1"), rate_tps: float = 1000.0) -> AdmissionController:
    """A controller that has seen each node prefill ``rate_tps`` tokens per second."""
    ctl = AdmissionController(smoothing=1.0)
    for node in nodes:
        assert ctl.try_admit(node, "warm", 0, 100, 10_000).admitted
        ctl.first_token(node, "warm", 0, 100, 100 / rate_tps)
    return ctl


def _admit(router: Router, ctl: AdmissionController, tenant: str, tokens: int, sla: Sla = Sla()) -> Any:
    return asyncio.run(admit_across(router, ctl, model="m", residency=SITE_A, affinity=None, tenant=tenant,
                                    prompt_tokens=tokens, sla=sla))


def test_a_request_the_first_node_cannot_serve_in_time_goes_to_another_compliant_one(tmp_path: Path) -> None:
    router, ctl = _router(tmp_path), _learned()
    first = _admit(router, ctl, "acme", 900)  # 0.9 s on an empty node: admitted on one A node
    second = _admit(router, ctl, "acme", 900)  # behind it there: 1.8 s > 1 s; the other A node has room
    assert {first.route.node, second.route.node} == {"a1", "a2"}
    assert second.record["estimate_ms"] == pytest.approx(900.0)
    for admitted in (first, second):
        assert admitted.route.node != "b1"  # b1 is idle, and outside the residency: never asked
    if "refused_by" in second.record:
        assert set(second.record["refused_by"]) == {first.route.node}
        assert "cannot meet the TTFT target" in second.route.excluded[first.route.node]


def test_a_tenant_over_its_fair_share_gets_429_while_another_tenant_is_served(tmp_path: Path) -> None:
    router, ctl = _router(tmp_path), _learned()
    for _ in range(2):
        _admit(router, ctl, "flood", 900)  # one on each A node
    with pytest.raises(AdmissionRefused) as refused:
        _admit(router, ctl, "flood", 900)
    assert (refused.value.status, refused.value.code) == (429, "sla_unattainable")
    assert refused.value.retry_after_s >= 1 and "other tenants of the class are served" in refused.value.message
    assert set(refused.value.record["refused_by"]) == {"a1", "a2"}
    assert refused.value.record["fair_share_estimate_ms"] <= 1000
    quiet = _admit(router, ctl, "quiet", 50)  # the flood counts against it only up to its own share
    assert quiet.route.node in {"a1", "a2"}


def test_nodes_saturated_by_a_higher_class_answer_503_to_everyone_below(tmp_path: Path) -> None:
    router, ctl = _router(tmp_path), _learned()
    urgent = Sla(name="urgent", priority=0, ttft_ms=5000, deadline_ms=5000)
    for _ in range(2):
        _admit(router, ctl, "vip", 1500, urgent)  # 1.5 s of prefill ahead on each A node
    with pytest.raises(AdmissionRefused) as refused:
        _admit(router, ctl, "acme", 10)
    assert (refused.value.status, refused.value.code) == (503, "appliance_saturated")
    assert "retry after Retry-After" in refused.value.message and refused.value.retry_after_s >= 1


def test_a_queueing_class_waits_for_room_instead_of_being_refused(tmp_path: Path) -> None:
    router, ctl = _router(tmp_path), _learned()
    batch = Sla(name="batch", priority=20, ttft_ms=1000, deadline_ms=4000, on_overload="queue")
    held = [_admit(router, ctl, "other", 900, batch).route.node for _ in range(2)]

    async def main() -> Any:
        async def first_tokens() -> None:
            await asyncio.sleep(0.3)
            for node in held:  # the queued requests got their first token: room again
                ctl.first_token(node, "other", 20, 900, 0.9)

        freeing = asyncio.create_task(first_tokens())
        admitted = await admit_across(router, ctl, model="m", residency=SITE_A, affinity=None, tenant="acme",
                                      prompt_tokens=900, sla=batch)
        await freeing
        return admitted

    admitted = asyncio.run(main())
    assert admitted.route.node in {"a1", "a2"} and admitted.record["queued_ms"] >= 250


def test_a_queueing_class_is_refused_once_its_deadline_could_not_be_met(tmp_path: Path) -> None:
    router, ctl = _router(tmp_path), _learned()
    batch = Sla(name="batch", priority=20, ttft_ms=1000, deadline_ms=1300, on_overload="queue")
    for _ in range(2):
        _admit(router, ctl, "other", 900, batch)
    with pytest.raises(AdmissionRefused) as refused:
        _admit(router, ctl, "acme", 900, batch)  # waits up to deadline - ttft = 0.3 s, then gives up
    assert refused.value.code in ("appliance_saturated", "sla_unattainable")
    assert refused.value.record["queued_ms"] >= 250 and "after queueing" in refused.value.message


def test_the_tenants_queue_cap_is_answered_at_once(tmp_path: Path) -> None:
    router, ctl = _router(tmp_path), _learned()
    asyncio.run(admit_across(router, ctl, model="m", residency=SITE_A, affinity=None, tenant="acme",
                             prompt_tokens=300, sla=Sla(), max_queued_tokens=500))
    with pytest.raises(AdmissionRefused) as refused:
        asyncio.run(admit_across(router, ctl, model="m", residency=SITE_A, affinity=None, tenant="acme",
                                 prompt_tokens=300, sla=Sla(), max_queued_tokens=500))
    assert (refused.value.status, refused.value.code) == (429, "queue_limit_exceeded")
