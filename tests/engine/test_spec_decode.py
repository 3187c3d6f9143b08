"""Prompt-lookup speculative decoding on the real model: greedy output identical token for token to
plain decoding, stops and caps inside a drafted chunk, sampled requests beside drafted ones, block
accounting after rollbacks (check_integrity), prefix-cache reuse, and the stats."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import LLM
from engine.core.block_manager import BlockManager
from engine.core.scheduler import Scheduler
from engine.core.sequence import Sequence
from engine.core.spec_decode import accept, can_draft, propose
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from tests.engine.helpers import make_seq

TEXT = ("The quick brown fox jumps over the lazy dog near the river bank. Every morning the farmer walks "
        "to the market with a basket of fresh eggs, warm bread and a jar of honey from his own bees. "
        "On rainy days he stays home, reads old books about sailing, and writes letters to his sister.")
REPEAT = f"Repeat the following text exactly:\n\n{TEXT}"
FREE = "Tell me a story about a dragon."
GREEDY = SamplingParams(max_tokens=40, temperature=0)


# ---- drafting and acceptance (no model) ----------------------------------------------------------
def test_propose_takes_the_latest_earlier_occurrence_of_the_longest_suffix() -> None:
    tokens = [5, 6, 7, 8, 9, 1, 6, 7, 3, 4, 5, 6, 7]
    assert propose(tokens, 3) == [8, 9, 1]  # the 3-gram [5, 6, 7] wins over the later 2-gram [6, 7]
    assert propose([1, 2, 3, 9, 2, 3, 8, 2, 3], 2) == [8, 2]  # 2-gram [2, 3]: latest earlier occurrence
    assert propose([1, 2, 3, 4], 4) == []  # nothing repeats
    assert propose([1, 2, 1, 2], 0) == []
    assert propose([7, 7, 7, 7], 4) == [7]  # an occurrence may overlap the suffix


def test_accept_takes_the_matching_prefix_and_a_bonus_token() -> None:
    assert accept((1, 2, 3), [1, 2, 3, 4]) == [1, 2, 3, 4]
    assert accept((1, 2, 3), [1, 9, 3, 4]) == [1, 9]
    assert accept((1, 2, 3), [8, 2, 3, 4]) == [8]
    with pytest.raises(ValueError, match="expected 3 greedy tokens for 2 drafts; got 2"):
        accept((1, 2), [1, 2])


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=0, logprobs=1),
    SamplingParams(temperature=0, repetition_penalty=1.2),
    SamplingParams(temperature=0, presence_penalty=0.5),
    SamplingParams(temperature=0, min_tokens=5),
])
def test_only_plain_greedy_sequences_draft(params: SamplingParams) -> None:
    seq = make_seq("r", [1, 2, 3, 1, 2], params=params)
    seq.num_computed_tokens = 4
    assert not can_draft(seq)
    plain = make_seq("g", [1, 2, 3, 1, 2], params=SamplingParams(temperature=0))
    plain.num_computed_tokens = 4
    assert can_draft(plain)


# ---- the real model -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spec_llm(engine_model_dir: Path) -> LLM:
    return LLM(model=engine_model_dir, check_integrity=True, max_num_batched_tokens=512, speculative_tokens=4)


def chat_ids(llm: LLM, text: str) -> list[int]:
    return llm.tokenizer.encode_chat([{"role": "user", "content": text}], True)


def same(a: list[RequestOutput], b: list[RequestOutput]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids
        assert x.text == y.text
        assert (x.finish_reason, x.stop_reason) == (y.finish_reason, y.stop_reason)


@pytest.mark.slow
def test_greedy_output_is_identical_and_drafts_are_accepted(llm: LLM, spec_llm: LLM) -> None:
    prompts: list[str | list[int]] = [chat_ids(llm, REPEAT), chat_ids(llm, FREE), TEXT + " " + TEXT[:60]]
    before = spec_llm.stats()
    got = spec_llm.generate(prompts, GREEDY)
    after = spec_llm.stats()
    same(llm.generate(prompts, GREEDY), got)
    drafted = after["spec_draft_tokens"] - before["spec_draft_tokens"]
    accepted = after["spec_accepted_tokens"] - before["spec_accepted_tokens"]
    assert after["spec_chunks"] > before["spec_chunks"]
    assert 0 < accepted <= drafted
    assert llm.stats()["spec_draft_tokens"] == 0  # off by default


@pytest.mark.slow
def test_stop_string_and_max_tokens_inside_a_drafted_chunk(llm: LLM, spec_llm: LLM) -> None:
    prompt = chat_ids(llm, REPEAT)
    full = llm.generate(prompt, GREEDY)[0]
    assert "market" in full.text, full.text  # the model repeats the text: the stop string comes from it
    stop = SamplingParams(max_tokens=40, temperature=0, stop=["market"])
    same(llm.generate(prompt, stop), spec_llm.generate(prompt, stop))
    for cap in (7, 18, 23):  # caps at different offsets into the 5-token chunks
        capped = SamplingParams(max_tokens=cap, temperature=0)
        got = spec_llm.generate(prompt, capped)
        same(llm.generate(prompt, capped), got)
        assert len(got[0].token_ids) == cap and got[0].finish_reason == "length"


@pytest.mark.slow
def test_sampled_requests_beside_drafted_ones_are_unaffected(llm: LLM, spec_llm: LLM) -> None:
    prompts: list[str | list[int]] = [chat_ids(llm, REPEAT), chat_ids(llm, FREE)]
    params = [SamplingParams(max_tokens=32, temperature=0), SamplingParams(max_tokens=32, temperature=0.8, seed=11)]
    before = spec_llm.stats()["spec_chunks"]
    same(llm.generate(prompts, params), spec_llm.generate(prompts, params))
    assert spec_llm.stats()["spec_chunks"] > before  # the greedy one did draft


@pytest.mark.slow
def test_prefix_cache_after_a_speculative_run_gives_the_same_output(llm: LLM, spec_llm: LLM) -> None:
    prompt = chat_ids(llm, REPEAT)
    first = spec_llm.generate(prompt, GREEDY)[0]
    # the next turn's prompt holds the speculatively generated tokens: their cached blocks must be
    # exactly what plain decoding computes
    turn = prompt + first.token_ids + chat_ids(llm, "Now repeat it once more.")[1:]
    again = spec_llm.generate(prompt, GREEDY)[0]
    assert again.num_cached_tokens > 0 and again.token_ids == first.token_ids
    cont = spec_llm.generate(turn, GREEDY)
    assert cont[0].num_cached_tokens >= len(prompt) // 2
    llm.engine.reset_prefix_cache()
    same(llm.generate(turn, GREEDY), cont)


# ---- scheduling (no model) ------------------------------------------------------------------------
def _decoding(num_blocks: int, budget: int) -> tuple[Scheduler, Sequence]:
    sched = Scheduler(BlockManager(num_blocks, 4), 4, 64, speculative_tokens=4)
    seq = make_seq("s", [1, 2, 3, 4, 5, 1, 2, 3], params=SamplingParams(temperature=0, max_tokens=50),
                   max_total_tokens=58)
    sched.add(seq)
    assert [it.num_new_tokens for it in sched.schedule().scheduled] == [8]  # the prompt
    seq.num_computed_tokens = 8
    seq.output_token_ids.append(4)  # [2, 3, 4] occurred at 1: drafts [5, 1, 2, 3]
    sched.max_num_batched_tokens = budget
    return sched, seq


def test_drafts_count_in_the_step_budget_and_get_blocks() -> None:
    sched, seq = _decoding(num_blocks=8, budget=64)
    (item,) = sched.schedule().scheduled
    assert (item.draft, item.num_new_tokens, item.samples) == ((5, 1, 2, 3), 5, True)
    assert len(seq.block_table) == 4  # 9 tokens + 4 drafts in blocks of 4
    sched, seq = _decoding(num_blocks=8, budget=3)
    (item,) = sched.schedule().scheduled
    assert (item.draft, item.num_new_tokens) == ((5, 1), 3)


def test_no_blocks_for_drafts_means_a_plain_decode_not_a_preemption() -> None:
    sched, seq = _decoding(num_blocks=3, budget=64)
    out = sched.schedule()
    assert [(it.draft, it.num_new_tokens) for it in out.scheduled] == [((), 1)]
    assert not out.preempted and len(seq.block_table) == 3
