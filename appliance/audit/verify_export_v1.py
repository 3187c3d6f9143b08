"""Verifying a version 1 export (``sovereign-audit-export/v1``, written before the Merkle trees).

Archived exports must stay verifiable for as long as they are kept. A version 1 tar holds
``records.jsonl``, ``manifest.json`` and ``manifest.sig``; its manifest names at most one signed
checkpoint, the version 1 form: a signed JSON chain head ``{stream, seq, hash, ts, key_id,
signature}``, the signature over the canonical JSON of those fields (without ``signature``)
plus ``"type": "sovereign-audit-checkpoint/v1"``. The first ten checks are the version 2 ones
(the same record scan); the 11th is that checkpoint. A version 1 export has no range proof or
proof files: it is vouched for by the manifest signature and, where present, that checkpoint.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from appliance.audit.canonical import canonical_json
from appliance.audit.export_scan import Manifest, RecordScan, parse_manifest
from appliance.audit.keys import key_id_of

EXPORT_TYPE_V1 = "sovereign-audit-export/v1"
CHECKPOINT_TYPE_V1 = "sovereign-audit-checkpoint/v1"
MANIFEST_FIELDS_V1 = frozenset({
    "type", "stream", "created", "period", "count", "first_seq", "last_seq", "anchor_prev_hash",
    "last_hash", "records_file", "records_sha256", "records_bytes", "hash_rule", "checkpoint", "key_id",
    "signature_algorithm",
})
_CP_FIELDS = ("stream", "seq", "hash", "ts", "key_id", "signature")


def parse_manifest_v1(obj: Any) -> Manifest:
    """A version 1 manifest, in the version 2 shape the record scan reads (no format, proofs or
    range proof); ``ValueError("<expected>, found <found>")`` otherwise."""
    if not isinstance(obj, dict) or set(obj) != MANIFEST_FIELDS_V1:
        found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"version 1 manifest fields {sorted(MANIFEST_FIELDS_V1)}, found {found}")
    shaped = {**obj, "type": "sovereign-audit-export/v2", "pruned": 0, "leaf_rule": "",
              "format": {"name": "jsonl", "file": None, "sha256": None, "bytes": None},
              "checkpoint": None, "tree_edge": [], "consistency_proof": [], "proofs": {"mode": "ends", "count": 0}}
    manifest = parse_manifest(shaped)
    return Manifest(**{**manifest.__dict__, "checkpoint": obj["checkpoint"]})


def checkpoint_problem_v1(cp: Any, m: Manifest, key: Ed25519PublicKey, hash_at: Callable[[int], str | None]) -> \
        tuple[str | None, str]:
    """(problem or ``None``, detail) for the manifest's version 1 checkpoint."""
    if cp is None:
        return None, ("no checkpoint names a seq inside this export: the records are vouched for by the manifest "
                      "signature alone")
    if not isinstance(cp, dict) or set(cp) != set(_CP_FIELDS) or not isinstance(cp["seq"], int) or any(
            not isinstance(cp[name], str) for name in _CP_FIELDS if name != "seq"):
        return f"a version 1 checkpoint {{{', '.join(_CP_FIELDS)}}}, found {cp!r:.200}", ""
    expected_id = key_id_of(key)
    if cp["key_id"] != expected_id:
        return f"signed by key_id {expected_id[:16]}..., found key_id {cp['key_id'][:16]}...", ""
    payload = {"type": CHECKPOINT_TYPE_V1, **{name: cp[name] for name in _CP_FIELDS if name != "signature"}}
    try:
        key.verify(base64.b64decode(cp["signature"], validate=True), canonical_json(payload).encode("utf-8"))
    except (InvalidSignature, binascii.Error, ValueError):
        return "a valid Ed25519 signature over the checkpoint, found an invalid one", ""
    if cp["stream"] != m.stream:
        return f"a checkpoint of stream {m.stream!r}, found one of {cp['stream']!r}", ""
    if not (m.first_seq is not None and m.first_seq <= cp["seq"] <= (m.last_seq or 0)):
        return f"a checkpoint seq inside {m.first_seq}..{m.last_seq}, found seq {cp['seq']}", ""
    found = hash_at(cp["seq"])
    if found != cp["hash"]:
        return f"record seq {cp['seq']} with the signed hash {cp['hash']}, found hash {found}", ""
    return None, f"signed version 1 checkpoint at seq {cp['seq']} ({cp['ts']}) matches"


def want_hash_at(m: Manifest) -> int | None:
    cp = m.checkpoint
    return cp["seq"] if isinstance(cp, dict) and isinstance(cp.get("seq"), int) else None


def scan_hash_at(scan: RecordScan) -> Callable[[int], str | None]:
    return lambda seq: scan.hash_at if scan.hash_at_seq == seq else None
