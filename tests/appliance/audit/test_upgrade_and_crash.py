"""A version 1 log (hash chains and signed JSON heads only) is taken into the Merkle trees on
upgrade and keeps its old checkpoints checked; a writer killed with SIGKILL mid-load leaves a
log that verifies, with every acknowledged append present, and a restart signs the tail."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from appliance.audit import AuditKeys, AuditLog
from appliance.audit.canonical import canonical_json, genesis_hash
from appliance.audit.checkpoint import GLOBAL_TREE
from appliance.audit.record import compute_record_hash

from .conftest import raw_sql, sqlite_only

V1_SCHEMA = """
CREATE TABLE audit_events (id INTEGER PRIMARY KEY AUTOINCREMENT, stream VARCHAR(128) NOT NULL,
  seq BIGINT NOT NULL, ts VARCHAR(32) NOT NULL, event_type VARCHAR(80) NOT NULL, actor VARCHAR(256) NOT NULL,
  tenant VARCHAR(256), request_id VARCHAR(256), data TEXT NOT NULL, prev_hash VARCHAR(64) NOT NULL,
  hash VARCHAR(64) NOT NULL, CONSTRAINT uq_audit_events_stream_seq UNIQUE (stream, seq));
CREATE TABLE audit_checkpoints (id INTEGER PRIMARY KEY AUTOINCREMENT, stream VARCHAR(128) NOT NULL,
  seq BIGINT NOT NULL, hash VARCHAR(64) NOT NULL, ts VARCHAR(32) NOT NULL, key_id VARCHAR(64) NOT NULL,
  signature VARCHAR(128) NOT NULL);
"""


def _v1_log(db: Path, keys: AuditKeys) -> None:
    conn = sqlite3.connect(db)
    conn.executescript(V1_SCHEMA)
    for stream, n in (("acme", 4), ("_admin", 2), ("globex", 3)):
        prev = genesis_hash(stream)
        for seq in range(1, n + 1):
            body = {"stream": stream, "seq": seq, "ts": f"2026-01-01T00:00:0{seq}.000000Z", "event_type": "completed",
                    "actor": "key:k", "tenant": None if stream == "_admin" else stream, "request_id": None,
                    "data": {"seq": seq}, "prev_hash": prev}
            if stream == "_admin":
                body["event_type"] = "admin.tenant_created"
            prev = compute_record_hash(body)
            conn.execute("INSERT INTO audit_events (stream, seq, ts, event_type, actor, tenant, request_id, data, "
                         "prev_hash, hash) VALUES (?,?,?,?,?,?,?,?,?,?)",
                         (stream, seq, body["ts"], body["event_type"], body["actor"], body["tenant"], None,
                          canonical_json(body["data"]), body["prev_hash"], prev))
        payload = {"type": "sovereign-audit-checkpoint/v1", "stream": stream, "seq": n, "hash": prev,
                   "ts": "2026-01-01T00:01:00.000000Z", "key_id": keys.key_id}
        conn.execute("INSERT INTO audit_checkpoints (stream, seq, hash, ts, key_id, signature) VALUES (?,?,?,?,?,?)",
                     (stream, n, prev, payload["ts"], keys.key_id, keys.sign(canonical_json(payload).encode())))
    conn.commit()
    conn.close()


@sqlite_only
def test_a_version_1_log_is_upgraded_into_the_trees(audit_url: str, key_path: Path, db_path: Path) -> None:
    _v1_log(db_path, AuditKeys(key_path))
    with AuditLog(audit_url, key_path, checkpoint_every=None) as log:
        assert log.verify().ok  # the old checkpoints verify before anything is adopted
        log.append("completed", stream="acme", actor="key:k", data={"after": "upgrade"})
        log.checkpoint()
        report = log.verify(unsigned_grace_s=0)
        assert report.ok, report.first_failure
        assert [(s.stream, s.records) for s in report.streams] == [
            ("_admin", 2), ("acme", 5), ("globex", 3), (GLOBAL_TREE, 10)]
        raw_sql(log, "UPDATE audit_checkpoints SET hash = ? WHERE stream = 'globex'", ("00" * 32,))
        failure = log.verify().first_failure
        assert failure is not None and (failure.stream, failure.check) == ("globex", "checkpoint signature")


_WRITER = """
import sys, threading
from pathlib import Path
from appliance.audit import AuditLog
log = AuditLog(sys.argv[1], Path(sys.argv[2]), checkpoint_every=50, checkpoint_interval_s=0.2)
lock = threading.Lock()
def work(w):
    i = 0
    while True:
        r = log.append("completed", stream=f"t{w % 3}", actor="key:k", request_id=f"{w}-{i}", data={"i": i})
        with lock:
            print(r.stream, r.seq, flush=True)  # acknowledged: durable before this line
        i += 1
for w in range(8):
    threading.Thread(target=work, args=(w,), daemon=True).start()
threading.Event().wait()
"""


def test_sigkill_under_load_loses_no_acknowledged_append(audit_url: str, key_path: Path, tmp_path: Path) -> None:
    AuditKeys(key_path)
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, audit_url, str(key_path)], stdout=subprocess.PIPE,
                                text=True, cwd=Path(__file__).resolve().parents[3],
                                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])})
        assert proc.stdout is not None
        acked: list[tuple[str, int]] = []
        deadline = time.monotonic() + 60
        while len(acked) < 150 + 50 * round_ and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            stream, seq = line.split()
            acked.append((stream, int(seq)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert len(acked) >= 150, f"the writer acknowledged only {len(acked)} appends"
        with AuditLog(audit_url, key_path, checkpoint_every=None) as log:
            report = log.verify()
            assert report.ok, report.first_failure
            stored = {(r.stream, r.seq) for s in ("t0", "t1", "t2") for r in log.query(s)}
            assert set(acked) <= stored, "an acknowledged append is missing after SIGKILL"
            log.checkpoint()  # what a restart does first: sign the unsigned tail
            assert log.verify(unsigned_grace_s=0).ok
    # An insider deletes the newest records of a stream after the crash: the checkpoints the
    # writer signed every 0.2 s (and the restart's) name records that are gone.
    with AuditLog(audit_url, key_path, checkpoint_every=None) as log:
        head = log.query("t1")[-1].seq
        raw_sql(log, "DELETE FROM audit_events WHERE stream = 't1' AND seq > ?", (head - 3,))
        failures = {s.stream: s.failure for s in log.verify().streams if s.failure is not None}
        assert failures["t1"] is not None and failures["t1"].check == "truncation"
        assert GLOBAL_TREE in failures

