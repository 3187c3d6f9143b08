"""Publication of signed checkpoints off the box: one C2SP note file per (tree, size) in a directory.

Layout (``directory`` is what an admin points ``audit.publish_dir`` at: removable media, a share a
SIEM reads, another appliance's inbox)::

    <directory>/<tree>/<size>.checkpoint   the signed note, exactly as signed (plus cosignatures)
    <directory>/<tree>/latest              a copy of the newest note of that tree

The directory itself must exist (it is never created: an unmounted medium's empty mount point
would otherwise quietly fill the local disk); tree folders are created in it. Every file is
written atomically (temp file, fsync, rename, fsync of the directory). A file is
never replaced by a note with a different checkpoint body: two different roots for one size of
one tree is a split view, the very thing publication exists to expose, so it is refused
(``SplitViewError``) and logged at CRITICAL. A note with the same body may only *add* signature
lines (a witness cosignature); ``latest`` never moves to a smaller tree.

``CheckpointPublisher`` is the ``AuditLog(on_checkpoints=...)`` hook: it only queues (the audit
writer never waits for a disk it does not own) and its own thread writes. While the directory is
unwritable or full it logs once a minute, keeps only the newest pending note per tree (memory
stays bounded by the number of trees) and retries.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from appliance.audit.checkpoint import Checkpoint
from appliance.audit.errors import AuditError
from appliance.audit.note import NoteError, SignedNote

log = logging.getLogger("appliance.audit.publish")

_TREE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}$")
LATEST = "latest"
SUFFIX = ".checkpoint"


class SplitViewError(AuditError):
    """A different checkpoint body for a (tree, size) that is already published."""


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new one, never half."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def merge_notes(existing: str, new: str, where: str) -> str:
    """The note to keep when ``new`` arrives for a file holding ``existing``: the same checkpoint
    with the union of their signature lines; ``SplitViewError`` when the bodies differ."""
    old_note, new_note = SignedNote.parse(existing), SignedNote.parse(new)
    if old_note.body != new_note.body:
        raise SplitViewError(f"{where}: expected the published checkpoint body "
                             f"{old_note.body.splitlines()[1:3]}, found a different one "
                             f"{new_note.body.splitlines()[1:3]} for the same size (split view); not replaced")
    merged = old_note
    for sig in new_note.signatures:  # a signer already on the file keeps its line
        if not any((s.name, s.key_id) == (sig.name, sig.key_id) for s in merged.signatures):
            merged = merged.with_signature(sig)
    return merged.text()


def write_checkpoint(directory: Path, tree: str, note_text: str) -> bool:
    """Publish one signed note of ``tree`` under ``directory``; True when a file changed."""
    if not _TREE.match(tree):
        raise ValueError(f"tree name: expected [A-Za-z0-9_][A-Za-z0-9_.:-]{{0,127}}, found {tree!r}")
    try:
        size = SignedNote.parse(note_text).checkpoint().size
    except NoteError as exc:
        raise ValueError(f"checkpoint of tree {tree!r}: {exc}") from None
    if not directory.is_dir():
        # Never created here: an unmounted medium's mount point would silently fill the local disk.
        raise FileNotFoundError(errno.ENOENT, "publish directory missing (not mounted?)", str(directory))
    tree_dir = directory / tree
    tree_dir.mkdir(exist_ok=True)
    path = tree_dir / f"{size}{SUFFIX}"
    text = note_text
    if path.exists():
        existing = path.read_text(encoding="utf-8")
        text = merge_notes(existing, note_text, str(path))
        if text == existing:
            _update_latest(tree_dir, size, text)
            return False
    atomic_write(path, text)
    _update_latest(tree_dir, size, text)
    return True


def _update_latest(tree_dir: Path, size: int, text: str) -> None:
    latest = tree_dir / LATEST
    if latest.exists():
        try:
            current = SignedNote.parse(latest.read_text(encoding="utf-8"))
            current_size = current.checkpoint().size
        except (NoteError, UnicodeDecodeError):
            current_size = -1  # unreadable: replace it with a good note
        if current_size > size or (current_size == size and current.text() == text):
            return
    atomic_write(latest, text)


class CheckpointPublisher:
    """Queue checkpoints (``__call__``, never blocking) and write them on a thread of its own.

    ``max_pending``: notes queued before the queue collapses to the newest per tree.
    ``retry_s``: pause after a failed write. ``on_error``: called once per failed attempt
    (a metrics counter). ``errors`` and ``split_views`` count what went wrong.
    """

    def __init__(self, directory: Path, *, max_pending: int = 1024, retry_s: float = 5.0,
                 on_error: Callable[[], None] | None = None) -> None:
        if max_pending < 1 or retry_s <= 0:
            raise ValueError(f"max_pending >= 1 and retry_s > 0 expected, found {max_pending}, {retry_s}")
        self.directory = Path(directory)
        self.max_pending = max_pending
        self.retry_s = retry_s
        self.on_error = on_error
        self.errors = 0
        self.split_views = 0
        self.published = 0
        self._pending: list[tuple[str, str]] = []  # (tree, note text), oldest first
        self._cond = threading.Condition()
        self._busy = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._last_logged = float("-inf")

    def __call__(self, checkpoints: Iterable[Checkpoint]) -> None:
        self.submit((cp.tree, cp.note) for cp in checkpoints)

    def publish_cosigned(self, tree: str, note_text: str) -> None:
        """Queue a note carrying witness cosignatures (merged into the published file)."""
        self.submit([(tree, note_text)])

    def submit(self, notes: Iterable[tuple[str, str]]) -> None:
        with self._cond:
            if self._stopping:
                return
            self._pending.extend(notes)
            if len(self._pending) > self.max_pending:
                self._collapse()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="audit-publisher", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def start(self) -> None:
        self.submit([])

    @property
    def pending(self) -> int:
        """Notes queued and not yet written."""
        with self._cond:
            return len(self._pending)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything queued is written (or failed for good); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def stop(self, timeout_s: float = 10.0) -> None:
        """Write what is queued (up to ``timeout_s``), then end the thread."""
        self.flush(timeout_s)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)

    def _collapse(self) -> None:
        newest: dict[str, tuple[int, str]] = {}
        for tree, text in self._pending:
            try:
                size = SignedNote.parse(text).checkpoint().size
            except NoteError:
                continue
            if tree not in newest or size >= newest[tree][0]:
                newest[tree] = (size, text)
        self._pending = [(tree, text) for tree, (_, text) in newest.items()]

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending:
                    return
                batch, self._pending = self._pending, []
                self._busy = True
            failed = self._write(batch)
            with self._cond:
                self._busy = False
                if failed:
                    self._pending = failed + self._pending
                    self._collapse()
                self._cond.notify_all()
                if failed and not self._stopping:
                    self._cond.wait(self.retry_s)
                elif failed:
                    return  # stopping: give up on a directory that still fails

    def _write(self, batch: list[tuple[str, str]]) -> list[tuple[str, str]]:
        for i, (tree, text) in enumerate(batch):
            try:
                write_checkpoint(self.directory, tree, text)
                self.published += 1
            except SplitViewError as exc:
                self.split_views += 1
                log.critical("audit checkpoint publication refused: %s", exc)
            except ValueError as exc:
                log.error("audit checkpoint not published: %s", exc)
            except OSError as exc:
                self.errors += 1
                if self.on_error is not None:
                    self.on_error()
                now = time.monotonic()
                if now - self._last_logged >= 60.0:
                    self._last_logged = now
                    log.error("audit checkpoints cannot be published to %s: %s (keeping the newest per tree, "
                              "retrying every %.0f s; this message repeats at most once a minute)",
                              self.directory, exc.strerror or type(exc).__name__, self.retry_s)
                return batch[i:]
        return []
