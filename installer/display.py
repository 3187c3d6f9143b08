"""Rich progress for long work: byte progress (verify, unpack) and playbook task progress.
With no console everything here is silent."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)


class ByteProgress:
    """An airgap_bundle ProgressSink drawn as a rich progress bar with bytes/s."""

    def __init__(self, console: Console | None) -> None:
        self.console = console
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def begin(self, label: str, total_bytes: int) -> None:
        if self.console is None:
            return
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                  TransferSpeedColumn(), console=self.console, transient=True,
                                  disable=not self.console.is_terminal)
        self._progress.start()
        self._task = self._progress.add_task(label, total=max(total_bytes, 1))

    def advance(self, nbytes: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, nbytes)

    def end(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        self._progress = None
        self._task = None


@contextmanager
def playbook_progress(console: Console | None, title: str) -> Iterator[Any]:
    """Yields an event handler for run_playbook that shows the running task and counts."""
    if console is None:
        yield None
        return
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TextColumn("{task.fields[counts]}"),
                        TimeElapsedColumn(), console=console, transient=True,
                        disable=not console.is_terminal)
    task = progress.add_task(title, total=None, counts="")
    counts = {"tasks": 0, "changed": 0, "failed": 0}

    def on_event(event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "task_start":
            counts["tasks"] += 1
            progress.update(task, description=f"{title}: {event.get('task', '')}")
        elif kind == "ok" and event.get("changed"):
            counts["changed"] += 1
        elif kind in ("failed", "unreachable"):
            counts["failed"] += 1
            console.print(f"[red]failed[/red] {event.get('host')}: {event.get('task')}: {event.get('msg', '')}")
        progress.update(task, counts=f"{counts['tasks']} tasks, {counts['changed']} changed")

    with progress:
        yield on_event
    console.print(f"{title}: {counts['tasks']} tasks, {counts['changed']} changed, {counts['failed']} failed")
