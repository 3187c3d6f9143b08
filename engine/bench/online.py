"""Online latency: requests arrive as a Poisson process at a set rate and stream through AsyncEngine.

Per request: TTFT (arrival -> first token), TPOT (mean time per output token after the first),
end-to-end latency. Reported as p50/p99 per rate, with the achieved output throughput.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass
from typing import Any

from engine.bench.offline import exact_length_params
from engine.bench.workload import BenchRequest, percentile


@dataclass
class RequestTiming:
    ttft: float
    tpot: float
    e2e: float
    output_tokens: int


@dataclass
class OnlineResult:
    rate: float  # requests per second (inf = all at once)
    seconds: float
    timings: list[RequestTiming]

    def summary(self) -> dict[str, Any]:
        ttft = [t.ttft for t in self.timings]
        tpot = [t.tpot for t in self.timings if t.output_tokens > 1]
        e2e = [t.e2e for t in self.timings]
        out = sum(t.output_tokens for t in self.timings)
        return {
            "rate": "inf" if math.isinf(self.rate) else self.rate,
            "requests": len(self.timings),
            "seconds": self.seconds,
            "output_tokens_per_s": out / self.seconds if self.seconds else 0.0,
            "ttft_p50_ms": 1e3 * percentile(ttft, 50), "ttft_p99_ms": 1e3 * percentile(ttft, 99),
            "tpot_p50_ms": 1e3 * percentile(tpot, 50), "tpot_p99_ms": 1e3 * percentile(tpot, 99),
            "e2e_p50_s": percentile(e2e, 50), "e2e_p99_s": percentile(e2e, 99),
        }


def arrival_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Seconds after the start at which each request arrives (exponential gaps; 0 for rate=inf)."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


async def _one(engine: Any, rid: str, req: BenchRequest, arrive_at: float) -> RequestTiming:
    delay = arrive_at - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    t0 = time.perf_counter()
    first: float | None = None
    n = 0
    async for delta in engine.generate(rid, req.prompt_ids, exact_length_params(req)):
        if delta.token_ids and first is None:
            first = time.perf_counter()
        n += len(delta.token_ids)
    end = time.perf_counter()
    first = first or end
    return RequestTiming(ttft=first - t0, tpot=(end - first) / (n - 1) if n > 1 else 0.0, e2e=end - t0,
                         output_tokens=n)


async def run_online(engine: Any, requests: list[BenchRequest], rate: float, seed: int = 0,
                     tag: str = "online") -> OnlineResult:
    """`engine` is a started engine.AsyncEngine (or anything with its generate())."""
    start = time.perf_counter()
    offsets = arrival_offsets(len(requests), rate, seed)
    timings = await asyncio.gather(*(
        _one(engine, f"{tag}-{rate}-{i}", r, start + off) for i, (r, off) in enumerate(zip(requests, offsets,
                                                                                           strict=True))
    ))
    return OnlineResult(rate, time.perf_counter() - start, list(timings))
