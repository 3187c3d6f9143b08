"""Benchmark: durable audit appends per second with many concurrent writers, against a bare
SQLite insert loop on the same disk in the same run.

    .venv/bin/python -m tests.appliance.audit.bench_append --writers 64 --events 20000

References, same machine, same run, same settings (WAL, synchronous=FULL):
- ``sqlite3 per-event commit``: one INSERT and one COMMIT (one fsync) per event -- the
  durability every audit append promises, done the naive way (what version 1 did, minus its
  statement building);
- ``sqlite3 one transaction``: every INSERT in one transaction, one fsync in all -- the upper
  bound for this disk, durable only at the very end.
The audit log: ``--writers`` threads each calling ``AuditLog.append`` (returns only once its
record is committed), and the same number of asyncio tasks awaiting ``append_async``.
Afterwards the log is verified from genesis (its time is reported too).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

from appliance.audit import AuditLog

DATA = {"model": "smollm2", "node": "node-a", "prompt_tokens": 812, "completion_tokens": 64,
        "finish_reason": "stop", "ttft_ms": 41.2, "latency_ms": 803.5, "region": "eu-west",
        "output_hash": "hmac-sha256:" + "ab" * 32, "client_ip": "10.1.2.3", "user_agent": "OpenAI/Python 1.0"}


def bare(path: Path, n: int, *, per_event: bool) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, stream TEXT, seq INTEGER, ts TEXT, data TEXT, "
                 "hash TEXT, UNIQUE (stream, seq))")
    text = json.dumps(DATA)
    start = time.perf_counter()
    if not per_event:
        conn.execute("BEGIN IMMEDIATE")
    for i in range(n):
        if per_event:
            conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t (stream, seq, ts, data, hash) VALUES (?, ?, ?, ?, ?)",
                     (f"t{i % 8}", i, "2026-12-07T00:00:00.000000Z", text, "00" * 32))
        if per_event:
            conn.execute("COMMIT")
    if not per_event:
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return n / elapsed


def threads(log: AuditLog, writers: int, n: int) -> float:
    per = n // writers

    def work(w: int) -> None:
        for i in range(per):
            log.append("completed", stream=f"tenant-{w % 8}", actor=f"key:k{w}", request_id=f"r{w}-{i}", data=DATA)

    pool = [threading.Thread(target=work, args=(w,)) for w in range(writers)]
    start = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return per * writers / (time.perf_counter() - start)


def tasks(log: AuditLog, writers: int, n: int) -> float:
    per = n // writers

    async def work(w: int) -> None:
        for i in range(per):
            await log.append_async("completed", stream=f"tenant-{w % 8}", actor=f"key:k{w}",
                                   request_id=f"a{w}-{i}", data=DATA)

    async def main() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(work(w) for w in range(writers)))
        return per * writers / (time.perf_counter() - start)

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writers", type=int, default=64)
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--dir", type=Path, default=None, help="where the databases go (default: a temp dir)")
    parser.add_argument("--postgres", action="store_true",
                        help="the log on a throwaway PostgreSQL (tests/pg.py) instead of SQLite")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp, ExitStack() as stack:
        root = Path(tmp)
        per_event = bare(root / "bare1.db", min(args.events, 3000), per_event=True)
        one_tx = bare(root / "bare2.db", args.events, per_event=False)
        url = f"sqlite:///{root / 'audit.db'}"
        if args.postgres:
            from tests.pg import fresh_database, postgres_server

            url = stack.enter_context(fresh_database(stack.enter_context(postgres_server())))
        log = AuditLog(url, root / "audit.key")
        try:
            threaded = threads(log, args.writers, args.events)
            batches_t, events_t = log.writer.batches, log.writer.events
            awaited = tasks(log, args.writers, args.events)
        finally:
            log.close()
        verify_log = AuditLog(url, root / "audit.key", create=False)
        start = time.perf_counter()
        report = verify_log.verify()
        verify_s = time.perf_counter() - start
        verify_log.close()
        print(f"writers={args.writers} events={args.events} log on {url.split(':')[0]}")
        print(f"sqlite3 per-event commit : {per_event:9.0f} events/s")
        print(f"sqlite3 one transaction  : {one_tx:9.0f} events/s (durable only at the end)")
        print(f"AuditLog.append, threads : {threaded:9.0f} events/s "
              f"({events_t / max(batches_t, 1):.1f} events per commit)")
        print(f"AuditLog.append_async    : {awaited:9.0f} events/s")
        print(f"verify {report.records_checked} records: {verify_s:.2f} s, ok={report.ok}")


if __name__ == "__main__":
    main()
