"""Running the shipped playbooks with ansible-core, in a child of our own interpreter.

The child is ``python -c CHILD_CODE`` (or the frozen executable with the hidden
``__ansible-playbook`` argument), which runs ansible's CLI entry point in-process: no
``ansible-playbook`` executable is needed. The environment is built from scratch for ansible:
inherited ANSIBLE_* variables are dropped, the shipped ansible.cfg is named, temp and home
directories live under the run's work directory (inside ROOT), the locale is UTF-8, and the
``sovereign_events`` stdout callback reports every task as a JSON line that we parse.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from installer.ansible_entry import CHILD_CODE, FROZEN_SUBCOMMAND
from installer.frozen import is_frozen, restore_loader_path

PLAYBOOK_DIR = Path(__file__).resolve().parent / "playbooks"
EVENT_PREFIX = "@@sovereign-event "
DEFAULT_TIMEOUT_S = 3600.0

EventHandler = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class TaskFailure:
    host: str
    task: str
    msg: str

    def __str__(self) -> str:
        return f"task '{self.task}' failed on {self.host}: {self.msg}"


@dataclass
class PlaybookResult:
    """What one ansible-playbook run did. ``hosts`` is ansible's per-host recap
    (ok, changed, failures, unreachable, skipped, rescued, ignored)."""

    playbook: str
    rc: int
    hosts: dict[str, dict[str, int]] = field(default_factory=dict)
    failures: list[TaskFailure] = field(default_factory=list)
    changed_tasks: list[str] = field(default_factory=list)
    output: list[str] = field(default_factory=list)
    stderr: str = ""
    timed_out: bool = False
    # reports of the node's appliance supervisor: {"host", "task", **report}
    service_reports: list[dict[str, Any]] = field(default_factory=list)
    # reports of the node's runtime builder (runtimectl): {"host", "task", **report}
    runtime_reports: list[dict[str, Any]] = field(default_factory=list)
    # reports of the egress firewall role: {"host", "task", "node", "mode", "enforced", "file", "reason"}
    firewall_reports: list[dict[str, Any]] = field(default_factory=list)
    # (host, task, seconds) for every finished task
    task_times: list[tuple[str, str, float]] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.failures and not self.timed_out

    @property
    def changed(self) -> int:
        return sum(h.get("changed", 0) for h in self.hosts.values())

    def summary(self) -> str:
        if self.ok:
            return f"{self.playbook}: ok, {self.changed} changed"
        if self.timed_out:
            return f"{self.playbook}: expected to finish, found it still running at the timeout"
        if self.failures:
            return "; ".join(str(f) for f in self.failures)
        lines = [ln for ln in (self.stderr.splitlines() or self.output) if ln.strip()]
        errors = [ln for ln in lines if ln.lstrip().startswith(("ERROR", "[ERROR]"))]
        tail = " | ".join(ln.strip() for ln in (errors or lines)[-3:])[-1500:]
        return f"{self.playbook}: expected exit code 0, found {self.rc}: {tail or 'no output'}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "playbook": self.playbook, "rc": self.rc, "ok": self.ok, "changed": self.changed,
            "hosts": self.hosts, "changed_tasks": self.changed_tasks,
            "failures": [{"host": f.host, "task": f.task, "msg": f.msg} for f in self.failures],
            "service": self.service_reports, "runtime": self.runtime_reports,
            "firewall": self.firewall_reports, "wall_s": round(self.wall_s, 3),
            "task_times": [{"host": h, "task": t, "s": s} for h, t, s in self.task_times],
        }

    def seconds_in(self, *task_names: str) -> float:
        """Time spent in the named tasks, summed over hosts."""
        return sum(t for _h, name, t in self.task_times if any(task_is(name, n) for n in task_names))


def task_is(name: str, wanted: str) -> bool:
    """Whether ansible's task name ``name`` ("role : Task name" inside a role) is ``wanted``."""
    return name == wanted or name.endswith(f" : {wanted}")


def child_command() -> list[str]:
    if is_frozen():
        return [sys.executable, FROZEN_SUBCOMMAND]
    return [sys.executable, "-c", CHILD_CODE]


def _utf8_locale(env: dict[str, str]) -> bool:
    for var in ("LC_ALL", "LC_CTYPE", "LANG"):
        value = env.get(var)
        if value:
            return "utf-8" in value.lower() or "utf8" in value.lower()
    return False


def ansible_env(work_dir: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: ours, minus any inherited ANSIBLE_*, plus fixed settings."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("ANSIBLE_")}
    restore_loader_path(env)  # frozen: node python3 and ssh must not load our bundled libraries
    if not _utf8_locale(env):
        env["LC_ALL"] = "C.UTF-8"  # ansible refuses to start under a non-UTF-8 locale
    env.update({
        "ANSIBLE_CONFIG": str(PLAYBOOK_DIR / "ansible.cfg"),
        "ANSIBLE_HOME": str(work_dir / "ansible-home"),
        "ANSIBLE_LOCAL_TEMP": str(work_dir / "local-tmp"),
        "ANSIBLE_ROLES_PATH": str(PLAYBOOK_DIR / "roles"),
        "ANSIBLE_CALLBACK_PLUGINS": str(PLAYBOOK_DIR / "callback_plugins"),
        "ANSIBLE_STDOUT_CALLBACK": "sovereign_events",
        "ANSIBLE_COLLECTIONS_PATH": str(work_dir / "collections"),
        "ANSIBLE_COLLECTIONS_SCAN_SYS_PATH": "False",
        "ANSIBLE_INVENTORY_ENABLED": "yaml",
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        "ANSIBLE_NOCOLOR": "True",
        "ANSIBLE_LOCALHOST_WARNING": "False",
        "ANSIBLE_GATHERING": "explicit",
        "PYTHONUNBUFFERED": "1",
    })
    return env


STOP_GRACE_S = 10.0


def run_playbook(
    playbook: str,
    *,
    inventory: dict[str, Any],
    extra_vars: dict[str, Any],
    work_dir: Path,
    on_event: EventHandler | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> PlaybookResult:
    """Run ``playbooks/<playbook>`` against ``inventory`` with ``extra_vars``; never raises for
    a failed play (the result says what failed)."""
    work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    inv_file = work_dir / "inventory.json"
    vars_file = work_dir / "vars.json"
    inv_file.write_text(json.dumps(inventory, indent=1))
    vars_file.write_text(json.dumps(extra_vars, indent=1))
    argv = [*child_command(), "-i", str(inv_file), "-e", f"@{vars_file}", str(PLAYBOOK_DIR / playbook)]
    result = PlaybookResult(playbook=playbook, rc=-1)
    started = time.monotonic()
    stderr_path = work_dir / "ansible.stderr"
    with stderr_path.open("w+") as stderr:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL,
                                env=ansible_env(work_dir), cwd=work_dir, text=True, encoding="utf-8",
                                errors="replace", start_new_session=True)
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            _signal_group(proc, signal.SIGKILL)

        timer = threading.Timer(timeout_s, kill)
        timer.start()
        try:
            for line in proc.stdout or ():
                _take_line(line.rstrip("\n"), result, on_event)
            result.rc = proc.wait()
        finally:
            timer.cancel()
            _stop_group(proc)
        result.timed_out = timed_out.is_set()
        result.wall_s = time.monotonic() - started
        stderr.seek(0)
        result.stderr = stderr.read()[-20000:]
    return result


def _signal_group(proc: subprocess.Popen[str], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop_group(proc: subprocess.Popen[str]) -> None:
    """ansible-playbook runs in its own process group (its forked workers included): when the
    installer stops early (Ctrl-C, SIGTERM, timeout) the whole group gets SIGTERM, then SIGKILL
    after STOP_GRACE_S, so no worker goes on writing into a release or a staging directory."""
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(proc, signal.SIGKILL)  # workers left behind by an ansible that did exit
    proc.wait()


def _take_line(line: str, result: PlaybookResult, on_event: EventHandler | None) -> None:
    if not line.startswith(EVENT_PREFIX):
        if line.strip():
            result.output.append(line)
        return
    try:
        event = json.loads(line[len(EVENT_PREFIX):])
    except ValueError:
        result.output.append(line)
        return
    kind = event.get("event")
    if kind in ("ok", "failed", "unreachable", "skipped", "ignored") and "duration_s" in event:
        result.task_times.append((str(event.get("host", "?")), str(event.get("task", "?")),
                                  float(event["duration_s"])))
    services = [event["service"]] if isinstance(event.get("service"), dict) else []
    services += [s for s in event.get("services") or [] if isinstance(s, dict)]
    for service in services:
        result.service_reports.append({"host": event.get("host"), "task": event.get("task"), **service})
    if isinstance(event.get("runtime"), dict):
        result.runtime_reports.append({"host": event.get("host"), "task": event.get("task"), **event["runtime"]})
    if isinstance(event.get("firewall"), dict):
        result.firewall_reports.append({"host": event.get("host"), "task": event.get("task"), **event["firewall"]})
    if kind in ("failed", "unreachable"):
        result.failures.append(TaskFailure(event.get("host", "?"), event.get("task", "?"), event.get("msg", "")))
    elif kind == "ok" and event.get("changed"):
        result.changed_tasks.append(f"{event.get('host')}: {event.get('task')}")
    elif kind == "stats":
        result.hosts = event.get("hosts", {})
    if on_event is not None:
        on_event(event)
