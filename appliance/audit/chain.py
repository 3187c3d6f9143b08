"""Walking a hash chain: the per-record checks shared by database and export verification.

Checks, in this order, for each record of a stream (the first that fails is reported):

1. ``stream``     -- the record belongs to the stream being walked;
2. ``seq``        -- seqs are gapless: exactly the previous seq + 1 (``first_seq`` at the start);
3. ``prev_hash``  -- links to the previous record's hash (the anchor at the start: the genesis
                     hash for seq 1);
4. ``hash``       -- the stored hash equals sha256 of the record's canonical body (a record
                     whose body retention pruned keeps its hash, links and leaf: skipped);
5. ``ts order``   -- timestamps never go backwards within a stream;
6. ``well-formed``-- every field is one an append could have written;
7. ``checkpoint`` -- where a signed checkpoint names a tree size equal to this seq, its root is
                     the Merkle root of the stream's records up to here (RFC 9162, leaves =
                     record hashes; walked with an O(log n) right edge).

Then, for the stream as a whole: every checkpoint's signature verifies with the audit public
key, and (in the database) no checkpoint names a size past the last record -- a truncated tail.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from appliance.audit.canonical import sha256_hex
from appliance.audit.checkpoint import Checkpoint
from appliance.audit.errors import AuditIntegrityError
from appliance.audit.merkle import Frontier, record_leaf
from appliance.audit.record import AuditRecord, well_formed_problem


@dataclass(frozen=True)
class ChainFailure:
    stream: str
    seq: int | None
    check: str
    expected: str
    found: str

    def to_error(self) -> AuditIntegrityError:
        return AuditIntegrityError(self.seq, self.stream, self.expected, self.found, check=self.check)

    def to_dict(self) -> dict[str, Any]:
        return {"stream": self.stream, "seq": self.seq, "check": self.check,
                "expected": self.expected, "found": self.found}

    def describe(self) -> str:
        where = "" if self.seq is None else f"seq {self.seq}: "
        return f"{where}{self.check}: expected {self.expected}, found {self.found}"


class ChainWalker:
    """Feed one stream's records in seq order; read ``failure`` when done."""

    def __init__(
        self, stream: str, *, anchor_prev_hash: str, first_seq: int = 1,
        checkpoints: Iterable[Checkpoint] = (), public_key: Ed25519PublicKey | None,
        frontier: Frontier | None = None,
    ) -> None:
        """``frontier``: the tree's right edge before ``first_seq`` (empty when it is 1)."""
        self.stream = stream
        if frontier is None and first_seq != 1:
            raise ValueError(f"a walk from seq {first_seq} needs the tree's edge before it")
        self.frontier = frontier if frontier is not None else Frontier()
        if self.frontier.size != first_seq - 1:
            raise ValueError(f"tree edge: expected {first_seq - 1} leaves before seq {first_seq}, "
                             f"found {self.frontier.size}")
        self.records = 0
        self.head: AuditRecord | None = None
        self._expected_seq = first_seq
        self._prev_hash = anchor_prev_hash
        self._prev_ts = ""
        self._chain_failure: ChainFailure | None = None
        self._checkpoint_failure: ChainFailure | None = None
        self._by_seq: dict[int, list[Checkpoint]] = {}
        self.checkpoints = list(checkpoints)
        for cp in self.checkpoints:
            problem = "a public key to check it, found none" if public_key is None else cp.signature_problem(public_key)
            if cp.stream != stream:
                problem = f"stream {stream!r}, found checkpoint for stream {cp.stream!r}"
            if problem is not None:
                self._note_checkpoint(ChainFailure(stream, cp.seq, "checkpoint signature", *_split(problem)))
            else:
                self._by_seq.setdefault(cp.seq, []).append(cp)

    def _note_checkpoint(self, failure: ChainFailure) -> None:
        current = self._checkpoint_failure
        if current is None or (failure.seq or 0) < (current.seq or 0):
            self._checkpoint_failure = failure

    @property
    def broken(self) -> bool:
        return self._chain_failure is not None

    @property
    def next_seq(self) -> int:
        return self._expected_seq

    def feed(self, record: AuditRecord, *, pruned: bool = False, body_text: str | None = None) -> None:
        """``body_text``: the record's canonical body as stored (``export_format.record_line_parts``):
        when its sha256 is the record's hash, the record need not be serialised again."""
        self.records += 1
        if self._chain_failure is None:  # after a break, later links say nothing new
            self._chain_failure = self._check(record, pruned, body_text)
            self._expected_seq = record.seq + 1
            self._prev_hash = record.hash
            self._prev_ts = record.ts
        self.head = record

    def _check(self, rec: AuditRecord, pruned: bool = False, body_text: str | None = None) -> ChainFailure | None:
        def fail(check: str, expected: str, found: str) -> ChainFailure:
            return ChainFailure(self.stream, rec.seq if check != "seq" else self._expected_seq,
                                check, expected, found)

        if rec.stream != self.stream:
            return fail("stream", repr(self.stream), repr(rec.stream))
        if rec.seq != self._expected_seq:
            return fail("seq", f"seq {self._expected_seq}", f"seq {rec.seq}")
        if rec.prev_hash != self._prev_hash:
            return fail("prev_hash", self._prev_hash, rec.prev_hash)
        if not pruned:
            if body_text is None or sha256_hex(body_text) != rec.hash:
                computed = rec.compute_hash()
                if computed != rec.hash:
                    return fail("hash", computed, rec.hash)
        elif rec.data:
            return fail("well-formed", "an empty body on a pruned record", "a body")
        if rec.ts < self._prev_ts:
            return fail("ts order", f"ts >= {self._prev_ts}", rec.ts)
        problem = well_formed_problem(rec)
        if problem is not None:
            return fail("well-formed", "fields an append could write", problem)
        self.frontier.append(record_leaf(rec.hash))
        cps = self._by_seq.pop(rec.seq, [])
        if cps:
            root = self.frontier.root().hex()
            for cp in cps:
                if cp.root != root:
                    return fail("checkpoint", f"root {cp.root} (signed {cp.ts})", f"root {root}")
        return None

    def finish(self, *, require_checkpoints_covered: bool) -> ChainFailure | None:
        """The first failure by seq. Checkpoints past the last record mean a truncated tail."""
        if require_checkpoints_covered and self._chain_failure is None:
            for seq in sorted(self._by_seq):
                if self.head is None or seq > self.head.seq:
                    head = "no records" if self.head is None else f"last record seq {self.head.seq}"
                    self._note_checkpoint(ChainFailure(
                        self.stream, seq, "truncation", f"a record at seq {seq} (signed checkpoint of "
                        f"{seq} records)", head))
                    break
        failures = [f for f in (self._chain_failure, self._checkpoint_failure) if f is not None]
        return min(failures, key=lambda f: f.seq or 0) if failures else None


def _split(problem: str) -> tuple[str, str]:
    """Split "<expected>, found <found>" into its halves."""
    expected, _, found = problem.partition(", found ")
    return expected, found or "?"
