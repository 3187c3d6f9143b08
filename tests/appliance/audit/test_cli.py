"""The ``audit`` Typer sub-app: exit codes scripts can rely on, tables, and ``--json``."""

from __future__ import annotations

import getpass
import json
from pathlib import Path

from typer.testing import CliRunner

from appliance.audit import AuditLog
from appliance.audit.cli import app, run_verify

from .conftest import fill, raw_sql

runner = CliRunner()


def test_verify_export_and_verify_export_commands(audit_log: AuditLog, audit_url: str, key_path: Path,
                                                   tmp_path: Path) -> None:
    fill(audit_log, "acme", 3)
    fill(audit_log, "globex", 2)
    db = audit_url
    result = runner.invoke(app, ["verify", "--db", db, "--key", str(key_path)])
    assert result.exit_code == 0, result.output
    assert "acme" in result.output and "globex" in result.output

    pem = tmp_path / "pub" / "audit.pem"
    assert runner.invoke(app, ["public-key", "--key", str(key_path), "--out", str(pem)]).exit_code == 0
    assert pem.read_bytes() == audit_log.public_key_pem()

    out = tmp_path / "acme.tar"
    result = runner.invoke(app, ["export", "--db", db, "--key", str(key_path), "--tenant", "acme",
                                 "--since", "2000-01-01T00:00:00Z", "--until", "2999-01-01T00:00:00Z",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["verify-export", str(out), "--public-key", str(pem), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] and report["count"] == 3 and len(report["checks"]) == 14

    # the export and the keyed verification were recorded in the log, under the CLI user
    admin = audit_log.query("_admin")
    exported = [r for r in admin if r.event_type == "admin.audit_exported"]
    verified = [r for r in admin if r.event_type == "admin.audit_verified"]
    assert len(exported) == 1 and len(verified) == 1
    assert exported[0].actor == f"cli:{getpass.getuser()}" and exported[0].tenant == "acme"
    assert exported[0].data["count"] == 3 and exported[0].data["result"] == "ok"
    assert exported[0].data["period"] == {"since": "2000-01-01T00:00:00.000000Z",
                                          "until": "2999-01-01T00:00:00.000000Z"}
    assert verified[0].data["result"] == "ok" and verified[0].data["streams"] == 2
    # verify-export with the appliance's database records it there; offline it records nothing
    result = runner.invoke(app, ["verify-export", str(out), "--public-key", str(pem), "--db", db, "--key",
                                 str(key_path)])
    assert result.exit_code == 0, result.output
    verified = [r for r in audit_log.query("_admin") if r.event_type == "admin.audit_verified"]
    assert verified[-1].data["what"] == "export" and verified[-1].data["count"] == 3
    assert runner.invoke(app, ["verify-export", str(out), "--public-key", str(pem), "--db", db]).exit_code == 2

    raw_sql(audit_url, "DELETE FROM audit_events WHERE stream = 'globex' AND seq = 1")
    result = runner.invoke(app, ["verify", "--db", db, "--public-key", str(pem), "--json"])
    assert result.exit_code == 1
    failure = json.loads(result.output)["first_failure"]
    assert (failure["stream"], failure["seq"], failure["check"]) == ("globex", 1, "seq")


def test_verify_export_exits_1_on_tampering(audit_log: AuditLog, audit_url: str, key_path: Path,
                                            tmp_path: Path) -> None:
    fill(audit_log, "acme", 2)
    out = tmp_path / "acme.tar"
    pem = tmp_path / "audit.pem"
    pem.write_bytes(audit_log.public_key_pem())
    assert runner.invoke(app, ["export", "--db", audit_url, "--key", str(key_path),
                               "--tenant", "acme", "--out", str(out)]).exit_code == 0
    data = bytearray(out.read_bytes())
    data[data.index(b'"seq":2')+6] = ord("3")  # edit a record inside the tar
    out.write_bytes(bytes(data))
    result = runner.invoke(app, ["verify-export", str(out), "--public-key", str(pem)])
    assert result.exit_code == 1
    assert "NOT VERIFIED" in result.output


def test_export_formats_and_refusals_from_the_cli(audit_log: AuditLog, audit_url: str, key_path: Path,
                                                  tmp_path: Path) -> None:
    fill(audit_log, "acme", 3)
    pem = tmp_path / "audit.pem"
    pem.write_bytes(audit_log.public_key_pem())
    base = ["export", "--db", audit_url, "--key", str(key_path), "--tenant", "acme"]
    for fmt in ("csv", "ocsf"):
        out = tmp_path / f"acme-{fmt}.tar"
        result = runner.invoke(app, [*base, "--format", fmt, "--proofs", "all", "--out", str(out), "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["count"] == 3
        assert runner.invoke(app, ["verify-export", str(out), "--public-key", str(pem)]).exit_code == 0
    result = runner.invoke(app, [*base, "--format", "xml", "--out", str(tmp_path / "x.tar")])
    assert result.exit_code == 2 and "--format jsonl|csv|ocsf" in result.output
    assert "LARGE" in runner.invoke(app, ["export", "--help"]).output
    # a stream that does not verify is refused (exit 1), and the refusal is recorded
    raw_sql(audit_url, "UPDATE audit_events SET actor = 'x' WHERE stream = 'acme' AND seq = 2")
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "bad.tar")])
    assert result.exit_code == 1 and not (tmp_path / "bad.tar").exists()
    refused = [r for r in audit_log.query("_admin") if r.event_type == "admin.audit_exported"][-1]
    assert refused.data["result"].startswith("refused: acme seq 2")


def test_usage_errors_exit_2(tmp_path: Path, key_path: Path) -> None:
    assert run_verify(f"sqlite:///{tmp_path / 'absent.db'}", key=key_path) == 2
    assert not (tmp_path / "absent.db").exists()  # verifying never creates a database
    result = runner.invoke(app, ["verify", "--db", f"sqlite:///{tmp_path / 'x.db'}"])
    assert result.exit_code == 2 and "--key or --public-key" in result.output
    assert runner.invoke(app, ["public-key", "--key", str(tmp_path / "nokey"), "--out", "x.pem"]).exit_code == 2


def test_the_audit_cli_carries_every_audit_command() -> None:
    """The witness and retention modules' commands are mounted on ``appliance audit`` itself."""
    import typer.main

    names = set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    assert {"verify", "export", "verify-export", "public-key", "checkpoint", "prove", "verify-proof",
            "consistency", "witness", "verify-anchors", "prune", "hold", "shred", "show-content"} <= names
