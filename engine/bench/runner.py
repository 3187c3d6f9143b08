"""`python -m engine bench` on CPU: offline throughput vs transformers, then online latency.

Offline: the same seeded workload goes through our engine and through transformers' batched
`generate`, alternating `repeats` times so both see the same background load; reported are the
median tokens/s of each and the median of the per-repeat ratios. The prefix cache is reset before
every engine run (random prompts share no prefix anyway; this makes it explicit).
"""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
from pathlib import Path
from typing import Any

import torch

from engine.bench.hf_reference import load_hf_model, run_hf_generate
from engine.bench.offline import run_offline
from engine.bench.online import run_online
from engine.bench.workload import WorkloadSpec, make_workload


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "load_avg_1m": round(load[0], 2)}


def run_offline_compare(
    model: Path, spec: WorkloadSpec, device: str, dtype: str, compare_transformers: bool,
    hf_batch_size: int, repeats: int, engine_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    from engine import LLM

    llm = LLM(model=model, device=device, dtype=dtype, **(engine_kwargs or {}))
    requests = make_workload(spec, llm.engine.model_config.vocab_size)
    ref = load_hf_model(model, device, dtype) if compare_transformers else None
    runs: list[dict[str, Any]] = []
    match = None
    for _ in range(repeats):
        llm.engine.block_manager.reset_prefix_cache()
        ours = run_offline(llm, requests)
        run: dict[str, Any] = {"engine_tokens_per_s": ours.output_tokens / ours.seconds,
                               "engine_seconds": ours.seconds, "load_avg_1m": machine_info()["load_avg_1m"]}
        if ref is not None:
            hf = run_hf_generate(ref, requests, hf_batch_size, device)
            run.update(hf_tokens_per_s=hf.output_tokens / hf.seconds, hf_seconds=hf.seconds,
                       hf_generated_tokens=hf.generated_tokens)
            run["ratio"] = run["engine_tokens_per_s"] / run["hf_tokens_per_s"]
            if match is None:
                match = sum(a == b for a, b in zip(ours.token_ids, hf.token_ids, strict=True))
        runs.append(run)
    result: dict[str, Any] = {
        "workload": spec.describe(),
        "output_tokens": sum(r.output_len for r in requests),
        "prompt_tokens": sum(len(r.prompt_ids) for r in requests),
        "repeats": runs,
        "engine_tokens_per_s": statistics.median(r["engine_tokens_per_s"] for r in runs),
    }
    if ref is not None:
        result["hf_batch_size"] = hf_batch_size
        result["hf_tokens_per_s"] = statistics.median(r["hf_tokens_per_s"] for r in runs)
        result["ratio"] = statistics.median(r["ratio"] for r in runs)
        result["greedy_match"] = f"{match}/{len(requests)}"
    return result


def run_online_rates(
    model: Path, spec: WorkloadSpec, device: str, dtype: str, rates: list[float],
    engine_kwargs: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    from engine import AsyncEngine, EngineConfig

    async def main() -> list[dict[str, Any]]:
        engine = AsyncEngine(EngineConfig(model=model, device=device, dtype=dtype, **(engine_kwargs or {})))
        await engine.start()
        try:
            vocab = engine.core.model_config.vocab_size
            warm = make_workload(WorkloadSpec(num_prompts=1, seed=spec.seed + 1000), vocab)
            await run_online(engine, warm, float("inf"), tag="warmup")
            out = []
            for i, rate in enumerate(rates):
                # a fresh seed per rate: no request can hit the prefix cache of an earlier rate
                requests = make_workload(WorkloadSpec(**{**spec.__dict__, "seed": spec.seed + 1 + i}), vocab)
                res = await run_online(engine, requests, rate, seed=spec.seed + i)
                out.append(res.summary())
            return out
        finally:
            await engine.shutdown()

    return asyncio.run(main())
