"""ansible-lint, production profile, on the shipped playbooks and roles (offline)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from installer.ansible_runner import PLAYBOOK_DIR

pytestmark = pytest.mark.slow


def test_playbooks_pass_ansible_lint_production_profile(tmp_path: Path) -> None:
    pytest.importorskip("ansiblelint", reason="ansible-lint is in the test extra")
    playbooks = sorted(p.name for p in PLAYBOOK_DIR.glob("*.yml"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update({"XDG_CACHE_HOME": str(tmp_path / "cache"), "NO_COLOR": "1", "ANSIBLE_HOME": str(tmp_path / "ah"),
                "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp")})
    proc = subprocess.run([sys.executable, "-m", "ansiblelint", "--profile", "production", "--offline", "--nocolor",
                           *playbooks, "roles"], cwd=PLAYBOOK_DIR, env=env, capture_output=True, text=True,
                          timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "Profile 'production' was required, and it passed" in output
    assert "0 failure(s), 0 warning(s)" in output
