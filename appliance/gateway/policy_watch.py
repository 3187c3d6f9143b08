"""Hot reload: a running gateway takes up policy files changed under it, validated, without restart.

Every ``WATCH_INTERVAL_S`` a worker thread reads the files of the set in force (the release's
policy files with the applied ones, DATA_DIR/policies, laid over them: ``policies.effective``) and
compares their digest with the set the gateway holds (a few small files: cheap). When they differ
it takes the data directory's policy lock (``policy_audit.policy_lock``, held by every writer while
it writes and records), reads the files again and validates them. A valid set is recorded unless
already recorded (an apply records ``admin.policy_applied``; a change by other means, say an editor
or a configuration tool, becomes ``admin.policy_changed``, once for all processes on the data
directory) and swapped in on the event loop with ``Runtime.replace_policies``. An invalid set is
logged once with every problem, and the running policy stays in force.

This is how every gateway worker of one install takes up an apply that one of them answered. The
watch runs for the gateway's lifespan (the policy router's lifespan, nested in the app's: it starts
after the runtime and stops before it); ``app.state.policy_watch_interval_s`` sets its interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI

from appliance.policy_audit import policy_lock, record_policy_reload
from policies import PolicySet, load_policy_files
from policies.effective import applied_policy_dir, origin_of, read_in_force
from policies.errors import PolicyError, PolicyValidationError
from policies.loader import policy_digest

log = logging.getLogger(__name__)
WATCH_INTERVAL_S = 5.0
_LOCK = "policy_apply_lock"


def apply_lock(app: FastAPI) -> asyncio.Lock:
    """The process's lock around a policy swap (an apply and the watch never interleave)."""
    lock: asyncio.Lock | None = getattr(app.state, _LOCK, None)
    if lock is None:
        lock = asyncio.Lock()
        setattr(app.state, _LOCK, lock)
    return lock


class PolicyWatcher:
    def __init__(self, runtime: Any, interval_s: float = WATCH_INTERVAL_S) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s: expected > 0, found {interval_s}")
        self.runtime = runtime
        self.interval_s = interval_s
        self._reported: str | None = None  # the digest of an unusable set already logged

    def changed(self) -> PolicySet | None:
        """In a worker thread: the valid set on disk when it differs from the one in force (recorded)."""
        release, data_dir = self.runtime.config.policies_dir, self.runtime.config.data_dir
        applied = applied_policy_dir(data_dir)
        try:
            if policy_digest(read_in_force(release, applied)) == self.runtime.policies.digest:
                return None
            with policy_lock(data_dir):
                files = read_in_force(release, applied)
                digest = policy_digest(files)
                current: PolicySet = self.runtime.policies
                if digest == current.digest:
                    return None
                new = load_policy_files(files, origin_of(release, applied))
                record_policy_reload(self.runtime.audit, current, new, data_dir, self.runtime.run_id)
                return new
        except (PolicyError, OSError) as exc:
            digest_now = self._digest_or_error(release, applied)
            if digest_now != self._reported:
                self._reported = digest_now
                detail = "\n  ".join(p.located() for p in exc.problems) if isinstance(
                    exc, PolicyValidationError) else str(exc)
                log.error("policy files in %s and %s changed but cannot be used; the policy in force stays (%s):"
                          "\n  %s", release, applied, self.runtime.policies.digest, detail)
            return None

    @staticmethod
    def _digest_or_error(release: Any, applied: Any) -> str:
        try:
            return policy_digest(read_in_force(release, applied))
        except (PolicyError, OSError) as exc:
            return f"error: {exc}"

    async def check(self, app: FastAPI) -> bool:
        """One look; True when a new set was put in force."""
        async with apply_lock(app):
            new = await asyncio.to_thread(self.changed)
            if new is None:
                return False
            old = self.runtime.replace_policies(new)
        log.warning("policy reloaded from %s and %s: %s -> %s", self.runtime.config.policies_dir,
                    applied_policy_dir(self.runtime.config.data_dir), old.digest, new.digest)
        return True

    async def run(self, app: FastAPI) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check(app)
            except Exception:  # the watch must outlive one failed look (an audit outage, say)
                log.exception("policy watch failed; next look in %.0f s", self.interval_s)


@contextlib.asynccontextmanager
async def watch_policies(app: FastAPI) -> AsyncIterator[None]:
    """Lifespan of the policy router: the watch runs while the gateway serves."""
    runtime = getattr(app.state, "runtime", None)
    if runtime is None:
        yield
        return
    watcher = PolicyWatcher(runtime, getattr(app.state, "policy_watch_interval_s", WATCH_INTERVAL_S))
    task = asyncio.create_task(watcher.run(app), name="policy-watch")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
