"""The gateway's live view of its engine nodes: a client per registered node, health, load, drain.

``Fleet`` keeps one ``NodeHandle`` per node of the registry (appliance/nodes.py): the engine
client (the in-process ``AsyncEngine`` of a single-node install, or a ``RemoteEngine`` over mutual
TLS), this gateway's requests in flight on it, and the node's last stats. A background task, every
``health_interval_s``:

1. re-reads the registry, so ``appliance nodes drain|add|remove`` (another process) take effect
   within one interval, starting clients for new nodes and closing those of removed ones;
2. probes each node that is due (``GET /v1/stats``: health and load in one call). Two failed probes
   in a row, or one failed connection while routing (``report_failure``), mark it ``down``; a down
   node is probed with exponential backoff up to ``health_backoff_max_s`` and marked ``up`` again
   by the first probe that succeeds. Health changes are written to the registry and audited;
3. moves a ``draining`` node with nothing in flight (here, and waiting/running on the node) to
   ``drained``.

Choosing a node is the router's job (appliance/router.py); this module only answers what is
there and how loaded it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from appliance.config import FleetSettings
from appliance.metrics import GatewayMetrics
from appliance.nodes import Node, NodeRegistry
from engine import SamplingParams
from engine.tokenizer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FAILURES_TO_DOWN = 2


class EngineClient(Protocol):
    """What the gateway needs of an engine, in-process or remote (AsyncEngine, RemoteEngine)."""

    async def start(self) -> None: ...
    async def shutdown(self) -> None: ...
    @property
    def tokenizer(self) -> Tokenizer: ...
    def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams, *,
                 cache_salt: str | None = None, priority: int = 0, deadline: float | None = None,
                 tenant: str | None = None, tpot_target_s: float | None = None,
                 ) -> Any: ...  # an async iterator of StreamDelta
    async def abort(self, request_id: str) -> None: ...


class Prober(Protocol):
    async def __call__(self, client: Any, timeout_s: float) -> dict[str, Any]: ...


AuditFn = Callable[[str, dict[str, Any]], None]
ClientFactory = Callable[[Node], EngineClient]


@dataclass
class NodeHandle:
    node: Node
    client: EngineClient
    started: bool = False
    in_flight: int = 0
    failures: int = 0
    next_probe: float = 0.0
    probing: bool = False  # a probe of it is in flight (a concurrent refresh leaves it alone)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def routable(self) -> bool:
        return self.started and self.node.state == "active" and self.node.health == "up"

    def load(self) -> float:
        """Requests this gateway has on the node plus those waiting in its queue (last probe)."""
        return self.in_flight + float(self.stats.get("waiting", 0))

    def serves(self, model: str) -> bool:
        return model in self.node.models


async def probe_stats(client: Any, timeout_s: float) -> dict[str, Any]:
    """Health and load of a node in one call: an in-process engine's stats, a remote node's /v1/stats."""
    if hasattr(client, "refresh_stats"):
        resp = await asyncio.wait_for(client.client.get("/v1/stats"), timeout_s)
        resp.raise_for_status()
        stats: dict[str, Any] = resp.json()
        return stats
    if not client.is_running:
        raise RuntimeError("engine loop is not running")
    return dict(client.stats())


class Fleet:
    def __init__(self, registry: NodeRegistry, settings: FleetSettings, make_client: ClientFactory,
                 audit: AuditFn, metrics: GatewayMetrics, prober: Prober = probe_stats) -> None:
        self.registry = registry
        self.settings = settings
        self._make_client = make_client
        self._audit = audit
        self.metrics = metrics
        self._prober = prober
        self._handles: dict[str, NodeHandle] = {}
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="fleet-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for handle in list(self._handles.values()):
            await self._close(handle)
        self._handles.clear()

    async def _close(self, handle: NodeHandle) -> None:
        if handle.started:
            try:
                await handle.client.shutdown()
            except Exception as exc:  # closing a dead node's client must not stop the others
                log.warning("closing node %s: %s", handle.name, type(exc).__name__)
            handle.started = False

    # ---- what is there ------------------------------------------------------------------
    def handles(self) -> list[NodeHandle]:
        return list(self._handles.values())

    def handle(self, name: str) -> NodeHandle | None:
        return self._handles.get(name)

    def models(self) -> set[str]:
        return {m for h in self._handles.values() for m in h.node.models}

    def tokenizer(self, model: str) -> Tokenizer | None:
        """The tokenizer of a started node serving ``model`` (all nodes of a model share one)."""
        for handle in self._handles.values():
            if handle.started and handle.serves(model):
                return handle.client.tokenizer
        return None

    # ---- request accounting (called by the service) -------------------------------------
    def acquire(self, name: str) -> None:
        handle = self._handles[name]
        handle.in_flight += 1
        self.metrics.node_in_flight.labels(name).set(handle.in_flight)

    def release(self, name: str) -> None:
        handle = self._handles.get(name)
        if handle is not None:
            handle.in_flight = max(0, handle.in_flight - 1)
            self.metrics.node_in_flight.labels(name).set(handle.in_flight)

    async def report_failure(self, name: str, error: str) -> None:
        """A request could not reach the node: down at once (no second chance before retrying)."""
        handle = self._handles.get(name)
        if handle is not None:
            handle.failures = max(handle.failures, FAILURES_TO_DOWN - 1)
            await self._probe_failed(handle, error)

    # ---- the background task ------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval_s)
            try:
                await self.refresh()
            except Exception:  # the loop must outlive a database hiccup
                log.exception("fleet refresh failed")

    async def refresh(self, *, probe: bool = True) -> None:
        """Take in the registry's nodes and states, probe the nodes that are due (``probe``), and
        mark drained nodes. The lock is held only while the handles change, never across a probe:
        an admin's drain (which refreshes with ``probe=False``) never waits for a slow node."""
        async with self._lock:
            nodes = {n.name: n for n in await asyncio.to_thread(self.registry.all)}
            for name in [n for n in self._handles if n not in nodes]:
                await self._close(self._handles.pop(name))
                self.metrics.forget_node(name)
            for name, node in nodes.items():
                handle = self._handles.get(name)
                if handle is None or handle.node.url != node.url:
                    if handle is not None:
                        await self._close(self._handles.pop(name))
                    try:
                        client = self._make_client(node)
                    except Exception as exc:  # e.g. missing client certificate: this node stays out
                        log.error("node %s cannot be used: %s", name, exc)
                        continue
                    handle = self._handles[name] = NodeHandle(node, client)
                handle.node = node
            due: list[NodeHandle] = []
            if probe:
                now = time.monotonic()
                due = [h for h in self._handles.values() if h.next_probe <= now and not h.probing]
                for handle in due:
                    handle.probing = True
        try:
            await asyncio.gather(*(self._probe(h) for h in due))
        finally:
            for handle in due:
                handle.probing = False
        async with self._lock:
            for handle in list(self._handles.values()):
                await self._finish_drain(handle)
                self.metrics.set_node_state(handle.name, handle.node.display_state)

    async def _probe(self, handle: NodeHandle) -> None:
        timeout = self.settings.connect_timeout_s
        try:
            if not handle.started:
                if not getattr(handle.client, "is_running", False):  # the in-process engine is started by the runtime
                    await asyncio.wait_for(handle.client.start(), timeout * 4)  # a remote node: fetches its tokenizer
                handle.started = True
            handle.stats = await self._prober(handle.client, timeout)
        except Exception as exc:
            await self._probe_failed(handle, f"{type(exc).__name__}: {exc}"[:300])
            return
        handle.failures = 0
        handle.next_probe = time.monotonic() + self.settings.health_interval_s
        if handle.node.health != "up":
            await self._set_health(handle, "up", "")

    async def _probe_failed(self, handle: NodeHandle, error: str) -> None:
        handle.failures += 1
        backoff = self.settings.health_interval_s * 2 ** max(0, handle.failures - FAILURES_TO_DOWN)
        handle.next_probe = time.monotonic() + min(backoff, self.settings.health_backoff_max_s)
        if handle.failures >= FAILURES_TO_DOWN and handle.node.health != "down":
            await self._set_health(handle, "down", error)

    async def _set_health(self, handle: NodeHandle, health: str, error: str) -> None:
        changed = await asyncio.to_thread(self.registry.set_health, handle.name, health, error)
        node = handle.node
        handle.node = dataclasses.replace(node, health=health, last_error=error)
        if changed:
            (log.warning if health == "down" else log.info)("node %s is %s%s", handle.name, health,
                                                            f": {error}" if error else "")
            await asyncio.to_thread(self._audit, f"node_{health}", {
                "node": handle.name, "labels": dict(node.labels), "error": error})

    async def _finish_drain(self, handle: NodeHandle) -> None:
        if handle.node.state != "draining" or handle.in_flight:
            return
        busy = int(handle.stats.get("running", 0)) + int(handle.stats.get("waiting", 0))
        if busy and handle.node.health == "up":
            return
        done = await asyncio.to_thread(self.registry.set_state, handle.name, "drained", expect=("draining",))
        if done is not None:
            handle.node = done
            await asyncio.to_thread(self._audit, "node_drained", {"node": handle.name})

