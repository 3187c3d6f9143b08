"""Structured output on the real model: json_object, json_schema (validated), regex, Lark grammar;
greedy and sampled; unguided rows in a mixed batch untouched; bad specs refused; through the node server."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from engine import LLM, SamplingParams, StreamDelta
from engine.guided import GuidedDecoding, GuidedSpecError
from engine.remote import RemoteEngine
from tests.engine.node_server import node_server
from tests.engine.tls_certs import TlsSet, make_tls_set

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}


def _chat(llm: LLM, text: str) -> str:
    return llm.tokenizer.apply_chat_template([{"role": "user", "content": text}])


def test_json_object_greedy_parses(llm: LLM) -> None:
    prompt = _chat(llm, 'Reply with a JSON object like {"city": ..., "country": ...} for Paris.')
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=300, guided={"json_object": True}))[0]
    assert out.finish_reason == "stop", out.text
    assert isinstance(json.loads(out.text), dict)


def test_json_schema_sampled_validates_over_seeds(llm: LLM) -> None:
    prompt = _chat(llm, "Describe a person as JSON.")
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=160, guided={"json_schema": SCHEMA})
              for seed in range(4)]
    outs = llm.generate([prompt] * len(params), params)
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)
    assert len({o.text for o in outs}) > 1  # sampled: the seeds give different documents


def test_regex_greedy_and_sampled_match_fully(llm: LLM) -> None:
    prompt = _chat(llm, "When did the Berlin wall fall? Answer with a date.")
    spec = {"regex": r"\d{4}-\d{2}-\d{2}"}
    params = [SamplingParams(temperature=0, max_tokens=20, guided=spec),
              SamplingParams(temperature=1.0, seed=7, max_tokens=20, guided=spec)]
    for out in llm.generate([prompt, prompt], params):
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", out.text), out.text
        assert out.finish_reason == "stop"


def test_lark_grammar(llm: LLM) -> None:
    grammar = 'start: "The answer is " ANSWER "."\nANSWER: "yes" | "no"'
    out = llm.generate([_chat(llm, "Is Paris in France?")],
                       SamplingParams(temperature=0, max_tokens=20, guided={"grammar": grammar}))[0]
    assert out.text in ("The answer is yes.", "The answer is no."), out.text


def test_mixed_batch_leaves_unguided_rows_identical(llm: LLM) -> None:
    plain = [_chat(llm, "What is the capital of France?"), "Once upon a time"]
    greedy = SamplingParams(temperature=0, max_tokens=24)
    alone = llm.generate(plain, greedy)
    mixed = llm.generate([plain[0], _chat(llm, "A person as JSON."), plain[1]],
                         [greedy, SamplingParams(temperature=0, max_tokens=80, guided={"json_schema": SCHEMA}), greedy])
    assert [mixed[0].token_ids, mixed[2].token_ids] == [alone[0].token_ids, alone[1].token_ids]
    jsonschema.validate(json.loads(mixed[1].text), SCHEMA)


@pytest.mark.parametrize(("spec", "message"), [
    ({"json_schema": {"type": "frobnicate"}}, "guided.json_schema is invalid: .*frobnicate"),
    ({"json_schema": {"$ref": "#/definitions/missing"}}, "guided.json_schema is invalid"),
    ({"json_schema": "not a schema"}, "guided.json_schema must be a JSON schema object"),
    ({"regex": "(unclosed"}, "guided.regex is invalid: .*unclosed group"),
    ({"grammar": "start: undefined_rule"}, "guided.grammar is invalid: .*undefined_rule"),
    ({"json_object": "yes"}, "guided.json_object must be true"),
])
def test_bad_spec_is_a_request_error(engine_model_dir: Path, spec: dict[str, object], message: str) -> None:
    guided = GuidedDecoding(engine_model_dir / "tokenizer.json", 49152, (2,))
    with pytest.raises(GuidedSpecError, match=f"(?s){message}"):
        guided.validate(spec)
    guided.validate({"json_schema": SCHEMA})
    guided.validate({"json_schema": SCHEMA})  # the second time from the cache
    assert guided.compiler.cache_len() == 1


def test_a_tokenizer_llguidance_cannot_read_refuses_guided_requests_only(tmp_path: Path) -> None:
    # a word-level tokenizer with no decoder (what the synthetic benchmark models have): the engine
    # must still start and serve; a guided request is then its own clear error
    vocab = {f"t{i}": i for i in range(300)}
    (tmp_path / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}}))
    guided = GuidedDecoding(tmp_path / "tokenizer.json", 300, (2,))  # builds nothing yet
    with pytest.raises(GuidedSpecError, match="not available for this model"):
        guided.validate({"json_object": True})


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsSet:
    return make_tls_set(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def node(engine_model_dir: Path, tls: TlsSet) -> Iterator[str]:
    with node_server(engine_model_dir, tls) as url:
        yield url


def test_guided_request_through_node_server(node: str, tls: TlsSet, llm: LLM) -> None:
    prompt = _chat(llm, "Describe a person as JSON.")
    params = SamplingParams(temperature=0, max_tokens=120, guided={"json_schema": SCHEMA})
    offline = llm.generate([prompt], params)[0]

    async def main() -> list[StreamDelta]:
        remote = RemoteEngine(node, ca_cert=tls.ca, client_cert=tls.client.cert, client_key=tls.client.key)
        await remote.start()
        try:
            return [d async for d in remote.generate("guided", prompt, params)]
        finally:
            await remote.shutdown()

    deltas = asyncio.run(main())
    text = "".join(d.text for d in deltas)
    jsonschema.validate(json.loads(text), SCHEMA)
    assert text == offline.text and deltas[-1].finish_reason == "stop"
