"""Who is calling: the authenticated tenant key behind a tenant API request."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Principal:
    tenant: str
    key_id: str
