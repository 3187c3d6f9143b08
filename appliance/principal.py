"""Who is calling: the authenticated key behind a request (a tenant's, or a named admin's)."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase


@dataclass(frozen=True)
class Principal:
    """A tenant key. ``scopes`` are the key's (``inference``, ``audit:read``); ``models`` are the
    tenant's model grants (names or glob patterns), which allow a model the policy alone would not."""

    tenant: str
    key_id: str
    scopes: tuple[str, ...] = ("inference",)
    models: tuple[str, ...] = ()

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes

    def granted(self, model: str) -> bool:
        """Whether the tenant's grants allow ``model`` (the policy's own list is checked elsewhere)."""
        return any(fnmatchcase(model, pattern) for pattern in self.models)


@dataclass(frozen=True)
class AdminPrincipal:
    """A named admin's key; admin actions are recorded as ``actor``."""

    name: str
    key_id: str

    @property
    def actor(self) -> str:
        return f"admin:{self.name}"
