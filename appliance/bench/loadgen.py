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
    ttft_s: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    client_cpu_s: float = 0.0

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


class ServerClosed(Exception):
    """The server closed a keep-alive connection before answering (retried on a new one)."""


class Connection:
    def __init__(self, target: Target) -> None:
        self.target = target
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

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
        if chunked:
            tail = b""
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
                if size == 0:
                    while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                        pass
                    break
                data = (await reader.readexactly(size + 2))[:-2]
                if not first:
                    if FIRST_TOKEN.search(tail + data):
                        first = time.perf_counter() - start
                    tail = data[-32:]
        elif length >= 0:
            data = await reader.readexactly(length)
            if FIRST_TOKEN.search(data):
                first = time.perf_counter() - start
        else:  # body until close
            data = await reader.read()
            close = True
        end = time.perf_counter() - start
        if close:
            self.close()
        return status, first, end


async def closed_loop(target: Target, connections: int, seconds: float, stream: bool,
                      warmup_s: float = 0.5) -> PhaseResult:
    """``connections`` clients each sending one request after another: the requests that complete
    within a window of ``seconds`` (after a warm-up of ``warmup_s``) are counted, with their latencies.
    Requests still running at the end are awaited (at most ``seconds + 60`` s more) but not counted."""
    payload = target.request(stream)
    result = PhaseResult()
    conns = [Connection(target) for _ in range(connections)]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    measure_from, stop_at = t0 + warmup_s, t0 + warmup_s + seconds

    async def client(conn: Connection) -> None:
        while loop.time() < stop_at:
            try:
                status, first, total = await conn.exchange(payload)
            except (OSError, ServerClosed, asyncio.IncompleteReadError, ValueError) as exc:
                if measure_from <= loop.time() <= stop_at:
                    result.error(type(exc).__name__)
                conn.close()
                await asyncio.sleep(0.05)
                continue
            if not measure_from <= loop.time() <= stop_at:
                continue  # finished in the warm-up or after the window: not counted
            if status != 200:
                result.error(f"HTTP {status}")
                continue
            result.ok += 1
            result.total_s.append(total)
            if stream:
                result.ttft_s.append(first if first else total)

    cpu: list[float] = []  # the generator's CPU time at the window's start and end
    loop.call_at(measure_from, lambda: cpu.append(time.process_time()))
    loop.call_at(stop_at, lambda: cpu.append(time.process_time()))
    try:
        await asyncio.wait_for(asyncio.gather(*(client(c) for c in conns)), warmup_s + 2 * seconds + 60)
    finally:
        for conn in conns:
            conn.close()
    while len(cpu) < 2:  # every client finished before the window closed (all failing fast)
        await asyncio.sleep(max(0.0, stop_at - loop.time()) + 0.01)
    result.wall_s = seconds
    result.client_cpu_s = cpu[1] - cpu[0]
    return result


async def probe(target: Target, stream: bool) -> tuple[int, float, float]:
    """One request on a fresh connection (setup checks): (status, ttft, total)."""
    conn = Connection(target)
    try:
        return await conn.exchange(target.request(stream))
    finally:
        conn.close()
