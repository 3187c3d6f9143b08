"""SLA scheduling on the real tiny model (CPU) through AsyncEngine: a high-priority request that
arrives while low-priority ones fill every slot gets its first token before they finish (one of
them is preempted, keeps its cached prefix and still produces the same greedy text); deadlines
end a running and a waiting request with finish reason "deadline" and free their blocks."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import pytest

from engine import AsyncEngine, EngineConfig, RequestError, SamplingParams, StreamDelta

pytestmark = pytest.mark.slow

LOW = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
HIGH = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
HIGH_PROMPT = "The capital of France is"
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle. Once upon a time"


def test_high_priority_gets_its_first_token_before_running_low_priority_requests_finish(
    engine_model_dir: Path,
) -> None:
    events: list[tuple[str, str]] = []  # (request id, "token" | "finished"), in the order seen

    async def consume(engine: AsyncEngine, rid: str, prompt: str, params: SamplingParams, priority: int,
                      tenant: str) -> list[StreamDelta]:
        deltas = []
        async for d in engine.generate(rid, prompt, params, priority=priority, tenant=tenant):
            deltas.append(d)
            if d.token_ids:
                events.append((rid, "token"))
            if d.finished:
                events.append((rid, "finished"))
        return deltas

    async def main() -> tuple[dict[str, list[StreamDelta]], dict[str, object]]:
        engine = AsyncEngine(EngineConfig(model=engine_model_dir, max_num_seqs=2, check_integrity=True))
        await engine.start()
        try:
            lows = [asyncio.create_task(consume(engine, f"low{i}", PROMPT, LOW, 2, "batch")) for i in range(2)]
            while sum(1 for _, kind in events if kind == "token") < 8:  # both low requests decoding
                await asyncio.sleep(0.01)
            high = asyncio.create_task(consume(engine, "high", HIGH_PROMPT, HIGH, 0, "interactive"))
            results = await asyncio.gather(*lows, high)
            base, per_token = engine.core.scheduler.cost.fit() or (-1.0, -1.0)  # steps were timed
            assert base >= 0 and per_token > 0
            return {"low0": results[0], "low1": results[1], "high": results[2]}, engine.stats()
        finally:
            await engine.shutdown()

    out, stats = asyncio.run(main())
    first_high = events.index(("high", "token"))
    assert first_high < events.index(("low0", "finished"))
    assert first_high < events.index(("low1", "finished"))
    assert stats["preemptions_by_reason"] == {"priority_slot": 1}
    texts = {rid: [t for d in deltas for t in d.token_ids] for rid, deltas in out.items()}
    # the preempted request recomputed from its cached prefix and continued exactly where it was
    assert texts["low0"] == texts["low1"] and len(texts["low0"]) == 48
    assert all(out[rid][-1].finish_reason == "length" for rid in out)
    preempted = next(rid for rid in ("low0", "low1") if out[rid][-1].num_cached_tokens > 0)
    assert out[preempted][-1].num_cached_tokens >= 16
    served = stats["tenant_served_tokens"]
    assert isinstance(served, dict) and served["interactive"] == out["high"][-1].num_prompt_tokens + 4
    assert stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_cache_usage"] == 0.0


def test_deadline_ends_running_and_waiting_requests(engine_model_dir: Path) -> None:
    async def main() -> tuple[list[StreamDelta], list[StreamDelta], list[StreamDelta], dict[str, object]]:
        engine = AsyncEngine(EngineConfig(model=engine_model_dir, max_num_seqs=1, check_integrity=True))
        await engine.start()
        try:
            long = SamplingParams(temperature=0, max_tokens=4000, ignore_eos=True)
            for bad, message in (({"deadline": math.nan}, "deadline must be a finite"),
                                 ({"tpot_target_s": 0.0}, "tpot_target_s must be a number of seconds > 0"),
                                 ({"tenant": ""}, "tenant must be 1 to 256 characters")):
                with pytest.raises(RequestError, match=message):
                    async for _ in engine.generate("bad", PROMPT, long, **bad):  # type: ignore[arg-type]
                        pass
            stream = engine.generate("running", PROMPT, long, priority=1, deadline=time.time() + 3.0)
            first = await anext(stream)  # running (holds the only slot) before the others arrive
            waiting = asyncio.create_task(_collect(engine, "waiting", long, deadline=time.time() + 1.0))
            after = asyncio.create_task(_collect(engine, "after", SamplingParams(temperature=0, max_tokens=3)))
            running = [first] + [d async for d in stream]
            got = await asyncio.gather(waiting, after)
            return running, got[0], got[1], engine.stats()
        finally:
            await engine.shutdown()

    running, waiting, after, stats = asyncio.run(main())
    assert running[-1].finished and running[-1].finish_reason == "deadline"
    assert 0 < running[-1].num_output_tokens < 4000
    assert waiting[-1].finish_reason == "deadline" and waiting[-1].num_output_tokens == 0
    assert after[-1].finish_reason == "length" and after[-1].num_output_tokens == 3  # the slot came back
    assert stats["num_deadline_misses"] == 2
    assert stats["deadline_misses_by_state"] == {"running": 1, "waiting": 1}
    assert stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_cache_usage"] == 0.0


async def _collect(engine: AsyncEngine, rid: str, params: SamplingParams,
                   deadline: float | None = None) -> list[StreamDelta]:
    return [d async for d in engine.generate(rid, PROMPT, params, priority=1, deadline=deadline)]
