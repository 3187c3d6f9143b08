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
from appliance.openai_logprobs import chat_logprobs, completion_logprobs
from appliance.openai_schema import ChatCompletionRequest
from appliance.openai_tools import parse_call
from appliance.service import InferenceSpec, Outcome, Prepared, RequestRejected
from engine import RequestError
from engine.errors import EngineDeadError
from engine.outputs import StreamDelta
from engine.tokenizer.tokenizer import Tokenizer

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


class _Choices:
    """One request's response, as chunks (a stream) or one body: ``n`` choices by ``index``, each
    with its logprobs when asked for, and for ``/v1/completions`` with ``echo`` the prompt first."""

    def __init__(self, prep: Prepared, chat: bool, tokenizer: Tokenizer | None, top_n: int | None,
                 echo: str | None = None, tool_call: bool = False) -> None:
        self.prep, self.chat, self.tokenizer, self.top_n = prep, chat, tokenizer, top_n
        self.echo = echo  # the prompt to put before each choice's text
        self.tool_call = tool_call  # each choice is a call (appliance/openai_tools.py): sent whole, at its end
        self.held: dict[int, str] = {}  # a call's text until its choice ends
        self.echoed: set[int] = set()
        self.offsets: dict[int, int] = {}  # completions logprobs: where the next token starts in the text
        self.tokens: dict[int, list[int]] = {}  # non-streaming with logprobs: what to report at the end
        self.logprobs: dict[int, list[dict[int, float]]] = {}

    def _logprobs(self, index: int, token_ids: list[int], lps: list[dict[int, float]] | None) -> Any:
        if self.top_n is None or self.tokenizer is None or lps is None:
            return None
        if self.chat:
            return chat_logprobs(self.tokenizer, token_ids, lps, self.top_n)
        body, self.offsets[index] = completion_logprobs(self.tokenizer, token_ids, lps, self.top_n,
                                                        self.offsets.get(index, 0))
        return body

    def _text(self, index: int, text: str) -> str:
        if self.echo is not None and index not in self.echoed:
            self.echoed.add(index)
            return self.echo + text
        return text

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.prep.request_id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.prep.created, "model": self.prep.model, "choices": choices}

    def opening(self) -> list[str]:
        if not self.chat:
            return []
        return [f"data: {json.dumps(self._envelope([{'index': i, 'delta': {'role': 'assistant', 'content': ''}, 'finish_reason': None, 'logprobs': None}]))}\n\n"  # noqa: E501
                for i in range(self.prep.params.n)]

    def chunk(self, delta: StreamDelta) -> str | None:
        """The chunk for one delta, or None when it carries nothing to send."""
        i = delta.index
        lp = self._logprobs(i, delta.token_ids, delta.logprobs) if delta.token_ids else None
        text = self._text(i, delta.text) if (delta.text or self.echo is not None) else ""
        finish = delta.finish_reason if delta.finished else None
        if self.tool_call:
            self.held[i] = self.held.get(i, "") + text
            text = ""
            if finish:
                return self._call_chunk(i, self.held.pop(i, ""), finish, lp)
        if not (text or finish or lp):
            return None
        if self.chat:
            choice = {"index": i, "delta": {"content": text} if text else {}, "finish_reason": finish, "logprobs": lp}
        else:
            choice = {"index": i, "text": text, "finish_reason": finish, "logprobs": lp}
        return f"data: {json.dumps(self._envelope([choice]))}\n\n"

    def _call_chunk(self, index: int, text: str, finish: str, lp: Any) -> str:
        call = parse_call(text) if finish == "stop" else None
        if call is None:  # cut short (max_tokens): what was made, as text
            delta: dict[str, Any] = {"content": text} if text else {}
        else:
            delta, finish = {"tool_calls": [{"index": 0, **call}]}, "tool_calls"
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": lp}
        return f"data: {json.dumps(self._envelope([choice]))}\n\n"

    def usage(self, outcome: Outcome) -> str:
        body = {**self._envelope([]), "usage": _usage(outcome)}
        return f"data: {json.dumps(body)}\n\n"

    def collect(self, delta: StreamDelta) -> None:
        if self.top_n is not None and delta.logprobs is not None:
            self.tokens.setdefault(delta.index, []).extend(delta.token_ids)
            self.logprobs.setdefault(delta.index, []).extend(delta.logprobs)

    def body(self, outcome: Outcome) -> dict[str, Any]:
        choices = []
        for i, c in enumerate(outcome.choices):
            lp = self._logprobs(i, self.tokens.get(i, []), self.logprobs.get(i, []))
            choice: dict[str, Any] = {"index": i, "finish_reason": c.finish_reason or "stop", "logprobs": lp}
            call = parse_call(c.text) if self.tool_call and choice["finish_reason"] == "stop" else None
            if call is not None:
                choice["message"] = {"role": "assistant", "content": None, "tool_calls": [call]}
                choice["finish_reason"] = "tool_calls"
            elif self.chat:
                choice["message"] = {"role": "assistant", "content": c.text}
            else:
                choice["text"] = self._text(i, c.text)
            choices.append(choice)
        return {"id": self.prep.request_id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.prep.created, "model": self.prep.model, "choices": choices, "usage": _usage(outcome)}


async def _sse(stream: AsyncIterator[StreamDelta], first: StreamDelta, prep: Prepared, outcome: Outcome,
               out: _Choices, include_usage: bool) -> AsyncIterator[str]:
    try:
        for opening in out.opening():
            yield opening
        delta = first
        while True:
            line = out.chunk(delta)
            if line is not None:
                yield line
            delta = await anext(stream)
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
        yield out.usage(outcome)
    yield "data: [DONE]\n\n"


async def _serve(request: Request, runtime: RuntimeDep, principal: PrincipalDep, spec: InferenceSpec,
                 include_usage: bool, chat: bool, echo: str | None = None,
                 tool_call: bool = False) -> JSONResponse | StreamingResponse:
    try:
        prep = await runtime.service.prepare(principal, spec)
    except RequestRejected as exc:
        if exc.recorded:
            mark_recorded(request.state)
        raise
    mark_recorded(request.state)  # admitted: whatever happens now ends in its completed/failed/aborted record
    outcome = Outcome()
    top_n = prep.params.logprobs
    out = _Choices(prep, chat, runtime.fleet.tokenizer(prep.model) if top_n is not None else None, top_n, echo,
                   tool_call)
    stream = runtime.service.run(prep, outcome)
    # x-request-id stays the gateway's id of this HTTP request (as OpenAI's does); the completion's
    # own id is in the body, and the audit records carry both
    headers = {"Cache-Control": "no-cache"}
    if spec.stream:
        try:
            first = await anext(stream)
        except Exception as exc:
            raise _http_error(exc) from exc
        return StreamingResponse(_sse(stream, first, prep, outcome, out, include_usage),
                                 media_type="text/event-stream", headers=headers)
    await _collect_unless_disconnected(request, stream, out.collect)
    return JSONResponse(out.body(outcome))


async def _collect_unless_disconnected(request: Request, stream: AsyncIterator[StreamDelta],
                                       keep: Callable[[StreamDelta], None]) -> None:
    """Run the generation to its end, unless the client goes away first: then it is cancelled (the
    node aborts it and the record says ``aborted``)."""
    async def collect() -> None:
        async for delta in stream:
            keep(delta)

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
    return await _serve(request, runtime, principal, spec, include_usage, chat=True, tool_call=body.calls_tools())


@router.post("/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request, runtime: RuntimeDep, principal: PrincipalDep
) -> JSONResponse | StreamingResponse:
    spec = InferenceSpec(model=body.model, max_tokens=body.max_tokens, sampling=_sampling(body), stream=body.stream,
                         prompt=body.prompt_text(), prefix="cmpl",
                         http_request_id=str(getattr(request.state, "request_id", "")),
                         client=client_fields(request.scope))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _serve(request, runtime, principal, spec, include_usage, chat=False,
                        echo=body.prompt_text() if body.echo else None)
