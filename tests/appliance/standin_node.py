"""A stand-in engine node for gateway tests that are about the gateway, not the model.

It runs the real node server (``engine.server.build_app``: mutual TLS with the installer-issued
certificates, the NDJSON protocol, /health, the real tokenizer of the test model) over an engine
that streams ``--tokens`` tokens, one every ``--delay-ms``, instead of running the model: fast to
start, and its streams last as long as a test needs them to (a gateway killed mid-stream).
It says so in /health (``stand_in: true``). Run in its own process::

    python -m tests.appliance.standin_node --root NODE_ROOT --model-dir DIR --port P
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any


class StandInEngine:
    def __init__(self, model_dir: Path, tokens: int, delay_s: float) -> None:
        from engine.tokenizer.tokenizer import Tokenizer

        self.tokenizer = Tokenizer(model_dir, (2,))
        self.tokens, self.delay_s = tokens, delay_s
        self.is_running = True
        self.running = 0

    def stats(self) -> dict[str, Any]:
        return {"running": self.running, "waiting": 0, "kv_cache_usage": 0.0}

    async def generate(self, request_id: str, prompt: Any, params: Any, **_: Any) -> AsyncIterator[Any]:
        from engine.outputs import StreamDelta

        n_prompt = len(prompt) if isinstance(prompt, list) else len(self.tokenizer.encode(prompt))
        wanted = getattr(params, "max_tokens", None) or self.tokens
        count = max(1, min(self.tokens, int(wanted)))
        self.running += 1
        try:
            for i in range(1, count + 1):
                await asyncio.sleep(self.delay_s)
                done = i == count
                yield StreamDelta(request_id, " x", [87], done, "length" if done else None, n_prompt, i)
        finally:
            self.running -= 1

    async def abort(self, request_id: str) -> None:
        return None


def main() -> None:
    import uvicorn

    from engine.server.app import build_app
    from engine.server.serve import ServeConfig, uvicorn_config

    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, required=True, help="the node's install root (tls/engine/ inside)")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    tls = args.root / "tls" / "engine"
    config = ServeConfig(model=args.model_dir, tls_cert=tls / "server.pem", tls_key=tls / "server.key",
                         client_ca=tls / "ca.pem", port=args.port)
    engine = StandInEngine(args.model_dir, args.tokens, args.delay_ms / 1000)
    app = build_app(engine, args.model_dir, health_info={"stand_in": True})  # type: ignore[arg-type]
    uvicorn.Server(uvicorn_config(app, config)).run()


if __name__ == "__main__":
    main()
