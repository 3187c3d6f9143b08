"""Applying policy to a real running gateway (``appliance serve`` in its own process, over a
stand-in engine node): through the admin API and through ``appliance policy apply``, which uses
that API while the gateway runs and writes the files for the next start when it does not; and
``appliance policy reset`` / ``DELETE /admin/v1/policies``, which put the release's policy back.
The applied files live in ROOT/data/policies: the release's policy directory stays byte-identical.

A tenant's request limit changed by an apply holds from the next request on, without restart; an
invalid apply is refused with every problem and leaves the limit in force; every change is an
``admin.policy_applied`` record with the old and new digests and who made it; a restart keeps the
applied policy (and does not record it again as a change)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from appliance.audit import AuditLog
from installer.first_admin import issue_first_admin_key
from tests.appliance.fleet_lab import MODEL, NODE_ENV, FleetLab
from tests.appliance.support import BIN, tls_ctx

QUESTION = [{"role": "user", "content": "Say hello."}]
POLICY: dict[str, object] = {"tenants": {"acme": {"allowed_models": ["*"], "rate_limit_rpm": 2}}}


def _site(rpm: int, sla_class: str = "interactive") -> str:
    return yaml.safe_dump({"tenants": {"acme": {"allowed_models": ["*"], "rate_limit_rpm": rpm,
                                                "sla_class": sla_class}}})


@pytest.fixture()
def lab(tmp_path: Path, model_dir: Path) -> Iterator[FleetLab]:
    lab = FleetLab(tmp_path, model_dir)
    lab.build({"n1": {"region": "eu", "site": "a", "classification": "internal"}}, POLICY)
    issue_first_admin_key(lab.gateway_root)  # as the installer leaves it: enrolled at the gateway's start
    try:
        lab.start_standin("n1", tokens=2)
        lab.start_gateway()
        yield lab
    finally:
        lab.close()


def _admin_http(lab: FleetLab) -> httpx.Client:
    key = (lab.gateway_root / "secrets" / "admin.key").read_text().strip()
    return httpx.Client(base_url=lab.url, verify=tls_ctx(lab.gateway_root / "tls" / "ca.pem"), timeout=60,
                        headers={"Authorization": f"Bearer {key}"})


def _served(client: openai.OpenAI) -> bool:
    """One request: True when served, False when refused for the tenant's request limit."""
    try:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2)  # type: ignore[arg-type]
    except openai.RateLimitError as exc:
        assert "rate_limit" in str(exc) or "requests per minute" in str(exc), exc
        return False
    return True


def _policy_cli(lab: FleetLab, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "appliance"), "policy", *args], text=True, capture_output=True,
                          env={**os.environ, **NODE_ENV}, timeout=120)


def _admin_records(lab: FleetLab, event: str) -> list[Any]:
    log = AuditLog(f"sqlite:///{lab.gateway_root / 'data' / 'appliance.db'}",
                   lab.gateway_root / "secrets" / "audit-signing.key")
    try:
        return [r for r in log.query("_admin") if r.event_type == event]
    finally:
        log.close()


def _stop_gateway(lab: FleetLab) -> None:
    assert lab.gateway is not None
    os.killpg(lab.gateway.pid, signal.SIGTERM)
    assert lab.gateway.wait(timeout=60) == 0


def test_apply_through_the_api_and_the_cli_takes_effect_without_restart_and_survives_one(
        lab: FleetLab, tmp_path: Path) -> None:
    acme = lab.client(lab.tenant_key("acme"), timeout=60)
    admin = _admin_http(lab)
    release = {p.name: p.read_bytes() for p in (lab.base / "policies").iterdir()}
    applied_dir = lab.gateway_root / "data" / "policies"
    first = admin.get("/admin/v1/policies").json()
    assert first["tenants"]["acme"]["rate_limit_rpm"] == 2
    assert [_served(acme) for _ in range(3)] == [True, True, False]  # 2 requests a minute

    # an invalid policy: 400 with every problem, located; the running policy stays
    bad = "tenants:\n  acme:\n    rate_limit_rpm: 100\n    sla_class: gold\n    colour: red\n"
    refused = admin.post("/admin/v1/policies?name=site.yaml", content=bad,
                         headers={"Content-Type": "application/yaml"})
    assert refused.status_code == 400, refused.text
    body = refused.json()
    assert body["error"]["code"] == "invalid_policy"
    problems = {p["place"]: p for p in body["problems"]}
    assert (problems["tenants.acme.sla_class"]["file"], problems["tenants.acme.sla_class"]["line"],
            problems["tenants.acme.sla_class"]["column"]) == ("site.yaml", 4, 16)
    assert (problems["tenants.acme.colour"]["line"], problems["tenants.acme.colour"]["column"]) == (5, 5)
    assert admin.get("/admin/v1/policies").json()["digest"] == first["digest"]
    assert not _served(acme)  # the old limit is still in force
    assert yaml.safe_load((lab.base / "policies" / "site.yaml").read_text()) == POLICY  # nothing written

    # a valid one through the API: in force for the very next request
    applied = admin.post("/admin/v1/policies?name=site.yaml", content=_site(100),
                         headers={"Content-Type": "application/yaml"})
    assert applied.status_code == 200, applied.text
    api = applied.json()
    assert (api["running"], api["changed"], api["old_digest"], api["files"], api["applied_dir"]) == (
        True, True, first["digest"], ["site.yaml"], str(applied_dir))
    assert yaml.safe_load((applied_dir / "site.yaml").read_text())["tenants"]["acme"]["rate_limit_rpm"] == 100
    assert _served(acme) and _served(acme)
    now = admin.get("/admin/v1/policies").json()
    assert now["digest"] == api["new_digest"]
    assert now["tenants"]["acme"]["sla_class"] == "interactive"

    # through the CLI while the gateway runs: it says it used the running gateway
    site = tmp_path / "site.yaml"
    site.write_text(_site(1))
    cli = _policy_cli(lab, "apply", str(site), "--root", str(lab.gateway_root))
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "applied to the running gateway at " + lab.url in cli.stdout
    assert not _served(acme)  # 1 a minute, and this minute's requests are already more
    running_digest = admin.get("/admin/v1/policies").json()["digest"]

    # an invalid file through the CLI: every problem with file, line and column; exit 1; nothing changes
    site.write_text("tenants:\n  acme:\n    rate_limit_rpm: 0\n")
    cli = _policy_cli(lab, "apply", str(site), "--root", str(lab.gateway_root))
    assert cli.returncode == 1, cli.stdout + cli.stderr
    assert f"{site}:3:21: tenants.acme.rate_limit_rpm: expected greater than or equal to 1, found 0" in cli.stdout
    assert admin.get("/admin/v1/policies").json()["digest"] == running_digest

    # a restart keeps the applied policy (the minute's requests are counted in the database, so the
    # limit of 1 a minute still refuses the next one)
    _stop_gateway(lab)
    lab.start_gateway()
    admin = _admin_http(lab)
    assert admin.get("/admin/v1/policies").json()["digest"] == running_digest
    assert admin.get("/admin/v1/policies").json()["tenants"]["acme"]["rate_limit_rpm"] == 1
    assert not _served(acme)

    # with the gateway stopped the CLI writes the files for the next start, and says so
    _stop_gateway(lab)
    site.write_text(_site(50, "standard"))
    cli = _policy_cli(lab, "apply", str(site), "--root", str(lab.gateway_root))
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "no gateway running: wrote site.yaml to " + str(applied_dir) in cli.stdout
    lab.start_gateway()
    admin = _admin_http(lab)
    assert admin.get("/admin/v1/policies").json()["tenants"]["acme"]["rate_limit_rpm"] == 50
    assert [_served(acme) for _ in range(3)] == [True, True, True]
    assert {p.name: p.read_bytes() for p in (lab.base / "policies").iterdir()} == release  # never written
    shown = _policy_cli(lab, "show", "--root", str(lab.gateway_root), "--json")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    (site_shown,) = [f for f in yaml.safe_load(shown.stdout)["files"] if f["name"] == "site.yaml"]
    assert (site_shown["origin"], site_shown["replaces"]) == ("applied", str(lab.base / "policies" / "site.yaml"))

    # a reset through the running gateway: the release's site.yaml (2 a minute) is in force at once
    in_force = admin.get("/admin/v1/policies").json()["digest"]
    missing = admin.delete("/admin/v1/policies/other.yaml")
    assert missing.status_code == 404 and "found no 'other.yaml'" in missing.json()["error"]["message"]
    cli = _policy_cli(lab, "reset", "site.yaml", "--root", str(lab.gateway_root))
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert cli.stdout.startswith(f"the running gateway at {lab.url} removed site.yaml from {applied_dir}")
    assert admin.get("/admin/v1/policies").json()["digest"] == first["digest"]
    assert not _served(acme)  # 2 a minute again, and this minute already had 3 (served under 50 a minute)
    assert list(applied_dir.iterdir()) == []
    again = admin.post("/admin/v1/policies?name=site.yaml", content=_site(9),
                       headers={"Content-Type": "application/yaml"}).json()["new_digest"]
    removed = admin.delete("/admin/v1/policies/site.yaml")
    assert removed.status_code == 200, removed.text
    assert (removed.json()["reset"], removed.json()["files"], removed.json()["old_digest"],
            removed.json()["new_digest"]) == (True, ["site.yaml"], again, first["digest"])
    nothing = admin.delete("/admin/v1/policies")
    assert nothing.status_code == 404 and "nothing to reset" in nothing.json()["error"]["message"]

    # every change recorded once, old and new digests chained, with who made it and how
    applied_records = _admin_records(lab, "admin.policy_applied")
    assert [(r.actor.split(":")[0], r.data["via"], r.data["running"], r.data.get("reset", False))
            for r in applied_records] == [("admin", "admin api", True, False), ("admin", "admin api", True, False),
                                          ("cli", "cli", False, False), ("admin", "admin api", True, True),
                                          ("admin", "admin api", True, False), ("admin", "admin api", True, True)]
    assert applied_records[3].data["old_digest"] == in_force
    assert applied_records[3].data["new_digest"] == first["digest"]
    assert applied_records[0].data["old_digest"] == first["digest"]
    assert applied_records[0].data["new_digest"] == api["new_digest"]
    assert applied_records[1].data["old_digest"] == api["new_digest"]
    assert applied_records[1].data["new_digest"] == running_digest
    assert applied_records[2].data["old_digest"] == running_digest
    assert all(r.data["files"] == ["site.yaml"] for r in applied_records)
    assert {p.name: p.read_bytes() for p in (lab.base / "policies").iterdir()} == release
    assert applied_records[0].data["by_key_id"] and "sov_" not in str(applied_records[0].data)  # key id only
    # the starts after the applies found the digest they had recorded: no second record of the change
    assert len(_admin_records(lab, "admin.policy_changed")) == 1  # the first start's
    refusals = [r for r in _admin_records(lab, "admin.request_refused") if r.data.get("code") == "invalid_policy"]
    assert len(refusals) == 1  # the refused apply is on record too


def test_validate_prints_every_problem_and_exits_by_outcome(tmp_path: Path) -> None:
    from policies import default_policy_dir

    bad = tmp_path / "bad.yaml"
    bad.write_text("sla_classes:\n  gold:\n    priority: 0\n    ttft_ms: 900\n    deadline_ms: 500\n"
                   "tenants:\n  acme:\n    sla_class: platinum\n  acme:\n    sla_class: gold\n")
    run = subprocess.run([str(BIN / "appliance"), "policy", "validate", str(bad), "--over", str(default_policy_dir())],
                         text=True, capture_output=True, timeout=120)
    assert run.returncode == 1
    assert run.stdout.splitlines() == [
        f"{bad}:9:3: tenants.acme: expected each key once in a mapping (first defined at line 7, column 3), "
        "found a second 'acme'"]  # a file that does not parse says so first; fix it, and the rest comes
    bad.write_text(bad.read_text().rsplit("  acme:\n    sla_class: gold\n", 1)[0])
    run = subprocess.run([str(BIN / "appliance"), "policy", "validate", str(bad), "--over", str(default_policy_dir()),
                          "--json"], text=True, capture_output=True, timeout=120)
    assert run.returncode == 1
    problems = yaml.safe_load(run.stdout)["problems"]
    assert [(p["place"], p["line"], p["column"]) for p in problems] == [
        ("sla_classes.gold", 2, 3), ("tenants.acme.sla_class", 8, 16)]
    run = subprocess.run([str(BIN / "appliance"), "policy", "validate", str(default_policy_dir())],
                         text=True, capture_output=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("valid: 3 file(s), 3 SLA class(es) ['batch', 'interactive', 'standard']")
