"""The set in force: the release's files with the applied files laid over them by name, loaded
under their real paths; with nothing applied it is exactly the release's set (same digest, so a
node moving to this layout records no change)."""

from __future__ import annotations

from pathlib import Path

import pytest

from policies import PolicyValidationError, load_policy_set
from policies.effective import (
    APPLIED,
    RELEASE,
    applied_policy_dir,
    files_in_force,
    in_force_digest,
    load_in_force,
)
from policies.errors import PolicyNotFoundError


def test_nothing_applied_is_the_release_set(policy_dir: Path, tmp_path: Path) -> None:
    applied = applied_policy_dir(tmp_path / "data")
    assert applied == tmp_path / "data" / "policies"
    release = load_policy_set(policy_dir)
    assert load_in_force(policy_dir, applied).digest == release.digest == in_force_digest(policy_dir, applied)
    applied.mkdir(parents=True)
    (applied / ".site.yaml.123.tmp").write_text("tenants: {broken")  # an apply's temporary file: not policy
    (applied / "notes.txt").write_text("not policy")
    assert load_in_force(policy_dir, applied).digest == release.digest


def test_applied_files_replace_by_name_or_are_added(policy_dir: Path, tmp_path: Path) -> None:
    applied = tmp_path / "applied"
    applied.mkdir()
    # a file of the release's name replaces the whole file, it is not merged into it: the release's
    # tenants.yaml holds default_tenant, so one holding only a tenant leaves the set without it
    (applied / "tenants.yaml").write_text("tenants:\n  acme: {rate_limit_rpm: 5}\n")
    with pytest.raises(PolicyValidationError) as info:
        load_in_force(policy_dir, applied)
    assert [(p.field, p.expected) for p in info.value.problems] == [("default_tenant", "a default tenant template")]
    release_tenants = (policy_dir / "tenants.yaml").read_text()
    with_acme = release_tenants.replace("tenants: {}", "tenants:\n  acme: {rate_limit_rpm: 5}")
    (applied / "tenants.yaml").write_text(with_acme)
    (applied / "zz_site.yml").write_text("tenants:\n  beta: {rate_limit_rpm: 6}\n")
    files = files_in_force(policy_dir, applied)
    assert [(f.name, f.origin, f.replaces) for f in files] == [
        ("retention.yaml", RELEASE, None), ("sla_classes.yaml", RELEASE, None),
        ("tenants.yaml", APPLIED, policy_dir / "tenants.yaml"), ("zz_site.yml", APPLIED, None)]
    policies = load_in_force(policy_dir, applied)
    assert policies.sources == tuple(str(f.path) for f in files)
    assert (policies.tenant_policy("acme").rate_limit_rpm, policies.tenant_policy("beta").rate_limit_rpm) == (5, 6)
    assert (policy_dir / "tenants.yaml").read_text() == release_tenants


def test_a_broken_applied_file_is_named_by_its_real_path(policy_dir: Path, tmp_path: Path) -> None:
    applied = tmp_path / "applied"
    applied.mkdir()
    (applied / "site.yaml").write_text("tenants:\n  acme:\n    sla_class: gold\n")
    with pytest.raises(PolicyValidationError) as info:
        load_in_force(policy_dir, applied)
    (problem,) = info.value.problems
    assert (problem.file, problem.field, problem.line, problem.column) == (
        str(applied / "site.yaml"), "tenants.acme.sla_class", 3, 16)


def test_a_missing_release_is_said_so(tmp_path: Path) -> None:
    with pytest.raises(PolicyNotFoundError, match="expected a YAML file or a directory, found nothing at"):
        load_in_force(tmp_path / "gone", tmp_path / "applied")
