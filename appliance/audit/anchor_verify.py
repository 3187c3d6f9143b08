"""Verifying the database against anchors held off the box: published and witnessed checkpoints.

The signing key vouches for whatever it signs, so a holder of the key can replace the log with
a shorter or different one and re-sign it; ``verify`` alone cannot tell. Anchors can: a
checkpoint that left the box (a publish directory, a witness's state, any directory of C2SP
checkpoint files) or that a witness cosigned fixes the tree at its size for good. The checks,
in this order:

1. every anchor (a file, or a checkpoint fetched from a witness) parses as a signed note; notes
   of other logs are skipped (listed);
2. each anchor of this log carries a valid signature of the audit key (a planted file fails);
3. each anchored tree is in the database with at least the anchored size, and the root of its
   first ``size`` records, recomputed from the records, is the anchored root;
4. for the newest anchor of each tree, a consistency proof built from the stored tree nodes
   verifies from the anchored root to the root of every current record (RFC 9162 2.1.4.2);
5. witness cosignatures (anchor files and the ``audit_cosignatures`` table) verify with the
   given witness keys; with ``require_witness`` each witness must have cosigned an ``_all``
   checkpoint, and the newest it cosigned is an anchor like any other (checks 3 and 4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Connection, Engine, select

from appliance.audit.checkpoint import GLOBAL_TREE, log_key_name, log_verifier, origin_of
from appliance.audit.errors import AuditError, AuditIntegrityError
from appliance.audit.merkle import Frontier, consistency_proof, record_leaf, verify_consistency
from appliance.audit.note import (
    SIG_COSIGNATURE,
    CheckpointBody,
    NoteError,
    SignedNote,
    Verifier,
)
from appliance.audit.schema import audit_cosignatures, audit_events
from appliance.audit.treestore import DbNodes
from appliance.audit.witness import parse_vkey


class AnchorInputError(AuditError, ValueError):
    """The anchors or witness keys given cannot be used (missing directory, malformed key)."""


@dataclass(frozen=True)
class Anchor:
    tree: str
    size: int
    root: bytes
    sources: tuple[str, ...]
    witnesses: tuple[str, ...] = ()  # names whose cosignature verified
    cosigned_at: int | None = None  # the newest verified cosignature time (unix seconds)


@dataclass(frozen=True)
class AnchorFailure:
    check: str
    tree: str | None
    size: int | None
    expected: str
    found: str
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.check, "tree": self.tree, "size": self.size, "expected": self.expected,
                "found": self.found, "source": self.source}

    def describe(self) -> str:
        where = "" if self.tree is None else f" tree {self.tree}" + ("" if self.size is None else f" size {self.size}")
        return f"{self.check}{where}: expected {self.expected}, found {self.found}" + (
            f" ({self.source})" if self.source else "")


@dataclass(frozen=True)
class TreeResult:
    tree: str
    anchors: int
    newest_anchored: int
    database_size: int
    ok: bool


@dataclass(frozen=True)
class WitnessResult:
    witness: str
    newest_size: int | None  # newest cosigned _all size
    cosigned_at: int | None
    records_after: int | None


@dataclass(frozen=True)
class AnchorReport:
    trees: tuple[TreeResult, ...]
    witnesses: tuple[WitnessResult, ...]
    failures: tuple[AnchorFailure, ...]
    skipped: tuple[str, ...] = field(default_factory=tuple)
    anchors_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "anchors_checked": self.anchors_checked,
            "trees": [t.__dict__ for t in self.trees], "witnesses": [w.__dict__ for w in self.witnesses],
            "failures": [f.to_dict() for f in self.failures], "skipped": list(self.skipped),
        }


def _anchor_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise AnchorInputError(f"anchor: expected a directory of checkpoints at {directory}, found none")
    return sorted(p for p in directory.rglob("*") if p.is_file() and (p.suffix == ".checkpoint" or p.name == "latest"))


def verify_anchors(engine: Engine, public_key: Ed25519PublicKey, anchor_dirs: Sequence[Path], *,
                   witness_keys: Sequence[str] = (), require_witness: bool = False,
                   extra_notes: Sequence[tuple[str, str]] = ()) -> AnchorReport:
    """Check the database against every anchor (see the module docstring); a value, never raises
    for tampering. ``extra_notes``: (where, signed note text) anchors obtained otherwise, e.g.
    fetched from a witness. ``AnchorInputError`` when an input is unusable."""
    witnesses = _witness_verifiers(witness_keys)
    if require_witness and not witnesses:
        raise AnchorInputError("require_witness: expected at least one witness key, found none")
    if not anchor_dirs and not witnesses and not extra_notes:
        raise AnchorInputError("anchors: expected an anchor directory or a witness key, found neither")
    prefix = log_key_name(public_key) + "/"
    log_key = log_verifier(public_key)
    failures: list[AnchorFailure] = []
    skipped: list[str] = []
    found: dict[tuple[str, int, bytes], list[str]] = {}
    cosigns: dict[tuple[str, int, bytes], dict[str, int]] = {}
    sources: list[tuple[str, str | None]] = []  # (where, note text; None: unreadable)
    for directory in anchor_dirs:
        for path in _anchor_files(Path(directory)):
            try:
                sources.append((str(path), path.read_text(encoding="utf-8")))
            except (UnicodeDecodeError, OSError):
                sources.append((str(path), None))
    sources.extend(extra_notes)
    for where, text in sources:
        try:
            if text is None:
                raise NoteError("an unreadable file")
            note = SignedNote.parse(text)
            body = note.checkpoint()
        except NoteError as exc:
            failures.append(AnchorFailure("1 anchor parses", None, None, "a C2SP signed checkpoint", str(exc), where))
            continue
        if not body.origin.startswith(prefix):
            skipped.append(f"{where} (origin {body.origin})")
            continue
        tree = body.origin[len(prefix):]
        if not note.signed_by(log_key):
            failures.append(AnchorFailure("2 anchor signature", tree, body.size,
                                          f"a signature of {log_key.name}", "none that verifies", where))
            continue
        key = (tree, body.size, body.root)
        found.setdefault(key, []).append(where)
        _note_cosignatures(note, witnesses, cosigns.setdefault(key, {}))
    with engine.connect() as conn, conn.begin():
        failures.extend(_database_cosignatures(conn, public_key, witnesses, found, cosigns))
        anchors = [Anchor(t, s, r, tuple(src), tuple(sorted(cosigns.get((t, s, r), {}))),
                          max(cosigns.get((t, s, r), {}).values(), default=None))
                   for (t, s, r), src in sorted(found.items())]
        trees, tree_failures, sizes = _check_trees(conn, anchors)
    failures.extend(tree_failures)
    results = []
    for w in witnesses:
        mine = [a for a in anchors if a.tree == GLOBAL_TREE and w.name in a.witnesses]
        newest = max(mine, key=lambda a: a.size, default=None)
        if newest is None:
            results.append(WitnessResult(w.name, None, None, None))
        else:
            results.append(WitnessResult(w.name, newest.size, cosigns[(newest.tree, newest.size, newest.root)][w.name],
                                         sizes.get(GLOBAL_TREE, 0) - newest.size))
        if require_witness and newest is None:
            failures.append(AnchorFailure("5 witness cosignature", GLOBAL_TREE, None,
                                          f"a checkpoint cosigned by {w.name}", "no valid cosignature"))
    if not anchors and not failures:
        failures.append(AnchorFailure("1 anchor parses", None, None, f"at least one checkpoint of {prefix}*",
                                      "none in the anchors given"))
    return AnchorReport(tuple(trees), tuple(results), tuple(failures), tuple(skipped), len(anchors))


def _witness_verifiers(keys: Sequence[str]) -> list[Verifier]:
    verifiers = []
    for text in keys:
        try:
            v = parse_vkey(text)
        except NoteError as exc:
            raise AnchorInputError(f"witness key: {exc}") from None
        if v.sig_type != SIG_COSIGNATURE:
            raise AnchorInputError(f"witness key {v.name}: expected a cosignature key (type 0x04)")
        verifiers.append(v)
    return verifiers


def _note_cosignatures(note: SignedNote, witnesses: list[Verifier], into: dict[str, int]) -> None:
    for w in witnesses:
        if note.signed_by(w):
            into[w.name] = max(into.get(w.name, 0), note.cosignature_time(w) or 0)


def _database_cosignatures(conn: Connection, public_key: Ed25519PublicKey, witnesses: list[Verifier],
                           found: dict[tuple[str, int, bytes], list[str]],
                           cosigns: dict[tuple[str, int, bytes], dict[str, int]]) -> list[AnchorFailure]:
    """Stored cosignature lines of known witnesses become anchors; a line that does not verify fails."""
    failures = []
    by_name = {w.name: w for w in witnesses}
    for row in conn.execute(select(audit_cosignatures).order_by(audit_cosignatures.c.id)):
        w = by_name.get(row.witness)
        if w is None:
            continue
        try:
            body = CheckpointBody(origin_of(public_key, row.tree), int(row.size), bytes.fromhex(row.root))
            note = SignedNote.parse(body.text() + "\n" + row.line + "\n")
            valid = note.signed_by(w)
        except (NoteError, ValueError):
            valid = False
        if not valid:
            failures.append(AnchorFailure("5 witness cosignature", row.tree, row.size,
                                          f"a valid cosignature by {w.name}", "a line that does not verify",
                                          f"audit_cosignatures id {row.id}"))
            continue
        key = (row.tree, int(row.size), body.root)
        found.setdefault(key, []).append(f"audit_cosignatures id {row.id}")
        _note_cosignatures(note, [w], cosigns.setdefault(key, {}))
    return failures


def _check_trees(conn: Connection,
                 anchors: list[Anchor]) -> tuple[list[TreeResult], list[AnchorFailure], dict[str, int]]:
    failures: list[AnchorFailure] = []
    results: list[TreeResult] = []
    sizes: dict[str, int] = {}
    for tree in sorted({a.tree for a in anchors} | {GLOBAL_TREE}):
        mine = sorted((a for a in anchors if a.tree == tree), key=lambda a: a.size)
        before = len(failures)
        by_size: dict[int, list[Anchor]] = {}
        for a in mine:
            by_size.setdefault(a.size, []).append(a)
        frontier = Frontier()
        for leaf_hash in _leaves(conn, tree):
            frontier.append(record_leaf(leaf_hash))
            for a in by_size.pop(frontier.size, []):
                if frontier.root() != a.root:
                    failures.append(AnchorFailure("3 anchored root", tree, a.size, f"root {a.root.hex()} (anchored)",
                                                  f"root {frontier.root().hex()} recomputed from the records",
                                                  a.sources[0]))
        sizes[tree] = frontier.size
        for size, held in sorted(by_size.items()):
            for a in held:
                failures.append(AnchorFailure("3 anchored root", tree, size, f"at least {size} records (anchored)",
                                              f"{frontier.size} records in the database: records deleted",
                                              a.sources[0]))
        if mine and len(failures) == before:
            failures.extend(_proof_check(conn, tree, mine[-1], frontier))
        if mine:
            results.append(TreeResult(tree, len(mine), mine[-1].size, frontier.size, len(failures) == before))
    return results, failures, sizes


def _leaves(conn: Connection, tree: str) -> Any:
    ev = audit_events.c
    if tree == GLOBAL_TREE:
        stmt = select(ev.hash).where(ev.gidx.is_not(None)).order_by(ev.gidx)
    else:
        stmt = select(ev.hash).where(ev.stream == tree).order_by(ev.seq)
    return conn.execute(stmt).scalars().yield_per(5000)


def _proof_check(conn: Connection, tree: str, newest: Anchor, current: Frontier) -> list[AnchorFailure]:
    try:
        proof = consistency_proof(DbNodes(conn, tree), newest.size, current.size)
    except AuditIntegrityError as exc:
        return [AnchorFailure("4 consistency proof", tree, newest.size, "the stored tree nodes for a proof",
                              exc.found, newest.sources[0])]
    if verify_consistency(newest.size, current.size, newest.root, current.root(), proof):
        return []
    return [AnchorFailure("4 consistency proof", tree, newest.size,
                          f"a proof that the database's {current.size} records extend the anchored tree",
                          "a proof from the stored tree nodes that does not verify (the nodes were altered)",
                          newest.sources[0])]
