"""``--format csv`` and ``--format ocsf``: the rendering of every event type, and its verification.

The canonical ``records.jsonl`` is always in the tar and is what the chain checks run on; the
CSV/OCSF file is signed (its sha256 is in the manifest) and must be exactly what those records
render to, so an edited spreadsheet or SIEM file fails check 14.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import pytest

from appliance.audit import AuditLog, export_stream, verify_export
from appliance.audit.csv_format import CSV_COLUMNS
from appliance.audit.ocsf import OCSF_VERSION, PRODUCT
from appliance.audit.record import REQUEST_EVENT_TYPES

# event type -> (OCSF activity_id, status_id) as documented in appliance/audit/ocsf.py
REQUEST_EXPECTED = {"accepted": (1, 1), "completed": (1, 1), "failed": (1, 2), "aborted": (1, 2),
                    "rejected": (1, 2), "abandoned": (1, 2), "retried": (1, 99)}
ADMIN_EXPECTED = {  # every admin event type the appliance writes today (grep "admin." in appliance/)
    "admin.admin_created": (1, 1), "admin.key_issued": (1, 1), "admin.tenant_created": (1, 1),
    "admin.node_added": (1, 1), "admin.appliance_started": (1, 1), "admin.audit_hold_added": (1, 1),
    "admin.audit_prune_started": (1, 1),
    "admin.audit_exported": (2, 1), "admin.audit_verified": (2, 2),  # data.result "failed: ..."
    "admin.audit_content_viewed": (2, 1),
    "admin.tenant_updated": (3, 1), "admin.policy_changed": (3, 1), "admin.admin_token_migrated": (3, 1),
    "admin.key_rotated": (3, 1), "admin.admin_disabled": (3, 1), "admin.node_draining": (3, 1),
    "admin.node_undrained": (3, 1), "admin.audit_hold_released": (3, 1),
    "admin.key_revoked": (4, 1), "admin.admin_token_removed": (4, 1), "admin.tenant_deleted": (4, 1),
    "admin.node_removed": (4, 1), "admin.audit_pruned": (4, 1), "admin.tenant_key_shredded": (4, 1),
    "admin.appliance_stopped": (4, 1),
    "admin.auth_failed": (99, 2), "admin.auth_failed_summary": (99, 2), "admin.request_refused": (99, 2),
    "admin.request_refused_summary": (99, 2), "admin.unclean_shutdown": (99, 1),
    "installer.install": (99, 1), "installer.rollback": (99, 2),  # data.result "failed"
}


def _members(tar: Path) -> dict[str, bytes]:
    with tarfile.open(tar) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()}  # type: ignore[union-attr]


def _rewrite(tar: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(tar, "w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


@pytest.fixture
def every_event(audit_log: AuditLog) -> AuditLog:
    assert set(REQUEST_EXPECTED) == REQUEST_EVENT_TYPES  # a new event type needs its mapping decided here
    for i, event_type in enumerate(sorted(REQUEST_EXPECTED)):
        data: dict[str, object] = {"model": "smollm2", "n": i}
        if i % 2 == 0:
            data |= {"client_ip": "10.1.2.3", "user_agent": "OpenAI/Python 1.54.0"}
        audit_log.append(event_type, stream="acme", actor="key:k1", request_id=f"req-{i}", data=data)
    for event_type in ADMIN_EXPECTED:
        data = {"result": "failed: acme seq 3 hash"} if event_type == "admin.audit_verified" else {"x": 1}
        if event_type == "installer.rollback":
            data = {"result": "failed"}
        audit_log.append(event_type, stream="_admin", actor="admin:alice", tenant="acme", data=data)
    return audit_log


def test_ocsf_maps_every_event_type(every_event: AuditLog, tmp_path: Path) -> None:
    pem = tmp_path / "audit.pem"
    pem.write_bytes(every_event.public_key_pem())
    for stream, expected_map in (("acme", REQUEST_EXPECTED), ("_admin", ADMIN_EXPECTED)):
        tar = export_stream(every_event, stream, None, None, tmp_path / f"{stream}.tar", fmt="ocsf")
        report = verify_export(tar, pem)
        assert report.ok, report.to_dict()
        members = _members(tar)
        assert "records.jsonl" in members and "records.ocsf.jsonl" in members
        records = [json.loads(line) for line in members["records.jsonl"].splitlines()]
        events = [json.loads(line) for line in members["records.ocsf.jsonl"].splitlines()]
        assert len(events) == len(records) == len(expected_map)
        for record, event in zip(records, events, strict=True):
            activity, status = expected_map[record["event_type"]]
            assert (event["class_uid"], event["category_uid"]) == (6003, 6)
            assert (event["activity_id"], event["status_id"]) == (activity, status), record["event_type"]
            assert event["type_uid"] == 600300 + activity
            assert event["status"] == {1: "Success", 2: "Failure", 99: "Other"}[status]
            moment = datetime.strptime(record["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
            assert event["time"] == int(moment.timestamp() * 1000)
            assert event["actor"] == {"user": {"uid": record["actor"]}}
            assert event["api"]["operation"] == record["event_type"]
            assert event["metadata"]["version"] == OCSF_VERSION == "1.1.0"
            assert event["metadata"]["product"] == PRODUCT
            assert event["metadata"].get("uid") == record["request_id"]
            assert event["metadata"]["sequence"] == record["seq"]
            if "client_ip" in record["data"]:
                assert event["src_endpoint"] == {"ip": record["data"]["client_ip"]}
                assert event["http_request"] == {"user_agent": record["data"]["user_agent"]}
            else:
                assert "src_endpoint" not in event and "http_request" not in event
            unmapped = event["unmapped"]
            assert (unmapped["stream"], unmapped["seq"], unmapped["hash"]) == (stream, record["seq"], record["hash"])
            assert unmapped["data"] == {k: v for k, v in record["data"].items()
                                        if k not in ("client_ip", "user_agent")}


def test_csv_is_rfc4180_with_fixed_columns_and_formula_cells_neutralised(audit_log: AuditLog, tmp_path: Path) -> None:
    audit_log.append("completed", stream="acme", actor="key:k1", request_id="=HYPERLINK(\"http://x\")",
                     data={"note": "a,b \"quoted\"\nnext line", "model": "smollm2"})
    audit_log.append("accepted", stream="acme", actor="@evil", request_id="-1+2", data={})
    tar = export_stream(audit_log, "acme", None, None, tmp_path / "a.tar", fmt="csv")
    members = _members(tar)
    raw = members["records.csv"]
    assert raw.startswith(",".join(CSV_COLUMNS).encode() + b"\r\n") and raw.endswith(b"\r\n")
    assert b'"{""model"":""smollm2""' in raw  # RFC 4180: a field with quotes is quoted, its quotes doubled
    rows = list(csv.reader(io.StringIO(raw.decode("utf-8"), newline="")))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 3
    first, second = (dict(zip(CSV_COLUMNS, row, strict=True)) for row in rows[1:])
    assert first["request_id"] == "'=HYPERLINK(\"http://x\")"
    assert json.loads(first["data"]) == {"note": "a,b \"quoted\"\nnext line", "model": "smollm2"}
    assert (second["actor"], second["request_id"], second["tenant"], second["pruned_at"]) == ("'@evil", "'-1+2",
                                                                                              "acme", "")
    records = [json.loads(line) for line in members["records.jsonl"].splitlines()]
    assert [r["hash"] for r in records] == [first["hash"], second["hash"]]
    pem = tmp_path / "audit.pem"
    pem.write_bytes(audit_log.public_key_pem())
    report = verify_export(tar, pem)
    assert report.ok, report.to_dict()
    assert report.checks[13].name == "format file" and "renders to" in report.checks[13].detail


def test_edited_csv_or_ocsf_file_fails_the_format_check(audit_log: AuditLog, tmp_path: Path) -> None:
    for i in range(3):
        audit_log.append("completed", stream="acme", actor="key:k1", request_id=f"r{i}", data={"n": i})
    pem = tmp_path / "audit.pem"
    pem.write_bytes(audit_log.public_key_pem())
    for fmt, name in (("csv", "records.csv"), ("ocsf", "records.ocsf.jsonl")):
        tar = export_stream(audit_log, "acme", None, None, tmp_path / f"{fmt}.tar", fmt=fmt)
        members = _members(tar)
        members[name] = members[name].replace(b"r1", b"r9")
        _rewrite(tar, members)
        report = verify_export(tar, pem)
        failed = [c for c in report.checks if not c.passed]
        assert [c.name for c in failed] == ["format file"], report.to_dict()
        assert "changed after export" in failed[0].detail
        members.pop(name)
        _rewrite(tar, members)
        failed = [c for c in verify_export(tar, pem).checks if not c.passed]
        assert [c.name for c in failed] == ["format file"] and "found none" in failed[0].detail


def test_a_signed_but_wrongly_rendered_file_fails(audit_log: AuditLog, tmp_path: Path) -> None:
    """Even with the key (a manifest re-signed over a doctored CSV) the CSV must render from the records."""
    audit_log.append("completed", stream="acme", actor="key:k1", request_id="r1", data={"n": 1})
    tar = export_stream(audit_log, "acme", None, None, tmp_path / "a.tar", fmt="csv")
    members = _members(tar)
    members["records.csv"] = members["records.csv"].replace(b"r1", b"r2")
    manifest = json.loads(members["manifest.json"])
    manifest["format"]["sha256"] = hashlib.sha256(members["records.csv"]).hexdigest()
    members["manifest.json"] = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    members["manifest.sig"] = audit_log.keys.sign(members["manifest.json"]).encode()
    _rewrite(tar, members)
    pem = tmp_path / "audit.pem"
    pem.write_bytes(audit_log.public_key_pem())
    failed = [c for c in verify_export(tar, pem).checks if not c.passed]
    assert [c.name for c in failed] == ["format file"] and "render" in failed[0].detail
