"""upgrade and rollback with real ansible runs: switch, re-check, refuse what must be refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from installer import (
    NotInstalledError,
    ReleaseConflict,
    VerificationFailed,
    install_bundle,
    read_entries,
    read_status,
)
from tests.installer.conftest import BundleFactory, run_cli

pytestmark = pytest.mark.slow


def test_upgrade_then_rollback(tmp_path: Path, bundle_factory: BundleFactory, trusted_root: Path) -> None:
    root = tmp_path / "root"
    v1 = bundle_factory("0.1.0")
    v2 = bundle_factory("0.2.0", marker=b"SAFETENSORS-PLACEHOLDER-SECOND-ONE!")
    install_bundle(v1, trusted_root, root)

    proc = run_cli("upgrade", "--bundle", str(v2), "--trusted-root", str(trusted_root), "--root", str(root),
                   "--skip-preflight", "--no-start", "--json")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    out = json.loads(proc.stdout)
    assert out["action"] == "upgrade" and out["switched"] and out["previous"] == "0.1.0"
    assert os.readlink(root / "current") == "releases/0.2.0"
    assert json.loads((root / "state" / "switch.json").read_text())["previous"] == "0.1.0"

    # the older bundle is now behind the trusted state: rollback protection refuses it
    with pytest.raises(VerificationFailed, match="check 7"):
        install_bundle(v1, trusted_root, root)

    proc = run_cli("rollback", "--root", str(root), "--no-start", "--json")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    out = json.loads(proc.stdout)
    assert out["action"] == "rollback" and out["version"] == "0.1.0" and out["previous"] == "0.2.0"
    assert os.readlink(root / "current") == "releases/0.1.0"
    assert read_status(root).current == "0.1.0"
    entry = read_entries(root / "journal" / "installer.jsonl")[-1]
    assert (entry["action"], entry["result"], entry["version"]) == ("rollback", "ok", "0.1.0")

    proc = run_cli("rollback", "--root", str(root), "--to", "0.2.0", "--no-start")
    assert proc.returncode == 0, proc.stderr
    assert os.readlink(root / "current") == "releases/0.2.0"

    # a modified file in the target release is caught before switching: ansible failure, exit 3
    victim = root / "releases" / "0.1.0" / "model" / "config.json"
    victim.chmod(0o644)
    victim.write_text('{"model_type": "evil"}')
    proc = run_cli("rollback", "--root", str(root), "--to", "0.1.0", "--no-start", "--json")
    assert proc.returncode == 3, proc.stderr + proc.stdout
    out = json.loads(proc.stdout)
    assert out["error"] == "AnsibleFailed" and "model/config.json: expected sha256" in out["message"]
    assert os.readlink(root / "current") == "releases/0.2.0"
    assert read_entries(root / "journal" / "installer.jsonl")[-1]["result"] == "failed"

    proc = run_cli("rollback", "--root", str(root), "--to", "9.9.9")
    assert proc.returncode == 2 and "9.9.9" in proc.stderr


def test_upgrade_needs_an_installed_release(tmp_path: Path, bundle_v1: Path, trusted_root: Path) -> None:
    with pytest.raises(NotInstalledError, match="expected an installed release to upgrade"):
        install_bundle(bundle_v1, trusted_root, tmp_path / "root", upgrade=True)
    assert not (tmp_path / "root").exists()


def test_upgrade_refuses_an_older_version(tmp_path: Path, bundle_factory: BundleFactory, trusted_root: Path) -> None:
    root = tmp_path / "root"
    (root / "releases" / "0.5.0").mkdir(parents=True)
    (root / "releases" / "0.5.0" / "appliance.yaml").write_text("version: '0.5.0'\nbundle_digest: x\n")
    (root / "current").symlink_to("releases/0.5.0")
    older = bundle_factory("0.4.0")
    with pytest.raises(ReleaseConflict, match=r"expected a version newer than 0\.5\.0, found 0\.4\.0"):
        install_bundle(older, trusted_root, root, upgrade=True)
    assert sorted(p.name for p in root.iterdir()) == ["current", "releases"]


def test_rollback_without_install(tmp_path: Path) -> None:
    proc = run_cli("rollback", "--root", str(tmp_path / "root"))
    assert proc.returncode == 2 and "no current symlink" in proc.stderr
    with pytest.raises(NotInstalledError):
        from installer import rollback

        rollback(tmp_path / "root")
