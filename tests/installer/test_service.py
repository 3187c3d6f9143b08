"""The node supervisor (appliancectl), the systemd unit, start/stop/restart and uninstall.

The supervisor's failure paths are driven with stand-in `appliance` scripts: a real appliance
cannot be made to ignore SIGTERM or to die on cue. Everything a user meets for real (starting,
health-checking, upgrading and rolling back the real appliance) is in test_frozen.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from installer.ansible_runner import run_playbook
from installer.freeze.contents import heavy_modules_loaded
from installer.frozen import restore_loader_path
from installer.status import CTL_SCRIPT
from tests.installer.conftest import run_cli


def ctl(*args: str, timeout: float = 60) -> tuple[int, dict[str, Any]]:
    proc = subprocess.run([sys.executable, str(CTL_SCRIPT), *args], capture_output=True, text=True, timeout=timeout)
    assert proc.stdout.startswith('{"sovereign_service"'), proc.stdout + proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def fake_appliance(directory: Path, body: str) -> Path:
    """An executable named `appliance` that runs ``body`` (python) when started as `appliance serve ...`."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "appliance"
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    script.chmod(0o755)
    return script


def test_start_reports_why_the_appliance_died(tmp_path: Path) -> None:
    root = tmp_path / "root"
    exe = fake_appliance(tmp_path / "bin", """
        import sys
        print("loading model from /models/x", flush=True)
        print("Traceback (most recent call last):\\n  File 'loader.py', line 1\\n"
              "safetensors.SafetensorError: invalid JSON in header", flush=True)
        sys.exit(3)
    """)
    rc, out = ctl("start", "--root", str(root), "--exe", str(exe), "--port", "1", "--expect-version", "9.9",
                  "--timeout", "30")
    assert rc == 1 and out["sovereign_service"] == "failed"
    assert "exited with code 3 before it was healthy" in out["message"]
    assert "safetensors.SafetensorError: invalid JSON in header" in out["message"]
    assert str(root / "logs" / "appliance.log") in out["message"]
    assert not (root / "run" / "appliance.pid").exists()
    log = (root / "logs" / "appliance.log").read_text()
    assert f"appliancectl start: {exe} serve --root {root} --host 127.0.0.1 --port 1" in log
    assert "loading model" in log


def test_start_refuses_a_missing_appliance_script(tmp_path: Path) -> None:
    rc, out = ctl("start", "--root", str(tmp_path), "--exe", str(tmp_path / "nope" / "appliance"), "--port", "1")
    assert rc == 1
    assert f"expected the appliance console script at {tmp_path / 'nope' / 'appliance'}" in out["message"]


def _spawn(exe: Path, root: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([str(exe), "serve", "--root", str(root), "--port", "1"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (root / "run").mkdir(parents=True, exist_ok=True)
    (root / "run" / "appliance.pid").write_text(f"{proc.pid}\n")
    time.sleep(0.5)  # let it install its signal handler
    return proc


def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    root = tmp_path / "root"
    exe = fake_appliance(tmp_path / "bin", """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            time.sleep(1)
    """)
    proc = _spawn(exe, root)
    try:
        rc, out = ctl("stop", "--root", str(root), "--timeout", "1")
        assert rc == 0 and out["killed"] is True and out["pid"] == proc.pid
        assert "did not stop within 1 s of SIGTERM: sent SIGKILL" in out["message"]
        assert proc.wait(timeout=10) == -signal.SIGKILL
        assert not (root / "run" / "appliance.pid").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_stop_sigterm_is_enough_for_a_well_behaved_appliance(tmp_path: Path) -> None:
    root = tmp_path / "root"
    exe = fake_appliance(tmp_path / "bin", """
        import time
        while True:
            time.sleep(1)
    """)
    proc = _spawn(exe, root)
    try:
        rc, out = ctl("stop", "--root", str(root), "--timeout", "20")
        assert rc == 0 and out["killed"] is False and "after SIGTERM" in out["message"]
        assert proc.wait(timeout=10) == -signal.SIGTERM
        rc, out = ctl("stop", "--root", str(root))
        assert rc == 0 and out["changed"] is False and out["message"] == "not running"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_recycled_pid_is_never_signalled(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "run").mkdir(parents=True)
    other = subprocess.Popen(["sleep", "30"])
    try:
        (root / "run" / "appliance.pid").write_text(f"{other.pid}\n")
        rc, out = ctl("stop", "--root", str(root), "--timeout", "1")
        assert rc == 0 and "removed a stale pidfile" in out["message"]
        assert other.poll() is None  # still running: not ours
        rc, out = ctl("status", "--root", str(root))
        assert rc == 0 and out["running"] is False
    finally:
        other.kill()
        other.wait()


def test_loader_path_of_a_frozen_installer_is_restored() -> None:
    env = {"LD_LIBRARY_PATH": "/tmp/_MEI123:/opt/cuda/lib64", "LD_LIBRARY_PATH_ORIG": "/opt/cuda/lib64"}
    restore_loader_path(env, "/tmp/_MEI123")
    assert env == {"LD_LIBRARY_PATH": "/opt/cuda/lib64"}
    env = {"LD_LIBRARY_PATH": "/tmp/_MEI123"}  # the admin had none: it goes away
    restore_loader_path(env, "/tmp/_MEI123")
    assert env == {}
    env = {"LD_LIBRARY_PATH": "/opt/x"}  # not frozen: untouched
    restore_loader_path(env, None)
    assert env == {"LD_LIBRARY_PATH": "/opt/x"}


def test_the_installer_never_imports_what_the_executable_leaves_out() -> None:
    assert heavy_modules_loaded() == []


@pytest.mark.slow
def test_systemd_unit_is_rendered(tmp_path: Path) -> None:
    """Where systemd is PID 1 the role writes this unit (rendered here, not started)."""
    playbook = tmp_path / "render_unit.yml"  # outside the shipped playbooks; roles come from ANSIBLE_ROLES_PATH
    playbook.write_text(
        "- name: Render the unit\n  hosts: sovereign_nodes\n  gather_facts: false\n  tasks:\n"
        "    - name: Render the systemd unit of the appliance\n      ansible.builtin.include_role:\n"
        "        name: sovereign_service\n        tasks_from: unit\n")
    inventory = {"sovereign_nodes": {"hosts": {"local": {
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable,
        "ansible_remote_tmp": str(tmp_path / "remote-tmp")}}}}
    result = run_playbook(str(playbook), inventory=inventory, work_dir=tmp_path / "ansible", extra_vars={
        "sovereign_root": "/opt/sovereign", "sovereign_service_exe": "/opt/sovereign/venv/bin/appliance",
        "sovereign_service_unit_dir": str(tmp_path), "sovereign_service_user": "sovereign",
        "sovereign_service_group": "sovereign", "sovereign_service_stop_timeout_s": 45})
    # the unit is written; the daemon-reload handler fails here (no systemd) and is expected to
    assert any(t.endswith("Write the systemd unit of the appliance") for t in result.changed_tasks), result.summary()
    unit = (tmp_path / "sovereign-appliance.service").read_text()
    lines = set(unit.splitlines())
    # appliancectl exec picks the release's runtime (current/release.json), else the node's appliance
    assert (f"ExecStart={sys.executable} /opt/sovereign/bin/appliancectl exec --root /opt/sovereign "
            "--exe /opt/sovereign/venv/bin/appliance") in lines
    assert {"User=sovereign", "Group=sovereign", "TimeoutStopSec=45", "KillSignal=SIGTERM", "Restart=on-failure",
            "Environment=HF_HUB_OFFLINE=1", "NoNewPrivileges=true", "WantedBy=multi-user.target",
            "StandardOutput=append:/opt/sovereign/logs/appliance.log"} <= lines
    assert "ReadWritePaths=/opt/sovereign/data /opt/sovereign/tls /opt/sovereign/secrets" in unit


def test_service_commands_need_an_installed_root(tmp_path: Path) -> None:
    for action in ("start", "restart"):
        proc = run_cli(action, "--root", str(tmp_path / "absent"))
        assert proc.returncode == 2 and "expected an appliance root" in " ".join(proc.stderr.split())
    (tmp_path / "empty").mkdir()
    proc = run_cli("start", "--root", str(tmp_path / "empty"), "--json")
    assert proc.returncode == 2 and json.loads(proc.stdout)["error"] == "NotInstalledError"


@pytest.mark.slow
def test_uninstall_keeps_audit_data_unless_purged_twice(tmp_path: Path, bundle_v1: Path, trusted_root: Path) -> None:
    root = tmp_path / "root"
    proc = run_cli("install", "--bundle", str(bundle_v1), "--trusted-root", str(trusted_root), "--root", str(root),
                   "--skip-preflight", "--no-start")
    assert proc.returncode == 0, proc.stderr
    # what a running appliance leaves behind
    (root / "data" / "appliance.db").write_bytes(b"audit records")
    for name in ("audit-signing.key", "admin.token", "cache-salt.key"):
        (root / "secrets" / name).write_text("secret\n")
    (root / "tls" / "server.key").write_text("key\n")
    (root / "logs" / "appliance.log").write_text("log\n")

    proc = run_cli("uninstall", "--root", str(root), "--purge-audit", "--json")
    assert proc.returncode == 2 and "expected it twice" in json.loads(proc.stdout)["message"]
    assert (root / "current").is_symlink()  # nothing removed

    proc = run_cli("uninstall", "--root", str(root), "--json")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    out = json.loads(proc.stdout)
    assert out["kept"] == ["data", "journal", "state/trust", "secrets/audit-signing.key"] and not out["purged"]
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert left == [".installer.lock", "data/appliance.db", "journal/installer.jsonl", "secrets/audit-signing.key",
                    "state/trust/root.json", "state/trust/trusted_state.json"]
    last = json.loads((root / "journal" / "installer.jsonl").read_text().splitlines()[-1])
    assert (last["action"], last["result"], last["version"]) == ("uninstall", "ok", "0.1.0")

    proc = run_cli("uninstall", "--root", str(root), "--purge-audit", "--purge-audit")
    assert proc.returncode == 0, proc.stderr
    assert not root.exists() and "audit data included" in proc.stdout
    assert os.path.isdir(tmp_path)
