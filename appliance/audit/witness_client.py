"""The appliance's side of c2sp.org/tlog-witness: submit checkpoints, keep verified cosignatures.

``WitnessClient`` speaks the protocol to one witness (HTTP on loopback, HTTPS with an optional
client certificate on a LAN; nothing else is ever contacted) and returns only cosignature lines
that verify with the witness key it was configured with. ``WitnessSubmitter`` is the thread that
feeds it: it takes the newest checkpoint of each witnessed tree, at most every ``interval_s``,
builds the consistency proof from the size the witness last cosigned (learnt from a 409 when
unknown), and stores each verified cosignature in ``audit_cosignatures`` (and, if a publisher is
given, publishes the cosigned note).
"""

from __future__ import annotations

import base64
import http.client
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import quote, urlsplit

from sqlalchemy import Engine, func, insert, select

from appliance.audit.canonical import utc_now_ts
from appliance.audit.checkpoint import GLOBAL_TREE, Checkpoint
from appliance.audit.checkpointing import latest_checkpoint
from appliance.audit.errors import AuditError
from appliance.audit.merkle import consistency_proof
from appliance.audit.note import SIG_COSIGNATURE, NoteError, SignedNote, Verifier
from appliance.audit.schema import WRITE_OPTION, audit_cosignatures
from appliance.audit.treestore import DbNodes
from appliance.audit.witness import parse_vkey

log = logging.getLogger("appliance.audit.witness")


class WitnessRefused(AuditError):
    """The witness answered with an error status (``status``); the message carries its text."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


class WitnessConflict(WitnessRefused):
    """409: the witness's last cosigned size is ``size`` (``None`` for a root mismatch)."""

    def __init__(self, size: int | None, message: str) -> None:
        self.size = size
        super().__init__(409, message)


class WitnessClient:
    def __init__(self, url: str, witness_vkey: str, *, ca: Path | None = None, client_cert: Path | None = None,
                 client_key: Path | None = None, timeout_s: float = 10.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"witness url: expected http(s)://host:port[/prefix], found {url!r}")
        if (client_cert is None) != (client_key is None):
            raise ValueError("witness client certificate: expected both the certificate and its key, found one")
        if timeout_s <= 0:
            raise ValueError(f"witness timeout: expected > 0 seconds, found {timeout_s}")
        try:
            self.verifier = parse_vkey(witness_vkey)
        except NoteError as exc:
            raise ValueError(f"witness key: {exc}") from None
        if self.verifier.sig_type != SIG_COSIGNATURE:
            raise ValueError(f"witness key {self.verifier.name}: expected a cosignature key (type 0x04), "
                             f"found type 0x{self.verifier.sig_type:02x}")
        self.url = url
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self.timeout_s = timeout_s
        self._tls: ssl.SSLContext | None = None
        if self._https:
            self._tls = ssl.create_default_context(cafile=None if ca is None else str(ca))
            if client_cert is not None and client_key is not None:
                self._tls.load_cert_chain(client_cert, client_key)

    @property
    def name(self) -> str:
        return self.verifier.name

    def add_checkpoint(self, note_text: str, old_size: int, proof: Iterable[bytes]) -> SignedNote:
        """Submit; the note with the witness's verified cosignature added, or ``WitnessRefused``."""
        body = f"old {old_size}\n" + "".join(base64.b64encode(h).decode() + "\n" for h in proof) + "\n" + note_text
        status, content_type, text = self._post(body.encode())
        if status == 409:
            size_text = text.strip()
            if content_type.startswith("text/x.tlog.size") and size_text.isdigit():
                raise WitnessConflict(int(size_text), f"witness {self.name} last cosigned size {size_text}, "
                                                      f"the submission assumed {old_size}")
            raise WitnessConflict(None, f"witness {self.name} refused: {text.strip()[:300]}")
        if status != 200:
            raise WitnessRefused(status, f"witness {self.name} answered {status}: {text.strip()[:300]}")
        try:
            cosigned = SignedNote.parse(note_text + text)
        except NoteError as exc:
            raise WitnessRefused(status, f"witness {self.name}: expected cosignature lines, found {exc}") from None
        if not cosigned.signed_by(self.verifier):
            raise WitnessRefused(status, f"witness {self.name}: expected a valid cosignature by "
                                         f"{self.verifier.text()}, found none")
        return cosigned

    def fetch_checkpoint(self, origin: str) -> SignedNote | None:
        """The newest checkpoint the witness cosigned for ``origin`` (``None`` if it holds none),
        returned only when its cosignature verifies with this client's witness key."""
        status, _, text = self._request("GET", self._prefix + "/checkpoint/" + quote(origin, safe=""), None)
        if status == 404:
            return None
        if status != 200:
            raise WitnessRefused(status, f"witness {self.name} answered {status}: {text.strip()[:300]}")
        try:
            note = SignedNote.parse(text)
        except NoteError as exc:
            raise WitnessRefused(status, f"witness {self.name}: expected a cosigned checkpoint, found {exc}") from None
        if not note.signed_by(self.verifier):
            raise WitnessRefused(status, f"witness {self.name}: expected its valid cosignature on the checkpoint "
                                         f"of {origin}, found none")
        return note

    def _post(self, body: bytes) -> tuple[int, str, str]:
        return self._request("POST", self._prefix + "/add-checkpoint", body)

    def _request(self, method: str, path: str, body: bytes | None) -> tuple[int, str, str]:
        conn: http.client.HTTPConnection
        if self._https:
            conn = http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout_s, context=self._tls)
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout_s)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "text/plain; charset=utf-8"})
            response = conn.getresponse()
            data = response.read(64 * 1024)
            return response.status, response.getheader("Content-Type") or "", data.decode("utf-8", "replace")
        except (OSError, http.client.HTTPException) as exc:
            raise WitnessRefused(0, f"witness {self.name} at {self.url} unreachable: {exc}") from None
        finally:
            conn.close()


def cosignature_line(note: SignedNote, verifier: Verifier) -> str:
    for sig in note.signatures:
        if sig.name == verifier.name and sig.key_id == verifier.id:
            return sig.line().rstrip("\n")
    raise ValueError(f"no signature line of {verifier.name} in the note")


class WitnessSubmitter:
    """A thread that gets the newest checkpoint of each witnessed tree cosigned (see module doc).

    ``trees``: the trees to witness (``None``: every tree a checkpoint arrives for).
    ``on_cosigned(tree, note_text)``: called with each cosigned note (publication).
    """

    def __init__(self, engine: Engine, client: WitnessClient, *, interval_s: float = 10.0,
                 trees: Iterable[str] | None = (GLOBAL_TREE,),
                 on_cosigned: Callable[[str, str], None] | None = None) -> None:
        if interval_s <= 0:
            raise ValueError(f"witness interval: expected > 0 seconds, found {interval_s}")
        self.engine = engine
        self.client = client
        self.interval_s = interval_s
        self.trees = None if trees is None else set(trees)
        self.on_cosigned = on_cosigned
        self.cosigned = 0
        self.failures = 0
        self._witness_size: dict[str, int] = {}
        self._pending: dict[str, Checkpoint] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._last_logged = float("-inf")

    def notify(self, checkpoints: Iterable[Checkpoint]) -> None:
        """Queue the newest checkpoint per tree (never blocks: called on the audit writer thread)."""
        with self._cond:
            for cp in checkpoints:
                if self.trees is not None and cp.tree not in self.trees:
                    continue
                held = self._pending.get(cp.tree)
                if held is None or cp.size >= held.size:
                    self._pending[cp.tree] = cp
            self._cond.notify_all()

    def start(self) -> None:
        """Start the thread, first queueing the newest stored checkpoint of each witnessed tree."""
        with self.engine.connect() as conn, conn.begin():
            for tree in self.trees or (GLOBAL_TREE,):
                newest = latest_checkpoint(conn, tree)
                if newest is not None:
                    self.notify([newest])
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="audit-witness", daemon=True)
                self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """One last submission of what is pending (within ``timeout_s``), then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)

    def _run(self) -> None:
        next_at = 0.0  # at most one round per interval; stop() wakes it for a last round
        while True:
            with self._cond:
                while not self._stopping and not (self._pending and time.monotonic() >= next_at):
                    self._cond.wait(max(0.0, next_at - time.monotonic()) if self._pending else None)
                work, self._pending = self._pending, {}
                stopping = self._stopping
            for cp in work.values():
                if self._attempt(cp) and not stopping:
                    self._requeue(cp)
            next_at = time.monotonic() + self.interval_s
            if stopping:
                return

    def _requeue(self, cp: Checkpoint) -> None:
        with self._cond:
            held = self._pending.get(cp.tree)
            if held is None or held.size < cp.size:
                self._pending[cp.tree] = cp

    def _attempt(self, cp: Checkpoint) -> bool:
        """Submit ``cp``, logging any failure; True when it is worth retrying later."""
        try:
            self.submit_now(cp)
        except (AuditError, ValueError) as exc:
            self.failures += 1
            if isinstance(exc, WitnessRefused) and exc.status in (409, 422):
                # The witness holds a tree this one does not extend: never retried (a newer
                # checkpoint is submitted when it comes, and refused again if history was rewritten).
                log.critical("audit checkpoint %s at size %d not cosigned: %s", cp.tree, cp.size, exc)
                return False
            now = time.monotonic()
            if now - self._last_logged >= 60.0:
                self._last_logged = now
                log.error("audit checkpoint %s at size %d not cosigned: %s (repeats at most once a minute)",
                          cp.tree, cp.size, exc)
            return True
        return False

    def submit_now(self, cp: Checkpoint) -> SignedNote:
        """Submit ``cp`` on this thread and store the cosignature; the cosigned note, or raises
        ``WitnessRefused`` (``WitnessConflict`` when the witness holds another tree)."""
        cosigned = self._submit(cp)
        self.cosigned += 1
        if self.on_cosigned is not None:
            self.on_cosigned(cp.tree, cosigned.text())
        return cosigned

    def _submit(self, cp: Checkpoint) -> SignedNote:
        old = self._witness_size.get(cp.tree)
        if old is None:
            old = self._stored_size(cp.tree)
        for attempt in range(2):
            if old > cp.size:
                raise WitnessRefused(409, f"witness {self.client.name} has cosigned {old} records of tree "
                                          f"{cp.tree}, the newest checkpoint here has {cp.size}: this log was cut "
                                          "or replaced since the witness saw it")
            with self.engine.connect() as conn, conn.begin():
                proof = consistency_proof(DbNodes(conn, cp.tree), old, cp.size) if old else []
            try:
                cosigned = self.client.add_checkpoint(cp.note, old, proof)
            except WitnessConflict as exc:
                if attempt or exc.size is None:
                    raise
                old = exc.size
                continue
            break
        self._witness_size[cp.tree] = cp.size
        line = cosignature_line(cosigned, self.client.verifier)
        with self.engine.connect() as conn:
            conn.execution_options(**{WRITE_OPTION: True})
            with conn.begin():
                conn.execute(insert(audit_cosignatures).values(
                    tree=cp.tree, size=cp.size, root=cp.root, witness=self.client.name, line=line, ts=utc_now_ts()))
        return cosigned

    def _stored_size(self, tree: str) -> int:
        c = audit_cosignatures.c
        with self.engine.connect() as conn, conn.begin():
            found = conn.execute(select(func.max(c.size)).where(c.tree == tree, c.witness == self.client.name)).scalar()
        return 0 if found is None else int(found)
