"""The gateway's CPU time per request: one stand-in engine node (tests/appliance/bench_routing.py:
the real node server over mutual TLS, 16 tokens per request at once, the real tokenizer) and one
gateway process; N chat completions at concurrency C through the whole gateway (auth, policy,
limits, admission, audit); the gateway's and the node's CPU seconds (from /proc) per request.

    .venv/bin/python -m tests.appliance.bench_gateway_cpu 16 400 stream|nostream [PYSPY_OUT]

With PYSPY_OUT (py-spy installed), the measured window is also sampled by py-spy (raw format,
threads holding the GIL only) for a profile of where that CPU goes.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.appliance.bench_routing import QUESTION
from tests.appliance.fleet_lab import MODEL, FleetLab


def cpu(pid: int) -> float:
    f = open(f"/proc/{pid}/stat").read().split(")")[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

async def run(lab: Any, key: str, conc: int, n: int, stream: bool) -> tuple[float, float, float]:
    ctx = ssl.create_default_context(cafile=str(lab.gateway_root / "tls" / "ca.pem"))
    limits = httpx.Limits(max_connections=conc * 2, max_keepalive_connections=conc * 2)
    async with httpx.AsyncClient(base_url=lab.url, verify=ctx, limits=limits, timeout=60,
                                 headers={"Authorization": f"Bearer {key}"}) as gw:
        sem = asyncio.Semaphore(conc)
        async def one() -> None:
            async with sem:
                body = {"model": MODEL, "messages": QUESTION, "max_tokens": 16, "stream": stream}
                if stream:
                    async with gw.stream("POST", "/v1/chat/completions", json=body) as r:
                        r.raise_for_status()
                        async for _ in r.aiter_lines():
                            pass
                else:
                    r = await gw.post("/v1/chat/completions", json=body)
                    r.raise_for_status()
        await asyncio.gather(*(one() for _ in range(conc)))  # warm
        c0, nc0, t0 = cpu(lab.gateway.pid), cpu(lab.nodes["n1"].proc.pid), time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        dt = time.perf_counter() - t0
        return (cpu(lab.gateway.pid) - c0) / n * 1000, (cpu(lab.nodes["n1"].proc.pid) - nc0) / n * 1000, n / dt

def main() -> None:
    conc, n, stream = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "stream"
    spy = sys.argv[4] if len(sys.argv) > 4 else ""
    md = Path(os.environ.get("SOVEREIGN_MODEL_DIR", ".cache/models/SmolLM2-135M-Instruct")).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        lab = FleetLab(Path(tmp), md)
        lab.build({"n1": {"region": "eu", "site": "a", "classification": "internal"}},
                  {"tenants": {"bench": {"allowed_models": ["*"], "rate_limit_rpm": 1000000,
                                         "max_tokens_per_minute": 100000000, "max_tokens_per_request": 64}}})
        node_tls = lab.nodes["n1"].root / "tls" / "engine"
        proc = subprocess.Popen([sys.executable, "-m", "tests.appliance.bench_routing", "node", "--model-dir", str(md),
                                 "--tls", str(node_tls), "--port", str(lab.nodes["n1"].port)], start_new_session=True)
        lab.nodes["n1"].proc = proc  # type: ignore[assignment]
        try:
            lab.wait_node("n1", 60)
            lab.start_gateway()
            key = lab.tenant_key("bench")
            asyncio.run(run(lab, key, conc, 50, stream))
            sp = None
            assert lab.gateway is not None
            if spy:
                sp = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "-p",
                                       str(lab.gateway.pid), "-f", "raw", "-o", spy, "-r", "200", "--nonblocking",
                                       "--gil"])
                time.sleep(1)
            g, nd, rps = asyncio.run(run(lab, key, conc, n, stream))
            if sp:
                sp.send_signal(signal.SIGINT)
                sp.wait()
            print(json.dumps({"gateway_cpu_ms_per_req": round(g, 2), "node_cpu_ms_per_req": round(nd, 2),
                              "requests_per_s": round(rps, 1), "concurrency": conc, "requests": n, "stream": stream}))
        finally:
            lab.close()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
