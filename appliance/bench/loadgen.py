"""A lean closed-loop HTTP/1.1 load generator, used identically for every target of the benchmark.

Raw asyncio streams (TLS where the target has a context), one keep-alive connection per virtual
client, a hand-written request writer and a minimal response parser (content-length and chunked
bodies): a fraction of the CPU an httpx or aiohttp client would take, which matters when the client
shares two cores with the servers it measures. Each request's time to first token (the first body
bytes holding a non-empty ``"content"``/``"text"`` string) and to the end of the response are kept.
The generator's own CPU time is measured per phase.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

FIRST_TOKEN = re.compile(rb'"(?:content|text)": ?"[^"]')


@dataclass(frozen=True)
class Target:
    """Where and what to send: one prepared request for streaming and one for non-streaming."""

    name: str
    host: str
    port: int
    path: str
    headers: dict[str, str]
    body_stream: bytes
    body_plain: bytes
    ssl: ssl.SSLContext | None = None
    server_hostname: str | None = None

    def request(self, stream: bool) -> bytes:
        body = self.body_stream if stream else self.body_plain
        head = [f"POST {self.path} HTTP/1.1", f"host: {self.host}:{self.port}", "content-type: application/json",
                f"content-length: {len(body)}", *(f"{k}: {v}" for k, v in self.headers.items())]
        return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@dataclass
class PhaseResult:
    """One phase (one target, one mode, one closed loop) of the benchmark."""

    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    error_samples: dict[str, str] = field(default_factory=dict)  # the first answer of each kind, cut
    ttft_s: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    warmup_s: float = 0.0  # how long it took until every client had completed a request
    client_cpu_s: float = 0.0
    server_cpu_s: float | None = None  # the target's processes, where a probe was given

    def error(self, what: str, sample: bytes = b"") -> None:
        self.errors[what] = self.errors.get(what, 0) + 1
        if what not in self.error_samples:
            self.error_samples[what] = sample[:300].decode("utf-8", "replace")


class ServerClosed(Exception):
    """The server closed a keep-alive connection before answering (retried on a new one)."""


class Connection:
    def __init__(self, target: Target) -> None:
        self.target = target
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.last_error_body = b""  # the body of the last answer that was not 200

    async def open(self) -> None:
        t = self.target
        self.reader, self.writer = await asyncio.open_connection(
            t.host, t.port, ssl=t.ssl, server_hostname=t.server_hostname if t.ssl else None, limit=2**20)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def exchange(self, payload: bytes) -> tuple[int, float, float]:
        """(status, seconds to first token or 0, seconds to the end) for one request; a keep-alive
        connection the server has closed meanwhile is reopened once."""
        for attempt in (0, 1):
            if self.writer is None:
                await self.open()
            try:
                return await self._once(payload)
            except ServerClosed:
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def _once(self, payload: bytes) -> tuple[int, float, float]:
        assert self.reader is not None and self.writer is not None
        reader = self.reader
        start = time.perf_counter()
        self.writer.write(payload)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise ServerClosed() from exc
        status_line, *header_lines = head[:-4].split(b"\r\n")
        status = int(status_line.split(b" ", 2)[1])
        length, chunked, close = -1, False, False
        for line in header_lines:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and b"close" in value.lower():
                close = True
        first = 0.0
        self.last_error_body = b""
        if chunked:
            tail = b""
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
                if size == 0:
                    while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                        pass
                    break
                data = (await reader.readexactly(size + 2))[:-2]
                if status != 200 and len(self.last_error_body) < 300:
                    self.last_error_body += data
                if not first:
                    if FIRST_TOKEN.search(tail + data):
                        first = time.perf_counter() - start
                    tail = data[-32:]
        elif length >= 0:
            data = await reader.readexactly(length)
            if status != 200:
                self.last_error_body = data
            if FIRST_TOKEN.search(data):
                first = time.perf_counter() - start
        else:  # body until close
            data = await reader.read()
            close = True
            if status != 200:
                self.last_error_body = data
        end = time.perf_counter() - start
        if close:
            self.close()
        return status, first, end


async def closed_loop(target: Target, connections: int, seconds: float, stream: bool,
                      warmup_s: float = 0.5, max_warmup_s: float = 60.0,
                      server_cpu: Callable[[], float] | None = None) -> PhaseResult:
    """``connections`` clients each sending one request after another. The measured window of
    ``seconds`` opens once every client has completed a request (so every connection is open and the
    loop is in its steady state) and at least ``warmup_s`` have passed, at the latest after
    ``max_warmup_s``, and lasts as long as the warm-up took if that was longer; the requests that
    complete inside it are counted, with their latencies.
    Requests still running when it closes are awaited (bounded) but not counted. ``server_cpu``: a
    probe of the target's CPU seconds, read when the window opens and closes."""
    payload = target.request(stream)
    result = PhaseResult()
    conns = [Connection(target) for _ in range(connections)]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    window: list[float] = []  # [opened at, closes at] once open
    cpu: list[float] = []  # the generator's CPU time at the window's start and end
    served: list[float] = []  # the target's, the same
    warmed: set[int] = set()

    def open_window() -> None:
        if not window:
            now = loop.time()
            # at least as long as the warm-up took: a target whose requests take longer than
            # ``seconds`` completes them in waves, and a shorter window could fall between two
            length = max(seconds, min(now - t0, max_warmup_s))
            window.extend((now, now + length))
            sample()
            loop.call_at(now + length, sample)

    def sample() -> None:
        cpu.append(time.process_time())
        if server_cpu is not None:
            served.append(server_cpu())

    def warmed_up(i: int) -> None:
        warmed.add(i)
        if len(warmed) == connections and not window:
            loop.call_at(t0 + warmup_s, open_window)

    async def client(i: int, conn: Connection) -> None:
        while not window or loop.time() < window[1]:
            try:
                status, first, total = await conn.exchange(payload)
            except (OSError, ServerClosed, asyncio.IncompleteReadError, ValueError) as exc:
                if window and window[0] <= loop.time() <= window[1]:
                    result.error(type(exc).__name__)
                conn.close()
                await asyncio.sleep(0.05)
                continue
            if i not in warmed:
                warmed_up(i)
            if not window or not window[0] <= loop.time() <= window[1]:
                continue  # finished in the warm-up or after the window: not counted
            if status != 200:
                result.error(f"HTTP {status}", conn.last_error_body)
                continue
            result.ok += 1
            result.total_s.append(total)
            if stream:
                result.ttft_s.append(first if first else total)

    loop.call_at(t0 + max(warmup_s, max_warmup_s), open_window)
    try:
        await asyncio.wait_for(asyncio.gather(*(client(i, c) for i, c in enumerate(conns))),
                               2 * max(warmup_s, max_warmup_s) + 2 * seconds + 60)
    finally:
        for conn in conns:
            conn.close()
    while len(cpu) < 2:  # every client finished before the window closed (all failing fast)
        await asyncio.sleep(0.01)
    result.wall_s = window[1] - window[0]
    result.warmup_s = window[0] - t0
    result.client_cpu_s = cpu[1] - cpu[0]
    if len(served) == 2:
        result.server_cpu_s = served[1] - served[0]
    return result


async def probe(target: Target, stream: bool) -> tuple[int, float, float]:
    """One request on a fresh connection (setup checks): (status, ttft, total)."""
    conn = Connection(target)
    try:
        return await conn.exchange(target.request(stream))
    finally:
        conn.close()
