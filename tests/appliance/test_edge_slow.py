"""Slow-header and slow-body connections over real TLS: each is closed within its deadline, and a
victim's ``/health`` stays fast meanwhile, compared with an idle baseline measured in the same test.

The security review found 100 such connections stayed open forever. Here 50 trickle a request head
and 50 trickle a body (one byte every 0.3 s), from their own loopback addresses; the gateway runs
with a 2 s head deadline and a 3 s body deadline.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.appliance.edge_support import EdgeServer, edge_server

pytestmark = pytest.mark.slow
HEAD_S, BODY_S = 2.0, 3.0
MARGIN_S = 5.0  # TLS handshakes of 100 connections on a 2-core machine, scheduling noise


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[EdgeServer]:
    limits = {"header_read_timeout_s": HEAD_S, "body_read_timeout_s": BODY_S, "tls_handshake_timeout_s": HEAD_S,
              "refusals_per_minute": 100_000}
    with edge_server(tmp_path_factory.mktemp("edge-slow"), model_dir, limits) as s:
        yield s


async def _trickle(port: int, ctx: ssl.SSLContext, source: str, prelude: bytes, drip: bytes,
                   give_up_s: float, delay_s: float = 0.0) -> tuple[float, bytes]:
    """Connect (after ``delay_s``), send ``prelude`` then ``drip`` a byte at a time until the server
    closes; returns (seconds from the end of the handshake to the close, what the server answered)."""
    await asyncio.sleep(delay_s)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1",
                                                   local_addr=(source, 0))
    start = time.monotonic()
    answer = b""

    async def drain() -> None:
        nonlocal answer
        while chunk := await reader.read(65536):
            answer += chunk

    reading = asyncio.ensure_future(drain())
    try:
        writer.write(prelude)
        for i in range(10_000):
            if reading.done() or time.monotonic() - start > give_up_s:
                break
            if drip:
                writer.write(drip[i % len(drip): i % len(drip) + 1])
            try:
                await writer.drain()
            except (ConnectionError, ssl.SSLError):
                break
            await asyncio.sleep(0.3)
        await asyncio.wait_for(asyncio.shield(reading), timeout=max(0.1, give_up_s - (time.monotonic() - start)))
    except (TimeoutError, ConnectionError, ssl.SSLError):
        pass
    closed_after = time.monotonic() - start if reading.done() else float("inf")
    reading.cancel()
    if reading.done() and not reading.cancelled():
        reading.exception()  # a reset instead of a clean close is a close too
    writer.close()
    return closed_after, answer


def _health_latencies(server: EdgeServer, source: str, count: int, stop: threading.Event | None = None) -> list[float]:
    out: list[float] = []
    with server.http(source, timeout=30) as http:
        http.get("/health")  # connection and TLS set up outside the measurement
        for _ in range(count):
            if stop is not None and stop.is_set():
                break
            t0 = time.perf_counter()
            assert http.get("/health").status_code == 200
            out.append(time.perf_counter() - t0)
            time.sleep(0.01)
    return out


def _p99(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(len(values) * 0.99))]


def test_slow_headers_and_bodies_are_cut_off_and_health_stays_fast(server: EdgeServer) -> None:
    baseline = _health_latencies(server, "127.0.3.1", 200)
    ctx = server.ssl()
    key = server.keys["edge-victim"]
    slow_head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"X-Slow: aaaaaaaaaaaaaaaa")
    slow_body = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
                 "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n".encode(), b'{"model": "')

    during: list[float] = []
    stop = threading.Event()
    victim = threading.Thread(target=lambda: during.extend(_health_latencies(server, "127.0.3.2", 400, stop)))

    async def attack() -> list[tuple[float, bytes]]:
        jobs = [_trickle(server.port, ctx, f"127.0.3.{10 + i}", *(slow_head if i % 2 == 0 else slow_body),
                         give_up_s=30, delay_s=0.02 * i) for i in range(100)]
        return await asyncio.gather(*jobs)

    victim.start()
    try:
        results = asyncio.run(attack())
    finally:
        stop.set()
        victim.join(timeout=120)
    heads, bodies = results[0::2], results[1::2]
    assert all(t <= HEAD_S + MARGIN_S for t, _ in heads), sorted(t for t, _ in heads)[-5:]
    assert all(t <= BODY_S + MARGIN_S for t, _ in bodies), sorted(t for t, _ in bodies)[-5:]
    # A head that began is answered 408 (the envelope) before the close; a trickled body too.
    assert all(answer.startswith(b"HTTP/1.1 408") and b'"header_timeout"' in answer for _, answer in heads)
    assert all(answer.startswith(b"HTTP/1.1 408") and b'"body_timeout"' in answer for _, answer in bodies)
    assert len(during) >= 20, len(during)
    limit = max(10 * _p99(baseline), 0.25)
    assert _p99(during) < limit, (
        f"victim /health p99 {_p99(during) * 1000:.1f} ms during the attack vs idle p99 "
        f"{_p99(baseline) * 1000:.1f} ms (medians {statistics.median(during) * 1000:.1f} / "
        f"{statistics.median(baseline) * 1000:.1f} ms, {len(during)} requests)")


def test_a_connection_that_sends_nothing_is_closed_silently(server: EdgeServer) -> None:
    closed_after, answer = asyncio.run(_trickle(server.port, server.ssl(), "127.0.3.200", b"", b"", give_up_s=30))
    assert closed_after <= HEAD_S + MARGIN_S and answer == b""


def test_keep_alive_connection_gets_a_deadline_for_each_new_head(server: EdgeServer) -> None:
    """A complete first request, then the next head trickled: the deadline starts again."""
    first = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    closed_after, answer = asyncio.run(_trickle(server.port, server.ssl(), "127.0.3.201",
                                                first + b"GET /health HTTP/1.1\r\n", b"X-A: bbbbbbbb", give_up_s=30))
    assert answer.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in answer, answer[:300]
    assert closed_after <= HEAD_S + MARGIN_S + 1


def test_a_tls_handshake_that_never_finishes_is_cut_off(server: EdgeServer) -> None:
    """Connections that open TCP and never (or only partly) send a ClientHello hold no socket
    beyond the handshake deadline."""
    socks = []
    for i in range(20):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=HEAD_S + MARGIN_S + 5,
                                        source_address=(f"127.0.3.{220 + i % 10}", 0))
        if i % 2:
            sock.sendall(b"\x16\x03\x01\x02\x00")  # the start of a ClientHello record, then nothing
        socks.append(sock)
    started = time.monotonic()
    for sock in socks:
        try:
            assert sock.recv(1024) == b""
        except ConnectionResetError:
            pass  # an abort is a close too
        finally:
            sock.close()
    assert time.monotonic() - started <= HEAD_S + MARGIN_S
