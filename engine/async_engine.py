"""Online, streaming engine: the engine loop runs in a background thread.

torch releases the GIL inside its kernels, so the loop thread and the asyncio event loop make
progress together. Requests go in through a thread-safe command queue; deltas come back to each
request's asyncio.Queue through `loop.call_soon_threadsafe`. Only the loop thread touches the
EngineCore after start(), apart from read-only validation (tokenizer, limits) in generate().
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from engine.config import EngineConfig
from engine.core.choices import SEPARATOR, check_request_id, choice_id, choice_params
from engine.core.engine_core import EngineCore
from engine.core.scheduling_policy import SchedulingPolicy
from engine.core.sequence import Sequence
from engine.errors import DuplicateRequestError, EngineDeadError, EngineError
from engine.outputs import StreamDelta
from engine.sampling_params import MAX_N, SamplingParams
from engine.tokenizer.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[StreamDelta | BaseException]

    def put(self, item: StreamDelta | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is closed
            pass


class AsyncEngine:
    def __init__(self, config: EngineConfig, scheduling: SchedulingPolicy | None = None) -> None:
        self.config = config
        self.scheduling = scheduling
        self._core: EngineCore | None = None
        self._commands: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._dead: BaseException | None = None
        self._active: set[str] = set()
        self._stats: dict[str, Any] = {}
        # loop thread only: choices 1..n-1 of a request, held until choice 0 (by its id) has its prompt computed
        self._later: dict[str, tuple[list[Sequence], _Sink]] = {}

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        if self._thread is not None:
            return
        self._core = await asyncio.to_thread(EngineCore, self.config, self.scheduling)
        self._stats = self._core.stats()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._commands.put(("wake", None))
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    @property
    def core(self) -> EngineCore:
        if self._core is None:
            raise EngineDeadError("AsyncEngine is not started: await engine.start() first")
        return self._core

    @property
    def tokenizer(self) -> Tokenizer:
        return self.core.tokenizer

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._dead is None and not self._stop.is_set()

    def stats(self) -> dict[str, Any]:
        return dict(self._stats)

    # ---- requests -----------------------------------------------------------------------
    async def generate(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        cache_salt: str | None = None,
        priority: int = 0,
        deadline: float | None = None,
        tenant: str | None = None,
        tpot_target_s: float | None = None,
    ) -> AsyncGenerator[StreamDelta, None]:
        """Stream deltas for one request. Raises a RequestError subclass for a bad request. A
        request unfinished at its deadline ends with finish_reason "deadline"; ``tenant`` is whose
        fair share its tokens count against (engine.core.fairness); while it decodes, steps batch no
        more tokens than fit in ``tpot_target_s`` seconds (an estimate from recent steps)."""
        if not self.is_running:
            raise EngineDeadError(f"engine is not serving: {self._dead or 'not started or shut down'}")
        check_request_id(request_id)
        if request_id in self._active:
            raise DuplicateRequestError(f"request id {request_id!r} is already in flight")
        # n > 1: one sequence per choice (engine/core/choices.py); choice 0 first, the rest once
        # its prompt is in the cache
        def make() -> list[Sequence]:
            return [self.core.make_sequence(
                choice_id(request_id, i), prompt, choice_params(params, i) if params.n > 1 else params,
                cache_salt=cache_salt, priority=priority, deadline=deadline, tenant=tenant,
                tpot_target_s=tpot_target_s,
            ) for i in range(params.n)]

        # a response format's grammar is compiled here (bounded, about a millisecond): off the event loop
        seqs = await asyncio.to_thread(make) if params.guided is not None else make()
        sink = _Sink(asyncio.get_running_loop(), asyncio.Queue())
        self._active.add(request_id)
        unfinished = set(range(params.n))
        try:
            self._commands.put(("add", (seqs, sink)))
            while True:
                item = await sink.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    unfinished.discard(item.index)
                yield item
                if not unfinished:
                    return
        finally:
            self._active.discard(request_id)
            if unfinished:  # consumer went away or errored: free every choice's blocks
                self._commands.put(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    # ---- the loop thread ----------------------------------------------------------------
    def _run(self) -> None:
        core = self.core
        sinks: dict[str, _Sink] = {}  # by sequence id (a choice's own id)
        try:
            while not self._stop.is_set():
                self._drain(core, sinks, block=not core.has_unfinished())
                if self._stop.is_set():
                    break
                stepped = core.step() if core.has_unfinished() else []
                # Stats first: a consumer woken by the last delta must already see this step's counts.
                self._stats = core.stats()
                for seq in stepped:
                    self._emit(core, sinks, seq)
            error: BaseException = EngineDeadError("engine shut down before the request finished")
        except Exception as exc:  # a crash fails every open request, loudly
            log.exception("engine loop crashed")
            self._dead = exc
            error = EngineDeadError(f"engine loop crashed: {exc!r}")
        for rid, sink in sinks.items():
            core.abort(rid)
            sink.put(error)
        self._later.clear()

    def _drain(self, core: EngineCore, sinks: dict[str, _Sink], block: bool) -> None:
        try:
            cmd, arg = self._commands.get(timeout=0.05) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            if cmd == "add":
                seqs, sink = arg
                try:
                    core.add_sequence(seqs[0])
                    sinks[seqs[0].request_id] = sink
                    if len(seqs) > 1:
                        self._later[seqs[0].request_id] = (seqs[1:], sink)
                except EngineError as exc:
                    sink.put(exc)
            elif cmd == "abort":
                self._later.pop(arg, None)  # choices not admitted yet: never will be
                for i in range(MAX_N):  # every choice still running
                    seq = core.abort(choice_id(arg, i))
                    if seq is not None:
                        self._emit(core, sinks, seq)
            try:
                cmd, arg = self._commands.get_nowait()
            except queue.Empty:
                return

    def _emit(self, core: EngineCore, sinks: dict[str, _Sink], seq: Sequence) -> None:
        sink = sinks.get(seq.request_id)
        if sink is None:
            return
        delta = core.delta(seq)
        if SEPARATOR in seq.request_id:  # a choice of an n > 1 request: its own index, the request's id
            request_id, index = seq.request_id.split(SEPARATOR)
            delta = dataclasses.replace(delta, request_id=request_id, index=int(index))
        sink.put(delta)
        if seq.is_finished:
            del sinks[seq.request_id]
        later = self._later.pop(seq.request_id, None)
        if later is not None:  # choice 0 has its prompt computed (or ended): the other choices now
            for other in later[0]:
                try:
                    core.add_sequence(other)
                    sinks[other.request_id] = later[1]
                except EngineError as exc:
                    later[1].put(exc)
                    break
