"""Gateway overhead in one run: our gateway, the engine node called directly, and LiteLLM.

Every upstream is a fake on purpose (see fakes.py): the benchmark measures gateways, not a model.
Our gateway (auth, policy, tenant limits, durable audit, the mutual-TLS hop) routes to a node that
runs the real node server code over a stand-in engine; its baseline (*node direct*) is that node's
/v1/generate called with the gateway's client certificate. LiteLLM cannot talk to our node
protocol, so it proxies to an OpenAI-compatible fake answering the same tokens; its baseline
(*upstream direct*) is that fake called directly. Each gateway's overhead is its latency minus its
own baseline's, measured in the same rounds. Rounds alternate the targets so that all of them see
the same machine load; one load generator (loadgen.py) drives every target the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import json
import os
import ssl
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.bench import lab, litellm_env
from appliance.bench.fakes import TOKENS
from appliance.bench.loadgen import PhaseResult, Target, closed_loop, probe
from appliance.bench.report import added, machine_info, summarize

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@dataclass
class Settings:
    model_dir: Path
    cache_dir: Path
    concurrency: int = 64
    streams: int = 200
    seconds: float = 5.0
    warmup_s: float = 2.0
    rounds: int = 3
    workers: tuple[int, ...] = (1, 2)
    stores: tuple[str, ...] = ("sqlite", "postgres")
    litellm: bool = True
    postgres_url: str | None = None

    def __post_init__(self) -> None:
        for name in ("concurrency", "streams", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an integer >= 1, found {getattr(self, name)}")
        if self.seconds <= 0 or self.warmup_s < 0:
            raise ValueError(f"seconds > 0 and warmup >= 0 expected, found {self.seconds} and {self.warmup_s}")
        if not self.workers or any(w < 1 for w in self.workers):
            raise ValueError(f"workers: expected counts >= 1, found {self.workers}")
        unknown = set(self.stores) - {"sqlite", "postgres"}
        if unknown or not self.stores:
            raise ValueError(f"stores: expected sqlite and/or postgres, found {sorted(self.stores)}")
        if not (self.model_dir / "tokenizer.json").is_file():
            raise ValueError(f"model dir: expected a model directory with tokenizer.json at {self.model_dir}")


@dataclass
class Entry:
    """One target and where its phases' results go."""

    target: Target
    kind: str  # "ours", "node-direct", "litellm", "upstream-direct"
    workers: int | None = None
    store: str | None = None
    pid: int | None = None  # the target's main process: its process tree's CPU time is measured
    phases: dict[str, list[PhaseResult]] = field(default_factory=lambda: {"plain": [], "stream": []})


def _body(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _chat(stream: bool) -> bytes:
    return _body({"model": lab.MODEL, "messages": QUESTION, "max_tokens": TOKENS, "stream": stream})


@contextlib.contextmanager
def _postgres(url: str | None, notes: list[str]) -> Iterator[Any]:
    """(admin URL, fresh_database) from tests/pg.py (a given server or a throwaway cluster), or None."""
    try:
        pg = importlib.import_module("tests.pg")
    except ImportError:
        notes.append("PostgreSQL rows skipped: tests/pg.py (source checkout) is needed to reach a server")
        yield None
        return
    if url:
        os.environ[pg.ENV_URL] = url
    try:
        with pg.postgres_server() as admin_url:
            yield admin_url, pg.fresh_database
    except pg.PostgresUnavailable as exc:
        notes.append(f"PostgreSQL rows skipped: no server reachable ({exc})")
        yield None


async def _run_rounds(entries: list[Entry], s: Settings, log: Any) -> None:
    for r in range(s.rounds):
        order = entries[r % len(entries):] + entries[:r % len(entries)]
        if r % 2:
            order.reverse()
        for mode in ("plain", "stream"):
            for e in order:
                conns = s.concurrency if mode == "plain" else s.streams
                probe_cpu = None if e.pid is None else functools.partial(lab.tree_cpu_seconds, e.pid)
                res = await closed_loop(e.target, conns, s.seconds, mode == "stream", s.warmup_s,
                                        server_cpu=probe_cpu)
                e.phases[mode].append(res)
                server = "-" if res.server_cpu_s is None else f"{res.server_cpu_s:.1f}"
                log(f"round {r + 1}/{s.rounds} {mode:6} {e.target.name:28} {res.ok / res.wall_s:8.1f} req/s  "
                    f"errors {sum(res.errors.values())}  CPU s: client {res.client_cpu_s:.1f} server {server}  "
                    f"warm-up {res.warmup_s:.1f} s")


def run(s: Settings, log: Any = print) -> dict[str, Any]:
    from engine.tokenizer.tokenizer import Tokenizer

    notes: list[str] = []
    machine = machine_info(Path(__file__).resolve().parents[2])
    ids = Tokenizer(s.model_dir, (2,)).encode_chat(QUESTION)
    procs: list[Any] = []
    entries: list[Entry] = []
    with tempfile.TemporaryDirectory(prefix="bench-gw-") as tmp, contextlib.ExitStack() as stack:
        base = Path(tmp)
        try:
            pki = base / "node-pki"
            lab.make_node_pki(pki)
            node_port, up_port = lab.free_port(), lab.free_port()
            me = [sys.executable, "-m", "appliance.bench"]
            node = lab.spawn([*me, "node", "--model-dir", str(s.model_dir), "--tls", str(pki), "--port",
                              str(node_port)], base / "node.log")
            procs.append(node)
            upstream = lab.spawn([*me, "upstream", "--port", str(up_port)], base / "upstream.log")
            procs.append(upstream)
            node_ssl = lab.node_client_ssl(pki)
            lab.wait_http(node, f"https://127.0.0.1:{node_port}/health", node_ssl, base / "node.log")
            lab.wait_http(upstream, f"http://127.0.0.1:{up_port}/health", False, base / "upstream.log")
            entries.append(Entry(Target(
                "node direct", "127.0.0.1", node_port, "/v1/generate", {},
                _body({"request_id": "bench", "prompt_token_ids": ids, "params": {"max_tokens": TOKENS}}),
                _body({"request_id": "bench", "prompt_token_ids": ids, "params": {"max_tokens": TOKENS}}),
                node_ssl, "127.0.0.1"), "node-direct", pid=node.pid))
            entries.append(Entry(Target("upstream direct", "127.0.0.1", up_port, "/v1/chat/completions", {},
                                        _chat(True), _chat(False)), "upstream-direct", pid=upstream.pid))

            workers_flag = lab.serve_supports_workers()
            gw_workers = s.workers
            if not workers_flag and any(w != 1 for w in s.workers):
                notes.append("`appliance serve` has no --workers option in this checkout yet: only one-worker "
                             "gateway rows were measured")
                gw_workers = (1,)
            pg = stack.enter_context(_postgres(s.postgres_url, notes)) if "postgres" in s.stores else None
            for store in s.stores:
                if store == "postgres" and pg is None:
                    continue
                for w in gw_workers:
                    db_url = None
                    if store == "postgres" and pg is not None:
                        admin_url, fresh = pg
                        db_url = stack.enter_context(fresh(admin_url, prefix="bench"))
                    gw = lab.lay_out_gateway(base / f"gw-{store}-{w}", s.model_dir, pki,
                                             f"https://127.0.0.1:{node_port}", db_url, w)
                    log(f"starting our gateway: {store}, {w} worker(s)")
                    try:
                        lab.start_gateway(gw, workers_flag)
                    except RuntimeError as exc:  # e.g. work in progress in the checkout: report, go on
                        lab.stop(gw.proc)
                        tail = " ".join(str(exc).split())[-400:]
                        notes.append(f"our gateway ({store}, {w}w) NOT measured: it did not start: ...{tail}")
                        log(notes[-1])
                        continue
                    procs.append(gw.proc)
                    entries.append(Entry(Target(
                        f"our gateway ({store}, {w}w)", "127.0.0.1", gw.port, "/v1/chat/completions",
                        {"authorization": f"Bearer {gw.key}"}, _chat(True), _chat(False), gw.ssl(), "127.0.0.1"),
                        "ours", w, store, gw.proc.pid if gw.proc else None))

            if s.litellm:
                env = litellm_env.find_env(s.cache_dir)
                if env is None:
                    log(f"building LiteLLM {litellm_env.LITELLM_VERSION}'s own environment under {s.cache_dir}")
                    try:
                        env = litellm_env.build_env(s.cache_dir, log=s.cache_dir / "litellm-build.log")
                    except litellm_env.LiteLLMUnavailable as exc:
                        notes.append(f"LiteLLM not measured: {exc}")
                if env is not None:
                    config = litellm_env.write_config(base / "litellm.yaml", lab.MODEL, up_port)
                    for w in s.workers:
                        port = lab.free_port()
                        log(f"starting LiteLLM {env.version}: {w} worker(s)")
                        argv = litellm_env.proxy_command(env, config, port, w, (pki / "server.pem", pki / "server.key"))
                        proc = lab.spawn(argv, base / f"litellm-{w}.log", litellm_env.OFFLINE_ENV)
                        procs.append(proc)
                        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
                        lab.wait_http(proc, f"https://127.0.0.1:{port}/health/liveliness", ctx,
                                      base / f"litellm-{w}.log", 240)
                        entries.append(Entry(Target(
                            f"LiteLLM {env.version} ({w}w)", "127.0.0.1", port, "/v1/chat/completions",
                            {"authorization": f"Bearer {litellm_env.MASTER_KEY}"}, _chat(True), _chat(False),
                            ctx, "127.0.0.1"), "litellm", w, "none", proc.pid))
            else:
                notes.append("LiteLLM not measured (--no-litellm)")

            for e in entries:  # every target answers before any measurement
                for stream in (False, True):
                    status, _, _ = asyncio.run(probe(e.target, stream))
                    if status != 200:
                        raise RuntimeError(f"{e.target.name}: expected 200 to a {'streaming' if stream else 'plain'} "
                                           f"request, got {status}")
            asyncio.run(_run_rounds(entries, s, log))
        finally:
            for proc in reversed(procs):
                lab.stop(proc)
        for log_file in sorted(base.glob("litellm-*.log")):  # the offline settings must have held
            text = log_file.read_text(errors="replace")
            if "Failed to fetch remote" in text or "Name or service not known" in text:
                notes.append(f"LiteLLM tried to reach the network ({log_file.name}): check its offline settings")
        load_after = [round(x, 2) for x in os.getloadavg()]
    return _result(entries, s, machine, load_after, notes)


def _result(entries: list[Entry], s: Settings, machine: dict[str, Any], load_after: list[float],
            notes: list[str]) -> dict[str, Any]:
    summaries = {e.target.name: (summarize(e.phases["plain"], False), summarize(e.phases["stream"], True))
                 for e in entries}
    baseline = {"ours": "node direct", "litellm": "upstream direct"}
    targets = []
    for e in entries:
        plain, stream = summaries[e.target.name]
        row: dict[str, Any] = {"name": e.target.name, "kind": e.kind, "workers": e.workers, "store": e.store,
                               "plain": plain, "stream": stream}
        if e.kind in baseline and baseline[e.kind] in summaries:
            row["baseline"] = baseline[e.kind]
            row["added"] = added(stream, summaries[baseline[e.kind]][1])
        targets.append(row)
    settings = {"concurrency": s.concurrency, "streams": s.streams, "seconds": s.seconds, "warmup_s": s.warmup_s,
                "rounds": s.rounds, "workers": list(s.workers), "stores": list(s.stores), "tokens": TOKENS,
                "litellm_version": litellm_env.LITELLM_VERSION if s.litellm else None}
    notes = [*notes, "The engine is a fake on purpose: node and upstream answer at once, so the numbers are the "
                     "gateways' own cost (see docs/benchmarks.md)."]
    return {"benchmark": "gateway-overhead", "machine": machine, "load_average_after": load_after,
            "settings": settings, "targets": targets, "notes": notes,
            "targets_issue_17": {"requests_per_s": 1000, "added_p50_ms": 1.0, "added_p99_ms": 5.0, "streams": 200}}
