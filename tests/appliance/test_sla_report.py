"""The signed SLA report: computed from a real audit log (SQLite, records written through
AuditLog in the shapes the service writes), percentiles against numbers worked out by hand,
signed and verified offline, a changed byte refused, bad periods and tenants refused."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console

from appliance.audit.log import AuditLog
from appliance.config import load_config
from appliance.policy_audit import record_policy_applied
from appliance.sla_cli import run_report, run_verify
from appliance.sla_report import Period, SlaReportError, nearest_rank
from appliance.sla_report_files import verify_report_dir
from policies.effective import applied_policy_dir, load_in_force
from tests.appliance.runtime_root import lay_out_root

# interactive: TTFT 1000 ms, TPOT 200 ms, at p99 (the shipped sla_classes.yaml)
# (ttft_ms, tpot_ms) of completed requests with 11 tokens; one more with a single token (ttft 100)
COMPLETED = [(120, 20), (80, 30), (300, 250), (1500, 10), (450, 50), (60, 40), (900, 60), (200, 70), (700, 80),
             (1000, 90)]
TENANTS = "tenants:\n  acme:\n    sla_class: interactive\n  batchco:\n    sla_class: batch\n"


def _console() -> Console:
    return Console(width=200, file=io.StringIO())


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    root = lay_out_root(tmp_path / "root", tmp_path / "model")
    config = load_config(root)
    applied = applied_policy_dir(config.data_dir)
    applied.mkdir(parents=True)
    shipped = (config.policies_dir / "tenants.yaml").read_text()
    assert "\ntenants: {}\n" in shipped
    (applied / "tenants.yaml").write_text(shipped.replace("\ntenants: {}\n", "\n" + TENANTS))
    policies = load_in_force(config.policies_dir, applied)
    config.secrets_dir.mkdir(parents=True, exist_ok=True)
    log = AuditLog(config.db_url, config.audit_key_path, create=True)
    try:
        record_policy_applied(log, None, policies, ["tenants.yaml"], config.data_dir, "cli:test")
        _write_requests(log)
    finally:
        log.close()
    return root


def _request(log: AuditLog, tenant: str, n: int, sla_class: str, end: str, ttft: float | None, latency: float,
             tokens: int) -> None:
    rid = f"chatcmpl-{tenant}-{n}"
    log.append("accepted", stream=tenant, actor="key:k1", tenant=tenant, request_id=rid, data={
        "model": "m", "node": "node-a", "sla_class": sla_class, "prompt_tokens": 5, "max_tokens": 16})
    log.append(end, stream=tenant, actor="key:k1", tenant=tenant, request_id=rid, data={
        "model": "m", "node": "node-a", "prompt_tokens": 5, "completion_tokens": tokens, "finish_reason": "stop",
        "ttft_ms": ttft, "latency_ms": latency, "output_hash": "hmac-sha256:00"})


def _write_requests(log: AuditLog) -> None:
    n = 0
    for ttft, tpot in COMPLETED:
        n += 1
        _request(log, "acme", n, "interactive", "completed", ttft, ttft + 10 * tpot, 11)
    _request(log, "acme", 11, "interactive", "completed", 100, 130, 1)
    _request(log, "acme", 12, "interactive", "failed", None, 40, 0)
    _request(log, "acme", 13, "interactive", "aborted", 50, 60, 1)
    for i, (status, code) in enumerate([(429, "sla_unattainable"), (429, "sla_unattainable"),
                                        (503, "appliance_saturated")]):
        log.append("rejected", stream="acme", actor="key:k1", tenant="acme", request_id=f"chatcmpl-r{i}",
                   data={"model": "m", "status": status, "code": code, "reason": "busy"})
    for i in range(3):  # another tenant's requests never enter acme's report
        _request(log, "batchco", i, "batch", "completed", 5000, 9000, 40)


def _month_of_records(root: Path) -> str:
    config = load_config(root)
    log = AuditLog(config.db_url, config.audit_key_path, create=False)
    try:
        return log.query("acme", limit=1)[0].ts[:7]
    finally:
        log.close()


def test_nearest_rank_by_hand() -> None:
    assert nearest_rank([], 50) is None
    assert nearest_rank([5.0], 99) == 5.0
    assert nearest_rank([3.0, 1.0, 2.0, 4.0], 50) == 2.0  # ceil(0.5 * 4) = 2nd smallest
    assert nearest_rank([3.0, 1.0, 2.0, 4.0], 51) == 3.0
    assert nearest_rank([float(v) for v in range(1, 101)], 99) == 99.0


def test_report_numbers_signature_and_audit_event(root: Path, tmp_path: Path) -> None:
    month = _month_of_records(root)
    out = tmp_path / "report"
    assert run_report(root, tenant="acme", period=month, fmt="all", out=out, console=_console()) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json", "manifest.sig", "sla-report.json", "sla-report.md", "sla-report.png"]
    report = json.loads((out / "sla-report.json").read_text())
    assert report["tenant"] == "acme" and report["period"]["month"] == month
    assert list(report["classes"]) == ["interactive"]  # batchco's batch requests are not acme's
    c = report["classes"]["interactive"]
    assert (c["requests"], c["ran"], c["completed"], c["failed"], c["aborted"], c["rejected"]) == (16, 13, 11, 1, 1, 3)
    assert c["rejected_by_code"] == {"429 sla_unattainable": 2, "503 appliance_saturated": 1}
    # TTFT of the 11 completed, sorted: 60 80 100 120 200 300 450 700 900 1000 1500 (nearest rank 6, 10, 11)
    assert c["ttft_ms"] == {"p50": 300.0, "p90": 1000.0, "p99": 1500.0}
    # TPOT of the 10 with 11 tokens, sorted: 10 20 30 40 50 60 70 80 90 250 (nearest rank 5, 9, 10)
    assert c["tpot_ms"] == {"p50": 50.0, "p90": 90.0, "p99": 250.0}
    # met: completed, TTFT <= 1000 and TPOT <= 200: all but (300, 250) and (1500, 10); 1000 is met (<=)
    assert c["slo_met"] == 9
    assert c["slo_missed_by_reason"] == {"aborted": 1, "failed": 1, "tpot": 1, "ttft": 1}
    assert c["attainment"] == pytest.approx(9 / 13)
    assert c["objective"]["met"] is False and c["objective"]["attainment_needed"] == pytest.approx(0.99)
    assert c["goodput_rps"] == pytest.approx(9 / report["period_seconds"])
    assert c["targets"]["ttft_ms"] == 1000 and c["targets"]["tpot_ms"] == 200
    assert report["policy"]["targets_were_in_force"] is True
    assert report["policy"]["in_force"] == [report["policy"]["targets_from"]]
    md = (out / "sla-report.md").read_text()
    assert "| interactive | 16 | 11 | 1 | 1 | 3 | 9 | 69.23% | MISSED (>= 99.00%)" in md
    assert (out / "sla-report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    config = load_config(root)
    log = AuditLog(config.db_url, config.audit_key_path, create=False)
    try:
        pub = tmp_path / "audit.pub"
        pub.write_bytes(log.public_key_pem())
        events = [r for r in log.query("_admin") if r.event_type == "admin.sla_report"]
    finally:
        log.close()
    assert len(events) == 1 and events[0].tenant == "acme"
    manifest = json.loads((out / "manifest.json").read_text())
    assert events[0].data["period"] == month
    assert events[0].data["files"] == {name: e["sha256"] for name, e in manifest["files"].items()}

    # offline, through the real command: verified; then one changed byte is refused, naming the file
    cmd = [str(Path(sys.executable).parent / "appliance"), "sla", "verify", str(out), "--key", str(pub)]
    good = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert good.returncode == 0, good.stdout + good.stderr
    assert "VERIFIED" in good.stdout
    md_bytes = bytearray((out / "sla-report.md").read_bytes())
    md_bytes[10] ^= 0x01
    (out / "sla-report.md").write_bytes(bytes(md_bytes))
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert bad.returncode == 1
    assert "NOT VERIFIED" in bad.stdout and "check 5 (file digests)" in bad.stdout
    assert "sla-report.md: expected sha256" in bad.stdout and "changed after signing" in bad.stdout


def test_changed_manifest_and_wrong_key_refused(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert run_report(root, tenant="acme", period=_month_of_records(root), fmt="json", out=out,
                      console=_console()) == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "manifest.sig", "sla-report.json"]
    config = load_config(root)
    pub = tmp_path / "audit.pub"
    log = AuditLog(config.db_url, config.audit_key_path, create=False)
    try:
        pub.write_bytes(log.public_key_pem())
    finally:
        log.close()
    assert run_verify(out, public_key=pub, console=_console()) == 0
    # the JSON rewritten with better numbers and the manifest's digest updated: the signature fails
    report = json.loads((out / "sla-report.json").read_text())
    report["classes"]["interactive"]["attainment"] = 1.0
    (out / "sla-report.json").write_text(json.dumps(report))
    manifest = json.loads((out / "manifest.json").read_text())
    data = (out / "sla-report.json").read_bytes()
    manifest["files"]["sla-report.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (out / "manifest.json").write_text(json.dumps(manifest, sort_keys=True, separators=(",", ":")))
    result = verify_report_dir(out, pub)
    assert not result.ok and result.first_failure is not None
    assert result.first_failure.name == "manifest signature"
    assert "changed after signing" in result.first_failure.detail
    # a key that did not sign it
    other = tmp_path / "other.pub"
    other.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    assert verify_report_dir(out, other).first_failure.name == "manifest signature"  # type: ignore[union-attr]
    assert not verify_report_dir(tmp_path / "nothing-here", pub).ok


@pytest.mark.parametrize("period", ["2026-13", "2026-1", "december", "2026-12-01", "0999-01", ""])
def test_bad_period_refused(period: str) -> None:
    with pytest.raises(SlaReportError, match=r"period: expected a UTC month as YYYY-MM \(e\.g\. 2026-12\)"):
        Period.parse(period)


def test_period_bounds() -> None:
    p = Period.parse("2026-12")
    assert (p.since, p.until) == (datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    assert p.seconds(datetime(2026, 12, 2, tzinfo=UTC)) == 86400.0
    assert p.seconds(datetime(2027, 3, 1, tzinfo=UTC)) == 31 * 86400.0


def test_bad_period_tenant_and_output_refused_by_the_command(root: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    month = _month_of_records(root)
    cases = [
        ({"tenant": "acme", "period": "2026-13"}, "period: expected a UTC month as YYYY-MM"),
        ({"tenant": "nobody", "period": month}, "tenant: expected a tenant of the policy in force or one with "
                                                "audit records, found 'nobody'"),
        ({"tenant": "../etc", "period": month}, "tenant: expected a tenant name matching"),
        ({"tenant": "_admin", "period": month}, "tenant: expected a tenant name matching"),
        ({"tenant": "acme", "period": month, "fmt": "pdf"}, "format: expected one of"),
    ]
    for args, message in cases:
        code = run_report(root, out=tmp_path / "never", **{"fmt": "all", **args})  # type: ignore[arg-type]
        assert code == 2, args
        assert message in " ".join(capsys.readouterr().err.split()), args
    assert not (tmp_path / "never").exists()
    out = tmp_path / "twice"
    assert run_report(root, tenant="acme", period=month, fmt="md", out=out, console=_console()) == 0
    assert run_report(root, tenant="acme", period=month, fmt="md", out=out, console=_console()) == 2
    assert "expected no signed report in it, found manifest.json" in " ".join(capsys.readouterr().err.split())


def test_month_without_requests_and_tampered_log(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "empty"
    assert run_report(root, tenant="acme", period="2020-01", fmt="all", out=out, console=_console()) == 0
    report = json.loads((out / "sla-report.json").read_text())
    assert report["classes"] == {} and report["policy"]["in_force"] == []
    assert report["policy"]["targets_were_in_force"] is False
    assert "No requests of this tenant in this period." in (out / "sla-report.md").read_text()
    # a record changed in the database: the report is refused, not computed from it
    db = load_config(root).db_url.removeprefix("sqlite:///")
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE audit_events SET data = replace(data, '\"ttft_ms\":1500', '\"ttft_ms\":150') "
                     "WHERE stream = 'acme'")
    assert run_report(root, tenant="acme", period=_month_of_records(root), fmt="json", out=tmp_path / "x",
                      console=_console()) == 1
    assert not (tmp_path / "x" / "manifest.json").exists()
