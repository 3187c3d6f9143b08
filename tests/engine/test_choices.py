"""n > 1 choices (engine/core/choices.py) on the real model: distinct and reproducible when seeded,
identical when greedy, the prompt's blocks shared through the prefix cache, every block back after
an abort (logprobs of each choice: test_logprobs.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from engine import LLM, AsyncEngine, EngineConfig, RequestError, SamplingParams
from engine.core.choices import choice_params
from engine.errors import DuplicateRequestError

STORY = [{"role": "user", "content": "Tell me a short story about a cat who likes to sing in the rain at night."}]


def test_seeded_choices_are_distinct_reproducible_and_share_the_prompt(llm: LLM) -> None:
    prompt = llm.tokenizer.encode_chat(STORY)
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=16, n=3)
    first = llm.generate([prompt], params)
    again = llm.generate([prompt], params)
    assert [o.index for o in first] == [0, 1, 2] and len({o.request_id for o in first}) == 1
    texts = [o.text for o in first]
    assert len(set(texts)) == 3, texts
    assert [o.text for o in again] == texts  # a seed makes the whole request reproducible
    hits = llm.engine.stats()["prefix_cache_hits"]
    third = llm.generate([prompt], params)
    assert [o.text for o in third] == texts
    block = llm.engine.block_manager.block_size
    full = (len(prompt) - 1) // block * block  # full prompt blocks (the last token is always computed)
    # choice 0 finds the prompt of the previous run in the cache as well; each choice took every full block
    assert llm.engine.stats()["prefix_cache_hits"] - hits == 3 * full > 0
    single = llm.generate([prompt], SamplingParams(temperature=1.0, seed=3, max_tokens=16))
    assert single[0].text == texts[0]  # choice 0 keeps the request's seed
    for out in first[1:]:  # the full prompt blocks came from the cache, not recomputed
        assert out.num_cached_tokens == full


def test_greedy_choices_are_identical_and_mixed_batches_keep_their_order(llm: LLM) -> None:
    prompt = llm.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    prompts: list[str | list[int]] = [prompt, "Hello"]
    outs = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=8, n=3),
                                            SamplingParams(temperature=0, max_tokens=4)])
    assert [o.index for o in outs] == [0, 1, 2, 0]
    assert outs[0].text == outs[1].text == outs[2].text and "Paris" in outs[0].text
    assert outs[3].request_id != outs[0].request_id


def test_choice_params_derive_distinct_seeds_and_n_is_bounded() -> None:
    params = SamplingParams(seed=5, n=4)
    seeds = [choice_params(params, i).seed for i in range(4)]
    assert seeds[0] == 5 and len(set(seeds)) == 4 and all(0 <= s < 2**63 for s in seeds)  # type: ignore[operator]
    assert all(choice_params(params, i).n == 1 for i in range(4))
    assert choice_params(SamplingParams(n=2), 1).seed is None
    with pytest.raises(ValueError, match="n must be an integer in"):
        SamplingParams(n=17)


def test_async_choices_stream_and_an_abort_frees_every_block(engine_model_dir: Path) -> None:
    async def main() -> tuple[dict[int, str], dict[str, object]]:
        engine = AsyncEngine(EngineConfig(model=engine_model_dir, kv_cache_bytes=64 << 20, max_num_seqs=8,
                                          check_integrity=True))
        await engine.start()
        try:
            prompt = engine.tokenizer.encode_chat(STORY)
            texts: dict[int, str] = {}
            async for d in engine.generate("r", prompt, SamplingParams(temperature=1.0, seed=9, max_tokens=12, n=3)):
                texts[d.index] = texts.get(d.index, "") + d.text
                assert d.request_id == "r"
            dup = engine.generate("dup", prompt, SamplingParams(max_tokens=32, n=2))
            await anext(dup)
            with pytest.raises(DuplicateRequestError, match="dup"):  # a user id in flight, n > 1 or not
                async for _ in engine.generate("dup", prompt, SamplingParams(max_tokens=2)):
                    pass
            await dup.aclose()
            with pytest.raises(RequestError, match="NUL"):
                async for _ in engine.generate("bad\x00id", prompt, SamplingParams(max_tokens=2)):
                    pass
            stream = engine.generate("gone", prompt, SamplingParams(temperature=1.0, max_tokens=64, n=4))
            seen = 0
            async for _ in stream:
                seen += 1
                if seen == 6:
                    break
            await stream.aclose()  # the consumer leaves: every choice is aborted
            for _ in range(100):
                if engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0:
                    break
                await asyncio.sleep(0.05)
            return texts, engine.stats()
        finally:
            await engine.shutdown()

    texts, stats = asyncio.run(main())
    assert sorted(texts) == [0, 1, 2] and len(set(texts.values())) == 3
    assert stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_cache_usage"] == 0.0

