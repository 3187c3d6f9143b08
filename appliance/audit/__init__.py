"""Tamper-evident audit log: per-stream hash chains, signed checkpoints, signed offline exports.

Each tenant's records form their own chain (stream = tenant name; ``"_admin"`` holds admin and
installer events), so one tenant's records can be exported and verified without revealing any
other tenant's. See ``record`` (hash rule), ``chain`` (checks), ``export_format`` (the export).
"""

from appliance.audit import content, holds, retention  # noqa: F401  (their tables join schema.metadata)
from appliance.audit.chain import ChainFailure
from appliance.audit.checkpoint import Checkpoint
from appliance.audit.errors import (
    AuditError,
    AuditIntegrityError,
    AuditInvalidEventError,
    AuditSecretError,
)
from appliance.audit.export import export_stream
from appliance.audit.export_format import ExportLimits
from appliance.audit.keys import AuditKeys, public_key_from_pem
from appliance.audit.log import AuditLog
from appliance.audit.record import ADMIN_STREAM, REQUEST_EVENT_TYPES, AuditRecord
from appliance.audit.reports import ChainReport, CheckResult, ExportReport, StreamReport
from appliance.audit.verify_export import verify_export

__all__ = [
    "ADMIN_STREAM",
    "REQUEST_EVENT_TYPES",
    "AuditError",
    "AuditIntegrityError",
    "AuditInvalidEventError",
    "AuditKeys",
    "AuditLog",
    "AuditRecord",
    "AuditSecretError",
    "ChainFailure",
    "ChainReport",
    "CheckResult",
    "Checkpoint",
    "ExportLimits",
    "ExportReport",
    "StreamReport",
    "export_stream",
    "public_key_from_pem",
    "verify_export",
]
