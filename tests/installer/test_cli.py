from __future__ import annotations

from pathlib import Path

from installer.ansible_runner import PLAYBOOK_DIR, ansible_env
from tests.installer.conftest import run_cli


def test_frozen_subcommand_runs_ansible_playbook_in_process() -> None:
    proc = run_cli("__ansible-playbook", "--version")
    assert proc.returncode == 0, proc.stderr
    assert "ansible-playbook [core 2." in proc.stdout


def test_ansible_env_is_built_from_scratch(tmp_path: Path) -> None:
    env = ansible_env(tmp_path, base={"PATH": "/usr/bin", "LANG": "C", "ANSIBLE_CALLBACK_PLUGINS": "/evil",
                                      "ANSIBLE_BECOME_PASS": "x"})
    assert env["LC_ALL"] == "C.UTF-8"
    assert env["ANSIBLE_CALLBACK_PLUGINS"] == str(PLAYBOOK_DIR / "callback_plugins")
    assert "ANSIBLE_BECOME_PASS" not in env
    assert env["ANSIBLE_CONFIG"] == str(PLAYBOOK_DIR / "ansible.cfg")
    assert env["ANSIBLE_LOCAL_TEMP"].startswith(str(tmp_path))
    assert env["ANSIBLE_RETRY_FILES_ENABLED"] == "False"
    assert "LC_ALL" not in ansible_env(tmp_path, base={"LANG": "en_US.UTF-8"})


def test_help_and_usage_errors() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    for command in ("preflight", "verify", "install", "upgrade", "rollback", "start", "stop", "restart", "status",
                    "uninstall"):
        assert command in proc.stdout
    assert run_cli("frobnicate").returncode == 2


def test_status_of_an_empty_root(tmp_path: Path) -> None:
    proc = run_cli("status", "--root", str(tmp_path / "nothing"), "--json")
    assert proc.returncode == 0
    assert '"installed": false' in proc.stdout


def test_verify_command_writes_nothing(tmp_path: Path, bundle_v1: Path, trusted_root: Path) -> None:
    root = tmp_path / "root"
    proc = run_cli("verify", "--bundle", str(bundle_v1), "--trusted-root", str(trusted_root), "--root", str(root),
                   "--json")
    assert proc.returncode == 0, proc.stderr
    assert '"ok": true' in proc.stdout
    assert not root.exists()
