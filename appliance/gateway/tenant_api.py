"""Tenant API: ``/v1/models`` and ``/v1/chat/completions`` (streaming and not), OpenAI-compatible."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from appliance.gateway.deps import PrincipalDep, RuntimeDep
from appliance.openai_schema import ChatCompletionRequest
from appliance.service import Outcome, Prepared, RequestRejected
from engine import RequestError

router = APIRouter(prefix="/v1")


@router.get("/models")
def list_models(runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    policy = runtime.policies.tenant_policy(principal.tenant)
    name = runtime.config.model_name
    allowed = "*" in policy.allowed_models or name in policy.allowed_models
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "sovereign-appliance"}] if allowed else []
    return {"object": "list", "data": data}


def _usage(outcome: Outcome) -> dict[str, int]:
    return {
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
    }


def _chunk(prep: Prepared, delta: dict[str, Any], finish: str | None, usage: Any = None) -> str:
    body: dict[str, Any] = {
        "id": prep.request_id, "object": "chat.completion.chunk", "created": prep.created, "model": prep.model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if delta is not None else [],
    }
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"


async def _sse(runtime: RuntimeDep, prep: Prepared, include_usage: bool) -> AsyncIterator[str]:
    outcome = Outcome()
    yield _chunk(prep, {"role": "assistant", "content": ""}, None)
    try:
        async for text, finish in runtime.service.run(prep, outcome):
            if text or finish:
                yield _chunk(prep, {"content": text} if text else {}, finish)
    except RequestError as exc:
        yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'invalid_request_error'}})}\n\n"
        return
    except Exception:
        yield "data: " + json.dumps({"error": {"message": "generation failed", "type": "server_error"}}) + "\n\n"
        return
    if include_usage:
        yield _chunk(prep, None, None, usage=_usage(outcome))  # type: ignore[arg-type]
    yield "data: [DONE]\n\n"


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, runtime: RuntimeDep, principal: PrincipalDep
) -> JSONResponse | StreamingResponse:
    prep = await runtime.service.prepare(principal, body)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _sse(runtime, prep, include_usage), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Request-Id": prep.request_id},
        )
    outcome = Outcome()
    try:
        async for _text, _finish in runtime.service.run(prep, outcome):
            pass
    except RequestError as exc:
        raise RequestRejected(400, str(exc), "invalid_request_error", "invalid_request") from exc
    return JSONResponse(
        {
            "id": prep.request_id, "object": "chat.completion", "created": prep.created, "model": prep.model,
            "choices": [{
                "index": 0, "message": {"role": "assistant", "content": outcome.text},
                "finish_reason": outcome.finish_reason or "stop", "logprobs": None,
            }],
            "usage": _usage(outcome),
        },
        headers={"X-Request-Id": prep.request_id},
    )
