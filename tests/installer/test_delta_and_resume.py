"""Delta bundles applied on top of the installed base release, and installs that are killed or
stopped half way: the next run journals what happened, tidies up and resumes (real ansible runs,
real signals)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from airgap_bundle import build_bundle
from installer import NotInstalledError, VerificationFailed, install_bundle, read_entries, read_status
from policies import default_policy_dir
from tests.installer.conftest import REPO, BundleFactory, make_model, run_cli

pytestmark = pytest.mark.slow


def _delta_bundle(tmp_path: Path, keys: Path, base_release: Path, version: str) -> Path:
    """Same model bytes as the factory's default, new policies: only the policies travel."""
    work = tmp_path / f"delta-{version}"
    model = make_model(work / "SmolLM2-tiny")
    policies = work / "policies"
    policies.mkdir()
    for src in default_policy_dir().glob("*.yaml"):
        (policies / src.name).write_text(src.read_text() + f"\n# release {version}\n")
    return build_bundle(work / f"appliance-{version}-delta.tar", keys, version, datetime.now(UTC) + timedelta(days=30),
                        model_dir=model, policies_dir=policies, base_manifest=base_release / "manifest.json",
                        metadata_version=int(time.time()) + 500)


def test_delta_bundle_upgrades_on_top_of_the_installed_base(tmp_path: Path, bundle_factory: BundleFactory,
                                                            keys: Path, trusted_root: Path) -> None:
    root = tmp_path / "root"
    install_bundle(bundle_factory("1.0.0"), trusted_root, root)
    delta = _delta_bundle(tmp_path, keys, root / "releases" / "1.0.0", "1.1.0")
    manifest = json.loads(subprocess.run(
        [sys.executable, "-m", "airgap_bundle.cli", "inspect", str(delta), "--json"], capture_output=True, text=True,
        cwd=REPO, check=True).stdout)["manifest"]
    assert manifest["delta"]["base_version"] == "1.0.0"
    assert any(p.startswith("model/") for p in manifest["delta"]["omitted"])

    # `verify --root` finds the base by itself
    proc = run_cli("verify", "--bundle", str(delta), "--trusted-root", str(trusted_root), "--root", str(root), "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["from_base"]

    proc = run_cli("upgrade", "--bundle", str(delta), "--trusted-root", str(trusted_root), "--root", str(root),
                   "--skip-preflight", "--no-start", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    assert out["version"] == "1.1.0" and out["previous"] == "1.0.0"
    assert out["verification"]["from_base"]
    new = root / "releases" / "1.1.0"
    assert (new / "model" / "model.safetensors").read_bytes() == (root / "releases/1.0.0/model/model.safetensors"
                                                                   ).read_bytes()
    assert "# release 1.1.0" in (new / "policies" / "tenants.yaml").read_text()
    assert os.readlink(root / "current") == "releases/1.1.0"

    # the 1.1.0 release is complete on its own: rolling back and forth re-checks every file
    proc = run_cli("rollback", "--root", str(root), "--no-start")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("rollback", "--root", str(root), "--to", "1.1.0", "--no-start")
    assert proc.returncode == 0, proc.stderr


def test_delta_bundle_without_its_base_is_refused_before_anything_is_written(
        tmp_path: Path, bundle_factory: BundleFactory, keys: Path, trusted_root: Path) -> None:
    base_root = tmp_path / "base"
    install_bundle(bundle_factory("2.0.0"), trusted_root, base_root)
    delta = _delta_bundle(tmp_path, keys, base_root / "releases" / "2.0.0", "2.1.0")

    fresh = tmp_path / "fresh"
    with pytest.raises(NotInstalledError, match=r"delta bundle on release 2\.0\.0.*found no release"):
        install_bundle(delta, trusted_root, fresh)
    assert not fresh.exists()
    proc = run_cli("install", "--bundle", str(delta), "--trusted-root", str(trusted_root), "--root", str(fresh),
                   "--skip-preflight", "--no-start", "--json")
    assert proc.returncode == 2 and "install the full bundle of 2.0.0 first" in json.loads(proc.stdout)["message"]
    assert not fresh.exists()


def test_delta_bundle_refuses_a_modified_base_file(tmp_path: Path, bundle_factory: BundleFactory, keys: Path,
                                                   trusted_root: Path) -> None:
    root = tmp_path / "root"
    install_bundle(bundle_factory("3.0.0"), trusted_root, root)
    delta = _delta_bundle(tmp_path, keys, root / "releases" / "3.0.0", "3.1.0")
    victim = root / "releases" / "3.0.0" / "model" / "model.safetensors"
    victim.chmod(0o644)
    data = bytearray(victim.read_bytes())
    data[0] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(VerificationFailed, match=r"check 8.*model/model\.safetensors"):
        install_bundle(delta, trusted_root, root, upgrade=True)
    assert not (root / "releases" / "3.1.0").exists()
    assert os.readlink(root / "current") == "releases/3.0.0"


def _install_until_copying(bundle: Path, trusted_root: Path, root: Path, version: str) -> subprocess.Popen[str]:
    """Start the real CLI and return once ansible has created the release's directories (the
    copies and appliance.yaml are still to come)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "installer.cli", "install", "--bundle", str(bundle), "--trusted-root",
         str(trusted_root), "--root", str(root), "--skip-preflight", "--no-start", "--json"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    marker = root / "releases" / version / "model"
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, f"installer ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, f"{marker} did not appear"
        time.sleep(0.02)
    return proc


def _kill_mid_install(bundle: Path, trusted_root: Path, root: Path, version: str) -> None:
    proc = _install_until_copying(bundle, trusted_root, root, version)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, as a power cut would
    proc.wait()


def test_killed_install_is_journalled_and_resumed(tmp_path: Path, bundle_factory: BundleFactory,
                                                  trusted_root: Path) -> None:
    root = tmp_path / "root"
    bundle = bundle_factory("4.0.0")
    _kill_mid_install(bundle, trusted_root, root, "4.0.0")
    assert not (root / "releases" / "4.0.0" / "appliance.yaml").exists()
    assert (root / ".installer-run.json").exists()
    assert list((root / ".staging").glob("run-*")), "the dead run's staging is left behind"

    status = read_status(root, probe_service=False)
    assert status.interrupted and "install of 4.0.0" in status.interrupted and status.current is None
    proc2 = run_cli("status", "--root", str(root), env={"COLUMNS": "400"})
    assert "interrupted run" in proc2.stdout and "did not finish" in proc2.stdout

    out = run_cli("install", "--bundle", str(bundle), "--trusted-root", str(trusted_root), "--root", str(root),
                  "--skip-preflight", "--no-start", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    assert result["version"] == "4.0.0" and any("did not finish" in n and "resuming" in n for n in result["notes"])
    assert os.readlink(root / "current") == "releases/4.0.0"
    assert not (root / ".installer-run.json").exists() and not (root / ".staging").exists()
    entries = read_entries(root / "journal" / "installer.jsonl")
    assert [(e["action"], e["result"]) for e in entries[-2:]] == [("install", "interrupted"), ("install", "ok")]
    assert read_status(root, probe_service=False).interrupted is None

    # and a third run changes nothing
    again = install_bundle(bundle, trusted_root, root)
    assert again.already_installed, again.playbook.changed_tasks


def test_killed_upgrade_then_rollback_removes_the_incomplete_release(tmp_path: Path, bundle_factory: BundleFactory,
                                                                     trusted_root: Path) -> None:
    root = tmp_path / "root"
    install_bundle(bundle_factory("5.0.0"), trusted_root, root)
    install_bundle(bundle_factory("5.1.0", marker=b"SAFETENSORS-PLACEHOLDER-FIVE-ONE-X"), trusted_root, root)
    doomed = bundle_factory("5.2.0", marker=b"SAFETENSORS-PLACEHOLDER-FIVE-TWO-X")
    _kill_mid_install(doomed, trusted_root, root, "5.2.0")
    assert os.readlink(root / "current") == "releases/5.1.0"

    out = run_cli("rollback", "--root", str(root), "--no-start", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    assert result["version"] == "5.0.0"
    assert any("removed its incomplete release" in n for n in result["notes"])
    assert not (root / "releases" / "5.2.0").exists()
    entries = read_entries(root / "journal" / "installer.jsonl")
    assert [(e["action"], e["result"], e["version"]) for e in entries[-2:]] == [
        ("install", "interrupted", "5.2.0"), ("rollback", "ok", "5.0.0")]


def test_sigterm_stops_the_install_cleanly_and_says_how_to_go_on(tmp_path: Path, bundle_factory: BundleFactory,
                                                                 trusted_root: Path) -> None:
    root = tmp_path / "root"
    bundle = bundle_factory("6.0.0")
    proc = _install_until_copying(bundle, trusted_root, root, "6.0.0")
    proc.send_signal(signal.SIGTERM)  # the installer only, as `kill PID` or systemd would
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    out = json.loads(stdout)
    assert out["error"] == "Interrupted" and "run the same command again to resume" in out["message"]
    assert not (root / ".installer-run.json").exists()
    assert not (root / ".staging").exists()
    entry = read_entries(root / "journal" / "installer.jsonl")[-1]
    assert (entry["action"], entry["result"]) == ("install", "interrupted") and "SIGTERM" in entry["detail"]
    assert read_status(root, probe_service=False).interrupted is None  # journalled already: nothing pending

    done = install_bundle(bundle, trusted_root, root)
    assert done.version == "6.0.0" and os.readlink(root / "current") == "releases/6.0.0"
