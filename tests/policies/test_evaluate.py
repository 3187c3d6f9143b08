from __future__ import annotations

from pathlib import Path

import pytest

from policies import (
    DECISION_CODES,
    NodeInfo,
    PolicySet,
    PolicyValidationError,
    RequestContext,
    ResidencyRule,
    RetentionPolicy,
    SLAClass,
    TenantPolicy,
    load_policy_set,
)
from tests.policies.conftest import write

NODES = [
    NodeInfo("zrh-1", {"region": "ch", "site": "zurich-1", "classification": "secret"}),
    NodeInfo("fra-1", {"region": "eu-central", "site": "fra-a", "classification": "internal"}),
    NodeInfo("unlabelled", {}),
]

SITE = """
tenants:
  bank:
    allowed_models: [SmolLM2-135M-Instruct]
    residency: {regions: [ch], sites: ["*"], classifications: [secret]}
    sla_class: interactive
    max_tokens_per_request: 256
    max_tokens_per_minute: 10000
  lab:
    allowed_models: ["*"]
    residency: {regions: [us-east], sites: ["*"], classifications: ["*"]}
    sla_class: batch
  open:
    allowed_models: ["*"]
  frozen:
    allowed_models: []
"""


@pytest.fixture
def policies(policy_dir: Path) -> PolicySet:
    write(policy_dir / "site.yaml", SITE)
    return load_policy_set(policy_dir)


def ctx(tenant: str, model: str = "SmolLM2-135M-Instruct", max_tokens: int = 64) -> RequestContext:
    return RequestContext(tenant=tenant, model=model, requested_max_tokens=max_tokens, nodes=NODES)


def test_allowed_request_lists_compliant_nodes(policies: PolicySet) -> None:
    d = policies.evaluate(ctx("bank"))
    assert d.allowed and d.reason == "" and d.code == ""
    assert d.eligible_nodes == ["zrh-1"]
    assert d.sla_class.name == "interactive" and d.sla_class.priority == 0
    assert d.policy == "bank" and d.tenant == "bank"


def test_unknown_tenant_gets_default_template(policies: PolicySet) -> None:
    d = policies.evaluate(ctx("stranger", model="anything"))
    # the shipped template grants no model: a tenant gets models by grant (deny by default)
    assert not d.allowed and d.code == "model_not_allowed"
    assert d.policy == "default"
    assert d.sla_class.name == "standard"
    # the template's "*" residency accepts every node, including one without labels
    d = policies.evaluate(ctx("open", model="anything"))
    assert d.allowed and d.eligible_nodes == ["zrh-1", "fra-1", "unlabelled"]


def test_model_not_allowed(policies: PolicySet) -> None:
    d = policies.evaluate(ctx("bank", model="Llama-3-70B"))
    assert not d.allowed and d.code == "model_not_allowed"
    assert "expected one of ['SmolLM2-135M-Instruct'], found 'Llama-3-70B'" in d.reason
    assert d.eligible_nodes == []
    assert d.sla_class.name == "interactive"


def test_suspended_tenant_allows_no_model(policies: PolicySet) -> None:
    assert policies.evaluate(ctx("frozen")).code == "model_not_allowed"


def test_max_tokens_exceeded(policies: PolicySet) -> None:
    assert policies.evaluate(ctx("bank", max_tokens=256)).allowed
    d = policies.evaluate(ctx("bank", max_tokens=257))
    assert d.code == "max_tokens_exceeded"
    assert "expected at most 256, found 257" in d.reason


def test_no_compliant_node_fails_closed(policies: PolicySet) -> None:
    d = policies.evaluate(ctx("lab"))
    assert not d.allowed and d.code == "no_compliant_node"
    assert "regions ['us-east']" in d.reason and "3 node(s)" in d.reason
    d = policies.evaluate(RequestContext("bank", "SmolLM2-135M-Instruct", 1, []))
    assert d.code == "no_compliant_node"


def test_missing_label_never_matches_explicit_rule() -> None:
    rule = ResidencyRule(regions=["ch"], sites=["*"], classifications=["secret"])
    assert rule.matches({"region": "ch", "classification": "secret"})
    assert not rule.matches({"region": "ch"})
    assert not rule.matches({"region": "CH", "classification": "secret"})


def test_decision_codes_are_the_contract() -> None:
    assert set(DECISION_CODES) == {"model_not_allowed", "no_compliant_node", "max_tokens_exceeded"}


def test_request_context_validates() -> None:
    with pytest.raises(ValueError, match="requested_max_tokens: expected an int >= 0, found -1"):
        RequestContext("t", "m", -1, [])
    with pytest.raises(ValueError, match="tenant: expected a non-empty string"):
        RequestContext("", "m", 1, [])
    with pytest.raises(ValueError, match="labels: expected a dict of str to str"):
        NodeInfo("n", {"gpus": 2})  # type: ignore[dict-item]


def test_policy_set_built_in_code_is_cross_checked() -> None:
    anywhere = ResidencyRule(regions=["*"], sites=["*"], classifications=["*"])
    template = TenantPolicy("default", ["*"], anywhere, "gold", 60, 100, 1000)
    with pytest.raises(PolicyValidationError, match=r"default_tenant\.sla_class: expected one of"):
        PolicySet(tenants={}, default_tenant=template, sla_classes={"standard": SLAClass("standard", 1, 10, 20)},
                  retention=RetentionPolicy(30))


def test_documents_validate_on_construction() -> None:
    with pytest.raises(ValueError, match="ttft_ms <= deadline_ms"):
        SLAClass("x", 0, 100, 10)
    with pytest.raises(ValueError):
        SLAClass("x", -1, 1, 10)


def test_to_dict_is_json_ready(policies: PolicySet) -> None:
    import json

    data = json.loads(json.dumps(policies.to_dict()))
    assert data["tenants"]["bank"]["residency"]["regions"] == ["ch"]
    assert data["sla_classes"]["batch"]["priority"] == 2
