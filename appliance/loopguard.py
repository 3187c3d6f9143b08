"""Watch that nothing blocks the gateway's event loop while it serves.

One blocked callback stalls every stream of every tenant, so the gateway keeps database work in
worker threads (the audit log's writer, the usage flusher, key lookups, admin routes) and awaits it.
Two checks prove it, both switched on by ``SOVEREIGN_LOOP_GUARD=1`` (tests and the benchmark use
them; they cost a little per statement, so production leaves them off):

- **database calls on the loop**: an SQLAlchemy ``before_cursor_execute`` listener notes every
  statement run from the thread of a running event loop, with the code that ran it; the count is
  ``gateway_loop_db_calls_total`` and each one is logged (``appliance.loopguard``, level ERROR:
  "database call on the event loop");
- **slow callbacks**: asyncio's debug mode with ``slow_callback_duration`` at
  ``SOVEREIGN_SLOW_CALLBACK_MS`` (default 10) logs every callback that held the loop longer
  ("Executing <Handle ...> took 0.012 seconds", logger ``asyncio``). That one measures wall time, so
  a loaded machine can show one that only waited for a core; the benchmark reports them, a test
  should not count them.

Startup and shutdown run on the loop before and after serving (they open the database, write the
start and stop records): the guard is armed after ``Runtime.start`` and disarmed at ``stop``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import traceback
from typing import Any

import sqlalchemy as sa

log = logging.getLogger("appliance.loopguard")
ENV = "SOVEREIGN_LOOP_GUARD"
SLOW_ENV = "SOVEREIGN_SLOW_CALLBACK_MS"


def enabled() -> bool:
    return os.environ.get(ENV, "") == "1"


class LoopGuard:
    def __init__(self, engines: list[sa.Engine], on_violation: Any = None) -> None:
        self._engines = list({id(e): e for e in engines}.values())
        self._on_violation = on_violation
        self._loop_thread: int | None = None
        self.violations = 0
        self._lock = threading.Lock()
        for engine in self._engines:
            sa.event.listen(engine, "before_cursor_execute", self._before_execute)

    def arm(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop_thread = threading.get_ident()
        slow_ms = float(os.environ.get(SLOW_ENV, "10") or 10)
        loop.set_debug(True)
        loop.slow_callback_duration = slow_ms / 1000.0
        logging.getLogger("asyncio").setLevel(logging.WARNING)
        log.warning("loop guard armed: database calls on the event loop are reported, and callbacks over %.0f ms",
                    slow_ms)

    def disarm(self) -> None:
        self._loop_thread = None

    def close(self) -> None:
        self.disarm()
        for engine in self._engines:
            if sa.event.contains(engine, "before_cursor_execute", self._before_execute):
                sa.event.remove(engine, "before_cursor_execute", self._before_execute)

    def _before_execute(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if self._loop_thread is None or threading.get_ident() != self._loop_thread:
            return
        with self._lock:
            self.violations += 1
        where = "".join(traceback.format_stack(limit=14)[:-2])
        log.error("database call on the event loop: %s\n%s", " ".join(statement.split())[:120], where)
        if self._on_violation is not None:
            self._on_violation()
