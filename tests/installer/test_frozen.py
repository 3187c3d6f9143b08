"""The real one-file executable (PyInstaller, cached by a hash of its sources) through the IT
admin's whole journey with the real model: install and serve over HTTPS, upgrade, a broken
upgrade that rolls back by itself, rollback, status, uninstall — inside a loopback-only network
namespace when the machine allows one (see frozen_journey.py)."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from installer.freeze.build import build
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

JOURNEY_TIMEOUT_S = 1500


def _can_unshare() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def frozen_exe() -> Path:
    return build(log=lambda msg: print(msg, file=sys.stderr))


def broken_model(model_dir: Path, dest: Path) -> Path:
    """The real model's files with model.safetensors replaced by one whose header is not JSON:
    the bundle is properly signed and installs, but the engine cannot load the weights."""
    dest.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy2(f, dest / f.name)
    header = b'{"corrupt": tru'
    (dest / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 1024)
    return dest


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, model_dir: Path, wheelhouse: Path) -> dict[str, Path]:
    """Three bundles carrying the real wheelhouse, as a vendor ships them: the appliance runs from the
    runtime the installer builds with pip --no-index (once: the three share their wheels)."""
    from airgap_bundle import build_bundle, init_keys
    from policies import default_policy_dir

    work = tmp_path_factory.mktemp("frozen-bundles")
    keys = work / "keys"
    init_keys(keys)
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(days=30)
    made = {"trusted_root": keys / "root.json"}
    models = {"v1": ("0.1.0", model_dir), "v2": ("0.2.0", model_dir),
              "broken": ("0.3.0", broken_model(model_dir, work / "broken" / model_dir.name))}
    for n, (label, (version, model)) in enumerate(models.items(), start=1):
        made[label] = build_bundle(work / f"appliance-{version}.tar", keys, version, expires, model_dir=model,
                                   policies_dir=default_policy_dir(), wheelhouse=wheelhouse, metadata_version=n)
    return made


def _step(seen: dict[str, Any], name: str) -> dict[str, Any]:
    step = next((s for s in seen["steps"] if s["name"] == name), None)
    assert step is not None, f"step {name} did not run; steps: {[s['name'] for s in seen['steps']]}"
    return step


def _ok(seen: dict[str, Any], name: str, rc: int = 0) -> dict[str, Any]:
    step = _step(seen, name)
    assert step["rc"] == rc, f"{name}: expected exit code {rc}, found {step['rc']}\n{step['stdout']}\n{step['stderr']}"
    return step


def test_frozen_installer_journey(frozen_exe: Path, bundles: dict[str, Path], tmp_path: Path) -> None:
    args = [str(frozen_exe), str(bundles["v1"]), str(bundles["v2"]), str(bundles["broken"]),
            str(bundles["trusted_root"]), str(tmp_path)]
    driver = [sys.executable, "-m", "tests.installer.frozen_journey", *args]
    offline = _can_unshare()
    if offline:
        script = "ip link set lo up && exec " + " ".join(driver)
        cmd = ["unshare", "-n", "sh", "-c", script]
    else:
        cmd = driver
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=JOURNEY_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    if offline:
        assert seen["interfaces"] == ["lo"] and seen["no_route_out"] is True

    verify = _ok(seen, "verify")["json"]
    assert verify["ok"] is True
    preflight = _ok(seen, "preflight")["json"]
    assert {c["name"] for c in preflight["checks"]} >= {"python3", "os", "disk", "memory", "gpu", "ansible"}

    install = _ok(seen, "install")["json"]
    assert install["started"] is True and install["version"] == "0.1.0"
    assert any("healthy after" in note for note in install["notes"])
    assert set(install["timings"]) >= {"verify", "unpack", "copy", "runtime", "ansible", "service_start", "total"}
    assert any("built from" in note and "pip --no-index" in note for note in install["notes"]), install["notes"]
    assert seen["health_after_install"]["version"] == "0.1.0"
    assert "Paris" in seen["answer"], seen["answer"]

    upgrade = _ok(seen, "upgrade")["json"]
    assert upgrade["previous"] == "0.1.0" and upgrade["switched"] is True
    assert any("reused" in note for note in upgrade["notes"]), upgrade["notes"]  # same wheels, same runtime
    assert seen["health_after_upgrade"]["version"] == "0.2.0"

    broken = _ok(seen, "upgrade_broken", rc=4)["json"]
    assert broken["error"] == "RolledBack"
    assert "release 0.3.0 failed on local" in broken["message"]
    assert "SafetensorError" in broken["message"]  # why the model did not load, from the appliance log
    assert "rolled back to 0.2.0, which is running again" in broken["message"]
    assert seen["health_after_broken_upgrade"]["version"] == "0.2.0"

    rollback = _ok(seen, "rollback")["json"]
    assert rollback["version"] == "0.1.0" and rollback["previous"] == "0.2.0"
    assert seen["health_after_rollback"]["version"] == "0.1.0"

    status = _ok(seen, "status")["json"]
    assert status["current"] == "0.1.0"
    assert [r["version"] for r in status["releases"]] == ["0.1.0", "0.2.0", "0.3.0"]
    runtimes = {r["runtime"] for r in status["releases"]}
    assert len(runtimes) == 1 and "node" not in runtimes and all(r["runtime_present"] for r in status["releases"])
    assert status["service"]["running"] is True and status["service"]["healthy"] is True
    assert status["last_rollout"]["result"] == "ok"
    actions = [(e["action"], e["result"], e["version"]) for e in _journal(tmp_path)]
    assert actions[:6] == [("install", "ok", "0.1.0"), ("upgrade", "ok", "0.2.0"), ("upgrade", "failed", "0.3.0"),
                           ("auto-rollback", "ok", "0.2.0"), ("rollback", "ok", "0.1.0"), ("uninstall", "ok", "0.1.0")]
    assert "0.1.0" in _ok(seen, "status_table")["stdout"]

    uninstall = _ok(seen, "uninstall")["json"]
    assert uninstall["kept"] == ["data", "journal", "state/trust", "secrets/audit-signing.key"]
    assert isinstance(seen["health_after_uninstall"], str)  # nothing answers any more
    assert "releases" not in " ".join(seen["left_in_root"])
    # the installer journal was imported into the tamper-evident audit log, which still verifies
    assert seen["audit_verify"]["rc"] == 0, seen["audit_verify"]["output"]


def _journal(work: Path) -> list[dict[str, Any]]:
    lines = (work / "root" / "journal" / "installer.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]
