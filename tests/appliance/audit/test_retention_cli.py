"""``appliance audit prune|hold|shred|show-content`` on an install root laid out as the installer
leaves it: exit codes, one-line messages, --json, and an _admin event for every change and viewing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml
from typer.testing import CliRunner, Result

from appliance.audit import AuditLog
from appliance.audit.content import MASTER_KEY_FILE, ContentSealer
from appliance.audit.retention_cli import retention_app
from policies import default_policy_dir
from tests.appliance.audit.conftest import fill


def install_root(tmp_path: Path) -> tuple[Path, AuditLog]:
    """An install root as the installer leaves it (the parts these commands read), and its log."""
    from appliance.config import load_config

    root = tmp_path / "root"
    release = root / "releases" / "1.0.0"
    shutil.copytree(default_policy_dir(), release / "policies")
    (release / "appliance.yaml").write_text(yaml.safe_dump({
        "version": "1.0.0", "model": {"name": "m", "path": str(tmp_path / "model")},
        "policies_dir": str(release / "policies")}))
    (root / "current").symlink_to(release)
    config = load_config(root)
    config.data_dir.mkdir(parents=True)
    return root, AuditLog(config.db_url, config.audit_key_path, checkpoint_every=None)


def cli(*args: str) -> Result:
    return CliRunner().invoke(retention_app, list(args))


def test_prune_and_hold_commands(tmp_path: Path) -> None:
    root, log = install_root(tmp_path)
    fill(log, "acme", 2)
    log.close()
    r = str(root)
    dry = cli("prune", "--root", r, "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout)["pruned"] == 0 and json.loads(dry.stdout)["dry_run"] is True
    added = cli("hold", "add", "--root", r, "--tenant", "acme", "--since", "2026-01-01T00:00:00+01:00",
                "--reason", "case 7", "--json")
    assert added.exit_code == 0, added.output
    hold = json.loads(added.stdout)
    assert (hold["tenant"], hold["since"], hold["until"]) == ("acme", "2025-12-31T23:00:00.000000Z", None)
    assert hold["created_by"].startswith("cli:")
    listed = cli("hold", "list", "--root", r, "--json")
    assert [h["id"] for h in json.loads(listed.stdout)] == [hold["id"]]
    assert cli("hold", "release", hold["id"], "--root", r).exit_code == 0
    again = cli("hold", "release", hold["id"], "--root", r)
    assert again.exit_code == 1 and "expected an active hold" in again.stderr
    bad = cli("hold", "add", "--root", r, "--tenant", "acme", "--reason", "x", "--until", "soon")
    assert bad.exit_code == 2 and "ISO 8601" in bad.stderr
    run = cli("prune", "--root", r)
    assert run.exit_code == 0 and "Pruned 0 records" in run.stdout
    log = AuditLog(f"sqlite:///{root / 'data' / 'appliance.db'}", root / "secrets" / "audit-signing.key")
    try:
        kinds = [rec.event_type for rec in log.query("_admin")]
        assert kinds == ["admin.audit_hold_added", "admin.audit_hold_released"]
        assert log.verify().ok
    finally:
        log.close()


def test_shred_and_show_content_commands(tmp_path: Path) -> None:
    root, log = install_root(tmp_path)
    sealer = ContentSealer(log, root / "secrets" / MASTER_KEY_FILE)
    log.append("completed", stream="acme", actor="key:k1", request_id="req-1",
               data={"content": sealer.seal("acme", "req-1", "the prompt and the answer")})
    fill(log, "acme", 1)
    log.close()
    r = str(root)
    shown = cli("show-content", "--root", r, "--tenant", "acme", "--request-id", "req-1")
    assert shown.exit_code == 0 and "the prompt and the answer" in shown.stdout
    missing = cli("show-content", "--root", r, "--tenant", "acme", "--request-id", "acme-1")
    assert missing.exit_code == 2 and "1 record(s) without stored content" in missing.stderr
    unconfirmed = cli("shred", "--root", r, "--tenant", "acme")
    assert unconfirmed.exit_code == 2 and "expected --yes" in unconfirmed.stderr
    shred = cli("shred", "--root", r, "--tenant", "acme", "--yes", "--json")
    assert shred.exit_code == 0, shred.output
    gone = cli("show-content", "--root", r, "--tenant", "acme", "--request-id", "req-1")
    assert gone.exit_code == 1 and f"destroyed on {json.loads(shred.stdout)['shredded_at']}" in gone.stderr
    log = AuditLog(f"sqlite:///{root / 'data' / 'appliance.db'}", root / "secrets" / "audit-signing.key")
    try:
        admin = [(rec.event_type, rec.request_id) for rec in log.query("_admin")]
        assert admin == [("admin.audit_content_viewed", "req-1"), ("admin.tenant_key_shredded", None),
                         ("admin.audit_content_viewed", "req-1")]
        assert log.verify().ok
    finally:
        log.close()
