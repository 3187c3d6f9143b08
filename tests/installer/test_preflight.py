from __future__ import annotations

import json
import os
import shutil
import socket
import stat
from pathlib import Path

import pytest

from installer import PreflightConfig, run_preflight
from installer.preflight import FAIL, PASS, WARN, check_disk, check_gpus
from tests.installer.conftest import run_cli

CHECKS = {"python3", "os", "disk", "memory", "gpu", "ansible"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def inventory_with_port(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "inventory.yaml"
    path.write_text(f"gateway: {{port: {port}}}\nnodes:\n  - name: local\n"
                    "    labels: {region: local, site: local, classification: internal}\n")
    return path


def fake_nvidia_smi(directory: Path, output: str, rc: int = 0) -> Path:
    """A stand-in for the NVIDIA driver's tool (no GPU on CI machines): prints what the real
    nvidia-smi prints for the query the preflight makes."""
    directory.mkdir(exist_ok=True)
    script = directory / "nvidia-smi"
    script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{output}\nEOF\nexit {rc}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return directory


def test_preflight_json(tmp_path: Path) -> None:
    inv = inventory_with_port(tmp_path, free_port())
    proc = run_cli("preflight", "--root", str(tmp_path / "root"), "--inventory", str(inv), "--allow-cpu", "--json")
    data = json.loads(proc.stdout)
    names = {c["name"] for c in data["checks"]}
    assert CHECKS <= names and any(n.startswith("port ") for n in names)
    assert all(c["status"] in (PASS, WARN, FAIL) for c in data["checks"])
    assert all(c["fix"] for c in data["checks"] if c["status"] == FAIL)
    assert proc.returncode == (0 if data["ok"] else 1)
    assert not (tmp_path / "root").exists()  # preflight writes nothing


def test_preflight_table(tmp_path: Path) -> None:
    inv = inventory_with_port(tmp_path, free_port())
    proc = run_cli("preflight", "--root", str(tmp_path), "--inventory", str(inv), "--allow-cpu",
                   env={"COLUMNS": "200"})
    assert "Preflight" in proc.stdout and "ansible-core" in proc.stdout


def test_port_in_use_fails(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        inv = inventory_with_port(tmp_path, port)
        proc = run_cli("preflight", "--root", str(tmp_path), "--inventory", str(inv), "--allow-cpu", "--json")
    data = json.loads(proc.stdout)
    check = next(c for c in data["checks"] if c["name"] == f"port {port}")
    assert check["status"] == FAIL and "in use" in check["detail"] and check["fix"]
    assert proc.returncode == 1 and data["ok"] is False


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_no_gpu_fails_unless_allow_cpu(tmp_path: Path) -> None:
    inv = inventory_with_port(tmp_path, free_port())
    proc = run_cli("preflight", "--root", str(tmp_path), "--inventory", str(inv), "--json")
    gpu = next(c for c in json.loads(proc.stdout)["checks"] if c["name"] == "gpu")
    assert gpu["status"] == FAIL and "--allow-cpu" in gpu["fix"]
    assert proc.returncode == 1
    assert check_gpus(PreflightConfig(), allow_cpu=True, expected=None).status == WARN


def test_gpus_from_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = fake_nvidia_smi(tmp_path / "bin", "0, NVIDIA H200, 143771, 565.57.01")
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    check = check_gpus(PreflightConfig(), allow_cpu=False, expected=None)
    assert check.status == PASS and "1 GPU(s): NVIDIA H200 (143771 MiB); driver 565.57.01" == check.detail
    mismatch = check_gpus(PreflightConfig(), allow_cpu=False, expected=2)
    assert mismatch.status == WARN and "inventory expects 2 GPU(s), found 1" in mismatch.detail


def test_broken_driver_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = fake_nvidia_smi(tmp_path / "bin", "NVIDIA-SMI has failed because it couldn't communicate", rc=9)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    check = check_gpus(PreflightConfig(), allow_cpu=False, expected=None)
    assert check.status == FAIL and "couldn't communicate" in check.detail


def test_disk_space_is_sized_from_the_bundle(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    assert check_disk(tmp_path, 1024, PreflightConfig()).status == PASS
    too_big = check_disk(tmp_path / "not" / "yet", free, PreflightConfig())
    assert too_big.status == FAIL and str(tmp_path) in too_big.detail and too_big.fix


def test_report_ok_and_failures(tmp_path: Path) -> None:
    report = run_preflight(tmp_path, allow_cpu=True, cfg=PreflightConfig(min_memory_bytes=1 << 60))
    memory = next(c for c in report.checks if c.name == "memory")
    assert memory.status == FAIL and not report.ok and memory in report.failures


def test_disk_space_counts_the_runtime_of_a_bundle_with_wheels(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    cfg = PreflightConfig(space_margin_bytes=0)
    # fits as a plain bundle, not once its wheels are expanded into a runtime
    assert check_disk(tmp_path, free // 4, cfg).status == PASS
    check = check_disk(tmp_path, free // 4, cfg, wheel_bytes=free // 4)
    assert check.status == FAIL and "GiB free" in check.detail
    ok = check_disk(tmp_path, 1 << 20, cfg, wheel_bytes=1 << 20)
    assert ok.status == PASS and "runtime 5 x" in ok.detail


def test_venv_check(tmp_path: Path) -> None:
    import sys

    from installer.preflight import check_venv

    assert check_venv(sys.executable, wheels=True).status == PASS
    # a python3 without venv/ensurepip (as Debian's python3 without python3-venv)
    fake = tmp_path / "python3"
    fake.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'ensurepip'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    failed = check_venv(str(fake), wheels=True)
    assert failed.status == FAIL and "ensurepip" in failed.detail and "python3-venv" in failed.fix
    assert check_venv(str(fake), wheels=False).status == WARN
