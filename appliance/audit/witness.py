"""A C2SP tlog-witness: cosigns a log's checkpoints only after checking it never rewrote history.

For every origin it witnesses the witness keeps exactly one thing, the newest checkpoint it
cosigned, as a file ``<state>/logs/<origin, percent-encoded>.checkpoint`` (the log's signed note
plus the witness's cosignature, written atomically and fsynced before any answer). A submission
(``POST /add-checkpoint``, c2sp.org/tlog-witness) is checked in this order:

1. the body parses: ``old <size>``, at most 63 base64 proof lines, a blank line, a signed note
   (400 otherwise);
2. the origin belongs to a configured log (404): a log verifier key named ``N`` covers the origin
   ``N`` and every ``N/<tree>`` (the appliance signs one origin per tree with one key);
3. a signature of that log's key verifies (403);
4. ``old <= size`` (400);
5. ``old`` is the size the witness last cosigned for the origin, 0 if none (409, body: that
   size, ``text/x.tlog.size``);
6. if ``old == size``, the root is the stored root (409);
7. the consistency proof from the stored (old) root to the new root verifies (422).

Only then is the new checkpoint stored and the cosignature returned. Checks 5 to 7 and the
store run under one lock, so concurrent requests can never roll the state back. A submission
signed by the log that fails 6 or 7 is kept under ``<state>/evidence/`` (at most
``max_evidence`` files): it is the log's own signed proof of a rewritten history.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import logging
import os
import re
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.audit.errors import AuditError
from appliance.audit.merkle import verify_consistency
from appliance.audit.note import (
    SIG_COSIGNATURE,
    CheckpointBody,
    NoteError,
    NoteSigner,
    SignedNote,
    Verifier,
    parse_verifier_key,
)
from appliance.audit.publish import atomic_write

log = logging.getLogger("appliance.audit.witness")

MAX_PROOF_LINES = 63
SIZE_CONTENT_TYPE = "text/x.tlog.size"
_TREE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}$")
_KEY_PREFIX = "PRIVATE+KEY+"


class WitnessError(AuditError):
    """The witness cannot start or its key or state is unusable (the message says why)."""


# -- keys ---------------------------------------------------------------------------------

parse_vkey = parse_verifier_key  # ``<name>+<key id hex>+<base64(type || key)>`` (note.py)


def generate_witness_key(path: Path, name: str) -> Verifier:
    """Create a witness key file (0600) at ``path``; never replaces an existing file."""
    private = Ed25519PrivateKey.generate()
    signer = NoteSigner(name, private, SIG_COSIGNATURE)  # validates the name
    seed = private.private_bytes_raw()
    blob = base64.b64encode(bytes([SIG_COSIGNATURE]) + seed).decode()
    text = f"{_KEY_PREFIX}{name}+{signer.verifier.id.hex()}+{blob}\n"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise WitnessError(f"witness key: expected no file at {path}, found one (not overwritten)") from None
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    return signer.verifier


def load_witness_key(path: Path) -> NoteSigner:
    """The cosigning key in ``path`` (``PRIVATE+KEY+<name>+<id hex>+<base64(0x04 || seed)>``, mode 0600)."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        text = path.read_text().strip()
    except OSError as exc:
        raise WitnessError(f"witness key {path}: expected a readable key file, found {exc.strerror}") from None
    if mode & 0o077:
        raise WitnessError(f"witness key {path}: expected mode 0600, found {mode:04o}")
    parts = text.split("+", 4)
    if len(parts) != 5 or text[:len(_KEY_PREFIX)] != _KEY_PREFIX:
        raise WitnessError(f"witness key {path}: expected PRIVATE+KEY+<name>+<id>+<key>, found another format")
    name, hex_id, blob = parts[2:]
    try:
        raw = base64.b64decode(blob, validate=True)
    except binascii.Error:
        raise WitnessError(f"witness key {path}: expected base64 key data, found undecodable text") from None
    if len(raw) != 33 or raw[0] != SIG_COSIGNATURE:
        raise WitnessError(f"witness key {path}: expected a cosignature (0x04) Ed25519 seed of 32 bytes")
    private = Ed25519PrivateKey.from_private_bytes(raw[1:])
    signer = NoteSigner(name, private, SIG_COSIGNATURE)
    if signer.verifier.id.hex() != hex_id:
        raise WitnessError(f"witness key {path}: key id {hex_id} does not match the key")
    return signer


# -- the state and the protocol -----------------------------------------------------------

@dataclass(frozen=True)
class Answer:
    status: int
    body: str
    content_type: str = "text/plain; charset=utf-8"


def _refuse(status: int, message: str) -> Answer:
    return Answer(status, message.rstrip("\n") + "\n")


class WitnessState:
    """The witness's durable memory in ``directory``, for the logs whose verifier keys it is given.

    Holds an exclusive lock on ``<directory>/lock`` while open: two witness processes on one
    state directory could otherwise each accept a different branch.
    """

    def __init__(self, directory: Path, logs: list[Verifier], signer: NoteSigner, *,
                 max_evidence: int = 1000) -> None:
        if not logs:
            raise WitnessError("witness: expected at least one log verifier key (--log), found none")
        for v in logs:
            if v.sig_type != 0x01:
                raise WitnessError(f"witness: log key {v.name} must be an Ed25519 note key (type 0x01)")
        self.directory = Path(directory)
        self.logs = list(logs)
        self.signer = signer
        self.max_evidence = max_evidence
        (self.directory / "logs").mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.directory / "evidence").mkdir(mode=0o700, exist_ok=True)
        self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise WitnessError(f"witness state {self.directory}: expected no other witness using it, "
                               "found it locked by another process") from None
        self._lock = threading.Lock()

    def close(self) -> None:
        os.close(self._lock_fd)

    def path_of(self, origin: str) -> Path:
        return self.directory / "logs" / (quote(origin, safe="") + ".checkpoint")

    def latest(self, origin: str) -> CheckpointBody | None:
        path = self.path_of(origin)
        if not path.exists():
            return None
        try:
            return SignedNote.parse(path.read_text(encoding="utf-8")).checkpoint()
        except (NoteError, OSError, UnicodeDecodeError) as exc:
            # Never fall back to "no state": that would accept any branch. Refuse to serve it.
            raise WitnessError(f"witness state {path}: expected the last cosigned checkpoint, found "
                               f"an unreadable file ({exc})") from None

    def _log_for(self, origin: str) -> Verifier | None:
        for v in self.logs:
            if origin == v.name or (origin.startswith(v.name + "/") and _TREE.match(origin[len(v.name) + 1:])):
                return v
        return None

    def add_checkpoint(self, body: bytes, now: int | None = None) -> Answer:
        """One ``add-checkpoint`` request, checked in the order of the module docstring."""
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return _refuse(400, "request body: expected UTF-8 text, found undecodable bytes")
        head, sep, note_text = text.partition("\n\n")
        if not sep:
            return _refuse(400, "request body: expected 'old <size>', proof lines, a blank line and a checkpoint; "
                                "found no blank line")
        lines = head.split("\n")
        match = re.fullmatch(r"old (0|[1-9][0-9]{0,19})", lines[0])
        if match is None:
            return _refuse(400, "first line: expected 'old <size>' (decimal, no leading zeros), "
                                f"found {lines[0][:60]!r}")
        old = int(match.group(1))
        if len(lines) - 1 > MAX_PROOF_LINES:
            return _refuse(400, f"consistency proof: expected at most {MAX_PROOF_LINES} lines, found {len(lines) - 1}")
        proof: list[bytes] = []
        for n, line in enumerate(lines[1:], start=1):
            try:
                digest = base64.b64decode(line, validate=True)
            except binascii.Error:
                digest = b""
            if len(digest) != 32:
                return _refuse(400, f"consistency proof line {n}: expected a base64 SHA-256 hash, found {line[:60]!r}")
            proof.append(digest)
        try:
            note = SignedNote.parse(note_text)
            checkpoint = note.checkpoint()
        except NoteError as exc:
            return _refuse(400, f"checkpoint: {exc}")
        log_key = self._log_for(checkpoint.origin)
        if log_key is None:
            return _refuse(404, f"origin: expected a log this witness is configured for, found {checkpoint.origin!r}")
        if not note.signed_by(log_key):
            return _refuse(403, f"checkpoint of {checkpoint.origin}: expected a valid signature by {log_key.name}+"
                                f"{log_key.id.hex()}, found none")
        if old > checkpoint.size:
            return _refuse(400, f"old size: expected at most the checkpoint size {checkpoint.size}, found {old}")
        with self._lock:
            stored = self.latest(checkpoint.origin)
            stored_size = 0 if stored is None else stored.size
            if old != stored_size:
                return Answer(409, f"{stored_size}\n", SIZE_CONTENT_TYPE)
            if stored is not None and old == checkpoint.size and stored.root != checkpoint.root:
                self._keep_evidence(checkpoint.origin, text)
                return _refuse(409, f"checkpoint of {checkpoint.origin} at size {old}: expected root "
                                    f"{base64.b64encode(stored.root).decode()} (cosigned), found "
                                    f"{base64.b64encode(checkpoint.root).decode()}: the log rewrote its history")
            stored_root = b"" if stored is None else stored.root
            if not verify_consistency(old, checkpoint.size, stored_root, checkpoint.root, proof):
                self._keep_evidence(checkpoint.origin, text)
                return _refuse(422, f"consistency proof from size {old} to {checkpoint.size} of {checkpoint.origin}: "
                                    "expected a proof that the new tree extends the cosigned one, found one that "
                                    "does not verify (history rewritten, or a wrong proof)")
            timestamp = int(time.time()) if now is None else now
            cosignature = self.signer.cosign(note.body, timestamp)
            if stored is None or checkpoint.size > stored.size:
                atomic_write(self.path_of(checkpoint.origin), note.with_signature(cosignature).text())
        log.info("cosigned %s at size %d", checkpoint.origin, checkpoint.size)
        return Answer(200, cosignature.line())

    def _keep_evidence(self, origin: str, request_text: str) -> None:
        folder = self.directory / "evidence"
        try:
            if sum(1 for _ in folder.iterdir()) >= self.max_evidence:
                log.warning("refused a signed checkpoint of %s (evidence folder full, not kept)", origin)
                return
            name = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{time.time_ns() % 10**9:09d}.txt"
            atomic_write(folder / name, request_text)
        except OSError as exc:
            log.error("could not keep evidence of a refused checkpoint of %s: %s", origin, exc.strerror)
            return
        log.warning("refused a checkpoint of %s signed by the log itself: kept as evidence in %s",
                    origin, folder / name)

