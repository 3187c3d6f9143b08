"""The run marker and the reconciliation after an unclean shutdown, on a real SQLite audit log and
real processes (the whole gateway killed with SIGKILL is in test_crash_recovery.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.audit import AuditLog
from appliance.reconcile import begin_run
from appliance.runmarker import RunMarker, RunMarkerError, holder_is_alive, read_marker, remove_marker, write_marker


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[AuditLog]:
    log = AuditLog(f"sqlite:///{tmp_path / 'audit.db'}", tmp_path / "audit.key")
    yield log
    log.close()


def _accepted(audit: AuditLog, tenant: str, request_id: str, run_id: str) -> None:
    audit.append("accepted", stream=tenant, actor="key:k1", tenant=tenant, request_id=request_id,
                 data={"run_id": run_id, "client_ip": "127.0.0.1"})


def _end(audit: AuditLog, event: str, tenant: str, request_id: str) -> None:
    audit.append(event, stream=tenant, actor="key:k1", tenant=tenant, request_id=request_id, data={})


def test_marker_round_trip_is_atomic_and_private(tmp_path: Path) -> None:
    path = tmp_path / "appliance.run"
    marker = RunMarker.new()
    write_marker(path, marker)
    assert read_marker(path) == marker
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["appliance.run"]  # no temporary file left
    assert not remove_marker(path, RunMarker.new())  # another run's marker is never removed
    assert remove_marker(path, marker) and read_marker(path) is None


@pytest.mark.parametrize(("text", "expected"), [
    ("not json", "expected a JSON object, found text that is not JSON"),
    ("[1]", "expected a JSON object, found list"),
    ('{"run_id": "x", "pid": 1, "started_at": "2026-01-01T00:00:00Z"}', "expected run_id as 32 lowercase hex"),
    ('{"run_id": "' + "a" * 32 + '", "pid": 0, "started_at": "2026-01-01T00:00:00Z"}', "expected pid as a positive"),
    ('{"run_id": "' + "a" * 32 + '", "pid": 5, "started_at": "yesterday"}', "expected started_at as an RFC 3339"),
])
def test_an_unreadable_marker_says_what_was_expected(tmp_path: Path, text: str, expected: str) -> None:
    (tmp_path / "appliance.run").write_text(text)
    with pytest.raises(ValueError, match=expected):
        read_marker(tmp_path / "appliance.run")


def test_holder_alive_only_for_the_live_process_that_wrote_it() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        now = RunMarker.new()
        assert holder_is_alive(RunMarker(now.run_id, child.pid, now.started_at))
        # the same pid, but the process started after the marker was written: a reused pid
        assert not holder_is_alive(RunMarker(now.run_id, child.pid, "2020-01-01T00:00:00Z"))
        assert not holder_is_alive(now)  # this process: an earlier runtime of ours that did not stop
        child.kill()
        child.wait()
        assert not holder_is_alive(RunMarker(now.run_id, child.pid, now.started_at))  # dead
    finally:
        child.kill()
        child.wait()


def test_a_clean_previous_run_writes_nothing(tmp_path: Path, audit: AuditLog) -> None:
    run = RunMarker.new()
    assert begin_run(audit, lambda: ["acme"], tmp_path / "appliance.run", run) is None
    assert audit.streams() == [] and read_marker(tmp_path / "appliance.run") == run


def test_unclean_previous_run_is_recorded_and_its_open_requests_abandoned(tmp_path: Path, audit: AuditLog) -> None:
    older = "0" * 32
    _accepted(audit, "acme", "chatcmpl-older", older)  # open, but of an older run: not this reconciliation's
    previous = RunMarker.new()
    write_marker(tmp_path / "appliance.run", previous)
    for request_id in ("r-done", "r-aborted", "r-open1", "r-rejected"):
        _accepted(audit, "acme", request_id, previous.run_id)
    _accepted(audit, "beta", "r-open2", previous.run_id)
    _end(audit, "completed", "acme", "r-done")
    _end(audit, "aborted", "acme", "r-aborted")
    _end(audit, "rejected", "acme", "r-rejected")
    newest = max(audit.query(s)[-1].ts for s in ("acme", "beta"))
    heads = {s: len(audit.query(s)) for s in ("acme", "beta")}

    run = RunMarker.new()
    done = begin_run(audit, lambda: ["acme", "beta", "gone"], tmp_path / "appliance.run", run)

    assert done is not None and read_marker(tmp_path / "appliance.run") == run
    (shutdown,) = audit.query("_admin")
    assert shutdown.event_type == "admin.unclean_shutdown" and shutdown.actor == "appliance"
    assert shutdown.data == {"previous_run_id": previous.run_id, "previous_pid": previous.pid,
                             "previous_started_at": previous.started_at, "last_record_ts": newest,
                             "open_requests": 2, "run_id": run.run_id}
    abandoned = {str(r.request_id): r for s in ("acme", "beta") for r in audit.query(s)[heads[s]:]}
    assert sorted(abandoned) == ["r-open1", "r-open2"]
    accepted_seq = {str(r.request_id): r.seq for s in ("acme", "beta") for r in audit.query(s)
                    if r.event_type == "accepted"}
    for request_id, record in abandoned.items():
        assert record.event_type == "abandoned" and record.tenant == record.stream
        assert record.data == {"run_id": previous.run_id, "accepted_seq": accepted_seq[request_id],
                               "reason": f"gateway stopped uncleanly (previous run {previous.run_id})"}
    assert shutdown.ts <= min(r.ts for r in abandoned.values())  # the shutdown record comes first
    assert audit.verify().ok

    # the next start after a clean stop: nothing more
    assert remove_marker(tmp_path / "appliance.run", run)
    count = sum(len(audit.query(s)) for s in audit.streams())
    assert begin_run(audit, lambda: ["acme", "beta"], tmp_path / "appliance.run", RunMarker.new()) is None
    assert sum(len(audit.query(s)) for s in audit.streams()) == count


def test_a_live_gateway_on_the_same_data_dir_is_refused_and_nothing_written(tmp_path: Path, audit: AuditLog) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        now = RunMarker.new()
        live = RunMarker(now.run_id, child.pid, now.started_at)
        write_marker(tmp_path / "appliance.run", live)
        with pytest.raises(RunMarkerError, match=f"another appliance \\(pid {child.pid}.*stop it first"):
            begin_run(audit, lambda: [], tmp_path / "appliance.run", RunMarker.new())
        assert audit.streams() == [] and read_marker(tmp_path / "appliance.run") == live
    finally:
        child.kill()
        child.wait()


def test_an_unreadable_marker_is_still_an_unclean_shutdown(tmp_path: Path, audit: AuditLog) -> None:
    (tmp_path / "appliance.run").write_text("{torn")
    run = RunMarker.new()
    begin_run(audit, lambda: [], tmp_path / "appliance.run", run)
    (record,) = audit.query("_admin")
    assert record.event_type == "admin.unclean_shutdown" and record.data["open_requests"] is None
    assert "not JSON" in record.data["marker_error"] and record.data["run_id"] == run.run_id
    assert json.loads((tmp_path / "appliance.run").read_text())["pid"] == os.getpid()


def test_client_fields_take_the_tcp_peer_and_a_cleaned_user_agent() -> None:
    from appliance.client_info import client_fields

    scope = {"client": ("10.1.2.3", 55000), "headers": [
        (b"x-forwarded-for", b"1.1.1.1"), (b"user-agent", "a\tb\x85c\u202ed".encode("utf-8") + b"z" * 600)]}
    who = client_fields(scope)
    assert who["client_ip"] == "10.1.2.3"  # never the header a client can set
    ua = who["user_agent"]
    assert len(ua) == 256 and ua.endswith("…") and ua.startswith("a\ufffdb")
    assert not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in ua)
    assert client_fields({"headers": []}) == {"client_ip": "unknown", "user_agent": ""}
