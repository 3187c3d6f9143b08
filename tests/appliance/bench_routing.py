"""Routing overhead of the gateway: the same streams sent to an engine node directly and through the
gateway (auth, policy, tokenization, router, admission, audit records, mutual TLS hop), in one run.

    .venv/bin/python -m tests.appliance.bench_routing --concurrency 64 --rounds 6 --out bench.json

What it measures: the node is a **stand-in engine** (it says so): the real node server code
(engine.server.build_app, mutual TLS, NDJSON) over an engine object that streams a fixed number of
tokens at once instead of running the model, so that the difference between the two paths is the
gateway's own work and not the model's noise. The real tokenizer is served, so the gateway renders
and tokenizes real chat prompts. Direct requests send the prompt's token ids to /v1/generate with
the gateway's client certificate; gateway requests are OpenAI chat completions over HTTPS with a
tenant key. Rounds alternate direct and gateway so both see the same machine load. Reported: time
to first content byte and to the end of the stream, p50/p90/p99 per path, and the p50 difference.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

TOKENS_PER_STREAM = 16
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


# ---- the stand-in node (runs in its own process: `python -m tests.appliance.bench_routing node ...`) ----
class StandInEngine:
    """Streams TOKENS_PER_STREAM tokens per request without computing anything (see module doc)."""

    def __init__(self, model_dir: Path) -> None:
        from engine.tokenizer.tokenizer import Tokenizer

        self.tokenizer = Tokenizer(model_dir, (2,))
        self.is_running = True

    def stats(self) -> dict[str, Any]:
        return {"running": 0, "waiting": 0, "kv_cache_usage": 0.0}

    async def generate(self, request_id: str, prompt: Any, params: Any, **_: Any) -> Any:
        from engine.outputs import StreamDelta

        n_prompt = len(prompt) if isinstance(prompt, list) else len(self.tokenizer.encode(prompt))
        for i in range(1, TOKENS_PER_STREAM + 1):
            await asyncio.sleep(0)
            done = i == TOKENS_PER_STREAM
            yield StreamDelta(request_id, " x", [87], done, "length" if done else None, n_prompt, i)

    async def abort(self, request_id: str) -> None:
        return None


def run_node(model_dir: Path, tls: Path, port: int) -> None:
    import uvicorn

    from engine.server.app import build_app
    from engine.server.serve import ServeConfig, uvicorn_config

    config = ServeConfig(model=model_dir, tls_cert=tls / "server.pem", tls_key=tls / "server.key",
                         client_ca=tls / "ca.pem", port=port)
    app = build_app(StandInEngine(model_dir), model_dir, health_info={"stand_in": True})  # type: ignore[arg-type]
    uvicorn.Server(uvicorn_config(app, config)).run()


# ---- the measurement ------------------------------------------------------------------------
async def _direct(client: httpx.AsyncClient, ids: list[int], n: int) -> tuple[float, float]:
    start = time.perf_counter()
    first = 0.0
    body = {"request_id": f"direct-{n}-{time.monotonic_ns()}", "prompt_token_ids": ids, "params": {"max_tokens": 16}}
    async with client.stream("POST", "/v1/generate", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if line and not first:
                first = time.perf_counter() - start
    return first, time.perf_counter() - start


async def _gateway(client: httpx.AsyncClient, model: str) -> tuple[float, float]:
    start = time.perf_counter()
    first = 0.0
    body = {"model": model, "messages": QUESTION, "max_tokens": 16, "stream": True}
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not first and '"content": "' in line and '"content": ""' not in line:
                first = time.perf_counter() - start
    return first, time.perf_counter() - start


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000.0


def _summary(samples: list[tuple[float, float]]) -> dict[str, float]:
    ttfb = [s[0] for s in samples]
    total = [s[1] for s in samples]
    return {"n": len(samples), "ttfb_p50_ms": _pct(ttfb, 0.5), "ttfb_p90_ms": _pct(ttfb, 0.9),
            "ttfb_p99_ms": _pct(ttfb, 0.99), "total_p50_ms": _pct(total, 0.5), "total_p90_ms": _pct(total, 0.9),
            "total_p99_ms": _pct(total, 0.99), "total_mean_ms": statistics.fmean(total) * 1000.0}


async def measure(lab: Any, key: str, concurrency: int, rounds: int) -> dict[str, Any]:
    import ssl

    from tests.appliance.fleet_lab import MODEL

    tls = lab.gateway_root / "tls" / "engine"
    node_ctx = ssl.create_default_context(cafile=str(tls / "ca.pem"))
    node_ctx.load_cert_chain(str(tls / "client.pem"), str(tls / "client.key"))
    gw_ctx = ssl.create_default_context(cafile=str(lab.gateway_root / "tls" / "ca.pem"))
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)
    from engine.tokenizer.tokenizer import Tokenizer

    ids = Tokenizer(lab.model_dir, (2,)).encode_chat(QUESTION)
    results: dict[str, list[tuple[float, float]]] = {"direct": [], "gateway": []}
    async with httpx.AsyncClient(base_url=lab.nodes["n1"].url, verify=node_ctx, limits=limits, timeout=60) as node, \
            httpx.AsyncClient(base_url=lab.url, verify=gw_ctx, limits=limits, timeout=60,
                              headers={"Authorization": f"Bearer {key}"}) as gw:
        # warm both paths (connections, TLS sessions, the gateway's caches)
        await asyncio.gather(*(_direct(node, ids, i) for i in range(concurrency)))
        await asyncio.gather(*(_gateway(gw, MODEL) for _ in range(concurrency)))
        for r in range(rounds):
            for path in (("direct", "gateway") if r % 2 == 0 else ("gateway", "direct")):
                if path == "direct":
                    batch = await asyncio.gather(*(_direct(node, ids, i) for i in range(concurrency)))
                else:
                    batch = await asyncio.gather(*(_gateway(gw, MODEL) for _ in range(concurrency)))
                results[path].extend(batch)
    direct, gateway = _summary(results["direct"]), _summary(results["gateway"])
    return {"concurrency": concurrency, "rounds": rounds, "tokens_per_stream": TOKENS_PER_STREAM,
            "direct": direct, "gateway": gateway,
            "added_ttfb_p50_ms": gateway["ttfb_p50_ms"] - direct["ttfb_p50_ms"],
            "added_total_p50_ms": gateway["total_p50_ms"] - direct["total_p50_ms"],
            "cpus": os.cpu_count()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd")
    node = sub.add_parser("node")
    node.add_argument("--model-dir", type=Path, required=True)
    node.add_argument("--tls", type=Path, required=True)
    node.add_argument("--port", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--model-dir", type=Path, default=Path(".cache/models/SmolLM2-135M-Instruct"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.cmd == "node":
        run_node(args.model_dir, args.tls, args.port)
        return
    from tests.appliance.fleet_lab import FleetLab

    with tempfile.TemporaryDirectory() as tmp:
        lab = FleetLab(Path(tmp), args.model_dir.resolve())
        lab.build({"n1": {"region": "eu", "site": "a", "classification": "internal"}},
                  {"tenants": {"bench": {"allowed_models": ["*"], "rate_limit_rpm": 1000000,
                                         "max_tokens_per_minute": 100000000, "max_tokens_per_request": 64}}})
        node_tls = lab.nodes["n1"].root / "tls" / "engine"
        proc = subprocess.Popen([sys.executable, "-m", "tests.appliance.bench_routing", "node", "--model-dir",
                                 str(args.model_dir.resolve()), "--tls", str(node_tls), "--port",
                                 str(lab.nodes["n1"].port)], start_new_session=True)
        lab.nodes["n1"].proc = proc  # type: ignore[assignment]
        try:
            lab.wait_node("n1", 60)
            lab.start_gateway()
            result = asyncio.run(measure(lab, lab.tenant_key("bench"), args.concurrency, args.rounds))
        finally:
            lab.close()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
