"""A guard against secrets in audit data: a backstop for bugs, not a substitute for care.

Audit records are exported to compliance officers and kept for years, so a bearer key that
slips into one is a leak that cannot be recalled. The guard rejects any mapping key (at any
depth) whose normalised name contains a secret-like word. Token *counts* such as
``prompt_tokens`` are fine; the words below were chosen not to match them.

Only key names are checked, never values: keys are chosen by our code, values may come from a
tenant (a model name, say), and a value rule would let a tenant make its own requests
unauditable -- and so refused -- at will.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from appliance.audit.errors import AuditSecretError

# Matched against the key lower-cased with every non-alphanumeric character removed, so
# "API-Key", "api_key" and "apiKey" all normalise to "apikey".
SECRET_KEY_WORDS: tuple[str, ...] = (
    "apikey",
    "authorization",
    "secret",
    "password",
    "passwd",
    "passphrase",
    "privatekey",
    "bearer",
    "credential",
    "accesstoken",
    "refreshtoken",
    "sessiontoken",
    "apitoken",
    "authtoken",
)
# Names that are secrets when they stand alone but are innocent inside longer words
# ("token" vs "prompt_tokens", "key" vs "key_id").
SECRET_KEY_NAMES: frozenset[str] = frozenset({"token", "key", "auth", "pwd", "pass"})


def _normalise(key: str) -> str:
    return re.sub(r"[^a-z0-9]", "", key.lower())


def _walk_keys(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """Yield ``(path, key)`` for every mapping key at any depth under ``value``."""
    if isinstance(value, dict):
        for key, child in value.items():
            child_path = f"{path}.{key}" if path else str(key)
            yield child_path, str(key)
            yield from _walk_keys(child, child_path)
    elif isinstance(value, (list, tuple)):
        for index, child in enumerate(value):
            yield from _walk_keys(child, f"{path}[{index}]")


def check_no_secrets(data: dict[str, Any]) -> None:
    """Raise ``AuditSecretError`` naming the first secret-like key path in ``data``."""
    for path, key in _walk_keys(data, ""):
        normalised = _normalise(key)
        if normalised in SECRET_KEY_NAMES or any(word in normalised for word in SECRET_KEY_WORDS):
            raise AuditSecretError(path)
