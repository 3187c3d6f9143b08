"""Retention and legal holds on a real audit database (SQLite and PostgreSQL): pruned bodies, a
log that still verifies, signed records of every prune and hold, and crash repair.

Records are written now; the pruner's clock is moved forward instead of waiting days."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import event

from appliance.audit import AuditLog, export_stream, verify_export
from appliance.audit.holds import HoldError, HoldStore
from appliance.audit.retention import Pruner, unaccounted_prunes
from policies import PolicySet, PolicyValidationError, default_policy_dir, load_policy_set
from tests.appliance.audit.conftest import fill, raw_sql, sql_rows

ACTOR = "cli:tester"


def policies(tmp_path: Path, retention: dict[str, Any]) -> PolicySet:
    """The shipped policy files with this retention section, through the real loader."""
    target = tmp_path / "policies"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(default_policy_dir(), target)
    (target / "retention.yaml").write_text(yaml.safe_dump({"retention": retention}))
    return load_policy_set(target)


def moment_between(log: AuditLog, before: tuple[str, int], after: tuple[str, int]) -> datetime:
    """Append ``before`` (stream, n), take the time, append ``after``: records of ``before``
    are older than the returned moment and those of ``after`` are not."""
    fill(log, *before)
    time.sleep(0.01)
    moment = datetime.now(UTC)
    time.sleep(0.01)
    fill(log, *after)
    return moment


def admin_events(log: AuditLog, event_type: str) -> list[dict[str, Any]]:
    return [{**r.data, "tenant": r.tenant, "actor": r.actor} for r in log.query("_admin")
            if r.event_type == event_type]


def rows(log: AuditLog, stream: str) -> list[tuple[Any, ...]]:
    return sql_rows(log, "SELECT seq, data, pruned_at, hash FROM audit_events WHERE stream = :s ORDER BY seq",
                    {"s": stream})


def test_prunes_old_tenant_bodies_keeps_hashes_and_the_log_verifies(audit_log: AuditLog, tmp_path: Path) -> None:
    audit_log.append("admin.tenant_created", stream="_admin", actor=ACTOR, tenant="acme", data={"x": 1})
    cut = moment_between(audit_log, ("acme", 12), ("acme", 3))
    fill(audit_log, "globex", 4)
    audit_log.checkpoint()
    hashes_before = [r[3] for r in rows(audit_log, "acme")]
    ps = policies(tmp_path, {"audit_days": 30, "tenants": {"globex": {"audit_days": 3650}}})

    report = Pruner(audit_log, ps, actor=ACTOR, batch_size=5, now=lambda: cut + timedelta(days=30)).run_once()

    assert [(t.tenant, t.count, t.first_seq, t.last_seq) for t in report.tenants] == [
        ("acme", 12, 1, 12), ("globex", 0, None, None)]
    after = rows(audit_log, "acme")
    assert [r[3] for r in after] == hashes_before
    assert all(r[1] == "{}" and r[2] is not None for r in after[:12])
    assert all(r[1] != "{}" and r[2] is None for r in after[12:])
    assert all(r[2] is None for r in rows(audit_log, "globex"))  # its own, longer retention
    assert all(r.data for r in audit_log.query("_admin"))  # _admin is never pruned
    verified = audit_log.verify()
    assert verified.ok, [s.failure for s in verified.streams if s.failure]
    started, = admin_events(audit_log, "admin.audit_prune_started")
    done, = admin_events(audit_log, "admin.audit_pruned")
    assert done["run_id"] == started["run_id"] and done["tenant"] == "acme" and done["actor"] == ACTOR
    assert (done["first_seq"], done["last_seq"], done["count"]) == (1, 12, 12)
    assert done["policy_digest"] == ps.digest and done["cutoff"] == report.tenants[0].cutoff
    assert done["pruned_at"] == after[0][2]
    # the tenant's export verifies offline, pruned records and all
    pem = tmp_path / "audit.pem"
    pem.write_bytes(audit_log.public_key_pem())
    exported = verify_export(export_stream(audit_log, "acme", None, None, tmp_path / "acme.tar"), pem)
    assert exported.ok, exported.to_dict()
    assert exported.extra["pruned"] == 12
    # new checkpoints sign over the pruned records as well
    audit_log.append("completed", stream="acme", actor="key:k1", data={"n": 99})
    assert audit_log.checkpoint() and audit_log.verify().ok


def test_dry_run_changes_nothing_and_a_second_run_has_nothing_to_do(audit_log: AuditLog, tmp_path: Path) -> None:
    cut = moment_between(audit_log, ("acme", 4), ("acme", 1))
    pruner = Pruner(audit_log, policies(tmp_path, {"audit_days": 1}), now=lambda: cut + timedelta(days=1))
    dry = pruner.run_once(dry_run=True)
    assert dry.pruned == 4 and dry.tenants[0].run_id is None
    assert all(r[2] is None for r in rows(audit_log, "acme")) and not audit_log.query("_admin")
    assert pruner.run_once().pruned == 4
    again = pruner.run_once()
    assert again.pruned == 0 and [(t.tenant, t.count, t.run_id) for t in again.tenants] == [("acme", 0, None)]
    assert len(admin_events(audit_log, "admin.audit_pruned")) == 1


def test_batches_are_bounded_and_a_capped_run_continues_next_time(audit_log: AuditLog, tmp_path: Path) -> None:
    cut = moment_between(audit_log, ("acme", 23), ("acme", 1))
    updates: list[str] = []

    def count_updates(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE AUDIT_EVENTS"):
            updates.append(statement)

    event.listen(audit_log.engine, "before_cursor_execute", count_updates)
    pruner = Pruner(audit_log, policies(tmp_path, {"audit_days": 7}), batch_size=5, max_records=15,
                    now=lambda: cut + timedelta(days=7))
    first = pruner.run_once()
    assert (first.pruned, first.tenants[0].last_seq, first.tenants[0].complete) == (15, 15, False)
    assert len(updates) == 3  # one statement per batch of 5, never one per record
    second = pruner.run_once()
    assert (second.pruned, second.tenants[0].first_seq, second.tenants[0].complete) == (8, 16, True)
    assert [r[2] is not None for r in rows(audit_log, "acme")] == [True] * 23 + [False]
    assert audit_log.verify().ok


def test_a_legal_hold_stops_pruning_until_released(audit_log: AuditLog, tmp_path: Path) -> None:
    cut = moment_between(audit_log, ("acme", 6), ("acme", 1))
    holds = HoldStore(audit_log)
    hold = holds.add("acme", reason="litigation 2026-17", actor=ACTOR)
    pruner = Pruner(audit_log, policies(tmp_path, {"audit_days": 1}), holds=holds,
                    now=lambda: cut + timedelta(days=1))
    held = pruner.run_once()
    assert held.pruned == 0 and held.tenants[0].held == 6
    assert all(r[2] is None for r in rows(audit_log, "acme"))
    assert [h.id for h in holds.list()] == [hold.id]

    released = holds.release(hold.id, actor="cli:counsel")
    assert released.released_by == "cli:counsel" and holds.list() == []
    assert [h.id for h in holds.list(include_released=True)] == [hold.id]
    assert pruner.run_once().pruned == 6
    added, = admin_events(audit_log, "admin.audit_hold_added")
    gone, = admin_events(audit_log, "admin.audit_hold_released")
    assert added == {"hold_id": hold.id, "since": None, "until": None, "reason": "litigation 2026-17",
                     "tenant": "acme", "actor": ACTOR}
    assert gone["hold_id"] == hold.id and gone["actor"] == "cli:counsel"


def test_a_hold_on_a_period_keeps_only_that_period(audit_log: AuditLog, tmp_path: Path) -> None:
    fill(audit_log, "globex", 2)  # another tenant: the hold is not its own
    fill(audit_log, "acme", 3)
    time.sleep(0.01)
    since = datetime.now(UTC)
    fill(audit_log, "acme", 3)
    time.sleep(0.01)
    until = datetime.now(UTC)
    cut = moment_between(audit_log, ("acme", 3), ("acme", 1))
    HoldStore(audit_log).add("acme", since=since, until=until.isoformat(), reason="audit period", actor=ACTOR)
    report = Pruner(audit_log, policies(tmp_path, {"audit_days": 1}), now=lambda: cut + timedelta(days=1)).run_once()
    by_tenant = {t.tenant: t for t in report.tenants}
    assert (by_tenant["acme"].count, by_tenant["acme"].held, by_tenant["globex"].count) == (6, 3, 2)
    assert [r[2] is not None for r in rows(audit_log, "acme")] == [True] * 3 + [False] * 3 + [True] * 3 + [False]
    assert audit_log.verify().ok


def test_an_interrupted_run_is_closed_by_the_next(audit_log: AuditLog, tmp_path: Path) -> None:
    """A run that stops between its intent record and its done record (a crash, a power cut)
    leaves the intent visible; the next run records what that run did, then goes on."""
    cut = moment_between(audit_log, ("acme", 10), ("acme", 1))
    ps = policies(tmp_path, {"audit_days": 1})

    class PowerCut(Exception):
        pass

    class CutAfterFirstBatch(Pruner):
        batches = 0

        def _prune_batch(self, *args: Any) -> int:
            if self.batches == 1:
                raise PowerCut
            self.batches += 1
            return super()._prune_batch(*args)

    with pytest.raises(PowerCut):
        CutAfterFirstBatch(audit_log, ps, batch_size=4, now=lambda: cut + timedelta(days=1)).run_once()
    assert len(admin_events(audit_log, "admin.audit_prune_started")) == 1
    assert admin_events(audit_log, "admin.audit_pruned") == []
    assert audit_log.verify().ok  # half-pruned is still a valid log

    # at first it may be another pruner at work: nothing is done, and the report says why
    busy = Pruner(audit_log, ps, batch_size=4, now=lambda: cut + timedelta(days=1)).run_once()
    assert busy.skipped is not None and "another prune run is in progress" in busy.skipped
    assert busy.pruned == 0 and admin_events(audit_log, "admin.audit_pruned") == []
    time.sleep(0.05)
    report = Pruner(audit_log, ps, batch_size=4, now=lambda: cut + timedelta(days=1), stale_after_s=0.01).run_once()
    assert report.skipped is None
    recovered, finished = admin_events(audit_log, "admin.audit_pruned")
    assert recovered["recovered"] is True and report.recovered == [recovered["run_id"]]
    assert (recovered["count"], recovered["first_seq"], recovered["last_seq"]) == (4, 1, 4)
    assert (finished["count"], finished["first_seq"], finished["last_seq"]) == (6, 5, 10)
    assert "recovered" not in finished
    assert [r[2] is not None for r in rows(audit_log, "acme")] == [True] * 10 + [False]
    assert audit_log.verify().ok


def test_pruning_while_the_writer_appends(audit_log: AuditLog, tmp_path: Path) -> None:
    cut = moment_between(audit_log, ("acme", 60), ("acme", 1))
    appended: list[int] = []
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(60):
                appended.append(audit_log.append("completed", stream="acme", actor="key:k1", data={"i": i}).seq)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    report = Pruner(audit_log, policies(tmp_path, {"audit_days": 1}), batch_size=2,
                    now=lambda: cut + timedelta(days=1)).run_once()
    thread.join(timeout=120)
    assert not errors and len(appended) == 60
    assert report.pruned == 60 and [r[2] is not None for r in rows(audit_log, "acme")] == [True] * 60 + [False] * 61
    assert audit_log.checkpoint() and audit_log.verify().ok


def test_the_periodic_task_prunes_and_stops_promptly(audit_log: AuditLog, tmp_path: Path) -> None:
    cut = moment_between(audit_log, ("acme", 5), ("acme", 1))
    pruner = Pruner(audit_log, policies(tmp_path, {"audit_days": 1}), now=lambda: cut + timedelta(days=1))

    async def scenario() -> None:
        task = asyncio.create_task(pruner.run_every(3600.0))
        for _ in range(600):  # the first run starts at once; wait for its done record
            if admin_events(audit_log, "admin.audit_pruned"):
                break
            await asyncio.sleep(0.05)
        pruner.stop()
        await asyncio.wait_for(task, timeout=60)  # wakes from its hour of sleep

    asyncio.run(scenario())
    assert [r[2] is not None for r in rows(audit_log, "acme")] == [True] * 5 + [False]
    assert len(admin_events(audit_log, "admin.audit_pruned")) == 1
    with pytest.raises(ValueError, match="interval_s must be > 0"):
        asyncio.run(pruner.run_every(0))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tenant": "acme", "reason": "  "}, "expected a reason of 1..1000 characters, found 0"),
    ({"tenant": "_admin", "reason": "x"}, "is never pruned"),
    ({"tenant": "bad name", "reason": "x"}, "tenant name"),
    ({"tenant": "acme", "reason": "x", "since": "2026-02-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"},
     "expected since < until"),
    ({"tenant": "acme", "reason": "x", "since": "last tuesday"}, "ISO 8601"),
])
def test_bad_holds_are_refused_saying_what_was_expected(audit_log: AuditLog, kwargs: dict[str, Any],
                                                         message: str) -> None:
    holds = HoldStore(audit_log)
    args = dict(kwargs)
    tenant = args.pop("tenant")
    with pytest.raises(HoldError, match=message):
        holds.add(tenant, actor=ACTOR, **args)
    assert holds.list(include_released=True) == [] and audit_log.query("_admin") == []


def test_releasing_an_unknown_or_released_hold_is_refused(audit_log: AuditLog) -> None:
    holds = HoldStore(audit_log)
    with pytest.raises(HoldError, match="expected the id of an existing hold"):
        holds.release("hold-nope", actor=ACTOR)
    hold = holds.add("acme", reason="x", actor=ACTOR)
    holds.release(hold.id, actor=ACTOR)
    with pytest.raises(HoldError, match="expected an active hold, found one released"):
        holds.release(hold.id, actor=ACTOR)
    assert len(admin_events(audit_log, "admin.audit_hold_released")) == 1


def test_pruner_refuses_bad_bounds() -> None:
    with pytest.raises(ValueError, match="batch_size >= 1"):
        Pruner(None, None, batch_size=0)  # type: ignore[arg-type]


def test_a_body_erased_behind_the_logs_back_is_not_accounted_for(audit_log: AuditLog, tmp_path: Path) -> None:
    """An insider who empties a record and stamps it pruned passes the chain walk (a pruned
    record's hash is not recomputed) but not the check against the signed prune records, which
    ``verify`` runs."""
    cut = moment_between(audit_log, ("acme", 3), ("acme", 3))
    Pruner(audit_log, policies(tmp_path, {"audit_days": 1}), now=lambda: cut + timedelta(days=1)).run_once()
    assert unaccounted_prunes(audit_log.engine) == []
    raw_sql(audit_log, "UPDATE audit_events SET data = '{}', pruned_at = :p WHERE stream = 'acme' AND seq = 5",
            {"p": rows(audit_log, "acme")[0][2]})
    failure = audit_log.verify().first_failure
    assert failure is not None and (failure.stream, failure.seq, failure.check) == ("acme", 5, "pruned")
    assert unaccounted_prunes(audit_log.engine) == [
        "acme seq 5: pruned: expected a signed admin.audit_prune_started covering it "
        f"(pruned_at {rows(audit_log, 'acme')[0][2]}), found none: the body was removed outside retention"]


def test_retention_policy_overrides_and_bad_sections(tmp_path: Path) -> None:
    assert load_policy_set().retention.stores_content("anyone") is False  # shipped files stay valid, content off
    ps = policies(tmp_path, {"audit_days": 90, "store_content": True,
                             "tenants": {"acme": {"audit_days": 7}, "globex": {"store_content": False}}})
    assert [ps.retention.audit_days_for(t) for t in ("acme", "globex", "initech")] == [7, 90, 90]
    assert [ps.retention.stores_content(t) for t in ("acme", "globex", "initech")] == [True, False, True]
    with pytest.raises(PolicyValidationError) as caught:
        policies(tmp_path, {"audit_days": 90, "store_content": "yes", "tenants": {"acme": {"audit_days": 0}}})
    found = sorted(str(p).split(": ", 1)[1] for p in caught.value.problems)
    assert found == ["retention.store_content: expected a valid boolean, found 'yes'",
                     "retention.tenants.acme.audit_days: expected greater than or equal to 1, found 0"]
