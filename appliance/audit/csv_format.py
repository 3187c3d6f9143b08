"""The CSV rendering of an export (``--format csv``): one row per record, for spreadsheets.

RFC 4180: comma separated, CRLF line ends, a header row, fields quoted when they hold a comma,
quote or line break (quotes doubled). Fixed columns, in this order: ``CSV_COLUMNS``; ``data``
is the record's canonical JSON body as text; empty cells are nulls.

Formula injection: a cell that begins with ``=``, ``+``, ``-``, ``@``, a tab or a carriage
return is prefixed with a single quote, so a spreadsheet shows it as text instead of running
it. That changes the cell, so CSV rows do not hash to the records' hashes: verification runs
on the canonical ``records.jsonl`` in the same export, and the verifier regenerates this file
from it and compares (the CSV's sha256 is also in the signed manifest).
"""

from __future__ import annotations

import csv
import io

from appliance.audit.canonical import canonical_json
from appliance.audit.record import AuditRecord

CSV_COLUMNS = ("stream", "seq", "ts", "event_type", "actor", "tenant", "request_id", "data", "prev_hash", "hash",
               "pruned_at")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: str | int | None) -> str:
    if value is None:
        return ""
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


class CsvRenderer:
    """Renders records to CSV bytes, one row at a time (``header()`` first)."""

    def __init__(self) -> None:
        self._buffer = io.StringIO()
        self._writer = csv.writer(self._buffer, lineterminator="\r\n", quoting=csv.QUOTE_MINIMAL)

    def _take(self) -> bytes:
        text = self._buffer.getvalue()
        self._buffer.seek(0)
        self._buffer.truncate()
        return text.encode("utf-8")

    def header(self) -> bytes:
        self._writer.writerow(CSV_COLUMNS)
        return self._take()

    def row(self, record: AuditRecord, pruned_at: str | None) -> bytes:
        self._writer.writerow([
            _cell(record.stream), record.seq, _cell(record.ts), _cell(record.event_type), _cell(record.actor),
            _cell(record.tenant), _cell(record.request_id), _cell(canonical_json(record.data)),
            record.prev_hash, record.hash, _cell(pruned_at),
        ])
        return self._take()
