"""``appliance serve --workers N`` and several gateways on one database (SQLite file, PostgreSQL).

Real processes throughout: ``appliance serve`` (supervisor and workers), stand-in engine nodes
(tests/appliance/standin_node.py: the real node server and tokenizer, no model), real HTTPS,
the official ``openai`` client, a real SQLite file and a real PostgreSQL (tests/pg.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.appliance.fleet_lab import FleetLab
from tests.appliance.gateways_lab import GatewaysLab, admin_key, ask
from tests.appliance.support import BIN, children

TENANTS = {"acme": {"rate_limit_rpm": 100_000, "max_tokens_per_minute": 10_000_000}}


def _serve(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "appliance"), "serve", "--root", str(root), *args], text=True,
                          capture_output=True, timeout=120, env={**os.environ, "LC_ALL": "C.UTF-8"})


def test_workers_without_engine_nodes_are_refused_saying_what_to_do(tmp_path: Path, model_dir: Path) -> None:
    lab = FleetLab(tmp_path, model_dir)
    lab.build_single({"tenants": {}})
    done = _serve(lab.gateway_root, "--workers", "2")
    assert done.returncode == 1, done.stdout + done.stderr
    said = " ".join((done.stdout + done.stderr).split())
    assert "2 gateway workers need engine nodes" in said and "appliance node serve" in said, said
    assert "fleet.nodes" in said and "--workers 1" in said, said
    assert not (lab.gateway_root / "data" / "appliance.run").exists()  # refused before opening anything


def test_gateway_workers_in_appliance_yaml_is_checked(tmp_path: Path, model_dir: Path) -> None:
    lab = FleetLab(tmp_path, model_dir)
    lab.build_single({"tenants": {}})
    config = lab.gateway_root / "current" / "appliance.yaml"
    doc = yaml.safe_load(config.read_text())
    doc["gateway"]["workers"] = "four"
    config.write_text(yaml.safe_dump(doc))
    done = _serve(lab.gateway_root)
    said = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 1 and "gateway.workers must be an integer in 1..64" in said and "'four'" in said, said


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shared.db'}"
        return
    from tests.pg import fresh_database

    with fresh_database(request.getfixturevalue("postgres_url")) as url:
        yield url


def test_a_key_revoked_through_one_gateway_is_refused_by_the_other_at_once(
        tmp_path: Path, model_dir: Path, db_url: str) -> None:
    lab = GatewaysLab(tmp_path / "lab", model_dir, db_url)
    lab.build(TENANTS)
    try:
        lab.start_node()
        lab.start_gateway(0)
        lab.start_gateway(1)
        boss = admin_key(db_url)
        with lab.admin(0, boss) as admin:
            assert admin.post("/admin/v1/tenants", json={"name": "acme"}).status_code == 201
            made = admin.post("/admin/v1/tenants/acme/keys", json={"label": "both"})
            assert made.status_code == 201, made.text
        key, key_id = made.json()["key"], made.json()["key_id"]
        second = lab.client(1, key)
        for _ in range(3):  # the key is now in gateway 2's cache
            ask(second)
        with lab.admin(0, boss) as admin:
            revoked = admin.delete(f"/admin/v1/keys/{key_id}")
            assert revoked.status_code == 200, revoked.text
        with pytest.raises(openai.AuthenticationError):
            ask(second)
        # and the same for a tenant suspended through gateway 2, seen by gateway 1 at once
        with lab.admin(1, boss) as admin:
            other = admin.post("/admin/v1/tenants/acme/keys", json={"label": "second"}).json()["key"]
            first = lab.client(0, other)
            ask(first)
            assert admin.post("/admin/v1/tenants/acme/disable").status_code == 200
        with pytest.raises(openai.PermissionDeniedError):
            ask(first)
    finally:
        lab.close()


def _alive(pid: int) -> bool:
    """A running process (a zombie nobody reaped yet is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _live_children(pid: int) -> list[int]:
    return [c for c in children(pid) if _alive(c)]


def _wait_for(what: str, check: object, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.3)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def _admin_records(db_url: str, event: str) -> list[dict[str, object]]:
    import json

    import sqlalchemy as sa

    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT data FROM audit_events WHERE event_type = :e ORDER BY gidx"),
                                {"e": event}).scalars().all()
    finally:
        engine.dispose()
    return [json.loads(r) for r in rows]


def test_workers_share_the_port_a_killed_worker_is_replaced_and_sigterm_stops_all_with_exit_0(
        tmp_path: Path, model_dir: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'lab' / 'gw' / 'data' / 'appliance.db'}"
    lab = GatewaysLab(tmp_path / "lab", model_dir, db_url)
    lab.build(TENANTS, gateways=1, workers=2)  # gateway.workers: 2 in appliance.yaml
    try:
        lab.start_node()
        supervisor = lab.start_gateway(0).proc
        assert supervisor is not None
        _wait_for("both workers serving", lambda: "with 2 workers" in lab.log(0))
        workers = _live_children(supervisor.pid)
        boss = admin_key(db_url)
        with lab.admin(0, boss) as admin:
            assert admin.post("/admin/v1/tenants", json={"name": "acme"}).status_code == 201
            key = admin.post("/admin/v1/tenants/acme/keys", json={"label": "w"}).json()["key"]
        for _ in range(4):
            ask(lab.client(0, key))  # a new connection each: any worker may take it
        started = {r["pid"] for r in _admin_records(db_url, "admin.appliance_started")}
        assert set(workers) <= started, (workers, started)  # each worker is a whole gateway run

        victim = workers[1]
        os.kill(victim, signal.SIGKILL)
        for _ in range(4):  # the other worker keeps serving on the same port meanwhile
            ask(lab.client(0, key))
        _wait_for("a replacement worker", lambda: len(_live_children(supervisor.pid)) == 2
                  and victim not in _live_children(supervisor.pid))
        _wait_for("the replacement's reconciliation of the killed worker's run",
                  lambda: any(r.get("previous_pid") == victim
                              for r in _admin_records(db_url, "admin.unclean_shutdown")))
        assert "died (signal SIGKILL)" in lab.log(0)
        _wait_for("the replacement serving", lambda: len(_admin_records(db_url, "admin.appliance_started")) == 3)
        ask(lab.client(0, key))

        live = _live_children(supervisor.pid)
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=90) == 0, lab.log(0)
        assert not any(_alive(pid) for pid in live), "a worker outlived its supervisor"
        stopped = {r["run_id"] for r in _admin_records(db_url, "admin.appliance_stopped")}
        assert len(stopped) == 2  # both live workers stopped cleanly, with their final records
        verified = lab.appliance("audit", "verify", "--db", db_url, "--key",
                                 str(lab.gateways[0].root / "secrets" / "audit-signing.key"))
        assert verified.returncode == 0, verified.stdout + verified.stderr
        with httpx.Client(verify=lab.tls()) as client, pytest.raises(httpx.ConnectError):
            client.get(f"{lab.gateways[0].url}/health")
    finally:
        lab.close()


def test_ctrl_c_stops_every_worker_with_exit_0_and_a_busy_port_is_refused(tmp_path: Path, model_dir: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'lab' / 'gw' / 'data' / 'appliance.db'}"
    lab = GatewaysLab(tmp_path / "lab", model_dir, db_url)
    lab.build(TENANTS, gateways=1)
    try:
        lab.start_node()
        supervisor = lab.start_gateway(0, "--workers", "2").proc
        assert supervisor is not None
        _wait_for("both workers serving", lambda: "with 2 workers" in lab.log(0))
        workers = _live_children(supervisor.pid)
        assert len(workers) == 2
        taken = _serve(lab.gateways[0].root, "--workers", "2", "--port", str(lab.gateways[0].port))
        said = " ".join((taken.stdout + taken.stderr).split())
        assert taken.returncode == 1 and f"port {lab.gateways[0].port} on 127.0.0.1 is already in use" in said, said
        os.killpg(supervisor.pid, signal.SIGINT)  # Ctrl-C in a terminal: the foreground process group
        assert supervisor.wait(timeout=90) == 0, lab.log(0)
        assert not any(_alive(pid) for pid in workers), "a worker outlived its supervisor"
        assert len(_admin_records(db_url, "admin.appliance_stopped")) == 2
    finally:
        lab.close()


def test_workers_whose_supervisor_was_killed_stop_themselves_cleanly(tmp_path: Path, model_dir: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'lab' / 'gw' / 'data' / 'appliance.db'}"
    lab = GatewaysLab(tmp_path / "lab", model_dir, db_url)
    lab.build(TENANTS, gateways=1)
    try:
        lab.start_node()
        supervisor = lab.start_gateway(0, "--workers", "2").proc
        assert supervisor is not None
        _wait_for("both workers serving", lambda: "with 2 workers" in lab.log(0))
        workers = _live_children(supervisor.pid)
        os.kill(supervisor.pid, signal.SIGKILL)  # nobody would restart them: orphans must not serve on
        supervisor.wait(timeout=30)
        _wait_for("the orphaned workers gone", lambda: not any(_alive(pid) for pid in workers), 60)
        assert len(_admin_records(db_url, "admin.appliance_stopped")) == 2  # a graceful stop, not a crash
        with httpx.Client(verify=lab.tls()) as client, pytest.raises(httpx.ConnectError):
            client.get(f"{lab.gateways[0].url}/health")
    finally:
        lab.close()
