"""The two fake upstreams of the gateway benchmark. Both are fakes ON PURPOSE: the benchmark measures
the gateways, not a model, so the upstream answers at once with a fixed number of tokens.

- ``run_node``: our engine node's real server code (``engine.server.build_app`` under uvicorn with
  mutual TLS, NDJSON) over ``StandInEngine``, which streams TOKENS tokens without computing anything.
  Our gateway routes to it over the ``fleet:`` path; the *direct* baseline calls its /v1/generate.
- ``run_upstream``: a tiny OpenAI-compatible HTTP/1.1 server (raw asyncio, keep-alive) answering
  POST /v1/chat/completions with the same TOKENS tokens, streamed as SSE or as one JSON body. LiteLLM
  cannot speak our node protocol, so it proxies to this one; its direct baseline calls it directly.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

TOKENS = 16  # tokens per answer, the same for every upstream
TOKEN_TEXT = " x"


class StandInEngine:
    """The engine interface the node server needs, streaming TOKENS tokens at once (see module doc)."""

    def __init__(self, model_dir: Path) -> None:
        from engine.tokenizer.tokenizer import Tokenizer

        self.tokenizer = Tokenizer(model_dir, (2,))
        self.is_running = True

    def stats(self) -> dict[str, Any]:
        return {"running": 0, "waiting": 0, "kv_cache_usage": 0.0}

    async def generate(self, request_id: str, prompt: Any, params: Any, **_: Any) -> AsyncIterator[Any]:
        from engine.outputs import StreamDelta

        n_prompt = len(prompt) if isinstance(prompt, list) else len(self.tokenizer.encode(prompt))
        wanted = min(TOKENS, getattr(params, "max_tokens", None) or TOKENS)
        for i in range(1, wanted + 1):
            await asyncio.sleep(0)
            done = i == wanted
            yield StreamDelta(request_id, TOKEN_TEXT, [87], done, "length" if done else None, n_prompt, i)

    async def abort(self, request_id: str) -> None:
        return None


def run_node(model_dir: Path, tls: Path, port: int) -> None:
    """Serve the stand-in engine with the node server code over mutual TLS (blocks)."""
    import uvicorn

    from engine.server.app import build_app
    from engine.server.serve import ServeConfig, uvicorn_config

    config = ServeConfig(model=model_dir, tls_cert=tls / "server.pem", tls_key=tls / "server.key",
                         client_ca=tls / "ca.pem", port=port)
    app = build_app(StandInEngine(model_dir), model_dir,  # type: ignore[arg-type]
                    health_info={"stand_in": True, "note": "benchmark fake: no model runs"})
    uvicorn.Server(uvicorn_config(app, config)).run()


# ---- the OpenAI-compatible fake upstream ------------------------------------------------------
def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _sse(rid: str, created: int, model: str, delta: dict[str, str], finish: str | None) -> bytes:
    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def _completion(rid: str, created: int, model: str) -> bytes:
    return json.dumps({
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": TOKEN_TEXT * TOKENS},
                     "finish_reason": "length"}],
        "usage": {"prompt_tokens": 20, "completion_tokens": TOKENS, "total_tokens": 20 + TOKENS}}).encode()


async def _serve_upstream_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    served = 0
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            body = await reader.readexactly(length) if length else b""
            served += 1
            if method == "GET":  # /health, /v1/models
                payload = b'{"status": "ok", "fake": true}'
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                             % (len(payload), payload))
                continue
            if path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                continue
            request = json.loads(body or b"{}")
            model, rid, created = str(request.get("model", "fake")), f"chatcmpl-fake-{served}", int(time.time())
            if not request.get("stream"):
                payload = _completion(rid, created, model)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                             % (len(payload), payload))
                continue
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            writer.write(_chunk(_sse(rid, created, model, {"role": "assistant", "content": ""}, None)))
            for i in range(1, TOKENS + 1):
                await asyncio.sleep(0)  # one event-loop turn per token, as the stand-in engine
                finish = "length" if i == TOKENS else None
                writer.write(_chunk(_sse(rid, created, model, {"content": TOKEN_TEXT}, finish)))
                await writer.drain()
            writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await writer.drain()
    except (ConnectionError, ValueError):
        return
    finally:
        writer.close()


async def _upstream_main(host: str, port: int) -> None:
    server = await asyncio.start_server(_serve_upstream_conn, host, port, backlog=4096)
    async with server:
        await server.serve_forever()


def run_upstream(host: str, port: int) -> None:
    """Serve the OpenAI-compatible fake on http://host:port (blocks)."""
    asyncio.run(_upstream_main(host, port))
