from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from appliance.db import open_database
from appliance.errors import TenancyError
from appliance.tenancy import TenantStore, api_keys_table


@pytest.fixture()
def store(tmp_path: Path) -> TenantStore:
    return TenantStore(open_database(f"sqlite:///{tmp_path / 'db.sqlite'}"))


def test_issued_key_authenticates_and_only_its_hash_is_stored(store: TenantStore) -> None:
    store.create_tenant("acme")
    issued = store.issue_key("acme")
    assert store.authenticate(issued.secret) == ("acme", issued.key_id)
    with store._engine.connect() as conn:
        rows = conn.execute(sa.select(api_keys_table)).all()
    secret_part = issued.secret.split("_", 2)[2]
    assert all(secret_part not in str(tuple(r)) for r in rows)


def test_wrong_unknown_and_malformed_keys_fail(store: TenantStore) -> None:
    store.create_tenant("acme")
    issued = store.issue_key("acme")
    tampered = issued.secret[:-1] + ("A" if issued.secret[-1] != "A" else "B")
    assert store.authenticate(tampered) is None
    assert store.authenticate("sov_0000000000000000_" + "x" * 43) is None
    assert store.authenticate("not-a-key") is None
    assert store.authenticate("") is None


def test_revoked_key_fails(store: TenantStore) -> None:
    store.create_tenant("acme")
    issued = store.issue_key("acme")
    store.revoke_key(issued.key_id)
    assert store.authenticate(issued.secret) is None
    with pytest.raises(TenancyError, match="no active key"):
        store.revoke_key(issued.key_id)


def test_keys_of_one_tenant_never_authenticate_as_another(store: TenantStore) -> None:
    store.create_tenant("a")
    store.create_tenant("b")
    ka, kb = store.issue_key("a"), store.issue_key("b")
    assert store.authenticate(ka.secret)[0] == "a"  # type: ignore[index]
    assert store.authenticate(kb.secret)[0] == "b"  # type: ignore[index]


@pytest.mark.parametrize("name", ["", "UPPER", "-lead", "x" * 64, "sp ace", "a/b"])
def test_invalid_tenant_names_are_refused(store: TenantStore, name: str) -> None:
    with pytest.raises(TenancyError, match="invalid tenant name"):
        store.create_tenant(name)


def test_duplicate_tenant_and_key_for_unknown_tenant(store: TenantStore) -> None:
    store.create_tenant("acme")
    with pytest.raises(TenancyError, match="already exists"):
        store.create_tenant("acme")
    with pytest.raises(TenancyError, match="unknown tenant"):
        store.issue_key("nobody")
