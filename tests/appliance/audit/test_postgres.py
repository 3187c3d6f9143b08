"""Several writers on one PostgreSQL log: separate processes, as several gateways would be.

Each writer is its own Python process with its own ``AuditLog`` on the same database and the
same signing key, appending to one shared stream and to a stream of its own at the same time
(with automatic checkpoints on). Afterwards the log verifies, every stream's seqs and the
appliance-wide tree's positions are gapless, and every append that returned is there exactly
once. Skips when there is no PostgreSQL server (tests/pg.py).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa

from appliance.audit import AuditError, AuditLog
from appliance.audit.writer import PG_LOCK_KEY
from tests.conftest import REPO_ROOT

from .conftest import sql_rows

WRITERS = 3
PER_WRITER = 240  # half to the shared stream, half to the writer's own

# One writer process: wait for the start file (so all open and append at once), open the log, append, report.
_WRITER = """
import json, sys, time
from pathlib import Path
from appliance.audit import AuditLog

url, key, index, count, start = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
done = []
deadline = time.monotonic() + 120
Path(f"{start}.{index}").touch()  # imported: ready
while not start.exists() and time.monotonic() < deadline:  # all open and append at the same moment
    time.sleep(0.005)
with AuditLog(url, key, checkpoint_every=25, checkpoint_interval_s=0.2) as log:
    for i in range(count):
        stream = "shared" if i % 2 == 0 else f"w{index}"
        record = log.append("completed", stream=stream, actor=f"key:w{index}", request_id=f"w{index}-{i}",
                            data={"writer": index, "i": i})
        done.append([record.stream, record.seq, record.request_id])
print(json.dumps(done))
"""


def _spawn(url: str, key: Path, index: int, count: int, start: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _WRITER, url, str(key), str(index), str(count), str(start)],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run_writers(url: str, key: Path, tmp_path: Path, *, writers: int, count: int) -> list[list[list[object]]]:
    start = tmp_path / "start"
    procs = [_spawn(url, key, n, count, start) for n in range(writers)]
    deadline = time.monotonic() + 120
    while not all(Path(f"{start}.{n}").exists() for n in range(writers)) and time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break  # its output says why
        time.sleep(0.02)
    start.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"writer failed (exit {proc.returncode}): {err[-2000:]}"
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_several_processes_append_to_one_postgres_log(postgres_db_url: str, tmp_path: Path) -> None:
    key = tmp_path / "secrets" / "audit.key"
    with AuditLog(postgres_db_url, key, checkpoint_every=None):
        pass  # the key file and the tables exist before the writers start
    results = _run_writers(postgres_db_url, key, tmp_path, writers=WRITERS, count=PER_WRITER)

    returned = Counter((stream, rid) for result in results for stream, _seq, rid in result)
    assert sum(returned.values()) == WRITERS * PER_WRITER and max(returned.values()) == 1
    stored = sql_rows(postgres_db_url, "SELECT stream, seq, request_id, gidx FROM audit_events")
    assert len(stored) == WRITERS * PER_WRITER, "lost or extra records"
    assert Counter((s, rid) for s, _seq, rid, _g in stored) == returned, "stored records differ from the appends"
    # each writer saw its own seqs as the database holds them
    seq_of = {(s, rid): seq for s, seq, rid, _g in stored}
    assert all(seq_of[(s, rid)] == seq for result in results for s, seq, rid in result)

    streams = {"shared": WRITERS * PER_WRITER // 2, **{f"w{n}": PER_WRITER // 2 for n in range(WRITERS)}}
    for stream, n in streams.items():
        seqs = sorted(seq for s, seq, _rid, _g in stored if s == stream)
        assert seqs == list(range(1, n + 1)), f"stream {stream}: seqs not gapless"
    assert sorted(g for *_rest, g in stored) == list(range(WRITERS * PER_WRITER)), "_all positions not gapless"
    # the shared stream really interleaved the writers (they ran at the same time)
    shared = [rid for s, _seq, rid, _g in sorted(stored, key=lambda r: (r[0], r[1])) if s == "shared"]
    switches = sum(1 for a, b in itertools.pairwise(shared) if str(a)[:2] != str(b)[:2])
    assert switches >= WRITERS - 1

    with AuditLog(postgres_db_url, key, checkpoint_every=None) as log:
        assert log.checkpoint() is not None
        report = log.verify()
        assert report.ok, report.to_dict()
        assert report.records_checked == WRITERS * PER_WRITER
        assert {s.stream for s in report.streams} >= set(streams)


def test_several_processes_open_an_empty_postgres_database_at_once(postgres_db_url: str, tmp_path: Path) -> None:
    """Gateways starting together on a new database all create the tables at once: none may fail."""
    key = tmp_path / "secrets" / "audit.key"
    with AuditLog(f"sqlite:///{tmp_path / 'keyonly.db'}", key, checkpoint_every=None):
        pass  # the signing key exists (they share it); the PostgreSQL database is still empty
    assert sql_rows(postgres_db_url, "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'audit_%'") == [(0,)]
    results = _run_writers(postgres_db_url, key, tmp_path, writers=4, count=10)
    assert sum(len(r) for r in results) == 40
    with AuditLog(postgres_db_url, key, checkpoint_every=None) as log:
        report = log.verify()
        assert report.ok, report.to_dict()
        assert report.records_checked == 40


@pytest.mark.timeout(120)  # without a lock timeout the append would wait forever
def test_a_writer_stuck_behind_another_fails_closed(postgres_db_url: str, tmp_path: Path) -> None:
    """Another gateway holding the writers' lock past the busy timeout: the append fails, nothing is
    recorded (PostgreSQL's lock_timeout plays SQLite's busy timeout), and the log works again after."""
    key = tmp_path / "audit.key"
    with AuditLog(postgres_db_url, key, checkpoint_every=None) as log:
        log.append("completed", stream="acme", actor="key:k1", data={"n": 1})
    blocker = sa.create_engine(postgres_db_url, poolclass=sa.pool.NullPool)
    with blocker.connect() as conn:
        conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": PG_LOCK_KEY})
        conn.commit()
        with AuditLog(postgres_db_url, key, checkpoint_every=None, busy_timeout_s=0.3) as slow:
            with pytest.raises(AuditError):
                slow.append("accepted", stream="acme", actor="key:k1", data={"prompt_tokens": 1})
        conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": PG_LOCK_KEY})
        conn.commit()
    blocker.dispose()
    with AuditLog(postgres_db_url, key, checkpoint_every=None) as log:
        assert [r.seq for r in log.query("acme")] == [1]
        assert log.append("accepted", stream="acme", actor="key:k1", data={}).seq == 2
        assert log.verify().ok
