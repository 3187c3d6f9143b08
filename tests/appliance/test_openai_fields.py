"""The request schema's field policy, without a server: every field honoured or refused by name,
inert values accepted, response_format bounded (size, depth), and the sampling values handed on."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from appliance.openai_completions import CompletionRequest
from appliance.openai_fields import REFUSED_CHAT, REFUSED_COMPLETIONS
from appliance.openai_schema import ChatCompletionRequest, RequestLimits, request_limits

BASE: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _refused(model: type[Any], body: dict[str, Any]) -> tuple[str, str]:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    err = caught.value.errors()[0]
    return ".".join(str(p) for p in err["loc"]), str(err["msg"])


@pytest.mark.parametrize("field", sorted(REFUSED_CHAT))
def test_each_unimplemented_chat_field_is_refused_by_name_and_inert_values_pass(field: str) -> None:
    loc, msg = _refused(ChatCompletionRequest, {**BASE, field: {"anything": 1}})
    assert loc == field and "leave " + field + " out" in msg
    for inert in (None, False, [], {}, *REFUSED_CHAT[field][0]):
        ChatCompletionRequest.model_validate({**BASE, field: inert})


@pytest.mark.parametrize("field", sorted(REFUSED_COMPLETIONS))
def test_each_unimplemented_completions_field_is_refused_by_name(field: str) -> None:
    loc, _ = _refused(CompletionRequest, {"model": "m", "prompt": "x", field: "some value"})
    assert loc == field


def test_unknown_fields_are_refused_not_ignored() -> None:
    assert _refused(ChatCompletionRequest, {**BASE, "temprature": 0.2})[0] == "temprature"
    assert _refused(CompletionRequest, {"model": "m", "prompt": "x", "max_token": 3})[0] == "max_token"
    assert _refused(ChatCompletionRequest, {**BASE, "stream_options": {"include_usage": True, "x": 1}})[0] \
        == "stream_options.x"
    message = {"role": "user", "content": "a", "function_call": {"name": "f"}}
    assert _refused(ChatCompletionRequest, {**BASE, "messages": [message]})[0] == "messages.0.function_call"


def test_sampling_values_carry_n_logprobs_response_format_and_extensions() -> None:
    req = ChatCompletionRequest.model_validate({
        **BASE, "n": 4, "logprobs": True, "top_logprobs": 5, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}})
    values = req.sampling()
    assert (values.n, values.logprobs, values.top_k, values.min_p, values.repetition_penalty) == (4, 5, 20, 0.05, 1.1)
    assert values.guided == {"json_schema": {"type": "object"}}
    plain = ChatCompletionRequest.model_validate({**BASE, "response_format": {"type": "text"}}).sampling()
    assert (plain.n, plain.logprobs, plain.guided, plain.top_k) == (1, None, None, -1)
    no_schema = {"type": "json_schema", "json_schema": {"name": "x"}}
    assert ChatCompletionRequest.model_validate({**BASE, "response_format": no_schema}).sampling().guided \
        == {"json_object": True}
    assert ChatCompletionRequest.model_validate({**BASE, "logprobs": True}).sampling().logprobs == 0


@pytest.mark.parametrize("body,where", [
    ({"top_logprobs": 2}, "needs logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"n": 17}, "n"), ({"n": 0}, "n"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!"}}}, "name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "not an object"}}}, "schema"),
])
def test_bad_values_of_the_new_fields_are_refused(body: dict[str, Any], where: str) -> None:
    loc, msg = _refused(ChatCompletionRequest, {**BASE, **body})
    assert where in loc or where in msg, (loc, msg)


def test_response_format_schemas_are_bounded_in_size_and_depth() -> None:
    big = {"type": "object", "description": "x" * 70000}
    _, msg = _refused(ChatCompletionRequest, {**BASE, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": big}}})
    assert "at most 65536 characters" in msg
    token = request_limits.set(RequestLimits(max_schema_chars=200_000))
    try:
        ChatCompletionRequest.model_validate({**BASE, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": big}}})
    finally:
        request_limits.reset(token)
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(40):
        deep = {"type": "array", "items": deep}
    _, msg = _refused(ChatCompletionRequest, {**BASE, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": deep}}})
    assert "levels deep" in msg


def test_completions_n_best_of_echo_and_logprobs() -> None:
    req = CompletionRequest.model_validate({"model": "m", "prompt": "x", "n": 3, "best_of": 3, "logprobs": 5,
                                            "echo": False})
    assert (req.sampling().n, req.sampling().logprobs) == (3, 5)
    assert "best_of" in _refused(CompletionRequest, {"model": "m", "prompt": "x", "n": 2, "best_of": 3})[1]
    assert "echo" in _refused(CompletionRequest, {"model": "m", "prompt": "x", "echo": True, "logprobs": 1})[1]
    assert _refused(CompletionRequest, {"model": "m", "prompt": "x", "logprobs": 6})[0] == "logprobs"


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "get_time"}}]


def test_tools_become_a_call_schema_and_a_system_message() -> None:
    req = ChatCompletionRequest.model_validate({**BASE, "tools": TOOLS, "tool_choice": "required"})
    guided = req.sampling().guided
    assert guided is not None and [o["properties"]["name"]["const"] for o in guided["json_schema"]["anyOf"]] \
        == ["get_weather", "get_time"]
    shown = req.template_messages()
    assert shown[0]["role"] == "system" and "get_weather" in shown[0]["content"] and shown[1]["content"] == "hi"
    named = ChatCompletionRequest.model_validate({**BASE, "tools": TOOLS, "tool_choice": {
        "type": "function", "function": {"name": "get_time"}}}).sampling().guided
    assert named == {"json_schema": {"type": "object", "properties": {
        "name": {"const": "get_time"}, "arguments": {"type": "object"}}, "required": ["name", "arguments"],
        "additionalProperties": False}}
    none = ChatCompletionRequest.model_validate({**BASE, "tools": TOOLS, "tool_choice": "none"})
    assert none.sampling().guided is None and not none.calls_tools() and len(none.template_messages()) == 1


@pytest.mark.parametrize("body,what", [
    ({"tools": TOOLS}, "tool_choice 'auto'"),
    ({"tools": TOOLS, "tool_choice": "auto"}, "tool_choice 'auto'"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
    ({"tools": TOOLS + TOOLS[:1], "tool_choice": "required"}, "unique"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "send one of them"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}], "tool_choice": "required"}, "function name"),
])
def test_tool_requests_that_cannot_be_honoured_are_refused(body: dict[str, Any], what: str) -> None:
    _, msg = _refused(ChatCompletionRequest, {**BASE, **body})
    assert what in msg, msg


def test_an_earlier_call_and_its_result_are_part_of_the_prompt() -> None:
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                    "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]
    shown = ChatCompletionRequest.model_validate({**BASE, "messages": messages}).template_messages()
    assert shown[1]["content"] == '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert shown[2] == {"role": "tool", "content": "18 C, sunny"}
