"""Shared by the anchor tests: a real witness process, a log on SQLite, and an insider's tampering.

``start_witness`` runs the real CLI (``python -m appliance.audit.witness_cli witness serve``) on a
free loopback port and returns once it printed the address it listens on.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from appliance.audit import AuditLog

REPO = Path(__file__).resolve().parents[3]
CLI = [sys.executable, "-m", "appliance.audit.witness_cli"]


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@dataclass
class Witness:
    proc: subprocess.Popen[str]
    url: str
    vkey: str
    key: Path
    state: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def witness_key(tmp: Path, name: str = "test-witness") -> tuple[Path, str]:
    key = tmp / f"{name}.key"
    done = run_cli("witness", "keygen", "--out", str(key), "--name", name)
    assert done.returncode == 0, done.stderr
    return key, done.stdout.strip()


def log_vkey(key_path: Path) -> str:
    done = run_cli("witness", "log-key", "--key", str(key_path))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def start_witness(key: Path, vkey: str, state: Path, logs: Sequence[str], *extra: str) -> Witness:
    args = [*CLI, "witness", "serve", "--key", str(key), "--state", str(state), "--listen", "127.0.0.1:0", *extra]
    for v in logs:
        args += ["--log", v]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + 60
    line = ""
    while time.monotonic() < deadline and not line:
        if proc.poll() is not None:
            raise AssertionError(f"witness exited {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        if sel.select(timeout=0.5):
            line = proc.stdout.readline()
    sel.close()
    assert " listening on " in line, f"witness did not start: {line!r}"
    url = line.rsplit(" ", 1)[1].strip()
    return Witness(proc, url, vkey, key, state)


def fill(log: AuditLog, n: int, stream: str = "acme", tag: str = "original") -> None:
    for i in range(n):
        log.append("completed", stream=stream, actor="key-1", tenant=stream, request_id=f"{tag}-{i}",
                   data={"i": i, "tag": tag})


def cut_to(url: str, k: int) -> None:
    """An insider's cut: every record from ``_all`` position ``k`` on is deleted, and with them
    the tree nodes, checkpoints and cosignatures past what is left of each tree."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM audit_events WHERE gidx >= :k"), {"k": k})
        heads = sa.text("SELECT stream, MAX(seq) FROM audit_events GROUP BY stream")
        left: dict[str, int] = {row[0]: int(row[1]) for row in conn.execute(heads)}
        trees = set(conn.execute(sa.text("SELECT DISTINCT tree FROM audit_tree_checkpoints UNION "
                                         "SELECT DISTINCT tree FROM audit_tree_nodes")).scalars())
        for tree in trees:
            n = k if tree == "_all" else int(left.get(tree) or 0)
            conn.execute(sa.text("DELETE FROM audit_tree_nodes WHERE tree = :t AND ((idx + 1) << level) > :n"),
                         {"t": tree, "n": n})
            for table in ("audit_tree_checkpoints", "audit_cosignatures"):
                conn.execute(sa.text(f"DELETE FROM {table} WHERE tree = :t AND size > :n"), {"t": tree, "n": n})
    engine.dispose()
