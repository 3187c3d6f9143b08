"""Keys, tenants and admins in real SQLite: scopes, expiry, rotation, deletion, grants, the
migration of a database made by the first release's schema, and the first-admin bootstrap."""

from __future__ import annotations

import datetime as dt
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from appliance.admins import ADMIN_KEY_FILE, LEGACY_TOKEN_FILE, bootstrap_admins
from appliance.apikeys import KeyCache, parse_expiry
from appliance.audit import AuditLog
from appliance.db import open_database
from appliance.errors import TenancyError
from appliance.gateway.deps import AdminDep, PrincipalDep
from appliance.service import RequestRejected
from appliance.tenancy import TenantStore

# The tables exactly as the first release created them (appliance/tenancy.py at 57f27af).
OLD_SCHEMA = """
CREATE TABLE tenants (name VARCHAR(64) NOT NULL, created_at VARCHAR(40) NOT NULL, disabled BOOLEAN NOT NULL,
                      PRIMARY KEY (name));
CREATE TABLE api_keys (key_id VARCHAR(32) NOT NULL, tenant VARCHAR(64) NOT NULL, secret_sha256 VARCHAR(64) NOT NULL,
                       label VARCHAR(128) NOT NULL, created_at VARCHAR(40) NOT NULL, revoked_at VARCHAR(40),
                       PRIMARY KEY (key_id), FOREIGN KEY(tenant) REFERENCES tenants (name));
CREATE INDEX ix_api_keys_tenant ON api_keys (tenant);
"""


@pytest.fixture()
def store(tmp_path: Path) -> TenantStore:
    return TenantStore(open_database(f"sqlite:///{tmp_path / 'db.sqlite'}"))


def test_scopes_models_and_owner_come_back_from_a_key(store: TenantStore) -> None:
    store.create_tenant("acme", ["SmolLM2-*"])
    issued = store.issue_key("acme", "ci", scopes=["inference", "audit:read"])
    check = store.check(issued.secret)
    assert check.ok and check.tenant == "acme" and check.admin is None
    assert check.scopes == ("inference", "audit:read") and check.models == ("SmolLM2-*",)
    assert store.check(store.issue_key("acme").secret).scopes == ("inference",)


@pytest.mark.parametrize(("scopes", "message"), [
    (["admin"], "belongs to admin keys"), (["root"], "expected only"), ([], "at least one"),
])
def test_bad_scopes_are_refused_naming_what_is_allowed(store: TenantStore, scopes: list[str], message: str) -> None:
    store.create_tenant("acme")
    with pytest.raises(TenancyError, match=message):
        store.issue_key("acme", scopes=scopes)


def test_expired_key_fails_with_its_own_code(store: TenantStore) -> None:
    store.create_tenant("acme")
    issued = store.issue_key("acme", expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1))
    assert store.check(issued.secret).ok
    time.sleep(1.2)
    assert store.check(issued.secret).code == "expired_api_key"
    assert store.authenticate(issued.secret) is None


@pytest.mark.parametrize("text", ["yesterday", "2020-01-01T00:00:00+00:00", "2030-01-01T00:00:00", "0d"])
def test_bad_expiry_is_refused(text: str) -> None:
    with pytest.raises(TenancyError, match=r"expiry: expected (a duration|a time)"):
        parse_expiry(text)


def test_rotation_keeps_the_old_key_for_the_grace_period_only(store: TenantStore) -> None:
    store.create_tenant("acme")
    old = store.issue_key("acme", "app", scopes=["inference", "audit:read"])
    new, old_info = store.rotate_key(old.key_id, grace=dt.timedelta(seconds=1))
    assert new.scopes == old.scopes and new.key_id != old.key_id
    assert old_info.state() == "retiring" and store.check(old.secret).ok
    time.sleep(1.2)
    assert store.check(old.secret).code == "invalid_api_key"
    assert store.check(new.secret).ok
    _, now_info = store.rotate_key(new.key_id)
    assert now_info.state() == "revoked" and not store.check(new.secret).ok
    with pytest.raises(TenancyError, match="no active key"):
        store.rotate_key(new.key_id)


def test_disabled_tenant_fails_distinctly_and_deletion_revokes_and_keeps_the_name(store: TenantStore) -> None:
    store.create_tenant("acme")
    key = store.issue_key("acme")
    store.update_tenant("acme", disabled=True)
    assert store.check(key.secret).code == "tenant_disabled"
    store.update_tenant("acme", disabled=False)
    assert store.check(key.secret).ok
    assert store.delete_tenant("acme") == [key.key_id]
    assert store.check(key.secret).code == "invalid_api_key"
    assert store.get_tenant("acme") is None and store.get_tenant("acme", include_deleted=True) is not None
    with pytest.raises(TenancyError, match="was deleted"):
        store.create_tenant("acme")
    with pytest.raises(TenancyError, match="unknown tenant"):
        store.update_tenant("acme", models=["*"])


@pytest.mark.parametrize("models", [["bad model"], ["x" * 129], [f"m{i}" for i in range(65)]])
def test_bad_model_grants_are_refused(store: TenantStore, models: list[str]) -> None:
    with pytest.raises(TenancyError, match="models: expected"):
        store.create_tenant("acme", models)


def test_admin_keys_are_admin_scoped_and_listed_without_secrets(store: TenantStore) -> None:
    issued = store.admins.create_admin("alice", "test")
    check = store.check(issued.secret)
    assert check.ok and check.admin == "alice" and check.tenant is None and check.scopes == ("admin",)
    listed = store.list_keys()
    assert [(k.owner_kind, k.owner) for k in listed] == [("admin", "alice")]
    assert issued.secret.split("_", 2)[2] not in repr(listed)
    store.admins.set_disabled("alice", True)
    assert store.check(issued.secret).code == "admin_disabled"
    with pytest.raises(TenancyError, match="already exists"):
        store.admins.create_admin("alice", "test")


def test_revocation_in_this_process_empties_the_cache_at_once() -> None:
    cache = KeyCache(ttl_s=60)
    from appliance.apikeys import KeyCheck

    cache.put("fp", KeyCheck("", "k1", tenant="acme"))
    assert cache.get("fp") is not None
    cache.drop(key_id="k1")
    assert cache.get("fp") is None


def test_a_database_of_the_old_schema_is_migrated_and_its_keys_keep_working(tmp_path: Path) -> None:
    db = tmp_path / "old.sqlite"
    con = sqlite3.connect(db)
    con.executescript(OLD_SCHEMA)
    con.close()
    # a key issued by the old code: same format, same hash rule
    import hashlib

    secret = "A" * 43
    con = sqlite3.connect(db)
    con.execute("INSERT INTO tenants VALUES ('acme', '2026-01-01T00:00:00+00:00', 0)")
    con.execute("INSERT INTO api_keys VALUES ('0123456789abcdef', 'acme', ?, 'old', '2026-01-01T00:00:00+00:00', NULL)",
                (hashlib.sha256(secret.encode()).hexdigest(),))
    con.commit()
    con.close()
    store = TenantStore(open_database(f"sqlite:///{db}"))
    check = store.check(f"sov_0123456789abcdef_{secret}")
    assert check.ok and check.tenant == "acme" and check.scopes == ("inference",) and check.models == ()
    TenantStore(open_database(f"sqlite:///{db}"))  # opening again changes nothing
    columns = {row[1] for row in sqlite3.connect(db).execute("PRAGMA table_info(api_keys)")}
    assert {"scopes", "expires_at", "last_used_at", "created_by"} <= columns
    store.touch("0123456789abcdef")
    assert store.get_key("0123456789abcdef").last_used_at is not None  # type: ignore[union-attr]


def test_shared_admin_token_is_migrated_to_a_named_admin(tmp_path: Path) -> None:
    store = TenantStore(open_database(f"sqlite:///{tmp_path / 'db.sqlite'}"))
    audit = AuditLog(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "audit.key")
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    (secrets / LEGACY_TOKEN_FILE).write_text("old-shared-token\n")
    assert "migrated" in bootstrap_admins(store.admins, audit, secrets)
    assert not (secrets / LEGACY_TOKEN_FILE).exists()
    key_file = secrets / ADMIN_KEY_FILE
    assert key_file.stat().st_mode & 0o777 == 0o600
    key = key_file.read_text().strip()
    assert store.check(key).admin == "admin"
    assert store.check("old-shared-token").code == "invalid_api_key"
    events = [r for r in audit.query("_admin") if r.event_type == "admin.admin_token_migrated"]
    assert len(events) == 1 and key.split("_", 2)[2] not in str(events[0].data)
    assert bootstrap_admins(store.admins, audit, secrets) == "admins exist"  # the second start does nothing


def test_installer_first_admin_key_is_enrolled_once(tmp_path: Path) -> None:
    store = TenantStore(open_database(f"sqlite:///{tmp_path / 'db.sqlite'}"))
    audit = AuditLog(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "audit.key")
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    assert "no admin" in bootstrap_admins(store.admins, audit, secrets)
    from appliance.apikeys import new_key

    full = new_key()[2]
    (secrets / ADMIN_KEY_FILE).write_text(full + "\n")
    assert "enrolled" in bootstrap_admins(store.admins, audit, secrets)
    assert store.check(full).admin == "admin"
    assert bootstrap_admins(store.admins, audit, secrets) == "admins exist"


def test_failed_authentication_records_are_bounded_and_the_rest_summarised() -> None:
    from appliance.gateway.auth_audit import AuthFailureAudit

    now = [0.0]
    bounded = AuthFailureAudit(per_client=3, total=5, window_s=60, clock=lambda: now[0])
    admitted = [bounded.admit("10.0.0.1")[0] for _ in range(10)] + [bounded.admit("10.0.0.2")[0] for _ in range(10)]
    assert admitted.count(True) == 5  # 3 for the first client, then the total cap leaves 2 for the second
    assert bounded.due() is None  # the window is not over
    now[0] = 61.0
    summary = bounded.due()
    assert summary is not None and summary["suppressed"] == 15 and summary["clients"] == 2
    assert summary["by_client"] == {"10.0.0.1": 7, "10.0.0.2": 8}
    assert bounded.due() is None and bounded.admit("10.0.0.1") == (True, None)  # a fresh window
    with pytest.raises(ValueError, match="per_client <= total"):
        AuthFailureAudit(per_client=10, total=5)


def test_dependencies_check_the_key_themselves_on_an_app_without_the_middleware(store: TenantStore) -> None:
    """A route must never run for a caller the middleware would refuse, even if an app is built
    without it (the same rules, in the dependency)."""
    app = FastAPI()
    app.state.runtime = SimpleNamespace(tenants=store)

    @app.exception_handler(RequestRejected)
    async def _rejected(_req: object, exc: RequestRejected) -> JSONResponse:
        return JSONResponse({"code": exc.code}, exc.status)

    @app.get("/v1/whoami")
    def whoami(principal: PrincipalDep) -> dict[str, str]:
        return {"tenant": principal.tenant}

    @app.get("/admin/v1/whoami")
    def admin_whoami(admin: AdminDep) -> dict[str, str]:
        return {"admin": admin.name}

    store.create_tenant("acme")
    tenant_key = store.issue_key("acme").secret
    auditor_key = store.issue_key("acme", scopes=["audit:read"]).secret
    admin_key = store.admins.create_admin("alice", "test").secret
    client = TestClient(app)

    def get(path: str, key: str | None) -> tuple[int, dict[str, str]]:
        resp = client.get(path, headers={"Authorization": f"Bearer {key}"} if key else {})
        return resp.status_code, resp.json()

    assert get("/v1/whoami", tenant_key) == (200, {"tenant": "acme"})
    assert get("/v1/whoami", None) == (401, {"code": "missing_api_key"})
    assert get("/v1/whoami", "sov_0123456789abcdef_" + "q" * 43) == (401, {"code": "invalid_api_key"})
    assert get("/v1/whoami", auditor_key) == (403, {"code": "insufficient_scope"})
    assert get("/v1/whoami", admin_key) == (403, {"code": "insufficient_scope"})
    assert get("/admin/v1/whoami", tenant_key) == (403, {"code": "insufficient_scope"})
    assert get("/admin/v1/whoami", admin_key) == (200, {"admin": "alice"})
