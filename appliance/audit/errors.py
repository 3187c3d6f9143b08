"""The audit log's exceptions: one root under the appliance's, specific subclasses.

Messages say what was expected and what was found. They never carry record data, which may
hold tenant content, and never carry key material.
"""

from __future__ import annotations

from appliance.errors import ApplianceError


class AuditError(ApplianceError):
    """Root of every audit error. An ``append`` that raises this was NOT recorded: fail closed."""


class AuditInvalidEventError(AuditError, ValueError):
    """An append was refused before touching storage: a field is malformed (message says which)."""


class AuditSecretError(AuditInvalidEventError):
    """Record data holds a key named like a secret (``api_key``, ``authorization``, ...).

    The message names the offending key path, never its value.
    """

    def __init__(self, key_path: str) -> None:
        self.key_path = key_path
        super().__init__(
            f"audit data must never hold secrets: expected no secret-like key, found {key_path!r} "
            "(record a key id instead)"
        )


class AuditIntegrityError(AuditError):
    """A chain, checkpoint or export failed verification.

    ``seq`` is the first record found wrong (``None`` when the failure is not about one record,
    e.g. a bad manifest signature); ``check`` names the check that failed.
    """

    def __init__(
        self, seq: int | None, stream: str, expected: str, found: str, *, check: str = "chain"
    ) -> None:
        self.seq = seq
        self.stream = stream
        self.expected = expected
        self.found = found
        self.check = check
        where = f"stream {stream!r}" + ("" if seq is None else f" seq {seq}")
        super().__init__(f"audit {check} check failed at {where}: expected {expected}, found {found}")
