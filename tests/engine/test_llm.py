"""LLM end to end on the real model: stops, seeds, prefix cache, abort, preemption, bad input."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from engine import LLM, InsufficientKVCacheError, PromptTooLongError, RequestError, SamplingParams
from engine.core.sequence import SequenceStatus

pytestmark = pytest.mark.slow

STORY = "Once upon a time"


def test_stop_string_truncates_and_finishes(llm: LLM) -> None:
    full = llm.generate([STORY], SamplingParams(temperature=0, max_tokens=20))[0].text
    word = full.split()[3]
    out = llm.generate([STORY], SamplingParams(temperature=0, max_tokens=20, stop=[word]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == word
    assert word not in out.text and full.startswith(out.text)


def test_stop_token_ids_and_max_tokens(llm: LLM) -> None:
    base = llm.generate([STORY], SamplingParams(temperature=0, max_tokens=6))[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 6
    stop_at = base.token_ids[3]
    out = llm.generate([STORY], SamplingParams(temperature=0, max_tokens=6, stop_token_ids=[stop_at]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    assert out.token_ids == base.token_ids[: base.token_ids.index(stop_at) + 1]


def test_seeded_sampling_is_reproducible(llm: LLM) -> None:
    p = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=12, seed=7)
    a = llm.generate([STORY], p)[0].token_ids
    b = llm.generate([STORY, "Hello"], [p, SamplingParams(max_tokens=12)])[0].token_ids
    assert a == b


def test_logprobs_returned_per_token(llm: LLM) -> None:
    out = llm.generate([STORY], SamplingParams(temperature=0, max_tokens=3, logprobs=2))[0]
    assert out.logprobs is not None and len(out.logprobs) == 3
    for tok, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert tok in lp and lp[tok] == max(lp.values())


def test_prefix_cache_shared_per_salt_only(llm: LLM) -> None:
    prompt = "The history of the printing press begins in " * 4
    params = SamplingParams(temperature=0, max_tokens=2)
    first = llm.generate([prompt], params, cache_salt="tenant-a")[0]
    same = llm.generate([prompt], params, cache_salt="tenant-a")[0]
    other = llm.generate([prompt], params, cache_salt="tenant-b")[0]
    assert first.num_cached_tokens == 0
    assert same.num_cached_tokens >= 16
    assert other.num_cached_tokens == 0
    assert first.token_ids == same.token_ids == other.token_ids


def test_abort_frees_blocks_at_once(llm: LLM) -> None:
    core = llm.engine
    free_before = core.block_manager.num_free_blocks
    seq = core.add_request("abort-me", "Tell me a long story about dragons", SamplingParams(max_tokens=50))
    core.step()
    assert core.block_manager.num_free_blocks < free_before
    core.abort("abort-me")
    assert seq.status is SequenceStatus.FINISHED and seq.finish_reason == "abort"
    assert core.block_manager.num_free_blocks == free_before
    core.check_integrity()
    assert not core.has_unfinished()


def test_preemption_under_tiny_kv_budget_is_still_exact(
    engine_model_dir: Path, hf_greedy: Callable[[list[int], int], list[int]]
) -> None:
    # 8 blocks of 4 tokens = 32 tokens of KV for three ~20-token sequences: forces preemption.
    per_block = 2 * 30 * 4 * 3 * 64 * 4
    tiny = LLM(model=engine_model_dir, block_size=4, kv_cache_bytes=8 * per_block, check_integrity=True)
    prompts = ["The sun is", "Water boils at", "My favourite book is"]
    params = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    outs = tiny.generate(prompts, params)
    assert tiny.stats()["num_preemptions"] > 0
    for p, o in zip(prompts, outs, strict=True):
        assert o.token_ids == hf_greedy(tiny.tokenizer.encode(p), 14), p


def test_bad_requests_raise_request_errors(engine_model_dir: Path) -> None:
    per_block = 2 * 30 * 16 * 3 * 64 * 4
    small = LLM(model=engine_model_dir, max_model_len=64, kv_cache_bytes=2 * per_block)
    with pytest.raises(PromptTooLongError, match="prompt has 70 tokens; max_model_len 64"):
        small.generate([[5] * 70], SamplingParams(max_tokens=1))
    with pytest.raises(InsufficientKVCacheError, match="the KV cache holds 32 tokens"):
        small.generate([[5] * 30], SamplingParams(max_tokens=10))
    with pytest.raises(RequestError, match="token ids must be in"):
        small.generate([[10**6]], SamplingParams(max_tokens=1))
    out = small.generate([[5] * 10], SamplingParams(temperature=0, max_tokens=4))[0]  # still serves
    assert len(out.token_ids) == 4
