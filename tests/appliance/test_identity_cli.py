"""`appliance tenants|keys|admins` through typer's CliRunner on a real install root and real SQLite."""

from __future__ import annotations

import getpass
import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from appliance.audit import AuditLog
from appliance.cli import app
from appliance.config import load_config
from appliance.db import open_database
from appliance.tenancy import TenantStore
from policies import default_policy_dir

runner = CliRunner()


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    release = tmp_path / "releases" / "1.0.0"
    shutil.copytree(default_policy_dir(), release / "policies")
    (release / "appliance.yaml").write_text(yaml.safe_dump({
        "version": "1.0.0", "bundle_digest": "sha256:test", "model": {"name": "m", "path": str(tmp_path / "model")},
        "policies_dir": str(release / "policies"), "gateway": {"host": "127.0.0.1", "port": 8443},
    }))
    (tmp_path / "current").symlink_to(release)
    (tmp_path / "data").mkdir(mode=0o700)
    return tmp_path


def run(root: Path, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, [*args, "--root", str(root)])
    return result.exit_code, result.stdout, result.stderr


def _store(root: Path) -> TenantStore:
    return TenantStore(open_database(load_config(root).db_url))


def test_tenant_lifecycle_and_grants(root: Path) -> None:
    code, out, _ = run(root, "tenants", "create", "acme", "--models", "SmolLM2-*, llama-3*", "--json")
    assert code == 0 and json.loads(out)["models"] == ["SmolLM2-*", "llama-3*"]
    assert run(root, "tenants", "create", "bare")[0] == 0
    code, out, _ = run(root, "tenants", "update", "bare", "--models", "m", "--json")
    assert code == 0 and json.loads(out)["models"] == ["m"]
    assert run(root, "tenants", "disable", "acme")[0] == 0
    listed = {t["name"]: t for t in json.loads(run(root, "tenants", "list", "--json")[1])}
    assert listed["acme"]["disabled"] and not listed["bare"]["disabled"]
    assert run(root, "tenants", "update", "acme", "--enable")[0] == 0
    key = run(root, "keys", "issue", "acme")[1].strip()
    code, _, err = run(root, "tenants", "delete", "acme")
    assert code == 2 and "--yes" in err
    code, out, _ = run(root, "tenants", "delete", "acme", "--yes", "--json")
    assert code == 0 and len(json.loads(out)["revoked_key_ids"]) == 1
    assert not _store(root).check(key).ok
    assert [t["name"] for t in json.loads(run(root, "tenants", "list", "--json")[1])] == ["bare"]
    code, _, err = run(root, "tenants", "create", "acme")
    assert code == 2 and "was deleted" in err
    actors = {r.actor for r in AuditLog(load_config(root).db_url, load_config(root).audit_key_path).query("_admin")}
    assert actors == {f"cli:{getpass.getuser()}"}


def test_keys_issue_list_rotate_revoke(root: Path) -> None:
    run(root, "tenants", "create", "acme", "--models", "m")
    code, out, err = run(root, "keys", "issue", "acme", "--scope", "inference", "--scope", "audit:read",
                         "--expires", "30d", "--label", "ci")
    assert code == 0 and out.strip().startswith("sov_") and len(out.strip().splitlines()) == 1
    assert "shown only now" in err
    key = out.strip()
    listed = json.loads(run(root, "keys", "list", "--json")[1])
    assert len(listed) == 1 and listed[0]["scopes"] == ["inference", "audit:read"] and listed[0]["expires_at"]
    assert key.split("_", 2)[2] not in json.dumps(listed)
    key_id = listed[0]["key_id"]
    code, out, _ = run(root, "keys", "rotate", key_id, "--grace", "1h", "--json")
    rotated = json.loads(out)
    assert code == 0 and rotated["scopes"] == ["inference", "audit:read"] and rotated["key_id"] != key_id
    store = _store(root)
    assert store.check(key).ok and store.check(rotated["key"]).ok  # the old key works for its grace period
    assert run(root, "keys", "revoke", key_id)[0] == 0
    assert not _store(root).check(key).ok
    code, _, err = run(root, "keys", "revoke", key_id)
    assert code == 2 and "no active key" in err
    assert [k["key_id"] for k in json.loads(run(root, "keys", "list", "--json")[1])] == [rotated["key_id"]]


@pytest.mark.parametrize(("args", "message"), [
    (["keys", "issue", "acme", "--scope", "admin"], "belongs to admin keys"),
    (["keys", "issue", "acme", "--expires", "tomorrow"], "expiry: expected"),
    (["keys", "issue", "nobody"], "unknown tenant"),
    (["keys", "rotate", "0123456789abcdef", "--grace", "1 hour"], "duration: expected a number and a unit"),
    (["keys", "rotate", "0123456789abcdef"], "no active key"),
    (["tenants", "create", "Bad Name"], "invalid tenant name"),
    (["tenants", "update", "acme", "--models", "a b"], "models: expected"),
    (["admins", "create", "Root!"], "invalid admin name"),
])
def test_bad_input_is_refused_with_exit_2_and_what_was_expected(root: Path, args: list[str], message: str) -> None:
    run(root, "tenants", "create", "acme")
    code, _, err = run(root, *args)
    assert code == 2 and message in err


def test_admins_create_prints_the_key_once_and_it_is_an_admin_key(root: Path) -> None:
    code, out, _ = run(root, "admins", "create", "alice")
    assert code == 0
    check = _store(root).check(out.strip())
    assert check.ok and check.admin == "alice" and check.scopes == ("admin",)
    assert json.loads(run(root, "admins", "list", "--json")[1])[0]["name"] == "alice"
    second = run(root, "keys", "issue", "alice", "--admin")[1].strip()
    assert _store(root).check(second).admin == "alice"
    assert run(root, "admins", "disable", "alice")[0] == 0
    assert _store(root).check(second).code == "admin_disabled"
