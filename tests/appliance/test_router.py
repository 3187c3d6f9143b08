"""The router's decisions over a real registry (SQLite) and a real Fleet whose node clients are
stand-ins that are always up (the real clients are exercised in test_fleet.py): model and residency
filters, the 403/404/503 split, exclusion of a failed node, drain, least load, prefix affinity."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from appliance.config import FleetSettings
from appliance.fleet import Fleet
from appliance.metrics import GatewayMetrics
from appliance.nodes import NodeError, NodeRegistry
from appliance.router import Router, RouteRefused
from policies import ResidencyRule

SITE_A = ResidencyRule(regions=["*"], sites=["a"], classifications=["*"])
ANYWHERE = ResidencyRule(regions=["*"], sites=["*"], classifications=["*"])


class StandIn:
    is_running = True


async def _stats(_client: Any, _timeout: float) -> dict[str, Any]:
    return {"waiting": 0, "running": 0}


def _fleet(tmp_path: Path) -> tuple[NodeRegistry, Fleet, list[tuple[str, dict[str, Any]]]]:
    from appliance.db import open_database

    registry = NodeRegistry(open_database(f"sqlite:///{tmp_path / 'db.sqlite'}"))
    events: list[tuple[str, dict[str, Any]]] = []
    fleet = Fleet(registry, FleetSettings(), lambda node: StandIn(), lambda e, d: events.append((e, d)),  # type: ignore[arg-type,return-value]
                  GatewayMetrics(), prober=_stats)
    for name, site, models in (("a1", "a", ["m1"]), ("a2", "a", ["m1", "m2"]), ("b1", "b", ["m1", "m2"])):
        registry.add(name, f"https://{name}:9443", {"region": "eu", "site": site, "classification": "x"}, models)
    asyncio.run(fleet.refresh())
    return registry, fleet, events


def test_residency_and_model_filter_and_the_refusal_codes(tmp_path: Path) -> None:
    _, fleet, events = _fleet(tmp_path)
    router = Router(fleet)
    assert {(e, d["node"]) for e, d in events} == {("node_up", "a1"), ("node_up", "a2"), ("node_up", "b1")}
    seen = {router.route("m1", SITE_A).node for _ in range(6)}
    assert seen == {"a1", "a2"}  # equal load: ties rotate
    assert router.route("m2", SITE_A).node == "a2"  # the only A node serving m2
    with pytest.raises(RouteRefused) as unknown:
        router.route("m3", ANYWHERE)
    assert unknown.value.status == 404 and unknown.value.code == "model_not_found"
    with pytest.raises(RouteRefused) as forbidden:
        router.route("m1", ResidencyRule(regions=["*"], sites=["c"], classifications=["*"]))
    assert forbidden.value.status == 403 and forbidden.value.code == "no_compliant_node"
    with pytest.raises(RouteRefused) as failed_over:
        router.route("m2", SITE_A, exclude=frozenset({"a2"}))
    assert failed_over.value.status == 503 and failed_over.value.code == "no_compliant_node_available"
    assert failed_over.value.retry_after_s and "a2: failed this request" in failed_over.value.message


def test_drain_down_and_load(tmp_path: Path) -> None:
    registry, fleet, _ = _fleet(tmp_path)
    router = Router(fleet)
    registry.set_state("a1", "draining")
    asyncio.run(fleet.refresh())
    assert {router.route("m1", SITE_A).node for _ in range(4)} == {"a2"}
    # drained as soon as nothing is in flight (here and on the node)
    assert registry.require("a1").state == "drained"
    asyncio.run(fleet.report_failure("a2", "ConnectError"))
    assert registry.require("a2").display_state == "down"
    with pytest.raises(RouteRefused) as down:
        router.route("m1", SITE_A)
    assert down.value.status == 503 and "a1: drained" in down.value.message and "a2: down" in down.value.message
    registry.set_state("a1", "active")
    asyncio.run(fleet.refresh())
    fleet.acquire("a1")
    fleet.acquire("a1")
    assert router.route("m1", ANYWHERE).node == "b1"  # a2 is down, a1 carries two requests
    fleet.release("a1")
    fleet.release("a1")


def test_prefix_affinity_holds_while_the_load_allows(tmp_path: Path) -> None:
    _, fleet, _ = _fleet(tmp_path)
    router = Router(fleet, affinity_slack=2)
    first = router.route("m1", SITE_A, affinity_key="k").node
    assert all(router.route("m1", SITE_A, affinity_key="k").node == first for _ in range(5))
    for _ in range(3):
        fleet.acquire(first)
    other = router.route("m1", SITE_A, affinity_key="k")
    assert other.node != first and other.why == "least loaded"
    assert router.route("m1", SITE_A, affinity_key="k").node == other.node  # the prefix moved with it


def test_registry_refuses_bad_nodes_with_what_was_expected(tmp_path: Path) -> None:
    registry, _, _ = _fleet(tmp_path)
    with pytest.raises(NodeError, match="https://"):
        registry.add("c1", "http://c1:9443", {}, ["m1"])
    with pytest.raises(NodeError, match="already exists"):
        registry.add("a1", "https://a1:9443", {}, ["m1"])
    with pytest.raises(NodeError, match="invalid node name"):
        registry.add("../etc", "https://x:1", {}, ["m1"])
    with pytest.raises(NodeError, match="at least one model"):
        registry.add("c1", "https://c1:9443", {}, [])
    with pytest.raises(NodeError, match="no node named"):
        registry.require("zz")
    changes = registry.sync([], "admin")  # the admin's nodes are removed only by their own source
    assert {c["node"] for c in changes} == {"a1", "a2", "b1"}


def test_a_slow_probe_never_holds_up_a_drain(tmp_path: Path) -> None:
    """The health loop probing a node that hangs (up to its connect timeout) must not delay an
    admin's drain of another node: refresh holds its lock only while the handles change."""
    from appliance.db import open_database

    registry = NodeRegistry(open_database(f"sqlite:///{tmp_path / 'db.sqlite'}"))
    for name in ("slow", "other"):
        registry.add(name, f"https://{name}:9443", {"region": "eu", "site": "a", "classification": "x"}, ["m1"])

    async def main() -> None:
        release = asyncio.Event()
        probing = asyncio.Event()

        async def prober(client: Any, _timeout: float) -> dict[str, Any]:
            if client.name == "slow" and release.is_set() is False and probing.is_set() is False:
                probing.set()
                await release.wait()  # a node that does not answer
            return {"waiting": 0, "running": 0}

        class Named:
            is_running = True

            def __init__(self, name: str) -> None:
                self.name = name

        fleet = Fleet(registry, FleetSettings(), lambda node: Named(node.name), lambda e, d: None,  # type: ignore[arg-type,return-value]
                      GatewayMetrics(), prober=prober)
        health_loop = asyncio.create_task(fleet.refresh())
        await asyncio.wait_for(probing.wait(), 10)
        registry.set_state("other", "draining", expect=("active",))
        await asyncio.wait_for(fleet.refresh(probe=False), 5)  # did not wait for the hanging probe
        other = fleet.handle("other")
        assert other is not None and other.node.state == "drained"  # nothing in flight: drained at once
        assert not health_loop.done()
        release.set()
        await asyncio.wait_for(health_loop, 5)
        slow = fleet.handle("slow")
        assert slow is not None and slow.routable and not slow.probing

    asyncio.run(main())
