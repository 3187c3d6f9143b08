"""``appliance audit prove / verify-proof / consistency``: proofs about single records and checkpoints.

- ``run_prove``: a C2SP tlog-proof that one record (a stream's seq, or an ``_all`` position)
  is in the newest signed checkpoint of its tree (one is signed first when none covers it yet);
  the proof is verified before it is written.
- ``run_verify_proof``: check such a file offline with the audit public key.
- ``run_consistency``: the RFC 9162 consistency proof between two checkpoints of one tree --
  given as checkpoint files (signed notes, e.g. published or witnessed copies) or as sizes
  (then the stored checkpoints of that size, or the stored tree's root, from ``--db``) -- verified
  against their roots; ``--proof FILE`` verifies a saved proof with no database at all.

Exit codes as for every audit command: 0 proven, 1 a proof or signature does not verify,
2 the command could not run.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from rich.console import Console
from sqlalchemy import select

from appliance.audit.checkpoint import GLOBAL_TREE, log_verifier, origin_of
from appliance.audit.checkpointing import latest_checkpoint, load_checkpoints
from appliance.audit.errors import AuditError
from appliance.audit.export_format import canonical_record_line
from appliance.audit.keys import AuditKeys, public_key_from_pem
from appliance.audit.log import AuditLog
from appliance.audit.merkle import consistency_proof, inclusion_proof, root, verify_consistency
from appliance.audit.note import NoteError, SignedNote
from appliance.audit.proofs import ProofError, record_proof, verify_proof
from appliance.audit.record import AuditRecord, validate_stream
from appliance.audit.schema import audit_events, make_engine
from appliance.audit.treestore import DbNodes, tree_size

EXIT_OK, EXIT_FAILED, EXIT_ERROR = 0, 1, 2
CONSISTENCY_HEADER = "sovereign-audit/consistency-proof@v1"


class UsageError(Exception):
    """The command cannot run as asked (exit 2)."""


def write_atomic(out: Path, data: bytes) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)


def public_key_of(key: Path | None, public_key: Path | None) -> Ed25519PublicKey:
    if key is not None:
        return AuditKeys(key, create=False).public_key
    if public_key is not None:
        return public_key_from_pem(Path(public_key).read_bytes())
    raise UsageError("expected --key or --public-key, found neither")


# -- prove -------------------------------------------------------------------------------------


def build_proof(log: AuditLog, *, tenant: str | None, seq: int | None, gidx: int | None) -> str:
    """The tlog-proof text for one record, against the newest checkpoint that covers it."""
    if (tenant is None or seq is None) == (gidx is None) or (gidx is not None and tenant is not None):
        raise UsageError("expected --tenant T --seq N, or --gidx N, found neither or both")
    tree = GLOBAL_TREE if gidx is not None else validate_stream(str(tenant))
    index = int(gidx) if gidx is not None else int(seq or 0) - 1
    if index < 0:
        raise UsageError(f"expected seq >= 1 or gidx >= 0, found {seq if gidx is None else gidx}")
    ev = audit_events.c
    where = (ev.gidx == index) if tree == GLOBAL_TREE else ((ev.stream == tree) & (ev.seq == index + 1))
    for attempt in range(2):
        with log.engine.connect() as conn, conn.begin():
            row = conn.execute(select(audit_events).where(where)).first()
            if row is None:
                raise UsageError(f"a record at {'gidx' if gidx is not None else 'seq'} "
                                 f"{gidx if gidx is not None else seq} of tree {tree!r}, found none")
            cp = latest_checkpoint(conn, tree)
            if cp is not None and cp.size > index:
                line = canonical_record_line(AuditRecord.from_row(row), row.pruned_at)
                path = inclusion_proof(DbNodes(conn, tree), index, cp.size)
                text = record_proof(line, index, path, cp.note)
                verify_proof(text, log.keys.public_key, tree=tree)  # never hand out a proof that fails
                return text
        if attempt == 0:
            log.checkpoint(row.stream)
    raise AuditError(f"no signed checkpoint of tree {tree!r} covers leaf {index}, even after signing one")


def run_prove(db: str, *, key: Path, tenant: str | None, seq: int | None, gidx: int | None, out: Path | None,
              as_json: bool = False, console: Console | None = None) -> int:
    stdout, err = console or Console(), Console(stderr=True)
    try:
        log = AuditLog(db, key, create=False)
        try:
            text = build_proof(log, tenant=tenant, seq=seq, gidx=gidx)
        finally:
            log.close()
        if out is not None:
            write_atomic(out, text.encode("utf-8"))
    except ProofError as exc:
        err.print(f"audit prove: the proof does not verify: {exc}", markup=False)
        return EXIT_FAILED
    except (UsageError, AuditError, OSError, ValueError) as exc:
        err.print(f"audit prove: {exc}", markup=False)
        return EXIT_ERROR
    if as_json:
        stdout.out(json.dumps({"ok": True, "path": None if out is None else str(out), "proof": text}, indent=2),
                   highlight=False)
    elif out is None:
        stdout.out(text, end="", highlight=False)
    else:
        stdout.print(f"wrote a verified tlog-proof to {out}", markup=False)
    return EXIT_OK


def run_verify_proof(path: Path, *, public_key: Path, tree: str | None = None, as_json: bool = False,
                     console: Console | None = None) -> int:
    stdout, err = console or Console(), Console(stderr=True)
    try:
        key = public_key_from_pem(Path(public_key).read_bytes())
        text = Path(path).read_text(encoding="utf-8")
    except (AuditError, OSError, UnicodeDecodeError) as exc:
        err.print(f"audit verify-proof: {exc}", markup=False)
        return EXIT_ERROR
    try:
        proven = verify_proof(text, key, tree=tree)
    except ProofError as exc:
        if as_json:
            stdout.out(json.dumps({"ok": False, "problem": str(exc)}, indent=2), highlight=False)
        else:
            stdout.print(f"[red]NOT VERIFIED[/]: {exc}")
        return EXIT_FAILED
    r = proven.record
    if as_json:
        stdout.out(json.dumps({"ok": True, "tree": proven.tree, "index": proven.index, "size": proven.checkpoint.size,
                               "stream": r.stream, "seq": r.seq, "hash": r.hash, "pruned_at": proven.pruned_at},
                              indent=2), highlight=False)
    else:
        stdout.print(f"[green]VERIFIED[/]: {r.stream} seq {r.seq} ({r.event_type}, {r.ts}) is leaf {proven.index} "
                     f"of tree {proven.tree!r} signed at {proven.checkpoint.size} records")
    return EXIT_OK


# -- consistency ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TreeHead:
    tree: str
    size: int
    root: bytes
    signed: bool  # False: a root read from the database, not a signed checkpoint


def _head_from_file(path: Path, key: Ed25519PublicKey) -> TreeHead:
    try:
        note = SignedNote.parse(path.read_text(encoding="utf-8"))
        body = note.checkpoint()
    except (NoteError, UnicodeDecodeError) as exc:
        raise ProofError(f"{path}: a C2SP signed checkpoint, found {exc}") from None
    prefix = origin_of(key, "")
    if not body.origin.startswith(prefix):
        raise ProofError(f"{path}: a checkpoint of origin {prefix}<tree>, found {body.origin!r}")
    if not note.signed_by(log_verifier(key)):
        raise ProofError(f"{path}: a checkpoint signed by the audit key, found no valid signature by it")
    return TreeHead(body.origin[len(prefix):], body.size, body.root, True)


def _head_from_db(db: str | None, tree: str | None, size: int, key: Ed25519PublicKey) -> TreeHead:
    if db is None or tree is None:
        raise UsageError(f"a size ({size}) needs --db and --tree to find its checkpoint, found "
                         f"{'no --db' if db is None else 'no --tree'}")
    engine = make_engine(db, create=False)
    try:
        with engine.connect() as conn, conn.begin():
            for cp in reversed(load_checkpoints(conn, tree)):
                if cp.size == size:
                    problem = cp.signature_problem(key)
                    if problem is not None:
                        raise ProofError(f"stored checkpoint of {tree!r} at {size}: {problem}")
                    return TreeHead(tree, size, bytes.fromhex(cp.root), True)
            if size > tree_size(conn, tree):
                raise UsageError(f"a size of at most {tree_size(conn, tree)} for tree {tree!r}, found {size}")
            return TreeHead(tree, size, root(DbNodes(conn, tree), size), False)
    finally:
        engine.dispose()


def _head(arg: str, db: str | None, tree: str | None, key: Ed25519PublicKey) -> TreeHead:
    if arg.isdigit():
        return _head_from_db(db, tree, int(arg), key)
    path = Path(arg)
    if not path.is_file():
        raise UsageError(f"a checkpoint file or a tree size, found {arg!r} (no such file)")
    return _head_from_file(path, key)


def parse_consistency_file(text: str) -> tuple[str, int, int, list[bytes]]:
    lines = text.rstrip("\n").split("\n")
    if len(lines) < 4 or lines[0] != CONSISTENCY_HEADER or not lines[1].startswith("tree ") \
            or not lines[2].startswith("old ") or not lines[3].startswith("new "):
        raise UsageError(f"a consistency proof file ({CONSISTENCY_HEADER}, tree, old, new, hashes), found "
                         f"{lines[0][:60]!r}")
    try:
        hashes = [base64.b64decode(line, validate=True) for line in lines[4:]]
        return lines[1][5:], int(lines[2][4:]), int(lines[3][4:]), hashes
    except (binascii.Error, ValueError):
        raise UsageError("a consistency proof file with decimal sizes and base64 hashes, found other text") from None


def consistency_text(tree: str, old: int, new: int, proof: list[bytes]) -> str:
    return "\n".join([CONSISTENCY_HEADER, f"tree {tree}", f"old {old}", f"new {new}",
                      *(base64.b64encode(h).decode() for h in proof)]) + "\n"


def check_consistency(old_arg: str, new_arg: str, *, db: str | None, key: Ed25519PublicKey, tree: str | None,
                      proof_file: Path | None) -> dict[str, Any]:
    old, new = _head(old_arg, db, tree, key), _head(new_arg, db, tree, key)
    if old.tree != new.tree or (tree is not None and old.tree != tree):
        raise ProofError(f"two checkpoints of tree {tree or old.tree!r}, found {old.tree!r} and {new.tree!r}")
    if old.size > new.size:
        raise UsageError(f"OLD no larger than NEW, found sizes {old.size} and {new.size}")
    if proof_file is not None:
        named, old_size, new_size, proof = parse_consistency_file(proof_file.read_text(encoding="utf-8"))
        if (named, old_size, new_size) != (old.tree, old.size, new.size):
            raise ProofError(f"a proof for tree {old.tree!r} {old.size} -> {new.size}, found one for {named!r} "
                             f"{old_size} -> {new_size}")
    elif db is None:
        raise UsageError("--db to compute the proof, or --proof FILE to check a saved one, found neither")
    else:
        engine = make_engine(db, create=False)
        try:
            with engine.connect() as conn, conn.begin():
                proof = consistency_proof(DbNodes(conn, old.tree), old.size, new.size)
        finally:
            engine.dispose()
    ok = verify_consistency(old.size, new.size, old.root, new.root, proof)
    return {"ok": ok, "tree": old.tree, "old": {"size": old.size, "root": old.root.hex(), "signed": old.signed},
            "new": {"size": new.size, "root": new.root.hex(), "signed": new.signed},
            "proof": [base64.b64encode(h).decode() for h in proof],
            "text": consistency_text(old.tree, old.size, new.size, proof)}


def run_consistency(old: str, new: str, *, db: str | None, key: Path | None, public_key: Path | None,
                    tree: str | None, proof_file: Path | None, out: Path | None, as_json: bool = False,
                    console: Console | None = None) -> int:
    stdout, err = console or Console(), Console(stderr=True)
    try:
        pub = public_key_of(key, public_key)
        result = check_consistency(old, new, db=db, key=pub, tree=tree, proof_file=proof_file)
        if out is not None and result["ok"]:
            write_atomic(out, result["text"].encode("utf-8"))
    except ProofError as exc:
        err.print(f"audit consistency: NOT VERIFIED: {exc}", markup=False)
        return EXIT_FAILED
    except (UsageError, AuditError, OSError, ValueError) as exc:
        err.print(f"audit consistency: {exc}", markup=False)
        return EXIT_ERROR
    if as_json:
        stdout.out(json.dumps({k: v for k, v in result.items() if k != "text"}, indent=2), highlight=False)
    else:
        stdout.out(result["text"], end="", highlight=False)
        unsigned = [name for name in ("old", "new") if not result[name]["signed"]]
        note = f" (unsigned root from the database: {', '.join(unsigned)})" if unsigned else ""
        verdict = "[green]CONSISTENT[/]" if result["ok"] else "[red]NOT CONSISTENT[/]"
        stdout.print(f"{verdict}: tree {result['tree']!r} {result['old']['size']} -> {result['new']['size']}{note}")
    return EXIT_OK if result["ok"] else EXIT_FAILED
