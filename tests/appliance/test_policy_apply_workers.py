"""Policy changes reach every gateway worker of an install without restart (``appliance serve``
with 2 workers on one port, over a stand-in engine node): an apply answered by one worker is taken
up by the other within its watch interval, files changed by hand are taken up by both and recorded
once, and a hand edit that does not validate is refused by both with the policy left in force."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import yaml

from tests.appliance.gateways_lab import GatewaysLab, admin_key, policy

WAIT_S = 40.0  # the watch looks every 5 s; a busy 2-core machine may be slow to schedule it


def _wait_for(what: str, check: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _records(db_url: str, event: str) -> list[dict[str, object]]:
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT data FROM audit_events WHERE event_type = :e ORDER BY gidx"),
                                {"e": event}).scalars().all()
    finally:
        engine.dispose()
    return [json.loads(r) for r in rows]


@pytest.fixture()
def lab(tmp_path: Path, model_dir: Path) -> Iterator[GatewaysLab]:
    db_url = f"sqlite:///{tmp_path / 'lab' / 'gw' / 'data' / 'appliance.db'}"
    lab = GatewaysLab(tmp_path / "lab", model_dir, db_url)
    lab.build({"acme": {"max_tokens_per_request": 64}}, gateways=1, workers=2)
    try:
        lab.start_node(tokens=2)
        lab.start_gateway(0)
        _wait_for("both workers serving", lambda: "with 2 workers" in lab.log(0), 120)
        yield lab
    finally:
        lab.close()


def _digests(lab: GatewaysLab, key: str, n: int = 12) -> set[str]:
    """The policy digest each of ``n`` new connections' workers holds (any worker may take one)."""
    seen = set()
    for _ in range(n):
        with lab.admin(0, key) as admin:
            seen.add(admin.get("/admin/v1/policies").json()["digest"])
    return seen


def _site(max_tokens: int) -> str:
    return yaml.safe_dump(policy({"acme": {"max_tokens_per_request": max_tokens}}))


def test_every_worker_takes_up_an_apply_and_a_hand_edit_without_restart(lab: GatewaysLab) -> None:
    boss = admin_key(lab.db_url)
    site = lab.gateways[0].root / "data" / "policies" / "site.yaml"  # where an apply writes it
    before = _digests(lab, boss)
    assert len(before) == 1

    with lab.admin(0, boss) as admin:
        applied = admin.post("/admin/v1/policies?name=site.yaml", content=_site(3),
                             headers={"Content-Type": "application/yaml"})
    assert applied.status_code == 200, applied.text
    new = applied.json()["new_digest"]
    # the worker that answered swapped at once; the other takes the written files up
    _wait_for("the other worker's reload", lambda: lab.log(0).count("policy reloaded from") == 1)
    assert _digests(lab, boss) == {new}
    assert len(_records(lab.db_url, "admin.policy_applied")) == 1
    assert not [r for r in _records(lab.db_url, "admin.policy_changed") if r.get("via")]  # not recorded twice

    # a hand edit that does not validate: both workers refuse it, say why once each, keep the policy
    site.write_text("tenants:\n  acme:\n    max_tokens_per_request: none\n")
    _wait_for("both workers' refusals", lambda: lab.log(0).count("cannot be used; the policy in force stays") == 2)
    assert "tenants.acme.max_tokens_per_request: expected a valid integer, found 'none'" in lab.log(0)
    assert f"{site}:3:29:" in lab.log(0)
    assert _digests(lab, boss) == {new}

    # a valid hand edit: both workers take it up; recorded once, as a change by other means
    site.write_text(_site(7))
    _wait_for("both workers' reloads", lambda: lab.log(0).count("policy reloaded from") == 3)
    (edited,) = _digests(lab, boss)
    assert edited != new
    changed = [r for r in _records(lab.db_url, "admin.policy_changed") if r.get("via") == "files changed while running"]
    assert len(changed) == 1 and changed[0]["old_digest"] == new and changed[0]["new_digest"] == edited
    with lab.admin(0, boss) as admin:
        assert admin.get("/admin/v1/policies").json()["tenants"]["acme"]["max_tokens_per_request"] == 7
    with httpx.Client(verify=lab.tls()) as client:
        assert client.get(f"{lab.gateways[0].url}/health").status_code == 200
