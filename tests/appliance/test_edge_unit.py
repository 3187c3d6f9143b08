"""The edge's parts on their own: limits configuration, the refusal budget's arithmetic (a manual
clock instead of sleeping), the request model's clamps and caps, and the middleware around a small
in-process ASGI app that fails on purpose (the one way to reach a 500; the gateway tests cover the
real app over HTTPS)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from appliance.gateway.edge import EdgeLimits, EdgeMiddleware
from appliance.gateway.errors import truncate_echo
from appliance.gateway.refusals import RefusalBudget
from appliance.openai_schema import ChatCompletionRequest, RequestLimits, request_limits

BASE: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_edge_limits_defaults_mapping_and_bad_values() -> None:
    limits = EdgeLimits()
    assert limits.max_body_bytes == 4 * 1024 * 1024 and limits.request_limits() == RequestLimits()
    assert EdgeLimits.from_mapping({"max_body_bytes": 1024, "header_read_timeout_s": 2}).max_body_bytes == 1024
    with pytest.raises(ValueError, match=r"unknown edge limits \['max_bodybytes'\]"):
        EdgeLimits.from_mapping({"max_bodybytes": 1})
    with pytest.raises(ValueError, match="max_body_bytes must be a number > 0, found 0"):
        EdgeLimits(max_body_bytes=0)
    with pytest.raises(ValueError, match=r"max_messages must be an integer, found 2\.5"):
        EdgeLimits(max_messages=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_connections must be a number > 0, found True"):
        EdgeLimits(max_connections=True)


def test_refusal_budget_blocks_after_budget_and_drains_per_minute() -> None:
    clock = FakeClock()
    budget = RefusalBudget(per_minute=6, clock=clock)  # drains one refusal every 10 s
    for _ in range(5):
        assert not budget.charge("10.0.0.1", "k1")
        assert budget.blocked("10.0.0.1") is None
    assert budget.charge("10.0.0.1", "k1")  # the sixth: now over
    assert budget.blocked("10.0.0.1") == 10 and budget.blocked(None, "k1") == 10
    assert budget.blocked("10.0.0.2", "k2") is None  # other sources are untouched
    clock.now += 9.9
    assert budget.blocked("10.0.0.1") == 1
    clock.now += 0.2
    assert budget.blocked("10.0.0.1") is None


def test_refusal_budget_forgets_the_oldest_sources_first() -> None:
    budget = RefusalBudget(per_minute=1, max_sources=3, clock=FakeClock())
    for i in range(5):
        budget.charge(f"10.0.0.{i}")
    assert len(budget) == 3
    assert budget.blocked("10.0.0.0") is None and budget.blocked("10.0.0.4") is not None
    with pytest.raises(ValueError, match="per_minute must be an integer >= 1, found 0"):
        RefusalBudget(per_minute=0)


def test_sampling_values_are_clamped_to_what_the_sampler_honours() -> None:
    tiny = ChatCompletionRequest.model_validate({**BASE, "temperature": 1e-300, "top_p": 1e-300, "seed": -1})
    values = tiny.sampling()
    assert values.temperature == 0.0 and values.top_p == 1e-5 and values.seed == 2**63 - 1
    defaults = ChatCompletionRequest.model_validate({**BASE, "stop": "END"}).sampling()
    assert (defaults.temperature, defaults.top_p, defaults.seed, defaults.stop) == (1.0, 1.0, None, ["END"])


def test_configured_request_limits_apply_through_the_context() -> None:
    token = request_limits.set(RequestLimits(max_messages=2, max_total_chars=5))
    try:
        with pytest.raises(ValidationError, match="at most 2 messages are allowed, found 3"):
            ChatCompletionRequest.model_validate({**BASE, "messages": [{"role": "user", "content": "a"}] * 3})
        with pytest.raises(ValidationError, match="at most 5 characters in all, found 6"):
            ChatCompletionRequest.model_validate({**BASE, "messages": [{"role": "user", "content": "abcdef"}]})
    finally:
        request_limits.reset(token)
    ChatCompletionRequest.model_validate({**BASE, "messages": [{"role": "user", "content": "abcdef"}] * 3})


def test_truncate_echo() -> None:
    assert truncate_echo("short") == "short"
    assert truncate_echo("x" * 1000) == "x" * 64 + "…"


async def _failing_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["path"] == "/own-id":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-request-id", b"chatcmpl-1")]})
        await send({"type": "http.response.body", "body": b"{}"})
        return
    raise RuntimeError("secret detail that must stay in the server log")


def _call(app: Any, path: str) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edge") as client:
            return await client.get(path)

    return asyncio.run(go())


def test_uncaught_exception_is_a_500_envelope_naming_the_request_id(caplog: pytest.LogCaptureFixture) -> None:
    app = EdgeMiddleware(_failing_app, EdgeLimits(), RefusalBudget())
    with caplog.at_level(logging.ERROR, logger="appliance.gateway.edge"):
        resp = _call(app, "/boom")
    request_id = resp.headers["x-request-id"]
    assert resp.status_code == 500
    assert resp.json() == {"error": {"message": f"internal error (request id {request_id})", "type": "server_error",
                                     "param": None, "code": "internal_error"}}
    assert "secret detail" not in resp.text
    assert request_id in caplog.text and "secret detail" in caplog.text and "Traceback" in caplog.text


def test_a_routes_own_request_id_is_kept_not_doubled() -> None:
    resp = _call(EdgeMiddleware(_failing_app, EdgeLimits(), RefusalBudget()), "/own-id")
    assert resp.headers.get_list("x-request-id") == ["chatcmpl-1"]
