"""Concurrent appends keep every stream's seqs gapless and its chain valid, on each back end."""

from __future__ import annotations

import threading
from pathlib import Path

from appliance.audit import AuditLog

THREADS = 6
PER_THREAD = 15


def _hammer(logs: list[AuditLog], streams: list[str]) -> list[BaseException]:
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def worker(index: int) -> None:
        log = logs[index % len(logs)]
        try:
            start.wait()
            for i in range(PER_THREAD):
                stream = streams[(index + i) % len(streams)]
                log.append("completed", stream=stream, actor=f"key:t{index}", request_id=f"t{index}-{i}",
                           data={"thread": index, "i": i})
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return errors


def _assert_gapless(log: AuditLog, streams: list[str]) -> None:
    total = 0
    for stream in streams:
        seqs = [r.seq for r in log.query(stream)]
        assert seqs == list(range(1, len(seqs) + 1))
        total += len(seqs)
    assert total == THREADS * PER_THREAD
    report = log.verify()
    assert report.ok, report.to_dict()
    assert report.records_checked == THREADS * PER_THREAD


def test_threads_sharing_one_log(audit_url: str, key_path: Path) -> None:
    with AuditLog(audit_url, key_path, checkpoint_every=7) as log:
        streams = ["acme", "globex"]
        assert _hammer([log], streams) == []
        _assert_gapless(log, streams)
        assert log.checkpoints("acme"), "auto-checkpoints were taken under load"


def test_separate_logs_on_one_database_contend_through_database_locks(audit_url: str, key_path: Path) -> None:
    # Each AuditLog has its own lock, so only the database keeps them apart, as two processes would be
    # (SQLite: BEGIN IMMEDIATE; PostgreSQL: the writer's lock or the unique (stream, seq) and a retry).
    logs = [AuditLog(audit_url, key_path, checkpoint_every=5) for _ in range(3)]
    try:
        assert _hammer(logs, ["acme"]) == []
        _assert_gapless(logs[0], ["acme"])
    finally:
        for log in logs:
            log.close()
