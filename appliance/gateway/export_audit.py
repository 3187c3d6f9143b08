"""Audit exports through the API, themselves recorded (``admin.audit_exported`` on ``_admin``).

``export_recorded`` writes one stream's signed export tar for a period (``audit.export_stream``)
into a private temporary directory under the data directory, then appends who exported which
stream, the period, how many records, the format and from where, before the tar is handed out.
Shared by the tenant self-service route (``/v1/audit/export``, a key's own tenant) and the admin
route (``/admin/v1/audit/export``, any stream).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.audit import AuditError, AuditIntegrityError, export_stream
from appliance.audit.export_format import MANIFEST_NAME
from appliance.service import RequestRejected

EXPORT_FORMAT = "jsonl"  # records.jsonl in a signed tar (audit/export_format.py)


@dataclass(frozen=True)
class Export:
    path: Path
    workdir: Path

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def manifest_facts(tar_path: Path) -> dict[str, Any]:
    """``count``, ``first_seq`` and ``last_seq`` from the export's manifest (None where absent)."""
    with tarfile.open(tar_path) as tar:
        member = tar.extractfile(MANIFEST_NAME)
        doc = json.loads(member.read()) if member is not None else {}
    return {name: doc.get(name) for name in ("count", "first_seq", "last_seq")}


async def export_recorded(runtime: Any, stream: str, since: str | None, until: str | None, *, actor: str,
                          tenant: str | None, via: str, client: dict[str, str]) -> Export:
    """The export of ``stream``, recorded; ``RequestRejected`` (500 ``audit_integrity`` when the
    stream does not verify, 400 otherwise) with nothing left behind when it cannot be made."""
    workdir = Path(tempfile.mkdtemp(prefix="audit-export-", dir=runtime.config.data_dir))
    made = Export(workdir / f"audit-{stream}.tar", workdir)
    try:
        await asyncio.to_thread(export_stream, runtime.audit, stream, since, until, made.path)
        facts = await asyncio.to_thread(manifest_facts, made.path)
        await runtime.audit.append_async(
            "admin.audit_exported", stream="_admin", actor=actor, tenant=tenant,
            data={"stream": stream, "since": since, "until": until, "format": EXPORT_FORMAT, "via": via, **facts,
                  **client})
    except AuditIntegrityError as exc:
        made.cleanup()
        raise RequestRejected(500, "the audit log does not verify; an admin must look at it before anything is "
                              "exported", "server_error", "audit_integrity") from exc
    except AuditError as exc:
        made.cleanup()
        raise RequestRejected(400, f"audit export refused: {str(exc)[:200]}", "invalid_request_error",
                              "invalid_request") from exc
    except ValueError as exc:  # the stream's name (the admin route takes it as a parameter)
        made.cleanup()
        raise RequestRejected(400, f"stream: {str(exc)[:200]}", "invalid_request_error", "invalid_parameter",
                              param="stream") from exc
    except BaseException:
        made.cleanup()
        raise
    return made
