"""The appliance's first admin key, made at the first install and shown once.

The installer cannot open the appliance's database (it imports nothing of ``appliance``), so it
makes the key and leaves it in ROOT/secrets/admin.key (0600); the appliance enrols it as admin
``admin`` when it opens, or, if it is already running, at the first admin request (see
appliance/admins.py, ``bootstrap_admins``). The key has the appliance's format,
``sov_<16 hex digits>_<43 url-safe characters>`` (appliance/apikeys.py).

A key is made only for a root whose appliance never ran (no ROOT/data/appliance.db) and that has no
key file yet, so a second install, an upgrade or the quickstart's re-runs print nothing.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

KEY_FILE = Path("secrets") / "admin.key"
DATABASE = Path("data") / "appliance.db"


def appliance_ran(root: Path) -> bool:
    """Whether an appliance has opened its database under ``root`` (ask before an install that
    starts the appliance: after it, the database exists either way)."""
    return (root / DATABASE).exists()


def issue_first_admin_key(root: Path, *, ran_before: bool | None = None) -> str | None:
    """Write a new first-admin key to ROOT/secrets/admin.key and return it, or None when this root
    already has one or its appliance had run before (``ran_before``, asked before the install;
    by default whether the database exists now)."""
    path = root / KEY_FILE
    if ran_before is None:
        ran_before = appliance_ran(root)
    if path.exists() or ran_before:
        return None
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = f"sov_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}"
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return key
