from __future__ import annotations

from pathlib import Path

import pytest

from policies import (
    PolicyNotFoundError,
    PolicyValidationError,
    default_policy_dir,
    load_policy_set,
)
from tests.policies.conftest import write

TENANTS = """
residency:
  eu-only:
    regions: [eu-west, eu-central]
    sites: ["*"]
    classifications: [internal, confidential]
tenants:
  acme:
    allowed_models: [SmolLM2-*]
    residency: eu-only
    sla_class: interactive
  bank:
    residency: {regions: [ch], sites: [zurich-1], classifications: [secret]}
    rate_limit_rpm: 10
"""


def test_defaults_ship_as_package_data() -> None:
    names = sorted(p.name for p in default_policy_dir().glob("*.yaml"))
    assert names == ["retention.yaml", "sla_classes.yaml", "tenants.yaml"]


def test_default_policy_set() -> None:
    ps = load_policy_set()
    assert list(ps.sla_classes) == ["interactive", "standard", "batch"]
    assert ps.sla_classes["interactive"].priority == 0
    assert ps.sla_classes["interactive"].priority < ps.sla_classes["standard"].priority
    assert ps.sla_classes["standard"].priority < ps.sla_classes["batch"].priority
    assert ps.default_tenant.name == "default"
    assert ps.default_tenant.allowed_models == []  # deny by default: models are granted per tenant
    assert ps.default_tenant.residency.regions == ["*"]
    assert ps.tenants == {}
    assert ps.retention.audit_days >= 1
    assert ps.digest.startswith("sha256:") and len(ps.digest) == 71
    assert ps.tenant_policy("anyone") is ps.default_tenant


def test_tenants_inherit_from_default_and_resolve_named_residency(policy_dir: Path) -> None:
    write(policy_dir / "tenants_site.yaml", TENANTS)
    ps = load_policy_set(policy_dir)
    acme = ps.tenant_policy("acme")
    assert acme.allowed_models == ["SmolLM2-*"]
    assert acme.residency.name == "eu-only"
    assert acme.sla_class == "interactive"
    assert acme.rate_limit_rpm == ps.default_tenant.rate_limit_rpm  # inherited
    bank = ps.tenant_policy("bank")
    assert bank.residency.sites == ["zurich-1"]
    assert bank.allowed_models == []  # inherited from the template, which grants nothing
    assert bank.rate_limit_rpm == 10


def test_digest_changes_with_content(policy_dir: Path) -> None:
    before = load_policy_set(policy_dir).digest
    write(policy_dir / "retention.yaml", "retention:\n  audit_days: 30\n")
    after = load_policy_set(policy_dir)
    assert after.digest != before
    assert after.retention.audit_days == 30


def test_single_file(tmp_path: Path) -> None:
    text = "".join(p.read_text() + "\n" for p in sorted(default_policy_dir().glob("*.yaml")))
    ps = load_policy_set(write(tmp_path / "all.yaml", text))
    assert set(ps.sla_classes) == {"interactive", "standard", "batch"}


def test_unknown_sla_class_is_rejected_at_load(policy_dir: Path) -> None:
    write(policy_dir / "t.yaml", "tenants:\n  acme:\n    sla_class: platinum\n")
    with pytest.raises(PolicyValidationError) as info:
        load_policy_set(policy_dir)
    err = info.value
    assert err.file.endswith("t.yaml")
    assert err.field == "tenants.acme.sla_class"
    assert "interactive" in err.expected and err.found == "'platinum'"
    assert "t.yaml: tenants.acme.sla_class: expected one of" in str(err)


def test_wrong_type_names_file_field_expected_found(policy_dir: Path) -> None:
    write(policy_dir / "sla_classes.yaml", "sla_classes:\n  fast:\n    priority: high\n"
          "    ttft_target_ms: 10\n    deadline_ms: 5\n")
    with pytest.raises(PolicyValidationError) as info:
        load_policy_set(policy_dir)
    text = str(info.value)
    assert "sla_classes.yaml: sla_classes.fast.priority: expected a valid integer, found 'high'" in text
    # tenants referring to the (now missing) 'standard' class are reported too
    assert "default_tenant.sla_class" in text


def test_cross_field_rules(policy_dir: Path) -> None:
    write(policy_dir / "sla_classes.yaml", "sla_classes:\n  standard:\n    priority: 1\n"
          "    ttft_target_ms: 500\n    deadline_ms: 100\n")
    write(policy_dir / "t.yaml", "tenants:\n  acme:\n    max_tokens_per_request: 5000\n"
          "    max_tokens_per_minute: 1000\n")
    with pytest.raises(PolicyValidationError) as info:
        load_policy_set(policy_dir)
    fields = {p.field: p for p in info.value.problems}
    assert fields["sla_classes.standard"].expected == "ttft_ms <= deadline_ms (100)"
    assert fields["sla_classes.standard"].found == "ttft_ms=500"
    assert fields["tenants.acme"].found == "max_tokens_per_request=5000"


@pytest.mark.parametrize(
    ("text", "field", "expected"),
    [
        ("tenants:\n  acme:\n    colour: blue\n", "tenants.acme.colour", "only known fields"),
        ("tenants:\n  acme:\n    residency: mars\n", "tenants.acme.residency", "a residency rule in"),
        ("tenants:\n  acme:\n    residency: {regions: [eu]}\n", "tenants.acme.residency.sites",
         "a value (required field)"),
        ("tenants:\n  acme:\n    residency: {regions: [], sites: ['*'], classifications: ['*']}\n",
         "tenants.acme.residency.regions", "at least 1 item(s)"),
        ("tenants:\n  acme:\n    rate_limit_rpm: 0\n", "tenants.acme.rate_limit_rpm", "greater than or equal to 1"),
        ("tenants:\n  default:\n    rate_limit_rpm: 5\n", "tenants.default", "the template under default_tenant"),
        ("tenants:\n  'bad name!':\n    rate_limit_rpm: 5\n", "tenants.bad name!.name", "match pattern"),
        ("tenant:\n  acme: {}\n", "tenant", "a section in"),
        ("sla_classes:\n  standard: {priority: 1, ttft_target_ms: 1, deadline_ms: 2}\n", "sla_classes.standard",
         "one definition (already defined in"),
        ("retention:\n  audit_days: 7\n", "retention", "one definition"),
        ("- just\n- a list\n", "<top level>", "a mapping of sections"),
        ("tenants:\n  acme: {rate_limit_rpm: 1}\n  acme: {rate_limit_rpm: 2}\n", "tenants.acme", "each key once"),
        ("tenants: [oops\n", "line 2, column 1", "valid YAML"),
    ],
)
def test_validation_problems(policy_dir: Path, text: str, field: str, expected: str) -> None:
    write(policy_dir / "zz_site.yaml", text)
    with pytest.raises(PolicyValidationError) as info:
        load_policy_set(policy_dir)
    matching = [p for p in info.value.problems if p.field == field]
    assert matching, f"no problem for {field} in {info.value}"
    assert expected in matching[0].expected
    assert matching[0].file.endswith(".yaml")


def test_missing_required_sections(tmp_path: Path) -> None:
    write(tmp_path / "only.yaml", "tenants: {}\n")
    with pytest.raises(PolicyValidationError) as info:
        load_policy_set(tmp_path)
    fields = {p.field for p in info.value.problems}
    assert {"sla_classes", "default_tenant", "retention"} <= fields


def test_not_found(tmp_path: Path) -> None:
    with pytest.raises(PolicyNotFoundError, match="found nothing at"):
        load_policy_set(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PolicyNotFoundError, match=r"expected \*\.yaml files, found none"):
        load_policy_set(tmp_path / "empty")


def test_validation_error_is_a_value_error(policy_dir: Path) -> None:
    write(policy_dir / "t.yaml", "tenants:\n  acme:\n    sla_class: platinum\n")
    with pytest.raises(ValueError):
        load_policy_set(policy_dir)
