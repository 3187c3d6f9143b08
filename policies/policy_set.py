"""PolicySet: the loaded, cross-checked policy documents and request evaluation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from policies.documents import ResidencyRule, RetentionPolicy, SLAClass, TenantPolicy
from policies.errors import PolicyProblem, PolicyValidationError
from policies.request import Decision, RequestContext

DEFAULT_TENANT_NAME = "default"


@dataclass(frozen=True)
class PolicySet:
    """All policies in force. Tenants not listed in ``tenants`` get ``default_tenant``.

    ``residency`` holds the named residency rules tenants may refer to; ``sources`` the files it
    was loaded from and ``digest`` a sha256 over their names and bytes (empty when built in code).
    """

    tenants: dict[str, TenantPolicy]
    default_tenant: TenantPolicy
    sla_classes: dict[str, SLAClass]
    retention: RetentionPolicy
    residency: dict[str, ResidencyRule] = field(default_factory=dict)
    sources: tuple[str, ...] = ()
    digest: str = ""

    def __post_init__(self) -> None:
        self.check_integrity()

    def check_integrity(self) -> None:
        """Raise PolicyValidationError unless every cross-reference resolves."""
        origin = "<policy set>"
        problems: list[PolicyProblem] = []
        if not self.sla_classes:
            problems.append(PolicyProblem(origin, "sla_classes", "at least one SLA class", "none"))
        for key, sla in self.sla_classes.items():
            if key != sla.name:
                problems.append(PolicyProblem(origin, f"sla_classes.{key}.name", repr(key), repr(sla.name)))
        if self.default_tenant.name != DEFAULT_TENANT_NAME:
            problems.append(
                PolicyProblem(origin, "default_tenant.name", repr(DEFAULT_TENANT_NAME), repr(self.default_tenant.name))
            )
        if DEFAULT_TENANT_NAME in self.tenants:
            problems.append(
                PolicyProblem(origin, f"tenants.{DEFAULT_TENANT_NAME}", "the template under default_tenant",
                              "a tenant entry named 'default'")
            )
        for key, tenant in [*self.tenants.items(), ("<default_tenant>", self.default_tenant)]:
            where = "default_tenant" if key == "<default_tenant>" else f"tenants.{key}"
            if key != "<default_tenant>" and key != tenant.name:
                problems.append(PolicyProblem(origin, f"{where}.name", repr(key), repr(tenant.name)))
            if tenant.sla_class not in self.sla_classes:
                problems.append(
                    PolicyProblem(origin, f"{where}.sla_class", f"one of {sorted(self.sla_classes)}",
                                  repr(tenant.sla_class))
                )
        if problems:
            raise PolicyValidationError(problems)

    def tenant_policy(self, name: str) -> TenantPolicy:
        """The tenant's explicit policy, or the default template (fail closed to the template,
        never to 'allow everything')."""
        return self.tenants.get(name, self.default_tenant)

    def sla_class_for(self, tenant: str) -> SLAClass:
        return self.sla_classes[self.tenant_policy(tenant).sla_class]

    def evaluate(self, ctx: RequestContext) -> Decision:
        """Decide on one request. Checks run in a fixed order: model, max tokens, residency."""
        policy = self.tenant_policy(ctx.tenant)
        sla = self.sla_classes[policy.sla_class]

        def refuse(code: str, reason: str) -> Decision:
            return Decision(False, reason, code, sla, [], tenant=ctx.tenant, policy=policy.name)

        if not policy.allows_model(ctx.model):
            return refuse(
                "model_not_allowed",
                f"model {ctx.model!r} is not allowed for tenant {ctx.tenant!r}: "
                f"expected one of {policy.allowed_models}, found {ctx.model!r}",
            )
        if ctx.requested_max_tokens > policy.max_tokens_per_request:
            return refuse(
                "max_tokens_exceeded",
                f"max_tokens for tenant {ctx.tenant!r}: expected at most {policy.max_tokens_per_request}, "
                f"found {ctx.requested_max_tokens}",
            )
        eligible = [node.name for node in ctx.nodes if policy.residency.matches(node.labels)]
        if not eligible:
            return refuse(
                "no_compliant_node",
                f"no engine node satisfies the residency of tenant {ctx.tenant!r}: expected a node with "
                f"{policy.residency.describe()}, found none among {len(ctx.nodes)} node(s)",
            )
        return Decision(True, "", "", sla, eligible, tenant=ctx.tenant, policy=policy.name)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (for the admin API and ``--json`` outputs)."""
        return {
            "digest": self.digest,
            "sources": list(self.sources),
            "sla_classes": {k: dataclasses.asdict(v) for k, v in self.sla_classes.items()},
            "residency": {k: dataclasses.asdict(v) for k, v in self.residency.items()},
            "default_tenant": dataclasses.asdict(self.default_tenant),
            "tenants": {k: dataclasses.asdict(v) for k, v in self.tenants.items()},
            "retention": dataclasses.asdict(self.retention),
        }
