"""A lean HTTP/1.1 client for the node's streaming endpoint: the gateway's hot path to a node.

``RemoteEngine.generate`` used httpx, whose per-request machinery (connection-pool bookkeeping,
socket liveness checks, header models, chunk decoders) cost the gateway more CPU than everything
else it does for a request. This client does only what the node protocol needs: keep-alive TLS
connections (mutual TLS, the same ``ssl.SSLContext``), one request at a time per connection, a
POST with a JSON body, a response read as a status line, headers and a chunked or sized body, cut
into NDJSON lines as they arrive.

Connections are reused while the node keeps them open; one idle for longer than ``idle_s`` (the
node server keeps them ``KEEP_ALIVE_S``) is closed, not reused. A reused connection that the node
had closed meanwhile shows as an end of stream before any byte of the answer; the request is then
sent once more on a fresh connection (the node never saw it). A response not read to its end (the
caller stopped early, an error, a timeout) closes its connection: nothing half-read is ever reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator
from urllib.parse import urlsplit

KEEP_ALIVE_S = 75.0  # the node server's keep-alive (engine/server/serve.py)
MAX_HEADER_BYTES = 64 * 1024
MAX_LINE_BYTES = 16 * 1024 * 1024


class NodeConnectionError(Exception):
    """The node could not be reached, or the connection broke or timed out mid-answer."""


class NodeTimeout(NodeConnectionError):
    """No data from the node for the read timeout (never retried: the node may be working on it)."""


class NodeHTTPStatus(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}")
        self.status, self.body = status, body


class _Conn:
    __slots__ = ("fresh", "idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.idle_since = time.monotonic()
        self.fresh = True

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class NodeHTTP:
    def __init__(self, base_url: str, ssl_context: ssl.SSLContext, *, connect_timeout_s: float,
                 read_timeout_s: float | None, max_idle: int = 256, idle_s: float = KEEP_ALIVE_S - 15) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"base_url: expected https://host:port; got {base_url!r}")
        self.host, self.port = parts.hostname, parts.port or 443
        self._host_header = parts.netloc.encode()
        self._ssl = ssl_context
        self._connect_timeout = connect_timeout_s
        self._read_timeout = read_timeout_s
        self._idle: list[_Conn] = []
        self._max_idle = max_idle
        self._idle_s = idle_s
        self._closed = False
        self.connects = 0  # connections opened (a reused one is not counted again)

    async def _connect(self) -> _Conn:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, ssl=self._ssl, limit=MAX_LINE_BYTES),
                self._connect_timeout)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            raise NodeConnectionError(f"ConnectError: cannot connect: {exc!r}") from exc
        self.connects += 1
        return _Conn(reader, writer)

    def _take_idle(self) -> _Conn | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.idle_since < self._idle_s and not conn.reader.at_eof() and not conn.writer.is_closing():
                conn.fresh = False
                return conn
            conn.close()
        return None

    def _give_back(self, conn: _Conn) -> None:
        if self._closed or len(self._idle) >= self._max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    async def _read(self, coro: object) -> bytes:
        try:
            if self._read_timeout is None:
                return await coro  # type: ignore[misc, no-any-return]
            return await asyncio.wait_for(coro, self._read_timeout)  # type: ignore[arg-type]
        except TimeoutError as exc:
            raise NodeTimeout(f"ReadTimeout: no data from the node for {self._read_timeout} s") from exc
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            raise NodeConnectionError(f"connection broken: {exc!r}") from exc

    async def _send(self, path: str, body: bytes) -> tuple[_Conn, int, dict[bytes, bytes]]:
        head = (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: " + self._host_header
                + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        for _attempt in range(2):
            conn = self._take_idle() or await self._connect()
            try:
                conn.writer.write(head + body)
                await conn.writer.drain()
                status_line = await self._read(conn.reader.readline())
            except (OSError, ssl.SSLError, NodeConnectionError) as exc:
                conn.close()
                if conn.fresh or isinstance(exc, NodeTimeout):
                    raise exc if isinstance(exc, NodeConnectionError) else NodeConnectionError(
                        f"{exc!r}") from exc
                continue  # a pooled connection the node had closed: once more on a new one
            except BaseException:
                conn.close()
                raise
            if not status_line:
                conn.close()
                if conn.fresh:
                    raise NodeConnectionError("the node closed the connection without answering")
                continue
            try:
                status, headers = await self._head(conn, status_line)
            except BaseException:
                conn.close()
                raise
            return conn, status, headers
        raise NodeConnectionError("the node closed the connection without answering")

    async def _head(self, conn: _Conn, status_line: bytes) -> tuple[int, dict[bytes, bytes]]:
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise NodeConnectionError(f"not an HTTP/1.1 answer: {status_line[:80]!r}")
        headers: dict[bytes, bytes] = {}
        size = 0
        while True:
            line = await self._read(conn.reader.readline())
            size += len(line)
            if size > MAX_HEADER_BYTES or not line:
                raise NodeConnectionError("headers too long or cut")
            if line in (b"\r\n", b"\n"):
                return int(parts[1]), headers
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()

    async def _chunks(self, conn: _Conn, headers: dict[bytes, bytes]) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (chunked or Content-Length framing)."""
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            while True:
                size_line = await self._read(conn.reader.readline())
                try:
                    size = int(size_line.split(b";", 1)[0].strip(), 16)
                except ValueError as exc:
                    raise NodeConnectionError(f"bad chunk size {size_line[:40]!r}") \
                        from exc
                if size == 0:
                    while (await self._read(conn.reader.readline())) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                data = await self._read(conn.reader.readexactly(size + 2))
                yield data[:-2]
        elif b"content-length" in headers:
            remaining = int(headers[b"content-length"])
            while remaining > 0:
                data = await self._read(conn.reader.read(min(remaining, 1 << 16)))
                if not data:
                    raise NodeConnectionError("answer cut short")
                remaining -= len(data)
                yield data
        else:
            raise NodeConnectionError("answer without a length")

    async def post_lines(self, path: str, body: bytes) -> AsyncGenerator[bytes, None]:
        """POST ``body``; yield the answer's lines (NDJSON). A status other than 200 raises
        ``NodeHTTPStatus`` with the whole (bounded) body."""
        conn, status, headers = await self._send(path, body)
        done = False
        try:
            if status != 200:
                raw = b"".join([c async for c in self._chunks(conn, headers)])[:MAX_HEADER_BYTES]
                done = True
                raise NodeHTTPStatus(status, raw)
            pending = b""
            async for data in self._chunks(conn, headers):
                pending += data
                if b"\n" not in pending:
                    if len(pending) > MAX_LINE_BYTES:
                        raise NodeConnectionError(f"a line over {MAX_LINE_BYTES} bytes")
                    continue
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line:
                        yield line
            if pending:
                yield pending
            done = True
        finally:
            if done and headers.get(b"connection", b"").lower() != b"close":
                self._give_back(conn)
            else:
                conn.close()
