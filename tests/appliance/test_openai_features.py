"""The engine features of the OpenAI API, through a real gateway (HTTPS, the official client):
structured output, n choices, logprobs, speculative decoding, quantized weights, and every field
either honoured or refused with a 400 naming it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest

from engine import LLM, SamplingParams
from tests.appliance.fleet_lab import ENGINE, MODEL, FleetLab

POLICY = {"tenants": {"app": {"allowed_models": ["*"], "rate_limit_rpm": 10000, "max_tokens_per_minute": 100000000},
                      "small": {"allowed_models": ["*"], "rate_limit_rpm": 10000, "max_tokens_per_minute": 400,
                                "max_tokens_per_request": 64}}}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "population_millions": {"type": "integer", "minimum": 0, "maximum": 100},
        "continent": {"enum": ["Europe", "Asia", "Africa", "America", "Oceania"]},
        "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 3},
    },
    "required": ["city", "population_millions", "continent", "landmarks"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[FleetLab]:
    lab = FleetLab(tmp_path_factory.mktemp("features"), model_dir)
    lab.build_single(POLICY, engine={"speculative_tokens": 4})
    try:
        lab.start_gateway()
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="module")
def client(lab: FleetLab) -> openai.OpenAI:
    return lab.client(lab.tenant_key("app"))


def test_json_schema_output_parses_and_validates(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    for seed in (1, 2, 3):
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Describe Paris as JSON."}], max_tokens=200,
            temperature=1.0, seed=seed, response_format=fmt)  # type: ignore[arg-type]
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content or ""), CITY)
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=60, temperature=0,
                                           response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)
    # a schema the engine cannot enforce is a 400 that says why, before anything is generated
    bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "no-such-type"}}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8,
                                       response_format=bad)  # type: ignore[arg-type]
    assert "no-such-type" in str(refused.value.body), refused.value.body


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}


def test_a_required_tool_call_is_a_valid_call_streamed_or_not(client: openai.OpenAI) -> None:
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
           "max_tokens": 60, "temperature": 0, "tools": [WEATHER], "tool_choice": "required"}
    reply = client.chat.completions.create(**ask)  # type: ignore[call-overload]
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])  # type: ignore[index]
    chunks = list(client.chat.completions.create(**ask, stream=True))
    calls = [tc for c in chunks for ch in c.choices for tc in (ch.delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function and calls[0].function.arguments == call.function.arguments
    assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] == ["tool_calls"]
    # the call and its result go back into the conversation; tool_choice "none" answers in text
    follow = client.chat.completions.create(model=MODEL, max_tokens=24, temperature=0, tools=[WEATHER],  # type: ignore
                                            tool_choice="none", messages=[
        *ask["messages"], {"role": "assistant", "tool_calls": [call.model_dump()]},  # type: ignore[misc]
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees celsius and sunny"}])
    assert follow.choices[0].finish_reason in ("stop", "length") and follow.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="tool_choice 'auto'"):
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, tools=[WEATHER])  # type: ignore


def test_n_choices_are_distinct_with_correct_usage_and_stream_as_they_answer(client: openai.OpenAI) -> None:
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a short story about a cat."}],
           "max_tokens": 24, "temperature": 1.0, "seed": 7, "n": 3}
    reply = client.chat.completions.create(**ask)  # type: ignore[call-overload]
    assert [c.index for c in reply.choices] == [0, 1, 2]
    texts = [c.message.content for c in reply.choices]
    assert len(set(texts)) == 3, texts
    assert reply.usage is not None and reply.usage.completion_tokens <= 3 * 24
    assert reply.usage.completion_tokens > 24  # every choice counted, not only the first
    streamed: dict[int, str] = {}
    usage = None
    for chunk in client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
    assert [streamed[i] for i in range(3)] == texts  # the same seed, the same three choices
    assert usage is not None and usage.completion_tokens == reply.usage.completion_tokens


def test_every_choice_counts_against_the_tenants_token_limit(lab: FleetLab) -> None:
    small = lab.client(lab.tenant_key("small"))
    with pytest.raises(openai.RateLimitError):  # 16 choices of 32 tokens: 512 > 400 a minute
        small.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=32, n=16)
    reply = small.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=32, n=2, temperature=0)
    assert len(reply.choices) == 2


def test_logprobs_match_the_returned_tokens(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0,
                                           logprobs=True, top_logprobs=3)
    choice = reply.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    content = choice.logprobs.content
    assert reply.usage is not None and len(content) == reply.usage.completion_tokens
    text = b"".join(bytes(t.bytes or []) for t in content).decode()
    assert (choice.message.content or "") in text  # the text, and at most the end-of-turn token after it
    for t in content:
        assert len(t.top_logprobs) == 3
        values = [alt.logprob for alt in t.top_logprobs]
        assert values == sorted(values, reverse=True) and t.logprob <= 0
        assert t.logprob == pytest.approx(values[0])  # greedy: the sampled token is the most likely
    legacy = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6,
                                       temperature=0, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.text_offset and lp.top_logprobs
    assert "".join(lp.tokens) == legacy.choices[0].text
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert all(len(top) <= 2 for top in lp.top_logprobs)


def test_speculative_decoding_is_greedy_identical_to_the_engine_without_it(client: openai.OpenAI,
                                                                           model_dir: Path) -> None:
    text = ("The quick brown fox jumps over the lazy dog. The lazy dog sleeps in the sun all day, and the fox "
            "runs through the forest looking for food.")
    messages = [{"role": "user", "content": f"Repeat this text exactly: {text}"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=48,  # type: ignore[arg-type]
                                           temperature=0)
    plain = LLM(model_dir, **{**ENGINE, "speculative_tokens": 0})  # the engine itself, no drafting
    [out] = plain.chat(messages, SamplingParams(max_tokens=48, temperature=0))
    assert reply.choices[0].message.content == out.text


def test_unsupported_and_unknown_fields_are_refused_naming_them(client: openai.OpenAI) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    cases: list[tuple[dict[str, object], str]] = [
        ({"functions": tools}, "functions"), ({"logit_bias": {"1": 5}}, "logit_bias"), ({"store": True}, "store"),
        ({"extra_body": {"temprature": 0.5}}, "temprature"), ({"n": 17}, "n"),
        ({"extra_body": {"guided_regex": "a+"}}, "guided_regex"),
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2, **extra)  # type: ignore
        assert refused.value.param == param, (extra, refused.value.body)
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, suffix="y")
    assert refused.value.param == "suffix"
    # values that ask for nothing are accepted: what client libraries send by default
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2, tool_choice="none",
                                           service_tier="auto", store=False)
    assert reply.choices[0].message.content


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[FleetLab]:
    lab = FleetLab(tmp_path_factory.mktemp("int8"), model_dir)
    lab.build_single(POLICY, engine={"quantization": "int8"})
    try:
        lab.start_gateway()
        yield lab
    finally:
        lab.close()


def test_an_int8_model_answers_paris(quantized: FleetLab) -> None:
    client = quantized.client(quantized.tenant_key("app"))
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0)
    assert "Paris" in (reply.choices[0].message.content or "")
