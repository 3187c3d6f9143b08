"""The router: the one place that chooses the engine node of a request.

For a request of tenant T for model M, in this fixed order:

1. nodes serving M: none in the registry -> 404 ``model_not_found``;
2. compliant = those whose labels satisfy T's residency rule: none -> 403 ``no_compliant_node``
   (policy forbids every node; retrying cannot help);
3. available = compliant nodes that are active, healthy and not excluded (a node that already
   failed this request): none -> 503 ``no_compliant_node_available`` with ``Retry-After``;
4. the least loaded available node (this gateway's requests in flight on it plus the node's own
   queue), except that a request whose prompt prefix was last sent to an available node goes there
   again while that node's load is within ``affinity_slack`` of the least loaded one (its prefix
   cache holds the prefix). Ties rotate, so equal nodes share the load.

Only step 2 ever admits a node, and every later step narrows that list: there is no path by
which a request reaches a node outside its tenant's residency, whatever the request says.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from appliance.fleet import Fleet, NodeHandle
from policies import ResidencyRule


class RouteRefused(Exception):
    """No node may or can serve the request; carries the HTTP status and OpenAI error code."""

    def __init__(self, status: int, code: str, message: str, retry_after_s: int | None = None,
                 decision: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s
        self.decision = decision or {}


@dataclass(frozen=True)
class Route:
    handle: NodeHandle
    candidates: list[str]
    why: str
    excluded: dict[str, str] = field(default_factory=dict)

    @property
    def node(self) -> str:
        return self.handle.name

    def decision(self) -> dict[str, Any]:
        """What the audit record keeps of this choice."""
        return {"candidates": self.candidates, "chosen": self.node, "why": self.why, "excluded": self.excluded}


class Router:
    def __init__(self, fleet: Fleet, *, affinity_slack: float = 2.0, affinity_capacity: int = 8192,
                 retry_after_s: int = 5) -> None:
        self.fleet = fleet
        self.affinity_slack = affinity_slack
        self._affinity: OrderedDict[str, str] = OrderedDict()
        self._capacity = affinity_capacity
        self._turn = itertools.count()
        self.retry_after_s = retry_after_s

    def compliant(self, model: str, residency: ResidencyRule) -> list[NodeHandle]:
        """Steps 1-2: the nodes that may hold this tenant's request, healthy or not."""
        serving = [h for h in self.fleet.handles() if h.serves(model)]
        if not serving:
            raise RouteRefused(404, "model_not_found", f"model {_short(model)!r} is not served by any node")
        compliant = [h for h in serving if residency.matches(h.node.labels)]
        if not compliant:
            raise RouteRefused(
                403, "no_compliant_node",
                f"no engine node serving {_short(model)!r} satisfies your data residency "
                f"({residency.describe()}); found {len(serving)} node(s) serving it, none compliant",
                decision={"candidates": [], "serving": len(serving)})
        return compliant

    def route(self, model: str, residency: ResidencyRule, affinity_key: str | None = None,
              exclude: frozenset[str] = frozenset()) -> Route:
        compliant = self.compliant(model, residency)
        excluded: dict[str, str] = {}
        available: list[NodeHandle] = []
        for handle in compliant:
            if handle.name in exclude:
                excluded[handle.name] = "failed this request"
            elif not handle.started or handle.node.health != "up":
                excluded[handle.name] = "down" if handle.node.health == "down" else "not yet healthy"
            elif handle.node.state != "active":
                excluded[handle.name] = handle.node.state
            else:
                available.append(handle)
        names = sorted(h.name for h in compliant)
        if not available:
            raise RouteRefused(
                503, "no_compliant_node_available",
                f"every engine node that may serve your request is unavailable now "
                f"({', '.join(f'{n}: {r}' for n, r in sorted(excluded.items()))}); retry later",
                retry_after_s=self.retry_after_s, decision={"candidates": names, "excluded": excluded})
        least = min(h.load() for h in available)
        if affinity_key is not None:
            sticky = self._affinity.get(affinity_key)
            for handle in available:
                if handle.name == sticky and handle.load() <= least + self.affinity_slack:
                    self._remember(affinity_key, handle.name)
                    return Route(handle, names, "prefix affinity", excluded)
        lightest = sorted((h for h in available if h.load() == least), key=lambda h: h.name)
        chosen = lightest[next(self._turn) % len(lightest)]
        if affinity_key is not None:
            self._remember(affinity_key, chosen.name)
        why = "least loaded" if len(available) > 1 else "only available node"
        return Route(chosen, names, why, excluded)

    def _remember(self, key: str, node: str) -> None:
        self._affinity[key] = node
        self._affinity.move_to_end(key)
        while len(self._affinity) > self._capacity:
            self._affinity.popitem(last=False)


def _short(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
