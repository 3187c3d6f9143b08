"""Values passed to and returned from ``PolicySet.evaluate``: node, request context, decision."""

from __future__ import annotations

from dataclasses import dataclass, field

from policies.documents import SLAClass

DECISION_CODES = ("model_not_allowed", "max_tokens_exceeded", "no_compliant_node")


@dataclass(frozen=True)
class NodeInfo:
    """An engine node as the policy engine sees it: a name and its placement labels
    (``region``, ``site``, ``classification``; others are ignored by residency)."""

    name: str
    labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"NodeInfo.name: expected a non-empty string, found {self.name!r}")
        if not isinstance(self.labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.labels.items()
        ):
            raise ValueError(f"NodeInfo.labels: expected a dict of str to str, found {self.labels!r}")


@dataclass(frozen=True)
class RequestContext:
    """One request to decide on. ``requested_max_tokens`` is the completion budget asked for."""

    tenant: str
    model: str
    requested_max_tokens: int
    nodes: list[NodeInfo]

    def __post_init__(self) -> None:
        if not isinstance(self.tenant, str) or not self.tenant:
            raise ValueError(f"RequestContext.tenant: expected a non-empty string, found {self.tenant!r}")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"RequestContext.model: expected a non-empty string, found {self.model!r}")
        n = self.requested_max_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"RequestContext.requested_max_tokens: expected an int >= 0, found {n!r}")
        if not all(isinstance(node, NodeInfo) for node in self.nodes):
            raise ValueError("RequestContext.nodes: expected a list of NodeInfo, found other values")


@dataclass(frozen=True)
class Decision:
    """The outcome of evaluating a request.

    ``reason`` and ``code`` are empty when allowed; otherwise ``code`` is one of
    ``DECISION_CODES``. ``sla_class`` is always the tenant's class, ``eligible_nodes`` the names
    of the nodes satisfying the tenant's residency (empty when refused). ``tenant`` echoes the
    request and ``policy`` names the tenant policy applied (``"default"`` for the template).
    """

    allowed: bool
    reason: str
    code: str
    sla_class: SLAClass
    eligible_nodes: list[str]
    tenant: str = ""
    policy: str = ""
