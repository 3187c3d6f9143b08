"""Typed policy documents: residency rules, SLA classes, tenant policies, retention.

Each is a frozen pydantic dataclass, so it validates at construction (``pydantic.ValidationError``,
a ``ValueError``) whether built from code or from a YAML mapping by the loader. Lists are used
rather than tuples because YAML yields lists; instances are still immutable (frozen).
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Annotated, Literal

from pydantic import AliasChoices, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator
from pydantic.dataclasses import dataclass

WILDCARD = "*"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
RESIDENCY_LABELS = ("region", "site", "classification")

_CONFIG = ConfigDict(extra="forbid")

Name = Annotated[StrictStr, Field(pattern=NAME_PATTERN)]
Label = Annotated[StrictStr, Field(min_length=1, max_length=128)]
PositiveInt = Annotated[StrictInt, Field(ge=1)]


@dataclass(frozen=True, config=_CONFIG)
class ResidencyRule:
    """Which engine nodes may hold a tenant's data, by node label.

    A node complies when its ``region``, ``site`` and ``classification`` labels are each listed
    (``"*"`` accepts any value, including a missing label). A label the node lacks never matches
    an explicit list: unknown placement fails closed. All three lists are required and non-empty.
    """

    regions: Annotated[list[Label], Field(min_length=1)]
    sites: Annotated[list[Label], Field(min_length=1)]
    classifications: Annotated[list[Label], Field(min_length=1)]
    name: StrictStr = ""

    def allowed_values(self, label: str) -> list[str]:
        if label == "region":
            return self.regions
        if label == "site":
            return self.sites
        if label == "classification":
            return self.classifications
        raise KeyError(f"unknown residency label {label!r}; expected one of {list(RESIDENCY_LABELS)}")

    def matches(self, labels: dict[str, str]) -> bool:
        for label in RESIDENCY_LABELS:
            allowed = self.allowed_values(label)
            if WILDCARD in allowed:
                continue
            value = labels.get(label)
            if value is None or value not in allowed:
                return False
        return True

    def describe(self) -> str:
        return (
            f"regions {self.regions}, sites {self.sites}, classifications {self.classifications}"
        )


OVERLOAD_ACTIONS = ("shed", "queue")


@dataclass(frozen=True, config=_CONFIG)
class SLAClass:
    """A latency class: the promise admission control and the engine schedule for.

    ``priority``: lower runs first (0..1000). ``ttft_ms``: time to first token and ``tpot_ms``:
    time per output token after the first (``None``: no TPOT target), both met by ``percentile``
    per cent of requests (e.g. 99 = p99). ``on_overload``: when the target cannot be met now,
    ``shed`` refuses at once (429/503 with Retry-After) and ``queue`` waits for room.
    ``deadline_ms``: an unfinished request is ended after it. ``ttft_target_ms`` is the old name of
    ``ttft_ms``, still accepted in files and kept as a read-only attribute.
    """

    name: Name
    priority: Annotated[StrictInt, Field(ge=0, le=1000)]
    ttft_ms: Annotated[StrictInt, Field(ge=1, validation_alias=AliasChoices("ttft_ms", "ttft_target_ms"))]
    deadline_ms: PositiveInt
    tpot_ms: PositiveInt | None = None
    percentile: Annotated[float, Field(strict=True, gt=0, le=100)] = 99.0
    on_overload: Literal["shed", "queue"] = "shed"

    @model_validator(mode="after")
    def _targets_within_deadline(self) -> SLAClass:
        if self.ttft_ms > self.deadline_ms:
            raise ValueError(f"ttft_ms <= deadline_ms ({self.deadline_ms}), found ttft_ms={self.ttft_ms}")
        if self.tpot_ms is not None and self.ttft_ms + self.tpot_ms > self.deadline_ms:
            raise ValueError(
                f"ttft_ms + tpot_ms <= deadline_ms ({self.deadline_ms}: a second token must fit before the deadline), "
                f"found ttft_ms + tpot_ms={self.ttft_ms + self.tpot_ms}"
            )
        return self

    @property
    def ttft_target_ms(self) -> int:
        """The old name of ``ttft_ms`` (callers written before TPOT targets existed)."""
        return self.ttft_ms


@dataclass(frozen=True, config=_CONFIG)
class TenantPolicy:
    """What one tenant may do. ``allowed_models`` holds names or glob patterns (``"*"`` = all);
    an empty list allows no model (a suspended tenant)."""

    name: Name
    allowed_models: list[Label]
    residency: ResidencyRule
    sla_class: Name
    rate_limit_rpm: PositiveInt
    max_tokens_per_request: PositiveInt
    max_tokens_per_minute: PositiveInt
    # Fairness and budgets (0 = no limit): requests in flight at once, prompt tokens admitted but
    # not yet prefilled, and tokens (prompt + completion) per UTC day and per UTC calendar month.
    max_concurrent_requests: Annotated[StrictInt, Field(ge=0)] = 0
    max_queued_tokens: Annotated[StrictInt, Field(ge=0)] = 0
    max_tokens_per_day: Annotated[StrictInt, Field(ge=0)] = 0
    max_tokens_per_month: Annotated[StrictInt, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _request_fits_minute_budget(self) -> TenantPolicy:
        if self.max_tokens_per_request > self.max_tokens_per_minute:
            raise ValueError(
                f"max_tokens_per_request <= max_tokens_per_minute ({self.max_tokens_per_minute}), "
                f"found max_tokens_per_request={self.max_tokens_per_request}"
            )
        return self

    def allows_model(self, model: str) -> bool:
        return any(fnmatchcase(model, pattern) for pattern in self.allowed_models)


AuditDays = Annotated[StrictInt, Field(ge=1, le=36500)]


@dataclass(frozen=True, config=_CONFIG)
class TenantRetention:
    """One tenant's exceptions to the retention section; a field left out (``None``) inherits."""

    audit_days: AuditDays | None = None
    store_content: StrictBool | None = None


@dataclass(frozen=True, config=_CONFIG)
class RetentionPolicy:
    """How long audit records keep their bodies, and whether request content is stored.

    ``audit_days``: a tenant record older than this many days has its body pruned (its hash,
    chain link and tree leaf stay). ``store_content``: keep the prompt and output of each
    completed request in its record, sealed with the tenant's data key (off by default).
    ``tenants``: per-tenant overrides of either, e.g. ``{"acme": {"audit_days": 30}}``.
    """

    audit_days: AuditDays
    store_content: StrictBool = False
    tenants: dict[Name, TenantRetention] = Field(default_factory=dict)

    def audit_days_for(self, tenant: str) -> int:
        override = self.tenants.get(tenant)
        return override.audit_days if override is not None and override.audit_days is not None else self.audit_days

    def stores_content(self, tenant: str) -> bool:
        override = self.tenants.get(tenant)
        if override is not None and override.store_content is not None:
            return override.store_content
        return self.store_content
