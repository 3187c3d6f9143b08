"""The group-commit writer: many appends share a commit, none returns before it is durable, a
failure loses nothing silently, the event loop never waits on storage, other writers' records
are adopted only when they verify, and checkpoints come on the count, the timer and at close."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from appliance.audit import AuditError, AuditIntegrityError, AuditKeys, AuditLog
from appliance.audit.checkpoint import GLOBAL_TREE
from appliance.audit.merkle import record_leaf, root
from appliance.audit.record import compute_record_hash

from .conftest import fill, raw_sql, sql_rows, sqlite_only


def test_concurrent_appends_share_commits_and_all_verify(audit_url: str, key_path: Path) -> None:
    with AuditLog(audit_url, key_path, checkpoint_every=None) as log:
        def work(w: int) -> None:
            for i in range(25):
                log.append("completed", stream=f"t{w % 4}", actor=f"key:k{w}", request_id=f"{w}-{i}",
                           data={"w": w, "i": i})

        pool = [threading.Thread(target=work, args=(w,)) for w in range(16)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        assert log.writer.events == 400
        assert log.writer.batches < 400, "concurrent appends were committed one transaction each"
        for s in range(4):
            assert [r.seq for r in log.query(f"t{s}")] == list(range(1, 101))
        log.checkpoint()
        report = log.verify()
        assert report.ok, report.first_failure
        assert report.records_checked == 400
        assert [s.records for s in report.streams if s.stream == GLOBAL_TREE] == [400]


def test_roots_are_rfc9162_roots_of_the_record_hashes(audit_log: AuditLog) -> None:
    fill(audit_log, "acme", 5)
    fill(audit_log, "globex", 2)
    fill(audit_log, "acme", 2)
    signed = {cp.tree: cp for cp in audit_log.checkpoint()}
    acme = [record_leaf(r.hash) for r in audit_log.query("acme")]
    from appliance.audit.merkle import MemoryNodes

    assert signed["acme"].size == 7 and signed["acme"].root == root(MemoryNodes(acme), 7).hex()
    rows = sql_rows(audit_log, "SELECT hash FROM audit_events ORDER BY gidx")
    leaves = [record_leaf(str(h)) for (h,) in rows]
    assert signed[GLOBAL_TREE].size == 9 and signed[GLOBAL_TREE].root == root(MemoryNodes(leaves), 9).hex()
    note = signed["acme"].note.split("\n")
    assert note[0].endswith("/acme") and note[1] == "7" and note[3] == "" and note[4].startswith("\u2014 ")


@sqlite_only
def test_append_async_never_blocks_the_event_loop(audit_url: str, key_path: Path, db_path: Path) -> None:
    log = AuditLog(audit_url, key_path, checkpoint_every=None)
    log.append("completed", stream="acme", actor="key:k", data={})
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock: the commit must wait

    async def main() -> tuple[int, bool]:
        append = asyncio.ensure_future(log.append_async("completed", stream="acme", actor="key:k", data={"n": 2}))
        ticks = 0
        while ticks < 20:  # the loop keeps running while the append waits for the lock
            await asyncio.sleep(0.01)
            ticks += 1
        pending = not append.done()
        blocker.execute("ROLLBACK")
        record = await append
        assert record.seq == 2
        return ticks, pending

    try:
        ticks, pending = asyncio.run(main())
        assert ticks == 20 and pending, "the append returned before its commit could happen"
    finally:
        blocker.close()
        log.close()


@sqlite_only
def test_a_failed_commit_fails_every_waiter_and_records_nothing(audit_url: str, key_path: Path,
                                                                 db_path: Path) -> None:
    log = AuditLog(audit_url, key_path, checkpoint_every=None, busy_timeout_s=0.2)
    fill(log, "acme", 2)
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            log.append("completed", stream="acme", actor="key:k", data={"i": i})
        except AuditError as exc:
            errors.append(exc)

    pool = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    blocker.execute("ROLLBACK")
    blocker.close()
    assert len(errors) == 8 and all("nothing recorded" in str(e) for e in errors)
    assert [r.seq for r in log.query("acme")] == [1, 2]
    fill(log, "acme", 1)  # and the log recovers once the database does
    assert [r.seq for r in log.query("acme")] == [1, 2, 3]
    assert log.verify().ok
    log.close()


def test_two_writers_on_one_log_adopt_each_others_records(audit_url: str, key_path: Path) -> None:
    a = AuditLog(audit_url, key_path, checkpoint_every=None)
    b = AuditLog(audit_url, key_path, checkpoint_every=None)
    try:
        for i in range(6):
            (a if i % 2 else b).append("completed", stream="acme", actor="key:k", data={"i": i})
            (b if i % 3 else a).append("completed", stream=f"s{i % 2}", actor="key:k", data={"i": i})
        assert [r.seq for r in a.query("acme")] == list(range(1, 7))
        a.checkpoint()
        fill(b, "acme", 1)
        b.checkpoint()
        report = a.verify()
        assert report.ok, report.first_failure
        assert report.records_checked == 13
    finally:
        a.close()
        b.close()


def test_a_forged_record_from_elsewhere_is_refused_not_adopted(audit_log: AuditLog) -> None:
    fill(audit_log, "acme", 2)
    head = audit_log.query("acme")[-1]
    body = {**head.body(), "seq": 3, "prev_hash": head.hash, "data": {"forged": True}}
    raw_sql(audit_log, "INSERT INTO audit_events (stream, seq, ts, event_type, actor, tenant, request_id, data, "
            "prev_hash, hash, gidx) VALUES (:stream, :seq, :ts, :event_type, :actor, :tenant, :request_id, :data, "
            ":prev_hash, :hash, 2)", {**body, "data": '{"forged":false}', "hash": compute_record_hash(body)})
    with pytest.raises(AuditIntegrityError, match="another process"):
        audit_log.append("completed", stream="globex", actor="key:k", data={})
    assert [r.stream for r in audit_log.query("globex")] == []


def test_checkpoints_on_count_on_timer_and_at_close(audit_url: str, key_path: Path) -> None:
    log = AuditLog(audit_url, key_path, checkpoint_every=4, checkpoint_interval_s=0.2)
    fill(log, "acme", 4)
    assert [c.size for c in log.checkpoints("acme")] == [4]
    fill(log, "acme", 1)
    deadline = time.monotonic() + 20
    while [c.size for c in log.checkpoints("acme")] != [4, 5] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [c.size for c in log.checkpoints("acme")] == [4, 5], "the timer signed nothing"
    assert [c.size for c in log.checkpoints(GLOBAL_TREE)][-1] == 5
    log2 = AuditLog(audit_url, key_path, checkpoint_every=1000, checkpoint_interval_s=3600)
    fill(log2, "globex", 2)
    log2.close()  # a clean close leaves nothing unsigned
    log.close()
    with AuditLog(audit_url, key_path, checkpoint_every=None) as check:
        assert [c.size for c in check.checkpoints("globex")] == [2]
        assert check.verify(unsigned_grace_s=0).ok


def test_deleting_every_checkpoint_is_caught_once_the_records_should_be_signed(audit_log: AuditLog) -> None:
    fill(audit_log, "acme", 3)
    audit_log.checkpoint()
    raw_sql(audit_log, "DELETE FROM audit_tree_checkpoints")
    assert audit_log.verify().ok  # alone, the database cannot tell a fresh tail from a cut one...
    report = audit_log.verify(unsigned_grace_s=0)  # ...but records the writer must have signed by now
    assert not report.ok
    assert report.first_failure is not None and report.first_failure.check == "unsigned"


def test_a_deleted_stream_with_its_checkpoints_and_nodes_breaks_the_appliance_tree(audit_log: AuditLog) -> None:
    fill(audit_log, "acme", 3)
    fill(audit_log, "globex", 3)
    fill(audit_log, "acme", 1)
    audit_log.checkpoint()
    for table, column in (("audit_events", "stream"), ("audit_tree_checkpoints", "tree"),
                          ("audit_tree_nodes", "tree")):
        raw_sql(audit_log, f"DELETE FROM {table} WHERE {column} = 'globex'")
    report = audit_log.verify()
    assert [s.stream for s in report.streams if not s.ok] == [GLOBAL_TREE]
    assert report.first_failure is not None and "deleted" in report.first_failure.found


_NEVER_CLOSED = """
import sys
from pathlib import Path
from appliance.audit import AuditLog
log = AuditLog(sys.argv[1], Path(sys.argv[2]), checkpoint_interval_s=3600)
log.append("admin.node_added", stream="_admin", actor="cli:someone", data={"node": "n1"})
"""


def test_a_process_that_never_closes_its_log_signs_at_exit(audit_url: str, key_path: Path) -> None:
    """An admin command that appends and exits (no close, long before the timer) leaves nothing
    unsigned: the writer signs what grew as the interpreter exits."""
    import subprocess
    import sys

    AuditKeys(key_path)
    subprocess.run([sys.executable, "-c", _NEVER_CLOSED, audit_url, str(key_path)], check=True, timeout=60)
    with AuditLog(audit_url, key_path, checkpoint_every=None) as log:
        assert [c.size for c in log.checkpoints("_admin")] == [1]
        assert log.verify(unsigned_grace_s=0).ok
