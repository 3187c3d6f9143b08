"""FastAPI app of the node server. Transport security (mutual TLS) is uvicorn's job: see serve.py.

POST /v1/generate  streams NDJSON: one StreamDelta object per line; a request the engine rejects
                   (bad parameters, prompt too long, ...) gets 400 before any line is sent; a
                   failure after streaming began ends the stream with an {"error": ...} line.
POST /v1/abort     {"request_id"}: finish a request now (its blocks are freed at once).
GET  /v1/stats     the engine's stats() as JSON.
GET  /v1/tokenizer tokenizer files, so a remote client tokenizes exactly like this node.
GET  /health       200 while the engine loop runs, else 503.
GET  /metrics      Prometheus text format, vLLM-compatible names.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine.async_engine import AsyncEngine
from engine.errors import EngineDeadError, RequestError
from engine.outputs import StreamDelta
from engine.server.metrics import EngineMetrics
from engine.server.wire import AbortBody, GenerateBody, delta_to_line, error_body, error_to_line

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _error(status: int, exc: BaseException) -> JSONResponse:
    return JSONResponse({"error": error_body(exc)}, status_code=status)


def build_app(engine: AsyncEngine, model_dir: Path, model_name: str | None = None,
              health_info: dict[str, Any] | None = None) -> FastAPI:
    """The engine must be started (and later shut down) by the caller, e.g. in a lifespan.
    ``health_info`` is added to /health's answer (e.g. the release version a supervisor waits for)."""
    app = FastAPI(title="engine node", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = EngineMetrics(engine.stats, model_name or model_dir.name)
    app.state.metrics = metrics

    @app.post("/v1/generate", response_model=None)
    async def generate(body: GenerateBody) -> Response:
        try:
            params = body.sampling_params()
        except ValueError as exc:
            return _error(400, exc)
        prompt: str | list[int] = body.prompt if body.prompt is not None else list(body.prompt_token_ids or [])
        start = time.perf_counter()
        stream = engine.generate(body.request_id, prompt, params, cache_salt=body.cache_salt,
                                 priority=body.priority, deadline=body.deadline,
                                 tenant=body.tenant, tpot_target_s=body.tpot_target_s)
        try:
            first = await anext(stream)
        except RequestError as exc:
            return _error(400, exc)
        except EngineDeadError as exc:
            return _error(503, exc)
        return StreamingResponse(_lines(stream, first, start, metrics), media_type="application/x-ndjson")

    @app.post("/v1/abort")
    async def abort(body: AbortBody) -> dict[str, Any]:
        await engine.abort(body.request_id)
        return {"request_id": body.request_id, "aborted": True}

    @app.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        return engine.stats()

    @app.get("/v1/tokenizer")
    async def tokenizer() -> dict[str, Any]:
        files = {name: (model_dir / name).read_text() for name in TOKENIZER_FILES if (model_dir / name).is_file()}
        return {"files": files, "eos_token_ids": list(engine.tokenizer.eos_token_ids)}

    @app.get("/health", response_model=None)
    async def health() -> Response:
        if engine.is_running:
            return JSONResponse({**(health_info or {}), "status": "ok"})
        return JSONResponse({**(health_info or {}), "status": "unavailable"}, status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


async def _lines(
    stream: AsyncIterator[StreamDelta], first: StreamDelta, start: float, metrics: EngineMetrics
) -> AsyncIterator[bytes]:
    """NDJSON lines; observes TTFT / TPOT / e2e. Closing it (client gone) aborts the request."""
    first_token_at: float | None = None
    delta = first
    try:
        while True:  # to the end of the stream: an n > 1 request ends when its last choice does
            if delta.token_ids and first_token_at is None:
                first_token_at = time.perf_counter()
                metrics.ttft.observe(first_token_at - start)
            yield delta_to_line(delta)
            if delta.finished and delta.index == 0:
                end = time.perf_counter()
                metrics.e2e.observe(end - start)
                if first_token_at is not None and delta.num_output_tokens > 1:
                    metrics.tpot.observe((end - first_token_at) / (delta.num_output_tokens - 1))
            delta = await anext(stream)
    except StopAsyncIteration:
        return
    except Exception as exc:  # the stream has started: report in-band, then end it
        log.warning("stream failed: %s", type(exc).__name__)
        yield error_to_line(exc)
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
