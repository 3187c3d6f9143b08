"""Group commit: one writer thread turns concurrent appends into one transaction and one fsync.

Callers hand a validated event to ``submit`` and wait on the returned future (a thread with
``future.result()``, the event loop with ``asyncio.wrap_future``): nobody waits for a
transaction of their own, and the event loop never blocks on storage. The writer takes every
event queued meanwhile (up to ``max_batch``), and in ONE write transaction assigns each its
stream seq, chain link, ``_all`` position and tree nodes, inserts them all, and commits; only
then are the futures resolved -- so an append that returned is durable (SQLite: WAL with
``synchronous=FULL``; PostgreSQL: a committed transaction), and a failed batch resolves every
future with ``AuditError`` and records nothing.

Checkpoints are signed by the same thread, so they never race appends: every
``interval_s`` while any tree has grown, when a tree grows past a multiple of ``every``, and on
request (``checkpoint()``, startup, shutdown).

State (each tree's head and right edge) is cached between batches. Another process writing the
same log (the CLI, a second gateway) is noticed at the next batch by the size of ``_all``; its
records are then adopted after their hashes and chain links are checked, so nothing is ever
signed over a record that does not verify. On PostgreSQL the transaction first takes an
advisory lock, so writers on several hosts take turns instead of colliding.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Connection, Engine, func, insert, select, text
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from appliance.audit.canonical import genesis_hash, sha256_hex, utc_now_ts
from appliance.audit.checkpoint import GLOBAL_TREE, Checkpoint, sign_checkpoint
from appliance.audit.checkpointing import latest_checkpoint
from appliance.audit.errors import AuditError, AuditIntegrityError
from appliance.audit.export_format import record_line_parts
from appliance.audit.keys import AuditKeys
from appliance.audit.merkle import Frontier, record_leaf
from appliance.audit.record import AuditRecord
from appliance.audit.schema import (
    WRITE_OPTION,
    audit_events,
    audit_tree_checkpoints,
    audit_tree_nodes,
)
from appliance.audit.treestore import load_frontier

log = logging.getLogger("appliance.audit")

_EVENT_COLUMNS = ("stream", "seq", "ts", "event_type", "actor", "tenant", "request_id", "data", "prev_hash", "hash",
                  "gidx")
_NODE_COLUMNS = ("tree", "level", "idx", "hash")
PG_LOCK_KEY = 0x50A7_A0D1  # pg_advisory_xact_lock key shared by every writer of one log


@dataclass
class Pending:
    stream: str
    fields: dict[str, Any]
    data_text: str
    future: Future[AuditRecord] = field(default_factory=Future)


@dataclass
class CheckpointRequest:
    """Sign now: ``stream`` (and ``_all``), or every tree that grew (``None``). ``explicit``
    requests (not the timer) first re-check what they sign and scan the whole database."""

    stream: str | None
    explicit: bool = True
    future: Future[list[Checkpoint]] = field(default_factory=Future)
    failure: AuditIntegrityError | None = None


@dataclass
class _Tree:
    size: int
    frontier: Frontier
    head_hash: str | None = None  # streams only
    head_ts: str = ""

    def copy(self) -> _Tree:
        return _Tree(self.size, self.frontier.copy(), self.head_hash, self.head_ts)


class GroupWriter:
    def __init__(
        self, engine: Engine, keys: AuditKeys, *, every: int | None, interval_s: float | None,
        max_batch: int = 512, max_retries: int = 5,
        on_checkpoints: Callable[[list[Checkpoint]], None] | None = None,
    ) -> None:
        self.engine = engine
        self.keys = keys
        self.every = every
        self.interval_s = interval_s
        self.max_batch = max_batch
        self.max_retries = max_retries
        self.on_checkpoints = on_checkpoints
        self._pg = engine.dialect.name == "postgresql"
        self._queue: queue.SimpleQueue[Pending | CheckpointRequest | None] = queue.SimpleQueue()
        self._trees: dict[str, _Tree] = {}
        self._global: _Tree | None = None
        self._signed: dict[str, int] = {}  # tree -> size of its newest checkpoint
        self._dirty: set[str] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._atexit = False
        self.batches = 0
        self.events = 0

    # -- the callers' side ----------------------------------------------------------------

    def submit(self, item: Pending | CheckpointRequest) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
                self._thread.start()
                if not self._atexit:  # a process that never calls close() still signs what it wrote
                    atexit.register(self.close)
                    self._atexit = True
            self._queue.put(item)

    def close(self) -> None:
        """Commit what is queued, sign what grew, stop the thread. A later append starts a new one
        (a runtime that is stopped and started again keeps its log)."""
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is not None:
                self._queue.put(None)
        if thread is not None:
            thread.join()

    # -- the writer thread --------------------------------------------------------------------

    def _run(self) -> None:
        next_due = time.monotonic() + (self.interval_s or 0)
        stopping = False
        while not stopping:
            timeout = None
            if self.interval_s is not None and self._dirty:
                timeout = max(0.0, next_due - time.monotonic())
            try:
                first = self._queue.get(timeout=timeout)
            except queue.Empty:
                first = CheckpointRequest(None, explicit=False)  # the timer: sign what grew
            batch: list[Pending | CheckpointRequest | None] = [first]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stopping = any(item is None for item in batch)
            appends = [i for i in batch if isinstance(i, Pending)]
            requests = [i for i in batch if isinstance(i, CheckpointRequest)]
            if stopping and self.every is not None:
                requests.append(CheckpointRequest(None, explicit=False))  # a clean close leaves nothing unsigned
            self._process(appends, requests)
            if requests or (self.interval_s is not None and time.monotonic() >= next_due):
                next_due = time.monotonic() + (self.interval_s or 0)

    def _process(self, appends: list[Pending], requests: list[CheckpointRequest]) -> None:
        error: BaseException | None = None
        for _attempt in range(self.max_retries):
            try:
                records, signed = self._transaction(appends, requests)
            except IntegrityError as exc:  # another writer took a seq meanwhile: reload and retry
                self._forget()
                error = exc
                continue
            except AuditIntegrityError as exc:
                self._forget()
                error = exc
                break
            except SQLAlchemyError as exc:
                self._forget()
                reason = str(getattr(exc, "orig", None) or type(exc).__name__)[:200]
                error = AuditError(f"audit append failed, nothing recorded: {reason}")
                break
            except Exception as exc:  # never leave a caller waiting forever
                self._forget()
                log.exception("audit writer failed")
                error = AuditError(f"audit append failed, nothing recorded: {type(exc).__name__}")
                break
            self.batches += 1
            self.events += len(records)
            for item, record in zip(appends, records, strict=True):
                item.future.set_result(record)
            for req in requests:
                if req.failure is not None:
                    req.future.set_exception(req.failure)
                else:
                    req.future.set_result([cp for cp in signed if req.stream in (None, cp.tree)])
            if signed and self.on_checkpoints is not None:
                try:
                    self.on_checkpoints(signed)
                except Exception:  # publishing is best effort here; verification shows gaps
                    log.exception("publishing audit checkpoints failed")
            return
        if isinstance(error, IntegrityError):
            error = AuditError(f"audit append failed after {self.max_retries} conflicting writers")
        assert error is not None
        for item in appends:
            item.future.set_exception(error if isinstance(error, AuditError) else AuditError(str(error)))
        for req in requests:
            req.future.set_exception(error if isinstance(error, AuditError) else AuditError(str(error)))

    def _forget(self) -> None:
        self._trees.clear()
        self._global = None

    def _transaction(
        self, appends: list[Pending], requests: list[CheckpointRequest],
    ) -> tuple[list[AuditRecord], list[Checkpoint]]:
        with self.engine.connect() as conn:
            conn.execution_options(**{WRITE_OPTION: True})
            with conn.begin():
                if self._pg:
                    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_LOCK_KEY})
                glob = self._sync(conn)
                work: dict[str, _Tree] = {}
                events: list[tuple[Any, ...]] = []
                nodes: list[tuple[Any, ...]] = []
                records: list[AuditRecord] = []
                for item in appends:
                    tree = work.get(item.stream)
                    if tree is None:
                        tree = work[item.stream] = self._stream(conn, item.stream).copy()
                    record = self._next(tree, item)
                    leaf = record_leaf(record.hash)
                    nodes.extend((item.stream, lv, ix, h) for lv, ix, h in tree.frontier.append(leaf)[1:])
                    gidx = glob.size
                    nodes.extend((GLOBAL_TREE, lv, ix, h) for lv, ix, h in glob.frontier.append(leaf)[1:])
                    glob.size += 1
                    tree.size = record.seq
                    f = item.fields
                    events.append((record.stream, record.seq, record.ts, f["event_type"], f["actor"], f["tenant"],
                                   f["request_id"], item.data_text, record.prev_hash, record.hash, gidx))
                    records.append(record)
                if events:
                    self._insert(conn, audit_events, _EVENT_COLUMNS, events)
                if nodes:
                    self._insert(conn, audit_tree_nodes, _NODE_COLUMNS, nodes)
                dirty = self._dirty | set(work) | ({GLOBAL_TREE} if events else set())
                trees = {**self._trees, **work, GLOBAL_TREE: glob}
                signed: list[Checkpoint] = []
                failures: list[AuditIntegrityError] = []
                if requests or self._count_due(work, glob):
                    wanted = set(dirty)
                    for req in requests:
                        if req.stream is None and req.explicit:
                            wanted |= self._unsigned_trees(conn)
                        elif req.stream is not None:
                            wanted |= {req.stream, GLOBAL_TREE}
                    explicit = any(req.explicit for req in requests)
                    for name in sorted(wanted):
                        state = trees.get(name) or self._stream(conn, name)
                        trees[name] = state
                        if state.size == 0 or self._signed.get(name) == state.size:
                            continue
                        if explicit:
                            failure = self._recheck(conn, name, state)
                            if failure is not None:
                                failures.append(failure)
                                continue
                        cp = sign_checkpoint(self.keys, tree=name, size=state.size, root=state.frontier.root(),
                                             ts=utc_now_ts())
                        conn.execute(insert(audit_tree_checkpoints).values(**cp.to_dict()))
                        signed.append(cp)
            # committed: the working copies become the state
            self._trees.update(work)
            self._global = glob
            for cp in signed:
                self._signed[cp.tree] = cp.size
            self._dirty = {t for t in dirty if t not in trees or self._signed.get(t) != trees[t].size}
            if failures:
                for req in requests:
                    if req.explicit:
                        req.failure = failures[0]
            return records, signed

    def _recheck(self, conn: Connection, name: str, state: _Tree) -> AuditIntegrityError | None:
        """Before an explicit checkpoint: the records since the tree's newest checkpoint must
        still hash to what the writer holds (and that checkpoint to its stored subtrees)."""
        row = latest_checkpoint(conn, name)
        if row is not None:
            problem = row.signature_problem(self.keys.public_key)
            if problem is not None:
                expected, _, found = problem.partition(", found ")
                return AuditIntegrityError(row.size, name, expected, found, check="checkpoint signature")
        start = 0 if row is None else int(row.size)
        try:
            frontier = load_frontier(conn, name, start)
        except AuditIntegrityError as exc:
            return exc
        if row is not None and frontier.root().hex() != row.root:
            return AuditIntegrityError(start, name, f"root {row.root} (signed checkpoint)",
                                       f"root {frontier.root().hex()} from the stored tree", check="checkpoint")
        ev = audit_events.c
        if name == GLOBAL_TREE:
            stmt = select(audit_events).where(ev.gidx >= start).order_by(ev.gidx)
        else:
            stmt = select(audit_events).where(ev.stream == name, ev.seq > start).order_by(ev.seq)
        prev: str | None = None
        for db_row in conn.execute(stmt).yield_per(1000):
            record = AuditRecord.from_row(db_row)
            if db_row.pruned_at is None and record.compute_hash() != record.hash:
                return AuditIntegrityError(record.seq, record.stream, f"hash {record.compute_hash()}",
                                           f"hash {record.hash}", check="hash")
            if name != GLOBAL_TREE and prev is not None and record.prev_hash != prev:
                return AuditIntegrityError(record.seq, name, f"prev_hash {prev}", f"prev_hash {record.prev_hash}",
                                           check="prev_hash")
            prev = record.hash
            frontier.append(record_leaf(record.hash))
        if frontier.size != state.size or frontier.root() != state.frontier.root():
            held = state.frontier.root().hex()[:16]
            return AuditIntegrityError(None, name, f"{state.size} records with root {held}...",
                                       f"{frontier.size} records with root {frontier.root().hex()[:16]}...",
                                       check="tree")
        return None

    def _insert(self, conn: Connection, table: Any, columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
        if self._pg:  # one multi-row INSERT per batch (SQLAlchemy's insertmanyvalues) beats psycopg's executemany
            conn.execute(insert(table), [dict(zip(columns, row, strict=True)) for row in rows])
        else:  # SQLite: the driver's executemany; SQLAlchemy's per-row machinery was a third of the writer's time
            marks = ", ".join("?" * len(columns))
            conn.exec_driver_sql(f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({marks})", rows)

    def _count_due(self, work: dict[str, _Tree], glob: _Tree) -> bool:
        if self.every is None:
            return False
        for name, tree in [*work.items(), (GLOBAL_TREE, glob)]:
            if tree.size // self.every > self._signed.get(name, 0) // self.every:
                return True
        return False

    def _unsigned_trees(self, conn: Connection) -> set[str]:
        ev, cp = audit_events.c, audit_tree_checkpoints.c
        heads = dict(conn.execute(select(ev.stream, func.max(ev.seq)).group_by(ev.stream)).all())
        signed = dict(conn.execute(select(cp.tree, func.max(cp.size)).group_by(cp.tree)).all())
        for name, size in signed.items():
            self._signed[name] = max(int(size), self._signed.get(name, 0))
        out = {name for name, size in heads.items() if signed.get(name) != size}
        top = conn.execute(select(func.max(ev.gidx))).scalar()
        if top is not None and signed.get(GLOBAL_TREE) != int(top) + 1:
            out.add(GLOBAL_TREE)
        return out

    # -- state ------------------------------------------------------------------------------------

    def _sync(self, conn: Connection) -> _Tree:
        """The ``_all`` tree as the database holds it now, adopting other writers' records."""
        ev = audit_events.c
        top = conn.execute(select(func.max(ev.gidx))).scalar()
        size = 0 if top is None else int(top) + 1
        if self._global is None:
            self._global = _Tree(size, load_frontier(conn, GLOBAL_TREE, size))
            self._adopt_unindexed(conn)
            return self._global.copy()
        if size != self._global.size:
            self._adopt(conn, self._global.size, size)
        return self._global.copy()

    def _adopt(self, conn: Connection, start: int, end: int) -> None:
        """Check and take in the records other writers appended at ``_all`` positions [start, end)."""
        assert self._global is not None
        ev = audit_events.c
        rows = conn.execute(select(audit_events).where(ev.gidx >= start).order_by(ev.gidx))
        expected = start
        for row in rows.yield_per(1000):
            if row.gidx != expected:
                raise AuditIntegrityError(None, GLOBAL_TREE, f"record at position {expected}",
                                          f"position {row.gidx}", check="tree")
            record = AuditRecord.from_row(row)
            self._check_foreign(conn, record, pruned=row.pruned_at is not None)
            self._global.frontier.append(record_leaf(record.hash))
            self._global.size += 1
            expected += 1
        if self._global.size != end:
            raise AuditIntegrityError(None, GLOBAL_TREE, f"{end} records", f"{self._global.size}", check="tree")
        self._dirty.add(GLOBAL_TREE)

    def _check_foreign(self, conn: Connection, record: AuditRecord, *, pruned: bool) -> None:
        if not pruned and record.compute_hash() != record.hash:
            raise AuditIntegrityError(record.seq, record.stream, f"hash {record.compute_hash()}",
                                      f"hash {record.hash} (record written by another process)", check="hash")
        tree = self._trees.get(record.stream)
        if tree is None:
            return  # loaded from the database, with this record, when first needed
        if record.seq != tree.size + 1 or record.prev_hash != tree.head_hash:
            raise AuditIntegrityError(record.seq, record.stream, f"seq {tree.size + 1} linked to {tree.head_hash}",
                                      f"seq {record.seq} linked to {record.prev_hash}", check="prev_hash")
        tree.frontier.append(record_leaf(record.hash))
        tree.size, tree.head_hash, tree.head_ts = record.seq, record.hash, record.ts
        self._dirty.add(record.stream)

    def _adopt_unindexed(self, conn: Connection) -> None:
        """Give records written before the trees existed (a version 1 log) their place in them."""
        assert self._global is not None
        ev = audit_events.c
        pending = conn.execute(select(func.count()).select_from(audit_events).where(ev.gidx.is_(None))).scalar()
        if not pending:
            return
        log.warning("audit log: adding %d records of a version 1 log to the Merkle trees", pending)
        by_stream: dict[str, _Tree] = {}
        nodes: list[dict[str, Any]] = []
        rows = conn.execute(select(audit_events).where(ev.gidx.is_(None)).order_by(ev.id)).all()
        for row in rows:
            record = AuditRecord.from_row(row)
            tree = by_stream.get(record.stream)
            if tree is None:
                if record.seq != 1:
                    raise AuditIntegrityError(record.seq, record.stream, "a version 1 stream starting at seq 1",
                                              f"seq {record.seq}", check="seq")
                tree = by_stream[record.stream] = _Tree(0, Frontier(), genesis_hash(record.stream))
            if record.seq != tree.size + 1 or record.prev_hash != tree.head_hash or (
                    record.compute_hash() != record.hash):
                raise AuditIntegrityError(record.seq, record.stream, "an intact version 1 chain",
                                          "a broken link or hash: run `appliance audit verify`", check="chain")
            leaf = record_leaf(record.hash)
            nodes.extend({"tree": record.stream, "level": lv, "idx": ix, "hash": h}
                         for lv, ix, h in tree.frontier.append(leaf)[1:])
            nodes.extend({"tree": GLOBAL_TREE, "level": lv, "idx": ix, "hash": h}
                         for lv, ix, h in self._global.frontier.append(leaf)[1:])
            conn.execute(audit_events.update().where(ev.id == row.id).values(gidx=self._global.size))
            self._global.size += 1
            tree.size, tree.head_hash = record.seq, record.hash
        if nodes:
            conn.execute(insert(audit_tree_nodes), nodes)
        self._dirty |= set(by_stream) | {GLOBAL_TREE}

    def _stream(self, conn: Connection, stream: str) -> _Tree:
        tree = self._trees.get(stream)
        if tree is not None:
            return tree
        ev = audit_events.c
        head = conn.execute(
            select(ev.seq, ev.hash, ev.ts).where(ev.stream == stream).order_by(ev.seq.desc()).limit(1)).first()
        if head is None:
            tree = _Tree(0, Frontier(), genesis_hash(stream), "")
        else:
            tree = _Tree(int(head.seq), load_frontier(conn, stream, int(head.seq)), head.hash, head.ts)
        self._trees[stream] = tree
        return tree

    @staticmethod
    def _next(tree: _Tree, item: Pending) -> AuditRecord:
        now = utc_now_ts()
        # Timestamps never go backwards in a stream (a clock step back is absorbed), so a time
        # range always selects a contiguous run of seqs.
        ts = now if now >= tree.head_ts else tree.head_ts
        f = item.fields
        seq = tree.size + 1
        # the hash over the canonical body, built around the data's canonical text (no second
        # serialisation of the data; export_format.record_line_parts is the same rule)
        prefix, suffix = record_line_parts(SimpleNamespace(
            actor=f["actor"], data=item.data_text, event_type=f["event_type"], prev_hash=tree.head_hash,
            request_id=f["request_id"], seq=seq, stream=item.stream, tenant=f["tenant"], ts=ts))
        record = AuditRecord(stream=item.stream, seq=seq, ts=ts, **f, prev_hash=tree.head_hash,  # type: ignore[arg-type]
                             hash=sha256_hex(prefix + suffix))
        tree.head_hash, tree.head_ts = record.hash, ts
        return record
