"""``appliance policy apply``, ``reset`` and ``show`` on a root whose gateway is not running, and
their refusals: a directory of files applied together into ROOT/data/policies (the release's files
byte-identical) and recorded; an upgrade of the release keeps them on top; a reset puts the
release's policy back, refused when what would remain is invalid; a gateway that looks alive but
does not answer, or no admin key, applies nothing (exit 2); a problem anywhere applies nothing
(exit 1)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from appliance.audit import AuditLog
from appliance.audit.retention_cli import run_prune
from appliance.runmarker import RunMarker, marker_path, write_marker
from appliance.tls import ensure_tls
from policies import load_policy_set
from policies.effective import load_in_force
from tests.appliance.runtime_root import lay_out_root
from tests.appliance.support import BIN


def _policy(root: Path, command: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "appliance"), "policy", command, *args, "--root", str(root)], text=True,
                          capture_output=True, timeout=120, env={**os.environ, "LC_ALL": "C.UTF-8"})


def _apply(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return _policy(root, "apply", *args)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _records(root: Path) -> list[dict[str, object]]:
    log = AuditLog(f"sqlite:///{root / 'data' / 'appliance.db'}", root / "secrets" / "audit-signing.key")
    try:
        return [r.data for r in log.query("_admin") if r.event_type == "admin.policy_applied"]
    finally:
        log.close()


@pytest.fixture()
def root(tmp_path: Path, model_dir: Path) -> Path:
    return lay_out_root(tmp_path / "root", model_dir)


def _new_files(tmp_path: Path) -> Path:
    new = tmp_path / "new"
    new.mkdir()
    gold = {"priority": 0, "ttft_ms": 200, "tpot_ms": 40, "percentile": 99, "on_overload": "queue",
            "deadline_ms": 20000}
    (new / "classes_site.yaml").write_text(yaml.safe_dump({"sla_classes": {"gold": gold}}))
    (new / "tenants_site.yaml").write_text(yaml.safe_dump({"tenants": {"acme": {"sla_class": "gold"}}}))
    return new


def test_a_directory_applied_while_stopped_is_written_and_recorded(root: Path, tmp_path: Path) -> None:
    policies = root / "releases" / "1.0.0" / "policies"
    release = _snapshot(policies)
    old = load_policy_set(policies).digest
    done = _apply(root, str(_new_files(tmp_path)))
    assert done.returncode == 0, done.stdout + done.stderr
    applied = root / "data" / "policies"
    assert done.stdout.startswith(f"no gateway running: wrote classes_site.yaml, tenants_site.yaml to {applied}")
    assert _snapshot(policies) == release  # the release's files are byte-identical
    assert sorted(_snapshot(applied)) == ["classes_site.yaml", "tenants_site.yaml"]
    now = load_in_force(policies, applied)
    assert now.sla_class_for("acme").name == "gold" and now.sla_classes["gold"].on_overload == "queue"
    assert f"{old} -> {now.digest}" in done.stdout
    log = AuditLog(f"sqlite:///{root / 'data' / 'appliance.db'}", root / "secrets" / "audit-signing.key")
    try:
        (record,) = [r for r in log.query("_admin") if r.event_type == "admin.policy_applied"]
    finally:
        log.close()
    assert record.actor.startswith("cli:")
    assert (record.data["old_digest"], record.data["new_digest"], record.data["files"], record.data["via"]) == (
        old, now.digest, ["classes_site.yaml", "tenants_site.yaml"], "cli")
    assert (root / "data" / "policy-state.json").read_text() == f'{{"digest": "{now.digest}"}}'


def test_one_bad_file_of_several_applies_nothing(root: Path, tmp_path: Path) -> None:
    new = _new_files(tmp_path)
    (new / "tenants_site.yaml").write_text("tenants:\n  acme:\n    sla_class: platinum\n")
    before = sorted(p.name for p in (root / "releases" / "1.0.0" / "policies").iterdir())
    done = _apply(root, str(new))
    assert done.returncode == 1
    assert done.stdout.strip() == (f"{new / 'tenants_site.yaml'}:3:16: tenants.acme.sla_class: expected one of "
                                   "['batch', 'gold', 'interactive', 'standard'], found 'platinum'")
    assert sorted(p.name for p in (root / "releases" / "1.0.0" / "policies").iterdir()) == before
    assert not (root / "data" / "policies").exists()


def test_an_upgrade_keeps_applied_files_on_top_and_reset_and_show_tell_the_release_from_them(
        root: Path, tmp_path: Path) -> None:
    old_release = root / "releases" / "1.0.0" / "policies"
    shipped = _snapshot(old_release)
    site = tmp_path / "retention.yaml"  # replaces the release's file of the same name
    site.write_text("retention:\n  audit_days: 30\n")
    assert _apply(root, str(site), str(_new_files(tmp_path))).returncode == 0
    assert _snapshot(old_release) == shipped

    # an upgrade (simulated as the installer leaves it): a new release whose tenants.yaml changed
    new_release = root / "releases" / "1.1.0"
    shutil.copytree(old_release, new_release / "policies")
    tenants = new_release / "policies" / "tenants.yaml"
    doc = yaml.safe_load(tenants.read_text())
    doc.setdefault("tenants", {})["beta"] = {"rate_limit_rpm": 11}
    tenants.write_text(yaml.safe_dump(doc))
    config = yaml.safe_load((root / "current" / "appliance.yaml").read_text())
    config["version"], config["policies_dir"] = "1.1.0", str(new_release / "policies")
    (new_release / "appliance.yaml").write_text(yaml.safe_dump(config))
    (root / "current").unlink()
    (root / "current").symlink_to(new_release)
    applied = root / "data" / "policies"
    in_force = load_in_force(new_release / "policies", applied)
    assert in_force.retention.audit_days == 30  # the applied file stays on top
    assert in_force.sla_class_for("acme").name == "gold"
    assert in_force.tenant_policy("beta").rate_limit_rpm == 11  # and the release's change is taken
    pruned = io.StringIO()  # audit prune keeps to the retention in force: the applied 30 days
    assert run_prune(root, dry_run=True, as_json=True, console=Console(file=pruned, width=200)) == 0
    assert json.loads(pruned.getvalue())["policy_digest"] == in_force.digest

    shown = _policy(root, "show", "--json")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    doc = json.loads(shown.stdout)
    assert (doc["digest"], doc["valid"], doc["applied_dir"]) == (in_force.digest, True, str(applied))
    origins = {f["name"]: (f["origin"], f["path"], f["replaces"]) for f in doc["files"]}
    assert origins == {
        "classes_site.yaml": ("applied", str(applied / "classes_site.yaml"), None),
        "retention.yaml": ("applied", str(applied / "retention.yaml"),
                           str(new_release / "policies" / "retention.yaml")),
        "sla_classes.yaml": ("release", str(new_release / "policies" / "sla_classes.yaml"), None),
        "tenants.yaml": ("release", str(tenants), None),
        "tenants_site.yaml": ("applied", str(applied / "tenants_site.yaml"), None)}
    table = _policy(root, "show")
    assert table.returncode == 0 and f"policy digest {in_force.digest}, valid; 3 applied file(s)" in table.stdout

    # a reset that would leave tenants_site.yaml naming a class no file defines: refused, nothing removed
    done = _policy(root, "reset", "classes_site.yaml")
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"{applied / 'tenants_site.yaml'}:3:16: tenants.acme.sla_class: expected one of" in done.stdout
    assert sorted(_snapshot(applied)) == ["classes_site.yaml", "retention.yaml", "tenants_site.yaml"]
    done = _policy(root, "reset", "tenants.yaml")
    assert done.returncode == 2 and "found no 'tenants.yaml'" in done.stderr

    # one file: the release's retention is in force again; then all: exactly the release's set
    done = _policy(root, "reset", "retention.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith(f"no gateway running: removed retention.yaml from {applied}")
    assert load_in_force(new_release / "policies", applied).retention.audit_days != 30
    done = _policy(root, "reset")
    assert done.returncode == 0, done.stdout + done.stderr
    release_only = load_policy_set(new_release / "policies").digest
    assert load_in_force(new_release / "policies", applied).digest == release_only
    assert f"-> {release_only}" in done.stdout and list(applied.iterdir()) == []
    records = _records(root)
    assert [(r["files"], r.get("reset", False)) for r in records] == [
        (["classes_site.yaml", "retention.yaml", "tenants_site.yaml"], False), (["retention.yaml"], True),
        (["classes_site.yaml", "tenants_site.yaml"], True)]
    assert records[-1]["new_digest"] == release_only and records[-1]["old_digest"] == records[-2]["new_digest"]


def test_a_gateway_that_looks_alive_but_does_not_answer_gets_nothing(root: Path, tmp_path: Path) -> None:
    # a live process holds the run marker (as a gateway would), but nothing listens on the port
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (root / "data").mkdir(parents=True, exist_ok=True)
        mine = RunMarker.new()
        write_marker(marker_path(root / "data"), RunMarker(mine.run_id, holder.pid, mine.started_at))
        site = tmp_path / "site.yaml"
        site.write_text(yaml.safe_dump({"tenants": {"acme": {"rate_limit_rpm": 3}}}))
        done = _apply(root, str(site))
        assert done.returncode == 2
        said = " ".join(done.stderr.split())
        assert "the gateway is running but no admin key was found: expected" in said, said
        key = root / "secrets" / "admin.key"
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_text("sov_0000000000000000_" + "a" * 43 + "\n")
        done = _apply(root, str(site))
        assert done.returncode == 2
        assert "its CA certificate is missing: expected" in " ".join(done.stderr.split())
        ensure_tls(root / "tls", ["127.0.0.1"])  # as the gateway's first start makes it
        done = _apply(root, str(site))
        assert done.returncode == 2
        said = " ".join(done.stderr.split())
        assert "https://127.0.0.1:8443 did not answer" in said and "nothing applied" in said, said
        assert "sov_0000" not in done.stdout + done.stderr  # the key is never shown
        done = _apply(root, str(site), "--url", "http://127.0.0.1:8443")
        assert done.returncode == 2 and "--url: expected https://HOST:PORT, found 'http://127.0.0.1:8443'" in " ".join(
            done.stderr.split())
        done = _apply(root, str(site), "--url", "https://127.0.0.1:9/")
        assert done.returncode == 2 and "https://127.0.0.1:9 did not answer" in " ".join(done.stderr.split())
        assert not (root / "releases" / "1.0.0" / "policies" / "site.yaml").exists()
        assert not (root / "data" / "policies").exists()
        done = _policy(root, "reset")  # the same refusals for a reset: here there is nothing to reset
        assert done.returncode == 2 and "nothing to reset" in " ".join(done.stderr.split())
    finally:
        holder.kill()
        holder.wait()
