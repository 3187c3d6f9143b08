"""``appliance policy apply`` on a root whose gateway is not running, and its refusals: a
directory of files applied together and recorded; a gateway that looks alive but does not answer,
or no admin key, applies nothing (exit 2); a problem anywhere applies nothing (exit 1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from appliance.audit import AuditLog
from appliance.runmarker import RunMarker, marker_path, write_marker
from appliance.tls import ensure_tls
from policies import load_policy_set
from tests.appliance.runtime_root import lay_out_root
from tests.appliance.support import BIN


def _apply(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "appliance"), "policy", "apply", *args, "--root", str(root)], text=True,
                          capture_output=True, timeout=120, env={**os.environ, "LC_ALL": "C.UTF-8"})


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
    old = load_policy_set(policies).digest
    done = _apply(root, str(_new_files(tmp_path)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith(f"no gateway running: wrote classes_site.yaml, tenants_site.yaml to {policies}")
    now = load_policy_set(policies)
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
    finally:
        holder.kill()
        holder.wait()
