"""The inventory's ``database:`` and ``audit:`` sections: several gateways on one PostgreSQL.

YAML format (top level of the inventory)::

    database:
      url: postgresql+psycopg://sovereign@db.example:5432/sovereign   # no password in it
      ca: tls/db-ca.pem               # optional: the server's CA; sslmode=verify-full
      client_cert: tls/gw.pem         # optional, with client_key: TLS client authentication
      client_key: tls/gw.key
      password_file: secrets/db.pw    # optional: the password, first line of this file
    audit:                            # optional; passed to appliance.yaml's audit: as given
      publish_dir: /srv/sovereign-checkpoints
      witness_url: https://witness.example:8443
      witness_key: witness.example+1a2b3c4d+AeR...

Files named here are on the installer's machine: absolute, or relative to the inventory file.
Each gateway node receives them as ROOT/tls/database/ca.pem, client.pem, client.key (0600) and
ROOT/secrets/database.pgpass (0600, libpq's password file), and its appliance.yaml names them as
libpq parameters (sslrootcert, sslcert, sslkey, passfile) of ``database.url``. The password never
enters the URL, appliance.yaml, an ansible variable, the journal or any output.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

DRIVER = "postgresql+psycopg"
DEFAULT_PORT = 5432
EXPECTED_URL = f"{DRIVER}://USER@HOST:PORT/DATABASE"
# libpq parameters the installer sets from the files it copies: never taken from the URL.
INSTALLER_PARAMS = ("sslrootcert", "sslcert", "sslkey", "passfile", "password")
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_DB_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.$-]{0,62}$")
_PARAM = re.compile(r"^[a-z_]{1,40}$")
# Where each file goes on a gateway node, relative to its install root, and its mode.
NODE_FILES = {"ca": ("tls/database/ca.pem", "0644"), "client_cert": ("tls/database/client.pem", "0644"),
              "client_key": ("tls/database/client.key", "0600"), "password": ("secrets/database.pgpass", "0600")}
PGPASS_NAME = "database.pgpass"


def _controller_file(value: str, info: ValidationInfo) -> str:
    """An existing file on the installer's machine: absolute, or relative to the inventory's directory."""
    base = (info.context or {}).get("base_dir")
    path = Path(value).expanduser()
    if not path.is_absolute():
        if base is None:
            raise ValueError(f"an absolute path (no inventory file to resolve it against), found {value!r}")
        path = Path(base) / path
    if not path.is_file():
        raise ValueError(f"a readable file on this machine, found nothing at {path}")
    return os.fspath(path.resolve())


FilePath = Annotated[StrictStr, Field(min_length=1, max_length=4096)]


class DatabaseSettings(BaseModel):
    """The shared PostgreSQL database of the gateways (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: Annotated[StrictStr, Field(min_length=1, max_length=2048)]
    ca: FilePath | None = None
    client_cert: FilePath | None = None
    client_key: FilePath | None = None
    password_file: FilePath | None = None
    connect_timeout_s: Annotated[StrictInt, Field(ge=1, le=300)] = 10

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        scheme, sep, _ = url.partition("://")
        if not sep or scheme not in ("postgresql", DRIVER):
            shown = f"{scheme}://..." if sep else "no scheme"
            raise ValueError(f"a PostgreSQL URL {EXPECTED_URL}, found {shown}")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"a PostgreSQL URL {EXPECTED_URL}, found one that does not parse ({exc})") from None
        if parts.password is not None:
            raise ValueError("no password in database.url (it would be written into appliance.yaml on every node): "
                             "put it in a file named by database.password_file, found a password in the URL")
        if not parts.username:
            raise ValueError(f"a user in database.url ({EXPECTED_URL}), found none")
        if not parts.hostname:
            raise ValueError(f"a host in database.url ({EXPECTED_URL}), found none")
        database = unquote(parts.path.lstrip("/"))
        if not _DB_NAME.match(database):
            raise ValueError(f"a database name in database.url ({EXPECTED_URL}), found {database or 'none'!r}")
        if parts.fragment:
            raise ValueError(f"no #fragment in database.url, found #{parts.fragment[:40]}")
        params = parse_qsl(parts.query, keep_blank_values=True)
        for key, value in params:
            if not _PARAM.match(key):
                raise ValueError(f"libpq parameter names in database.url's query, found {key[:40]!r}")
            if key in INSTALLER_PARAMS:
                raise ValueError(f"no {key} in database.url (the installer sets sslrootcert, sslcert, sslkey and "
                                 f"passfile from database.ca, client_cert, client_key and password_file), found {key}")
            if key == "sslmode" and value not in SSLMODES:
                raise ValueError(f"sslmode one of {', '.join(SSLMODES)}, found {value[:40]!r}")
        keys = [k for k, _ in params]
        if len(keys) != len(set(keys)):
            dupes = sorted({k for k in keys if keys.count(k) > 1})
            raise ValueError(f"each parameter once in database.url, found {dupes} more than once")
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        base = f"{DRIVER}://{quote(unquote(parts.username), safe='')}@{host}:{port or DEFAULT_PORT}/{database}"
        return base + (f"?{urlencode(params)}" if params else "")

    @field_validator("ca", "client_cert", "client_key", "password_file")
    @classmethod
    def _files(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else _controller_file(value, info)

    @model_validator(mode="after")
    def _check(self) -> DatabaseSettings:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key together (TLS client authentication), found only "
                             + ("client_cert" if self.client_key is None else "client_key"))
        if self.client_cert is not None and self.ca is None:
            raise ValueError("database.ca with client_cert (a client certificate is only sent to a verified "
                             "server), found no ca")
        mode = self.params.get("sslmode")
        if self.ca is not None and mode not in (None, "verify-full"):
            raise ValueError(f"sslmode=verify-full (or none: the installer sets it) with database.ca, found "
                             f"sslmode={mode}")
        return self

    @property
    def params(self) -> dict[str, str]:
        return dict(parse_qsl(urlsplit(self.url).query, keep_blank_values=True))

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or DEFAULT_PORT

    @property
    def user(self) -> str:
        return unquote(urlsplit(self.url).username or "")

    def node_url(self, root: str) -> str:
        """The URL a gateway node's appliance.yaml holds: the inventory's, plus the libpq parameters
        of the files copied under that node's install ``root``."""
        params = self.params
        if self.ca is not None:
            params["sslmode"] = "verify-full"
            params["sslrootcert"] = f"{root}/{NODE_FILES['ca'][0]}"
        if self.client_cert is not None:
            params["sslcert"] = f"{root}/{NODE_FILES['client_cert'][0]}"
            params["sslkey"] = f"{root}/{NODE_FILES['client_key'][0]}"
        if self.password_file is not None:
            params["passfile"] = f"{root}/{NODE_FILES['password'][0]}"
        base = self.url.split("?", 1)[0]
        return base + (f"?{urlencode(params, safe='/')}" if params else "")

    def read_password(self) -> str:
        """The password: the first line of password_file (never shown in any message)."""
        assert self.password_file is not None
        try:
            text = Path(self.password_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"database.password_file: expected a readable UTF-8 file, found "
                             f"{type(exc).__name__} at {self.password_file}") from None
        password = text.split("\n", 1)[0].rstrip("\r")
        if not password:
            raise ValueError(f"database.password_file: expected the password on the first line, found an empty "
                             f"first line in {self.password_file}")
        return password


def pgpass_line(user: str, password: str) -> str:
    """One libpq password file line for ``user`` on any host, port and database (the file serves
    this one connection only); ``:`` and ``\\`` escaped as libpq reads them."""
    def esc(text: str) -> str:
        return text.replace("\\", "\\\\").replace(":", "\\:")

    return f"*:*:*:{esc(user)}:{esc(password)}\n"


class AuditSettings(BaseModel):
    """The inventory's ``audit:``: written into every gateway node's appliance.yaml as given
    (appliance/config.py checks it again). Paths are on the nodes (absolute)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_free_bytes: Annotated[StrictInt, Field(ge=0)] | None = None
    publish_dir: StrictStr | None = None
    witness_url: StrictStr | None = None
    witness_key: StrictStr | None = None
    witness_interval_s: Annotated[float, Field(gt=0, le=86400)] | None = None
    witness_timeout_s: Annotated[float, Field(gt=0, le=86400)] | None = None
    witness_streams: StrictBool | None = None
    witness_ca: StrictStr | None = None
    witness_client_cert: StrictStr | None = None
    witness_client_key: StrictStr | None = None

    @field_validator("publish_dir", "witness_ca", "witness_client_cert", "witness_client_key")
    @classmethod
    def _node_path(cls, value: str | None) -> str | None:
        if value is not None and (not value.startswith("/") or ".." in Path(value).parts):
            raise ValueError(f"an absolute path on the gateway nodes without '..', found {value!r}")
        return value

    @field_validator("witness_url")
    @classmethod
    def _witness_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"http://host:port or https://host:port, found {value[:80]!r}")
        return value

    @model_validator(mode="after")
    def _pairs(self) -> AuditSettings:
        if (self.witness_url is None) != (self.witness_key is None):
            raise ValueError("witness_url and witness_key together (a cosignature is only kept once checked "
                             "with the witness's key), found only "
                             + ("witness_url" if self.witness_key is None else "witness_key"))
        if (self.witness_client_cert is None) != (self.witness_client_key is None):
            raise ValueError("witness_client_cert and witness_client_key together, found only one")
        return self

    def as_config(self) -> dict[str, Any]:
        """The appliance.yaml ``audit:`` mapping: only what the inventory set."""
        return self.model_dump(exclude_none=True)


def database_vars(database: DatabaseSettings | None, audit: AuditSettings | None, node_roots: dict[str, str],
                  gateways: list[str], work: Path) -> dict[str, Any]:
    """Extra vars of the install playbook: per gateway node its database URL, the files each
    receives (controller path, path under its root, mode, sha1 for the copy's own check), the
    node that runs ``appliance db migrate`` (the first gateway) and the audit settings. The
    password goes into a 0600 libpq password file in ``work``; no variable holds it."""
    out: dict[str, Any] = {"sovereign_database_urls": {}, "sovereign_database_files": [],
                           "sovereign_database_migrate_on": "", "sovereign_database_check": {},
                           "sovereign_database_audit": audit.as_config() if audit is not None else {}}
    if database is None:
        return out
    out["sovereign_database_urls"] = {name: database.node_url(node_roots[name]) for name in gateways}
    out["sovereign_database_migrate_on"] = gateways[0] if gateways else ""
    out["sovereign_database_check"] = {"host": database.host, "port": database.port,
                                       "timeout": database.connect_timeout_s}
    sources = {"ca": database.ca, "client_cert": database.client_cert, "client_key": database.client_key}
    if database.password_file is not None:
        pgpass = work / PGPASS_NAME
        fd = os.open(pgpass, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(pgpass_line(database.user, database.read_password()))
        sources["password"] = os.fspath(pgpass)
    for kind, src in sources.items():
        if src is None:
            continue
        dest, mode = NODE_FILES[kind]
        sha1 = hashlib.sha1(Path(src).read_bytes()).hexdigest()
        out["sovereign_database_files"].append({"src": src, "dest": dest, "mode": mode, "sha1": sha1})
    return out
