"""The benchmark's load generator against real asyncio servers on loopback: chunked SSE and
content-length bodies, first-token detection, and a keep-alive connection the server closed."""

from __future__ import annotations

import asyncio
import json

from appliance.bench.fakes import TOKENS, _serve_upstream_conn
from appliance.bench.loadgen import Connection, Target, closed_loop


def _target(port: int) -> Target:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    return Target("fake", "127.0.0.1", port, "/v1/chat/completions", {"authorization": "Bearer k"},
                  json.dumps({**body, "stream": True}).encode(), json.dumps(body).encode())


def test_streams_and_plain_bodies_are_read_to_their_end() -> None:
    async def main() -> None:
        server = await asyncio.start_server(_serve_upstream_conn, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        conn = Connection(_target(port))
        try:
            status, first, total = await conn.exchange(_target(port).request(True))
            assert status == 200 and 0 < first <= total
            status, first, total = await conn.exchange(_target(port).request(False))  # same connection
            assert status == 200 and 0 < first <= total
            result = await closed_loop(_target(port), 3, 0.3, True, warmup_s=0.05)
            assert result.ok > 0 and result.errors == {} and len(result.ttft_s) == result.ok
            assert all(0 < f <= t for f, t in zip(result.ttft_s, result.total_s, strict=True))
        finally:
            conn.close()
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def test_a_keep_alive_connection_closed_by_the_server_is_reopened() -> None:
    answered: list[int] = []

    async def one_answer_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length"))
        await reader.readexactly(length)
        body = json.dumps({"choices": [{"message": {"content": " x" * TOKENS}}]}).encode()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        answered.append(1)
        writer.close()  # no connection: close header: the client finds out on its next request

    async def main() -> None:
        server = await asyncio.start_server(one_answer_then_close, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        conn = Connection(_target(port))
        try:
            for _ in range(3):
                status, _, _ = await conn.exchange(_target(port).request(False))
                assert status == 200
        finally:
            conn.close()
            server.close()
            await server.wait_closed()
        assert len(answered) == 3

    asyncio.run(main())


def test_a_refusal_is_counted_with_a_sample_of_its_answer() -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length"))
            await reader.readexactly(length)
            body = b'{"error": {"message": "rate limit: slow down"}}'
            writer.write(b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(refuse, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            result = await closed_loop(_target(port), 2, 0.2, False, warmup_s=0.05, max_warmup_s=0.1)
        finally:
            server.close()
            await server.wait_closed()
        assert result.ok == 0 and result.errors["HTTP 429"] > 0, result.errors
        assert "rate limit: slow down" in result.error_samples["HTTP 429"]

    asyncio.run(main())
