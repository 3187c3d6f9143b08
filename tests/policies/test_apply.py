"""Files applied over a release's policy files: checked as the set that would then be in force,
written atomically into the applied directory (never the release's), removed again by a reset, and
put back; the digest is the one the next load from disk computes."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from policies import PolicyValidationError, load_policy_set
from policies.apply import (
    MAX_FILES,
    overlay,
    remove_policy_files,
    restore_policy_files,
    without,
    write_policy_files,
)
from policies.effective import load_in_force
from policies.errors import PolicyNotFoundError
from policies.loader import MAX_FILE_BYTES

SITE = b"tenants:\n  acme:\n    allowed_models: ['*']\n    rate_limit_rpm: 7\n"
RETENTION_30 = b"retention:\n  audit_days: 30\n"


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture
def applied(tmp_path: Path) -> Path:
    return tmp_path / "data" / "policies"


def test_overlay_validates_the_set_that_would_be_in_force(policy_dir: Path, applied: Path) -> None:
    before = load_policy_set(policy_dir)
    new = overlay(policy_dir, applied, {"site.yaml": SITE})
    assert new.tenant_policy("acme").rate_limit_rpm == 7
    assert new.digest != before.digest
    assert not applied.exists()  # nothing written by a check
    # an applied file of the same name is replaced, not merged
    applied.mkdir(parents=True)
    (applied / "site.yaml").write_bytes(b"tenants:\n  beta: {rate_limit_rpm: 1}\n")
    replaced = overlay(policy_dir, applied, {"site.yaml": SITE})
    assert set(replaced.tenants) == {"acme"}


def test_written_files_load_with_the_checked_digest_and_leave_the_release_alone(policy_dir: Path,
                                                                                applied: Path) -> None:
    release = _snapshot(policy_dir)
    new = overlay(policy_dir, applied, {"site.yaml": SITE, "retention.yaml": RETENTION_30})
    before = write_policy_files(applied, {"site.yaml": SITE, "retention.yaml": RETENTION_30})
    assert _snapshot(policy_dir) == release  # the release's files untouched
    assert stat.S_IMODE(applied.stat().st_mode) == 0o750
    in_force = load_in_force(policy_dir, applied)
    assert in_force.digest == new.digest
    assert in_force.retention.audit_days == 30  # the applied retention.yaml replaced the release's
    assert str(applied / "retention.yaml") in in_force.sources
    assert str(policy_dir / "retention.yaml") not in in_force.sources
    assert before == {"site.yaml": None, "retention.yaml": None}
    assert not [p.name for p in applied.iterdir() if p.name.startswith(".")]  # no temporary file left
    restore_policy_files(applied, before)
    assert list(applied.iterdir()) == []
    assert load_in_force(policy_dir, applied).digest == load_policy_set(policy_dir).digest


def test_an_invalid_overlay_names_the_new_file_and_its_line(policy_dir: Path, applied: Path) -> None:
    with pytest.raises(PolicyValidationError) as info:
        overlay(policy_dir, applied, {"site.yaml": b"tenants:\n  acme:\n    sla_class: gold\n"})
    (problem,) = info.value.problems
    assert (problem.file, problem.field, problem.line, problem.column) == (
        str(applied / "site.yaml"), "tenants.acme.sla_class", 3, 16)


def test_reset_removes_applied_files_checked_first_and_can_be_put_back(policy_dir: Path, applied: Path) -> None:
    classes = b"sla_classes:\n  gold: {priority: 0, ttft_ms: 200, percentile: 99, on_overload: queue, " \
              b"deadline_ms: 20000}\n"
    uses_gold = b"tenants:\n  acme:\n    sla_class: gold\n"
    write_policy_files(applied, {"classes_site.yaml": classes, "site.yaml": uses_gold,
                                 "retention.yaml": RETENTION_30})
    # removing the class a remaining file uses: refused, every problem under the real paths
    with pytest.raises(PolicyValidationError) as info:
        without(policy_dir, applied, ["classes_site.yaml"])
    (problem,) = info.value.problems
    assert (problem.file, problem.field, problem.line) == (str(applied / "site.yaml"), "tenants.acme.sla_class", 3)
    with pytest.raises(PolicyNotFoundError, match=r"expected applied files among \['classes_site.yaml', "
                                                  r"'retention.yaml', 'site.yaml'\], found no 'tenants.yaml'"):
        without(policy_dir, applied, ["tenants.yaml"])  # a release file is not an applied one
    with pytest.raises(PolicyNotFoundError):
        without(policy_dir, applied, ["../policies/retention.yaml"])
    # the release's retention.yaml is in force again once the applied one is gone
    gone, new = without(policy_dir, applied, ["retention.yaml"])
    assert gone == ["retention.yaml"] and new.retention.audit_days == load_policy_set(policy_dir).retention.audit_days
    before = remove_policy_files(applied, gone)
    assert load_in_force(policy_dir, applied).digest == new.digest
    restore_policy_files(applied, before)
    assert (applied / "retention.yaml").read_bytes() == RETENTION_30
    # all of them: exactly the release's set
    gone, new = without(policy_dir, applied, None)
    assert gone == ["classes_site.yaml", "retention.yaml", "site.yaml"]
    assert new.digest == load_policy_set(policy_dir).digest
    remove_policy_files(applied, gone)
    with pytest.raises(PolicyNotFoundError, match="nothing to reset"):
        without(policy_dir, applied, None)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"../escape.yaml": SITE}, "a plain file name ending in .yaml"),
        ({"sub/site.yaml": SITE}, "a plain file name ending in .yaml"),
        ({"site.txt": SITE}, "a plain file name ending in .yaml"),
        ({".hidden.yaml": SITE}, "a plain file name ending in .yaml"),
        ({"site.yaml": b""}, "at least one section"),
        ({"site.yaml": b"# only a comment\n"}, "at least one section"),
        ({"site.yaml": b"{}\n"}, "at least one section"),
        ({"site.yaml": b"#" * (MAX_FILE_BYTES + 1)}, f"at most {MAX_FILE_BYTES} bytes"),
        ({}, "at least one policy file"),
        ({f"f{i}.yaml": SITE for i in range(MAX_FILES + 1)}, f"at most {MAX_FILES} files"),
    ],
)
def test_bad_files_are_refused_before_anything_is_read_or_written(policy_dir: Path, applied: Path,
                                                                   files: dict[str, bytes], expected: str) -> None:
    listing = sorted(p.name for p in policy_dir.iterdir())
    with pytest.raises(PolicyValidationError) as info:
        overlay(policy_dir, applied, files)
    assert any(expected in p.expected for p in info.value.problems), info.value
    with pytest.raises(PolicyValidationError) as info:
        write_policy_files(applied, files)
    assert any(expected in p.expected for p in info.value.problems), info.value
    assert sorted(p.name for p in policy_dir.iterdir()) == listing
    assert not applied.exists()
    assert not (applied.parent / "escape.yaml").exists()


def test_a_single_file_release_takes_applied_files_too(tmp_path: Path, policy_dir: Path, applied: Path) -> None:
    single = tmp_path / "all.yaml"
    single.write_bytes(b"".join(p.read_bytes() + b"\n" for p in sorted(policy_dir.iterdir())))
    new = overlay(single, applied, {"site.yaml": SITE})
    assert new.sources == (str(single), str(applied / "site.yaml"))
    write_policy_files(applied, {"site.yaml": SITE})
    assert load_in_force(single, applied).digest == new.digest
    assert single.read_bytes().count(b"retention:") == 1  # untouched


def test_an_applied_path_that_is_a_file_is_refused(policy_dir: Path, applied: Path) -> None:
    applied.parent.mkdir(parents=True)
    applied.write_bytes(SITE)
    with pytest.raises(PolicyValidationError, match="a directory of applied policy files"):
        load_in_force(policy_dir, applied)
