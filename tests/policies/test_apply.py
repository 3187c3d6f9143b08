"""Files laid over a policy directory: checked as the set the directory would then hold, written
atomically, and put back; the digest is the one the next load from disk computes."""

from __future__ import annotations

from pathlib import Path

import pytest

from policies import PolicyValidationError, load_policy_set
from policies.apply import MAX_FILES, overlay, restore_policy_files, write_policy_files
from policies.loader import MAX_FILE_BYTES

SITE = b"tenants:\n  acme:\n    allowed_models: ['*']\n    rate_limit_rpm: 7\n"


def test_overlay_validates_the_set_the_directory_would_hold(policy_dir: Path) -> None:
    before = load_policy_set(policy_dir)
    new = overlay(policy_dir, {"site.yaml": SITE})
    assert new.tenant_policy("acme").rate_limit_rpm == 7
    assert new.digest != before.digest
    assert not (policy_dir / "site.yaml").exists()  # nothing written by a check
    # a file of the same name is replaced, not merged
    (policy_dir / "site.yaml").write_bytes(b"tenants:\n  beta: {rate_limit_rpm: 1}\n")
    replaced = overlay(policy_dir, {"site.yaml": SITE})
    assert set(replaced.tenants) == {"acme"}


def test_written_files_load_with_the_checked_digest_and_can_be_put_back(policy_dir: Path) -> None:
    original = (policy_dir / "retention.yaml").read_bytes()
    new = overlay(policy_dir, {"site.yaml": SITE, "retention.yaml": b"retention:\n  audit_days: 30\n"})
    before = write_policy_files(policy_dir, {"site.yaml": SITE, "retention.yaml": b"retention:\n  audit_days: 30\n"})
    assert load_policy_set(policy_dir).digest == new.digest
    assert before == {"site.yaml": None, "retention.yaml": original}
    assert not [p.name for p in policy_dir.iterdir() if p.name.startswith(".")]  # no temporary file left
    restore_policy_files(policy_dir, before)
    assert not (policy_dir / "site.yaml").exists()
    assert (policy_dir / "retention.yaml").read_bytes() == original


def test_an_invalid_overlay_names_the_new_file_and_its_line(policy_dir: Path) -> None:
    with pytest.raises(PolicyValidationError) as info:
        overlay(policy_dir, {"site.yaml": b"tenants:\n  acme:\n    sla_class: gold\n"})
    (problem,) = info.value.problems
    assert (problem.file, problem.field, problem.line, problem.column) == (
        str(policy_dir / "site.yaml"), "tenants.acme.sla_class", 3, 16)


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
def test_bad_files_are_refused_before_anything_is_read_or_written(policy_dir: Path, files: dict[str, bytes],
                                                                   expected: str) -> None:
    listing = sorted(p.name for p in policy_dir.iterdir())
    for action in (overlay, write_policy_files):
        with pytest.raises(PolicyValidationError) as info:
            action(policy_dir, files)
        assert any(expected in p.expected for p in info.value.problems), info.value
    assert sorted(p.name for p in policy_dir.iterdir()) == listing
    assert not (policy_dir.parent / "escape.yaml").exists()


def test_a_single_file_policy_path_is_refused(tmp_path: Path) -> None:
    single = tmp_path / "all.yaml"
    single.write_bytes(SITE)
    with pytest.raises(PolicyValidationError, match="a directory of policy files"):
        overlay(single, {"site.yaml": SITE})
