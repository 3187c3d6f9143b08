"""install_bundle end to end: real signed bundles, real ansible-playbook runs on localhost."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
import yaml

from airgap_bundle import init_keys, verify_bundle
from installer import (
    EXIT_REFUSED,
    ReleaseConflict,
    VerificationFailed,
    install_bundle,
    read_entries,
    read_status,
)
from tests.installer.conftest import BundleFactory, run_cli, tamper, tree_snapshot

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory, bundle_v1: Path, trusted_root: Path) -> Path:
    root = tmp_path_factory.mktemp("installed") / "root"
    result = install_bundle(bundle_v1, trusted_root, root)
    assert result.changed > 0 and result.switched and result.previous is None
    return root


def test_install_lays_out_the_root(installed: Path, bundle_v1: Path, trusted_root: Path) -> None:
    release = installed / "releases" / "0.1.0"
    assert os.readlink(installed / "current") == "releases/0.1.0"
    for name, mode in {"data": 0o700, "tls": 0o700, "secrets": 0o700, "state": 0o700, "journal": 0o750,
                       "releases": 0o755}.items():
        assert stat.S_IMODE((installed / name).stat().st_mode) == mode, name
    report = verify_bundle(bundle_v1, trusted_root)
    # every installed artefact carries the hash signed in the bundle
    for path in ("model/config.json", "model/model.safetensors", "model/tokenizer.json",
                 "policies/sla_classes.yaml", "policies/tenants.yaml", "policies/retention.yaml", "manifest.json"):
        data = (release / path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == report.targets[path].sha256, path
        assert stat.S_IMODE((release / path).stat().st_mode) == 0o444
    assert not (installed / ".staging").exists()
    assert not (installed / ".current.tmp").exists()
    trust = json.loads((installed / "state" / "trust" / "trusted_state.json").read_text())
    assert trust["version"] == "0.1.0" and trust["digest"] == report.digest


def test_appliance_yaml_follows_the_contract(installed: Path, bundle_v1: Path, trusted_root: Path) -> None:
    config = yaml.safe_load((installed / "current" / "appliance.yaml").read_text())
    digest = verify_bundle(bundle_v1, trusted_root).digest
    release = installed / "releases" / "0.1.0"
    assert config == {
        "version": "0.1.0",
        "bundle_digest": digest,
        "model": {"name": "SmolLM2-tiny", "path": str(release / "model")},
        "policies_dir": str(release / "policies"),
        "node": {"name": "local", "labels": {"region": "local", "site": "local", "classification": "internal"},
                 "roles": ["gateway", "engine"], "models": ["SmolLM2-tiny"]},
        "gateway": {"host": "127.0.0.1", "port": 8443, "workers": 1},  # one gateway process (the default)
    }  # one node with both roles: no engine_node and no fleet section (the engine runs in-process)
    from policies import load_policy_set

    assert load_policy_set(Path(config["policies_dir"])).sla_classes["interactive"].priority == 0


def test_journal_records_the_install(installed: Path) -> None:
    journal = installed / "journal" / "installer.jsonl"
    assert stat.S_IMODE(journal.stat().st_mode) == 0o640
    first = read_entries(journal)[0]
    assert list(first) == ["ts", "actor", "action", "version", "bundle_digest", "nodes", "result", "detail"]
    assert first["action"] == "install" and first["result"] == "ok" and first["version"] == "0.1.0"
    assert first["nodes"] == ["local"] and first["bundle_digest"].startswith("sha256:")
    assert first["actor"]


def test_second_install_changes_nothing(installed: Path, bundle_v1: Path, trusted_root: Path) -> None:
    before = (installed / "releases" / "0.1.0" / "appliance.yaml").stat().st_mtime_ns
    proc = run_cli("install", "--bundle", str(bundle_v1), "--trusted-root", str(trusted_root),
                   "--root", str(installed), "--skip-preflight", "--no-start", "--json")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    out = json.loads(proc.stdout)
    assert out["changed"] == 0 and out["already_installed"] and not out["switched"]
    assert out["playbook"]["hosts"]["local"]["changed"] == 0
    assert out["playbook"]["hosts"]["local"]["failures"] == 0
    assert (installed / "releases" / "0.1.0" / "appliance.yaml").stat().st_mtime_ns == before
    last = read_entries(installed / "journal" / "installer.jsonl")[-1]
    assert last["result"] == "ok" and "no changes" in last["detail"]


def test_status(installed: Path) -> None:
    status = read_status(installed)
    assert status.installed and status.current == "0.1.0"
    assert [r.version for r in status.releases] == ["0.1.0"]
    assert status.bundle_digest == status.releases[0].bundle_digest
    proc = run_cli("status", "--root", str(installed), "--json")
    assert proc.returncode == 0
    data = json.loads(proc.stdout)
    assert data["current"] == "0.1.0" and data["releases"][0]["model"] == "SmolLM2-tiny"
    table = run_cli("status", "--root", str(installed), env={"COLUMNS": "200"})
    assert "0.1.0" in table.stdout and status.bundle_digest in table.stdout


def test_tampered_bundle_writes_nothing_on_a_fresh_root(tmp_path: Path, bundle_v1: Path,
                                                        trusted_root: Path) -> None:
    bad = tamper(bundle_v1, tmp_path / "tampered.tar")
    root = tmp_path / "root"
    with pytest.raises(VerificationFailed) as info:
        install_bundle(bad, trusted_root, root)
    assert info.value.exit_code == EXIT_REFUSED
    assert "[model/model.safetensors]" in str(info.value) and "expected sha256" in str(info.value)
    assert not root.exists()
    proc = run_cli("install", "--bundle", str(bad), "--trusted-root", str(trusted_root), "--root", str(root),
                   "--skip-preflight", "--no-start", "--json")
    assert proc.returncode == 1, proc.stderr
    out = json.loads(proc.stdout)
    assert out["ok"] is False and out["error"] == "VerificationFailed"
    assert not out["verification"]["ok"]
    assert not root.exists()


def test_tampered_bundle_leaves_an_installed_root_alone(installed: Path, bundle_v1: Path, trusted_root: Path,
                                                        tmp_path: Path) -> None:
    bad = tamper(bundle_v1, tmp_path / "tampered.tar")
    journal = installed / "journal" / "installer.jsonl"
    before = tree_snapshot(installed)
    entries_before = len(read_entries(journal))
    with pytest.raises(VerificationFailed):
        install_bundle(bad, trusted_root, installed)
    after = tree_snapshot(installed)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed <= {"journal/installer.jsonl", "journal"}, changed
    entries = read_entries(journal)
    assert len(entries) == entries_before + 1
    assert entries[-1]["result"] == "refused" and "verification failed" in entries[-1]["detail"]


def test_bundle_signed_by_other_keys_is_refused(tmp_path: Path, bundle_v1: Path) -> None:
    other = init_keys(tmp_path / "other-keys")
    with pytest.raises(VerificationFailed, match="check"):
        install_bundle(bundle_v1, other, tmp_path / "root")
    assert not (tmp_path / "root").exists()


def test_not_a_bundle_is_refused(tmp_path: Path, trusted_root: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(VerificationFailed):
        install_bundle(junk, trusted_root, tmp_path / "root")
    assert not (tmp_path / "root").exists()


def test_same_version_from_another_bundle_is_refused(installed: Path, bundle_factory: BundleFactory,
                                                     trusted_root: Path) -> None:
    other = bundle_factory("0.1.0", marker=b"SAFETENSORS-PLACEHOLDER-DIFFERENT!!")
    with pytest.raises(ReleaseConflict, match=r"release 0\.1\.0 is immutable"):
        install_bundle(other, trusted_root, installed)
    assert read_entries(installed / "journal" / "installer.jsonl")[-1]["result"] == "refused"


def test_missing_inputs_are_usage_errors(tmp_path: Path, trusted_root: Path, bundle_v1: Path) -> None:
    proc = run_cli("install", "--bundle", str(tmp_path / "absent.tar"), "--trusted-root", str(trusted_root),
                   "--root", str(tmp_path / "root"), "--skip-preflight")
    assert proc.returncode == 2 and "found nothing at" in proc.stderr
    proc = run_cli("install", "--trusted-root", str(trusted_root))
    assert proc.returncode == 2  # --bundle missing: typer usage error
    assert not (tmp_path / "root").exists()


def test_bundle_with_invalid_policies_is_refused(tmp_path: Path, bundle_factory: BundleFactory,
                                                 trusted_root: Path) -> None:
    import shutil

    from policies import default_policy_dir

    policies = tmp_path / "policies"
    shutil.copytree(default_policy_dir(), policies)
    (policies / "site.yaml").write_text("tenants:\n  acme:\n    sla_class: platinum\n")
    bundle = bundle_factory("0.3.0", policies=policies)
    root = tmp_path / "root"
    proc = run_cli("install", "--bundle", str(bundle), "--trusted-root", str(trusted_root), "--root", str(root),
                   "--skip-preflight", "--no-start", "--json")
    assert proc.returncode == 2, proc.stderr + proc.stdout
    out = json.loads(proc.stdout)
    assert out["error"] == "BundleContentError" and "policies/site.yaml: tenants.acme.sla_class" in out["message"]
    assert not (root / "releases").exists() and not (root / "state").exists()
    assert read_entries(root / "journal" / "installer.jsonl")[-1]["result"] == "refused"


def test_a_bundle_whose_policies_do_not_fit_this_hosts_applied_policies_is_refused(
        tmp_path: Path, bundle_factory: BundleFactory, trusted_root: Path) -> None:
    """Policies applied while running (ROOT/data/policies) stay on top of every release: a bundle
    whose classes no longer hold an applied tenant's class cannot be installed under them."""
    import shutil

    from policies import default_policy_dir

    root = tmp_path / "root"
    applied = root / "data" / "policies"
    applied.mkdir(parents=True)
    (applied / "site.yaml").write_text("tenants:\n  acme:\n    sla_class: interactive\n")
    policies = tmp_path / "policies"
    shutil.copytree(default_policy_dir(), policies)
    (policies / "sla_classes.yaml").write_text(  # valid alone: no tenant of its own names interactive
        "sla_classes:\n  standard:\n    priority: 1\n    ttft_ms: 5000\n    deadline_ms: 300000\n")
    bundle = bundle_factory("0.3.1", policies=policies)
    proc = run_cli("install", "--bundle", str(bundle), "--trusted-root", str(trusted_root), "--root", str(root),
                   "--skip-preflight", "--no-start", "--json")
    assert proc.returncode == 2, proc.stderr + proc.stdout
    out = json.loads(proc.stdout)
    assert out["error"] == "BundleContentError" and "tenants.acme.sla_class" in out["message"], out
    assert not (root / "releases").exists()


def test_bundle_without_policies_gets_the_default_policies(tmp_path: Path, bundle_factory: BundleFactory,
                                                           trusted_root: Path) -> None:
    bundle = bundle_factory("0.1.1", policies=None)
    result = install_bundle(bundle, trusted_root, tmp_path / "root")
    assert any("default policies" in note for note in result.notes)
    from policies import default_policy_dir, load_policy_set

    installed = load_policy_set(result.release_dir / "policies")
    assert installed.digest == load_policy_set(default_policy_dir()).digest
