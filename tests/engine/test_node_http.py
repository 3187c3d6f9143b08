"""The lean node client (engine/node_http.py) against real TLS servers that answer as the node
does, and as a broken or slow one would: chunked NDJSON streamed in pieces, keep-alive reuse, a
pooled connection the server closed meanwhile, a read timeout, a cut answer, garbage, an error status."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from engine.node_http import NodeConnectionError, NodeHTTP, NodeHTTPStatus, NodeTimeout
from tests.engine.tls_certs import TlsSet, make_tls_set

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsSet:
    return make_tls_set(tmp_path_factory.mktemp("tls"))


def _contexts(tls: TlsSet) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls.ca))
    server.load_cert_chain(str(tls.server.cert), str(tls.server.key))
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca))
    client.load_cert_chain(str(tls.client.cert), str(tls.client.key))
    return server, client


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    return await reader.readexactly(length)


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def _run(tls: TlsSet, handler: Handler, body: Callable[[NodeHTTP], Awaitable[object]], **kwargs: float) -> object:
    server_ctx, client_ctx = _contexts(tls)
    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    http = NodeHTTP(f"https://127.0.0.1:{port}", client_ctx, connect_timeout_s=5,
                    read_timeout_s=kwargs.get("read_timeout_s", 5))
    try:
        return await body(http)
    finally:
        await http.close()
        server.close()


async def _lines(http: NodeHTTP, payload: bytes = b"{}") -> list[bytes]:
    return [line async for line in http.post_lines("/v1/generate", payload)]


async def _ndjson_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Keep-alive, chunked, lines split across chunks as a streaming server may send them."""
    try:
        while True:
            body = await _read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n")
            writer.write(_chunk(b'{"n": 1}\n{"n"') + _chunk(b': 2}\n') + _chunk(body + b"\n"))
            await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


def test_lines_are_cut_right_and_the_connection_is_reused(tls: TlsSet) -> None:
    async def body(http: NodeHTTP) -> object:
        first = await _lines(http, b'{"x": 1}')
        second = await _lines(http, b'{"x": 2}')
        return first, second, http.connects

    first, second, connects = asyncio.run(_run(tls, _ndjson_handler, body))  # type: ignore[misc]
    assert first == [b'{"n": 1}', b'{"n": 2}', b'{"x": 1}'] and second[-1] == b'{"x": 2}'
    assert connects == 1


def test_a_pooled_connection_closed_by_the_node_is_replaced_once(tls: TlsSet) -> None:
    async def one_answer_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n{\"n\": 1}\n")
        await writer.drain()
        writer.close()  # as an idle keep-alive timeout would, but before the client knows

    async def body(http: NodeHTTP) -> object:
        first = await _lines(http)
        await asyncio.sleep(0.05)
        http._idle[0].reader._eof = False  # type: ignore[attr-defined]  # the client has not noticed yet
        return first, await _lines(http), http.connects

    first, second, connects = asyncio.run(_run(tls, one_answer_then_close, body))  # type: ignore[misc]
    assert first == second == [b'{"n": 1}'] and connects == 2


def test_silence_is_a_read_timeout_and_the_connection_is_dropped(tls: TlsSet) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + _chunk(b'{"n": 1}\n'))
        await writer.drain()
        await asyncio.sleep(5)

    async def body(http: NodeHTTP) -> object:
        got: list[bytes] = []
        with pytest.raises(NodeTimeout, match="ReadTimeout"):
            async for line in http.post_lines("/v1/generate", b"{}"):
                got.append(line)
        return got, len(http._idle)

    got, idle = asyncio.run(_run(tls, silent, body, read_timeout_s=0.3))  # type: ignore[misc]
    assert got == [b'{"n": 1}'] and idle == 0  # what came before the silence was delivered; nothing reused


@pytest.mark.parametrize(("answer", "expected"), [
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + b"5\r\n{\"n\"", "connection broken"),
    (b"SSH-2.0-OpenSSH_9.2\r\n", "not an HTTP/1.1 answer"),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
    (b"HTTP/1.1 200 OK\r\n\r\n{}\n", "answer without a length"),
    (b"", "closed the connection without answering"),
])
def test_a_broken_answer_is_a_clear_connection_error(tls: TlsSet, answer: bytes, expected: str) -> None:
    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(answer)
        await writer.drain()
        writer.close()

    async def body(http: NodeHTTP) -> object:
        with pytest.raises(NodeConnectionError, match=expected):
            await _lines(http)
        return len(http._idle)

    assert asyncio.run(_run(tls, broken, body)) == 0


def test_an_error_status_carries_its_body_and_keeps_the_connection(tls: TlsSet) -> None:
    async def refusing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await _read_request(reader)
            except asyncio.IncompleteReadError:
                return
            payload = b'{"error": {"type": "PromptTooLongError", "message": "too long"}}'
            writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: " + str(len(payload)).encode()
                         + b"\r\n\r\n" + payload)
            await writer.drain()

    async def body(http: NodeHTTP) -> object:
        with pytest.raises(NodeHTTPStatus) as refused:
            await _lines(http)
        with pytest.raises(NodeHTTPStatus):
            await _lines(http)
        return refused.value, http.connects

    refused, connects = asyncio.run(_run(tls, refusing, body))  # type: ignore[misc]
    assert refused.status == 400 and b"PromptTooLongError" in refused.body and connects == 1


def test_no_connection_without_the_nodes_trusted_certificate(tls: TlsSet, tmp_path: Path) -> None:
    other = make_tls_set(tmp_path)  # another installation's CA: the node is not trusted

    async def body(http: NodeHTTP) -> object:
        _, client_ctx = _contexts(other)
        http._ssl = client_ctx
        with pytest.raises(NodeConnectionError, match="ConnectError"):
            await _lines(http)
        return None

    asyncio.run(_run(tls, _ndjson_handler, body))
    with pytest.raises(ValueError, match="https://host:port"):
        NodeHTTP("http://127.0.0.1:1", ssl.create_default_context(), connect_timeout_s=1, read_timeout_s=1)
