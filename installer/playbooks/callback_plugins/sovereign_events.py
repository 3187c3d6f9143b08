# Stdout callback for sovereign-installer: one machine-readable line per playbook event, which
# the installer parses to drive its progress display, count changes and report failures.
# Each line is EVENT_PREFIX followed by a JSON object with an "event" key.
from __future__ import annotations

import json
import sys
import time
from typing import Any

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
    name: sovereign_events
    type: stdout
    short_description: JSON-lines events for sovereign-installer
    description:
        - Prints one JSON object per playbook event, prefixed so other output can be told apart.
"""

EVENT_PREFIX = "@@sovereign-event "
_MAX_MSG = 2000
SERVICE_MARK = '{"sovereign_service"'
RUNTIME_MARK = '{"sovereign_runtime"'


def _service_report(result: dict[str, Any], mark: str = SERVICE_MARK) -> dict[str, Any] | None:
    """The JSON report of the node's appliance supervisor (appliancectl) or runtime builder
    (runtimectl, ``mark`` RUNTIME_MARK), when the task ran it."""
    stdout = result.get("stdout")
    if not isinstance(stdout, str) or not stdout.startswith(mark):
        return None
    try:
        report = json.loads(stdout.splitlines()[0])
    except ValueError:
        return None
    return report if isinstance(report, dict) else None


def _message(result: dict[str, Any]) -> str:
    parts = []
    for key in ("msg", "stderr", "module_stderr", "exception"):
        value = result.get(key)
        if value and str(value).strip() != "(traceback unavailable)":
            parts.append(str(value))
    for item in result.get("results", []) or []:
        if isinstance(item, dict) and item.get("failed"):
            parts.append(_message(item))
    return "\n".join(parts)[:_MAX_MSG]


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "stdout"
    CALLBACK_NAME = "sovereign_events"

    def _emit(self, **event: Any) -> None:
        sys.stdout.write(EVENT_PREFIX + json.dumps(event, default=str) + "\n")
        sys.stdout.flush()

    _task_started = 0.0

    def _result(self, kind: str, result: Any) -> None:
        data = dict(result.result)
        event: dict[str, Any] = {
            "event": kind,
            "host": result.host.get_name(),
            "task": result.task.get_name(),
            "action": result.task.action,
            "changed": bool(data.get("changed", False)),
            "msg": _message(data) if kind in ("failed", "unreachable") else "",
            # since the task started (for a loop: all items so far on all hosts)
            "duration_s": round(time.monotonic() - self._task_started, 3),
        }
        service = _service_report(data)
        if service is not None:
            event["service"] = service
        # a looped task (one supervisor call per service of the node): every item's report
        items = [_service_report(item) for item in data.get("results", []) or [] if isinstance(item, dict)]
        if any(items):
            event["services"] = [item for item in items if item is not None]
        runtime = _service_report(data, RUNTIME_MARK)
        if runtime is not None:
            event["runtime"] = runtime
        # the sovereign_firewall role's set_fact: enforced or not, and why
        firewall = (data.get("ansible_facts") or {}).get("sovereign_firewall_report")
        if isinstance(firewall, dict):
            event["firewall"] = firewall
        self._emit(**event)

    def v2_playbook_on_play_start(self, play: Any) -> None:
        self._emit(event="play_start", name=play.get_name())

    def v2_playbook_on_task_start(self, task: Any, is_conditional: bool) -> None:
        self._task_started = time.monotonic()
        self._emit(event="task_start", task=task.get_name())

    def v2_playbook_on_handler_task_start(self, task: Any) -> None:
        self._task_started = time.monotonic()
        self._emit(event="task_start", task=task.get_name(), handler=True)

    def v2_runner_on_ok(self, result: Any) -> None:
        self._result("ok", result)

    def v2_runner_on_failed(self, result: Any, ignore_errors: bool = False) -> None:
        self._result("ignored" if ignore_errors else "failed", result)

    def v2_runner_on_skipped(self, result: Any) -> None:
        self._result("skipped", result)

    def v2_runner_on_unreachable(self, result: Any) -> None:
        self._result("unreachable", result)

    def v2_playbook_on_stats(self, stats: Any) -> None:
        hosts = {}
        for host in sorted(stats.processed):
            hosts[host] = stats.summarize(host)
        self._emit(event="stats", hosts=hosts)
