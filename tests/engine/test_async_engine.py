"""AsyncEngine: concurrent streams equal offline results; bad requests fail alone; abort."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from engine import LLM, AsyncEngine, EngineConfig, PromptTooLongError, SamplingParams, StreamDelta

pytestmark = pytest.mark.slow

PROMPTS = ["The sun is", "Water boils at", "My favourite book is", "def add(a, b):"]


async def _collect(engine: AsyncEngine, rid: str, prompt: str, params: SamplingParams) -> list[StreamDelta]:
    return [d async for d in engine.generate(rid, prompt, params, cache_salt="t1", priority=0)]


def test_concurrent_streams_equal_offline(engine_model_dir: Path, llm: LLM) -> None:
    params = SamplingParams(temperature=0, max_tokens=16, stop=["\n\n"])
    offline = llm.generate(PROMPTS, params)

    async def main() -> tuple[list[list[StreamDelta]], dict[str, float | int]]:
        engine = AsyncEngine(EngineConfig(model=engine_model_dir, check_integrity=True))
        await engine.start()
        try:
            streams = await asyncio.gather(
                *(_collect(engine, f"r{i}", p, params) for i, p in enumerate(PROMPTS))
            )
            return list(streams), engine.stats()
        finally:
            await engine.shutdown()

    streams, stats = asyncio.run(main())
    for deltas, off in zip(streams, offline, strict=True):
        assert "".join(d.text for d in deltas) == off.text
        assert [t for d in deltas for t in d.token_ids] == off.token_ids
        assert deltas[-1].finished and deltas[-1].finish_reason == off.finish_reason
        assert all(not d.finished for d in deltas[:-1])
        assert deltas[-1].num_output_tokens == len(off.token_ids)
    assert stats["running"] == 0 and stats["waiting"] == 0


def test_bad_request_fails_alone_and_abort(engine_model_dir: Path) -> None:
    async def main() -> None:
        engine = AsyncEngine(EngineConfig(model=engine_model_dir, max_model_len=32, check_integrity=True))
        await engine.start()
        try:
            assert "assistant" in engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
            with pytest.raises(PromptTooLongError):
                async for _ in engine.generate("too-long", [5] * 40, SamplingParams()):
                    pass
            # abort a long request mid-stream; another one still completes
            long_params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
            deltas: list[StreamDelta] = []

            async def consume() -> None:
                async for d in engine.generate("long", "Tell me a story", long_params):
                    deltas.append(d)
                    if len(deltas) == 2:
                        await engine.abort("long")

            short = asyncio.create_task(_collect(engine, "short", "Hi", SamplingParams(max_tokens=3)))
            await consume()
            assert deltas[-1].finish_reason == "abort" and deltas[-1].num_output_tokens < 20
            assert (await short)[-1].finished
            await asyncio.sleep(0.2)
            assert engine.stats()["kv_cache_usage"] == 0.0
        finally:
            await engine.shutdown()

    asyncio.run(main())
