"""Prove the appliance needs no network once the bundle is built: install and serve inside a
network namespace whose only interface is loopback (`unshare -n`, then `ip link set lo up`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.appliance.support import VendorBundle
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def _can_unshare() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs unshare -n (root or user namespaces) and iproute2")
def test_install_and_serve_with_loopback_only(tmp_path: Path, vendor_bundle: VendorBundle) -> None:
    script = (
        "ip link set lo up && exec " + sys.executable + " -m tests.appliance.offline_session "
        f"{vendor_bundle.bundle} {vendor_bundle.trusted_root} {tmp_path / 'root'}"
    )
    proc = subprocess.run(["unshare", "-n", "sh", "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["interfaces"] == ["lo"]
    assert seen["no_route_out"] is True
    assert "Paris" in seen["answer"]
    assert seen["server_exit"] == 0
    assert seen["audit_verify_exit"] == 0
