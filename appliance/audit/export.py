"""``export_stream``: one tenant's records for a period, as a signed, self-contained tar.

Before anything is written, the whole stream is verified from genesis against its signed
checkpoints (an export never vouches for a broken chain) and its head is checkpointed. The
tar is built in a temporary file beside ``out`` and moved into place in one step; an existing
``out`` is never replaced unless ``overwrite`` is true. See ``export_format`` for the layout.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import tempfile
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from appliance.audit.canonical import canonical_json, normalize_ts, parse_ts, utc_now_ts
from appliance.audit.errors import AuditError
from appliance.audit.export_format import (
    EXPORT_TYPE,
    HASH_RULE,
    MANIFEST_NAME,
    RECORDS_NAME,
    SIGNATURE_NAME,
)
from appliance.audit.log import AuditLog
from appliance.audit.record import validate_stream


def export_stream(
    log: AuditLog, stream: str, since: str | datetime | None, until: str | datetime | None, out: Path,
    *, overwrite: bool = False,
) -> Path:
    """Write ``stream``'s records with ``since <= ts < until`` to the tar ``out``; returns ``out``.

    Raises ``AuditIntegrityError`` if the stream does not verify, ``AuditError`` otherwise.
    """
    validate_stream(stream)
    lower, upper = normalize_ts(since), normalize_ts(until)
    if lower is not None and upper is not None and lower >= upper:
        raise AuditError(f"export period: expected since < until, found {lower} >= {upper}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise AuditError(f"export target {out}: expected no existing file, found one (pass overwrite)")
    log.verify(stream).raise_for_failure()
    log.checkpoint(stream)

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=out.parent) as records_file:
        facts = _write_records(log, stream, lower, upper, records_file)
        covering = [
            cp for cp in log.checkpoints(stream)
            if facts["first_seq"] is not None and facts["first_seq"] <= cp.seq <= facts["last_seq"]
        ]
        created = utc_now_ts()
        manifest: dict[str, Any] = {
            "type": EXPORT_TYPE, "stream": stream, "created": created,
            "period": {"since": lower, "until": upper}, **facts,
            "records_file": RECORDS_NAME, "hash_rule": HASH_RULE,
            "checkpoint": max(covering, key=lambda cp: (cp.seq, cp.ts)).to_dict() if covering else None,
            "key_id": log.keys.key_id, "signature_algorithm": "ed25519",
        }
        manifest_bytes = canonical_json(manifest).encode("utf-8")
        signature = log.keys.sign(manifest_bytes).encode("ascii")
        mtime = int(parse_ts(created).timestamp())
        records_file.seek(0)
        _write_tar(out, overwrite, mtime, [
            (RECORDS_NAME, records_file, facts["records_bytes"]),
            (MANIFEST_NAME, io.BytesIO(manifest_bytes), len(manifest_bytes)),
            (SIGNATURE_NAME, io.BytesIO(signature), len(signature)),
        ])
    return out


def _write_records(
    log: AuditLog, stream: str, lower: str | None, upper: str | None, sink: IO[bytes]
) -> dict[str, Any]:
    digest = hashlib.sha256()
    size = count = 0
    first = last = None
    for record in log.iter_records(stream, lower, upper):
        line = (record.to_json_line() + "\n").encode("utf-8")
        sink.write(line)
        digest.update(line)
        size += len(line)
        count += 1
        if first is None:
            first = record
        last = record
    sink.flush()
    return {
        "count": count,
        "first_seq": None if first is None else first.seq,
        "last_seq": None if last is None else last.seq,
        "anchor_prev_hash": None if first is None else first.prev_hash,
        "last_hash": None if last is None else last.hash,
        "records_sha256": digest.hexdigest(),
        "records_bytes": size,
    }


def _write_tar(out: Path, overwrite: bool, mtime: int, members: list[tuple[str, IO[bytes], int]]) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            with tarfile.open(fileobj=handle, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for name, source, size in members:
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = size, mtime, 0o644
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    tar.addfile(info, source)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        if overwrite:
            os.replace(tmp, out)
        else:
            try:
                os.link(tmp, out)  # fails rather than replace a file that appeared meanwhile
            except FileExistsError:
                raise AuditError(f"export target {out}: expected no existing file, found one") from None
    finally:
        tmp.unlink(missing_ok=True)
