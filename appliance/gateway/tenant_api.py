"""Tenant API, OpenAI-compatible: ``/v1/models``, ``/v1/chat/completions`` and ``/v1/completions``
(streaming and not).

A request is admitted and its first token obtained before any response starts, so every refusal,
a prompt the node rejects, or no reachable node, is an HTTP error with the OpenAI envelope; once
streaming, a failure is an ``error`` event with a ``code``. A non-streaming request whose client
disconnects is aborted on its node and audited ``aborted``. Every record of a request carries the
client's address and user agent (``client_info.client_fields``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from appliance.client_info import client_fields
from appliance.gateway.deps import PrincipalDep, RuntimeDep
from appliance.gateway.refusal_audit import mark_recorded
from appliance.openai_completions import CompletionRequest
from appliance.openai_schema import ChatCompletionRequest
from appliance.service import InferenceSpec, Outcome, Prepared, RequestRejected
from engine import RequestError
from engine.errors import EngineDeadError

router = APIRouter(prefix="/v1")


def _sampling(req: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
    """SamplingParams fields (besides max_tokens): defaults filled in, clamped (openai_schema.clamped_sampling)."""
    values = dataclasses.asdict(req.sampling())
    values["stop"] = values["stop"] or None
    return values


@router.get("/models")
def list_models(runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    """The models this tenant may use, on nodes its residency allows (whether up or not)."""
    policy = runtime.policies.tenant_policy(principal.tenant)
    names: set[str] = set()
    for handle in runtime.fleet.handles():
        if policy.residency.matches(handle.node.labels):
            names.update(m for m in handle.node.models if runtime.service.model_allowed(principal, m))
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "sovereign-appliance"} for name in sorted(names)]
    return {"object": "list", "data": data}


def _usage(outcome: Outcome) -> dict[str, int]:
    return {
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
    }


def _http_error(exc: Exception) -> RequestRejected:
    """An error before the first token, as the HTTP error the client gets."""
    if isinstance(exc, RequestRejected):
        return exc
    if isinstance(exc, RequestError):
        return RequestRejected(400, str(exc)[:500], "invalid_request_error", type(exc).__name__)
    if isinstance(exc, EngineDeadError):
        return RequestRejected(503, "no compliant engine node could serve the request now; retry later",
                               "server_error", "no_compliant_node_available", retry_after_s=5)
    return RequestRejected(502, "the engine node failed the request", "server_error", "node_failed")


Chunk = Callable[[Prepared, str | None, str | None, Any], str]


def _chat_chunk(prep: Prepared, text: str | None, finish: str | None, usage: Any = None) -> str:
    body: dict[str, Any] = {"id": prep.request_id, "object": "chat.completion.chunk", "created": prep.created,
                            "model": prep.model, "choices": []}
    if usage is None:
        delta = {"role": "assistant", "content": ""} if text is None and finish is None else (
            {"content": text} if text else {})
        body["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    else:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"


def _text_chunk(prep: Prepared, text: str | None, finish: str | None, usage: Any = None) -> str:
    body: dict[str, Any] = {"id": prep.request_id, "object": "text_completion", "created": prep.created,
                            "model": prep.model, "choices": []}
    if usage is None:
        body["choices"] = [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]
    else:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"


async def _sse(stream: AsyncIterator[tuple[str, str | None]], first: tuple[str, str | None], prep: Prepared,
               outcome: Outcome, chunk: Chunk, include_usage: bool, opening: bool) -> AsyncIterator[str]:
    try:
        if opening:
            yield chunk(prep, None, None, None)
        text, finish = first
        while True:
            if text or finish:
                yield chunk(prep, text, finish, None)
            if finish:
                break
            text, finish = await anext(stream)
    except StopAsyncIteration:
        pass
    except RequestError as exc:
        yield "data: " + json.dumps({"error": {"message": str(exc)[:500], "type": "invalid_request_error",
                                               "param": None, "code": type(exc).__name__}}) + "\n\n"
        return
    except Exception:
        yield "data: " + json.dumps({"error": {
            "message": f"the engine node {outcome.node or prep.route.node} failed during generation",
            "type": "server_error", "param": None, "code": "node_failed"}}) + "\n\n"
        return
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    if include_usage:
        yield chunk(prep, None, None, _usage(outcome))
    yield "data: [DONE]\n\n"


async def _serve(request: Request, runtime: RuntimeDep, principal: PrincipalDep, spec: InferenceSpec,
                 include_usage: bool, chat: bool) -> JSONResponse | StreamingResponse:
    try:
        prep = await runtime.service.prepare(principal, spec)
    except RequestRejected as exc:
        if exc.recorded:
            mark_recorded(request.state)
        raise
    mark_recorded(request.state)  # admitted: whatever happens now ends in its completed/failed/aborted record
    outcome = Outcome()
    stream = runtime.service.run(prep, outcome)
    # x-request-id stays the gateway's id of this HTTP request (as OpenAI's does); the completion's
    # own id is in the body, and the audit records carry both
    headers = {"Cache-Control": "no-cache"}
    if spec.stream:
        try:
            first = await anext(stream)
        except Exception as exc:
            raise _http_error(exc) from exc
        return StreamingResponse(
            _sse(stream, first, prep, outcome, _chat_chunk if chat else _text_chunk, include_usage, chat),
            media_type="text/event-stream", headers=headers)
    await _collect_unless_disconnected(request, stream)
    choice: dict[str, Any] = {"index": 0, "finish_reason": outcome.finish_reason or "stop", "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": outcome.text}
    else:
        choice["text"] = outcome.text
    return JSONResponse({"id": prep.request_id, "object": "chat.completion" if chat else "text_completion",
                         "created": prep.created, "model": prep.model, "choices": [choice], "usage": _usage(outcome)})


async def _collect_unless_disconnected(request: Request, stream: AsyncIterator[tuple[str, str | None]]) -> None:
    """Run the generation to its end, unless the client goes away first: then it is cancelled (the
    node aborts it and the record says ``aborted``)."""
    async def collect() -> None:
        async for _ in stream:
            pass

    async def disconnected() -> None:
        while True:  # the body is read already: the next message is the disconnect
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    work = asyncio.create_task(collect())
    watch = asyncio.create_task(disconnected())
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
    if work in done:
        exc = work.exception()
        if exc is not None:
            raise _http_error(exc) from exc  # type: ignore[arg-type]
        return
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await work
    raise RequestRejected(499, "client closed the request", "invalid_request_error", "client_disconnected")


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, runtime: RuntimeDep, principal: PrincipalDep
) -> JSONResponse | StreamingResponse:
    spec = InferenceSpec(model=body.model, max_tokens=body.requested_max_tokens(0) or None,
                         sampling=_sampling(body), stream=body.stream, messages=body.template_messages(),
                         http_request_id=str(getattr(request.state, "request_id", "")),
                         client=client_fields(request.scope))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _serve(request, runtime, principal, spec, include_usage, chat=True)


@router.post("/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request, runtime: RuntimeDep, principal: PrincipalDep
) -> JSONResponse | StreamingResponse:
    spec = InferenceSpec(model=body.model, max_tokens=body.max_tokens, sampling=_sampling(body), stream=body.stream,
                         prompt=body.prompt_text(), prefix="cmpl",
                         http_request_id=str(getattr(request.state, "request_id", "")),
                         client=client_fields(request.scope))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _serve(request, runtime, principal, spec, include_usage, chat=False)
