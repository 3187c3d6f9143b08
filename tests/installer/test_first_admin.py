"""The installer's first-admin key: made once for a root whose appliance never ran, private, in
the appliance's key format, and enrolled by the appliance as admin 'admin'."""

from __future__ import annotations

from pathlib import Path

from installer.first_admin import appliance_ran, issue_first_admin_key


def test_first_install_makes_one_private_key_and_later_runs_make_none(tmp_path: Path) -> None:
    key = issue_first_admin_key(tmp_path)
    path = tmp_path / "secrets" / "admin.key"
    assert key is not None and path.read_text().strip() == key
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    assert issue_first_admin_key(tmp_path) is None  # a second install prints nothing
    assert path.read_text().strip() == key


def test_no_key_for_a_root_whose_appliance_already_ran(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "appliance.db").write_bytes(b"")
    assert issue_first_admin_key(tmp_path) is None
    assert not (tmp_path / "secrets" / "admin.key").exists()


def test_a_first_install_that_started_the_appliance_still_gets_its_key(tmp_path: Path) -> None:
    ran_before = appliance_ran(tmp_path)  # asked before the install, as the CLI does
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "appliance.db").write_bytes(b"")  # the install started the appliance
    assert not ran_before and issue_first_admin_key(tmp_path, ran_before=ran_before) is not None


def test_the_appliance_enrols_the_key_as_admin_admin(tmp_path: Path) -> None:
    from appliance.admins import bootstrap_admins
    from appliance.audit import AuditLog
    from appliance.db import open_database
    from appliance.tenancy import TenantStore

    key = issue_first_admin_key(tmp_path)
    assert key is not None
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    store = TenantStore(open_database(url))
    bootstrap_admins(store.admins, AuditLog(url, tmp_path / "audit.key"), tmp_path / "secrets")
    check = store.check(key)
    assert check.ok and check.admin == "admin" and check.scopes == ("admin",)
