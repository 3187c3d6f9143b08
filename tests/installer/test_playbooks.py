"""The shipped playbooks follow the project's Ansible conventions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from installer.ansible_runner import PLAYBOOK_DIR

ROLES = ["sovereign_common", "sovereign_release", "sovereign_switch", "sovereign_service", "sovereign_rollout",
         "sovereign_runtime"]
TASK_KEYWORDS = {"name", "loop", "loop_control", "register", "when", "notify", "changed_when", "failed_when",
                 "tags", "become", "vars", "args", "ignore_errors", "no_log", "delegate_to"}


def _tasks(path: Path) -> list[dict[str, Any]]:
    data = yaml.safe_load(path.read_text()) or []
    tasks: list[dict[str, Any]] = []
    for item in data:
        tasks.append(item)
        for key in ("tasks", "pre_tasks", "post_tasks", "handlers", "block", "rescue", "always"):
            tasks.extend(item.get(key, []) or [])
    return tasks


def _task_files() -> list[Path]:
    return sorted([*PLAYBOOK_DIR.glob("roles/*/tasks/*.yml"), *PLAYBOOK_DIR.glob("roles/*/handlers/*.yml"),
                   *PLAYBOOK_DIR.glob("*.yml")])


@pytest.mark.parametrize("role", ROLES)
def test_roles_have_the_standard_layout(role: str) -> None:
    for sub in ("defaults", "tasks", "handlers", "templates", "meta"):
        assert (PLAYBOOK_DIR / "roles" / role / sub).is_dir(), f"{role}/{sub}"
    assert (PLAYBOOK_DIR / "roles" / role / "meta" / "main.yml").is_file()
    assert any((PLAYBOOK_DIR / "roles" / role / "templates").iterdir())


@pytest.mark.parametrize("path", _task_files(), ids=lambda p: str(p.relative_to(PLAYBOOK_DIR)))
def test_tasks_are_named_sentences_with_fqcn_modules(path: Path) -> None:
    for task in _tasks(path):
        name = task.get("name", "")
        assert name and name[0].isupper(), f"{path}: task without a sentence name: {task}"
        if "hosts" in task or "block" in task:
            continue
        modules = [k for k in task if k not in TASK_KEYWORDS]
        assert len(modules) == 1, f"{path}: {name}: expected one module, found {modules}"
        module = modules[0]
        if module.startswith("sovereign_"):  # the role's own module, shipped in its library/
            role_dir = path.parents[1]
            assert (role_dir / "library" / f"{module}.py").is_file(), f"{path}: {name}: {module} not in library/"
            continue
        assert module.startswith("ansible.builtin."), f"{path}: {name}: {module} is not FQCN builtin"


def test_role_defaults_are_prefixed() -> None:
    for path in PLAYBOOK_DIR.glob("roles/*/defaults/main.yml"):
        for key in yaml.safe_load(path.read_text()) or {}:
            assert key.startswith("sovereign_"), f"{path}: {key}"


def test_nothing_is_fetched_from_a_network() -> None:
    text = "\n".join(p.read_text() for p in PLAYBOOK_DIR.rglob("*.yml"))
    for module in ("get_url", "uri", "git", "pip", "apt", "yum", "dnf", "unarchive", "package"):
        assert f"ansible.builtin.{module}:" not in text
    assert "http://" not in text and "https://" not in text
