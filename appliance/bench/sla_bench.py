"""``python -m appliance.bench sla``: FCFS vs SLA scheduling + admission, in one run, on the real model.

Two phases with identical load, each on a fresh engine node process (``appliance node serve``, the
real model on CPU) behind a fresh gateway (``appliance serve``: HTTPS, tenant keys, audit):

1. ``fcfs``: the node runs ``engine.scheduling: fcfs`` (arrival order, no preemption for priority,
   no deadlines, no fair share) and admission is effectively off: the gateway's policy is the real
   classes with the TTFT target and deadline of every class set to 3 600 000 ms and no TPOT target,
   so the admission estimate never exceeds a target (nothing is refused or held) and the node gets
   no TPOT target to chunk prefills for. Attainment is still measured against the real targets.
2. ``sla``: ``engine.scheduling: sla`` and the shipped classes (``policies/defaults``), admission on.

Workload (open loop for the interactive tenants, fixed seeds, the same arrivals and prompts in both
phases; see ``Workload``): ``alpha`` (interactive) sends short prompts at a Poisson rate; ``beta``
(interactive) sends long prompts at a Poisson rate; ``bulk`` (batch) floods with more concurrent
long generations than the node has sequence slots (a closed loop per stream; a refused stream
waits its Retry-After, at most 2 s). Requests that arrive in the measured window are counted and
awaited; the batch tenant's throughput is the tokens it received inside the window.
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from appliance.bench import lab

TENANTS = {"alpha": "interactive", "beta": "interactive", "bulk": "batch"}
HUGE_MS = 3_600_000
ENGINE = {"device": "cpu", "dtype": "float32", "kv_cache_bytes": 96 * 2**20}
FILLER = ("The committee reviewed the quarterly report on regional water supply, noting that reservoir "
          "levels, pipeline maintenance and seasonal demand all shaped the recommendations below. ")


@dataclass(frozen=True)
class Workload:
    seconds: float = 90.0  # measured window per phase
    warmup_s: float = 5.0  # load runs this long before the window opens
    alpha_rate: float = 1.0  # req/s, short prompts
    alpha_max_tokens: int = 16
    beta_rate: float = 0.25  # req/s, long prompts
    beta_prompt_words: int = 300
    beta_max_tokens: int = 16
    bulk_streams: int = 12
    bulk_max_tokens: int = 96
    max_num_seqs: int = 8
    seed: int = 16

    def __post_init__(self) -> None:
        for name in ("seconds", "alpha_rate", "beta_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)!r}")
        if self.warmup_s < 0:
            raise ValueError(f"warmup_s must be >= 0; got {self.warmup_s!r}")
        for name in ("alpha_max_tokens", "beta_max_tokens", "bulk_max_tokens", "max_num_seqs", "beta_prompt_words"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)!r}")
        if self.bulk_streams < 0:
            raise ValueError(f"bulk_streams must be >= 0; got {self.bulk_streams!r}")


@dataclass
class Outcome:
    tenant: str
    arrival_s: float  # since the phase's load started
    status: int = 0
    code: str = ""  # error code of a refusal / failure
    ttft_s: float = 0.0
    total_s: float = 0.0
    tokens: int = 0
    finish: str = ""


@dataclass
class Phase:
    name: str
    outcomes: list[Outcome] = field(default_factory=list)
    bulk_window_tokens: int = 0
    served_start: dict[str, int] = field(default_factory=dict)
    served_end: dict[str, int] = field(default_factory=dict)
    node_stats: dict[str, Any] = field(default_factory=dict)


def arrivals(rate: float, horizon_s: float, rng: random.Random) -> list[float]:
    out, t = [], rng.expovariate(rate)
    while t < horizon_s:
        out.append(t)
        t += rng.expovariate(rate)
    return out


def prompts(w: Workload) -> dict[str, list[tuple[float, str]]]:
    """(arrival, prompt) per interactive tenant, the same for both phases (seeded). Every prompt opens
    with its own number so the prefix cache cannot serve one long prompt from another."""
    rng = random.Random(w.seed)
    horizon = w.warmup_s + w.seconds
    alpha = [(t, f"Request {i}-{rng.randrange(10**6)}: name one colour of the sky, briefly.")
             for i, t in enumerate(arrivals(w.alpha_rate, horizon, rng))]
    words = FILLER.split()
    body = " ".join(words[i % len(words)] for i in range(w.beta_prompt_words))
    beta = [(t, f"Document {i}-{rng.randrange(10**6)}. {body}\nSummarise the document in one sentence.")
            for i, t in enumerate(arrivals(w.beta_rate, horizon, rng))]
    return {"alpha": alpha, "beta": beta}


# ---- one streamed request ---------------------------------------------------------------------
async def chat(client: httpx.AsyncClient, key: str, prompt: str, max_tokens: int, out: Outcome,
               on_token: Callable[[], None] | None = None) -> None:
    body = {"model": lab.MODEL, "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": prompt}]}
    start = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body,
                                 headers={"authorization": f"Bearer {key}"}) as resp:
            out.status = resp.status_code
            if resp.status_code != 200:
                raw = await resp.aread()
                out.code = _error_code(raw, resp.status_code)
                retry = resp.headers.get("retry-after", "")
                out.finish = retry  # read by the batch loop
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out.code = str(chunk["error"].get("code") or "stream_error")
                    continue
                for choice in chunk.get("choices", ()):
                    if choice.get("delta", {}).get("content"):
                        out.tokens += 1
                        if not out.ttft_s:
                            out.ttft_s = time.perf_counter() - start
                        if on_token is not None:
                            on_token()
                    if choice.get("finish_reason"):
                        out.finish = str(choice["finish_reason"])
    except httpx.HTTPError as exc:
        out.code = type(exc).__name__
    out.total_s = time.perf_counter() - start


def _error_code(raw: bytes, status: int) -> str:
    try:
        err = json.loads(raw).get("error", {})
        return str(err.get("code") or err.get("type") or f"http_{status}")
    except (ValueError, AttributeError):
        return f"http_{status}"


# ---- one phase --------------------------------------------------------------------------------
async def drive(w: Workload, url: str, ca: ssl.SSLContext, keys: dict[str, str], phase: Phase,
                window_open: Callable[[], None], window_close: Callable[[], None]) -> None:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, verify=ca, timeout=httpx.Timeout(600.0), limits=limits) as client:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        w_start, w_end = t0 + w.warmup_s, t0 + w.warmup_s + w.seconds
        tasks: list[asyncio.Task[None]] = []

        async def timed(tenant: str, at: float, prompt: str, max_tokens: int) -> None:
            await asyncio.sleep(max(0.0, t0 + at - loop.time()))
            out = Outcome(tenant, at)
            await chat(client, keys[tenant], prompt, max_tokens, out)
            if w.warmup_s <= at < w.warmup_s + w.seconds:
                phase.outcomes.append(out)

        def bulk_token() -> None:
            if w_start <= loop.time() < w_end:
                phase.bulk_window_tokens += 1

        async def bulk_stream(i: int) -> None:
            n = 0
            while loop.time() < w_end:
                at = loop.time() - t0
                out = Outcome("bulk", at)
                await chat(client, keys["bulk"], f"Stream {i} job {n}: write a long story about a lighthouse keeper.",
                           w.bulk_max_tokens, out, bulk_token)
                n += 1
                if w.warmup_s <= at < w.warmup_s + w.seconds:
                    phase.outcomes.append(out)
                if out.status != 200:
                    retry = float(out.finish) if out.finish.replace(".", "", 1).isdigit() else 1.0
                    await asyncio.sleep(min(2.0, max(0.2, retry)))

        work = prompts(w)
        for at, prompt in work["alpha"]:
            tasks.append(asyncio.create_task(timed("alpha", at, prompt, w.alpha_max_tokens)))
        for at, prompt in work["beta"]:
            tasks.append(asyncio.create_task(timed("beta", at, prompt, w.beta_max_tokens)))
        tasks += [asyncio.create_task(bulk_stream(i)) for i in range(w.bulk_streams)]
        await asyncio.sleep(max(0.0, w_start - loop.time()))
        window_open()
        await asyncio.sleep(max(0.0, w_end - loop.time()))
        window_close()
        await asyncio.gather(*tasks)


def node_stats(node_url: str, pki: Path) -> dict[str, Any]:
    resp = httpx.get(f"{node_url}/v1/stats", verify=lab.node_client_ssl(pki), timeout=10)
    resp.raise_for_status()
    return dict(resp.json())


def tenant_policy() -> dict[str, Any]:
    big = {"allowed_models": ["*"], "rate_limit_rpm": 1_000_000, "max_tokens_per_minute": 1_000_000_000,
           "max_tokens_per_request": 4096}
    return {"tenants": {t: {**big, "sla_class": c} for t, c in TENANTS.items()}}


def admission_off(classes_file: Path) -> dict[str, Any]:
    """The shipped classes with every TTFT target and deadline at HUGE_MS and no TPOT target."""
    doc = yaml.safe_load(classes_file.read_text())
    for body in doc["sla_classes"].values():
        body.update(ttft_ms=HUGE_MS, deadline_ms=HUGE_MS, on_overload="shed")
        body.pop("tpot_ms", None)
    return dict(doc)


def run_phase(name: str, w: Workload, model_dir: Path, base: Path, log: Callable[[str], None]) -> Phase:
    base.mkdir(parents=True)
    pki = base / "pki"
    lab.make_node_pki(pki)
    node_root, node_port = base / "node", lab.free_port()
    node_url = f"https://127.0.0.1:{node_port}"
    gw = lab.lay_out_gateway(base / "gw", model_dir, pki, node_url, None, 1)
    policies = gw.root / "current" / "policies"
    (policies / "site.yaml").write_text(yaml.safe_dump(tenant_policy()))
    if name == "fcfs":
        (policies / "sla_classes.yaml").write_text(yaml.safe_dump(admission_off(policies / "sla_classes.yaml")))
    release = node_root / "releases" / "1.0.0"
    release.mkdir(parents=True)
    (release / "appliance.yaml").write_text(yaml.safe_dump({
        "version": "1.0.0", "bundle_digest": "sha256:bench", "model": {"name": lab.MODEL, "path": str(model_dir)},
        "policies_dir": str(policies), "node": {"name": "n1", "labels": lab.NODE_LABELS, "roles": ["engine"]},
        "engine_node": {"host": "127.0.0.1", "port": node_port},
        "engine": {**ENGINE, "max_num_seqs": w.max_num_seqs, "scheduling": name}}))
    (node_root / "current").symlink_to(release)
    tls = node_root / "tls" / "engine"
    tls.mkdir(parents=True)
    for f in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key"):
        (tls / f).write_bytes((pki / f).read_bytes())
        (tls / f).chmod(0o600 if f.endswith(".key") else 0o644)
    node = lab.spawn([*lab.appliance_command(), "node", "serve", "--root", str(node_root)], base / "node.log")
    phase = Phase(name)
    try:
        lab.wait_http(node, f"{node_url}/health", lab.node_client_ssl(pki), base / "node.log", 300)
        lab.start_gateway(gw, workers_flag=False)
        from appliance.db import open_database
        from appliance.tenancy import TenantStore

        engine = open_database(gw.db_url)
        try:
            store = TenantStore(engine)
            keys = {}
            for tenant in TENANTS:
                if store.get_tenant(tenant) is None:
                    store.create_tenant(tenant, [lab.MODEL])
                keys[tenant] = store.issue_key(tenant, label="sla benchmark").secret
        finally:
            engine.dispose()
        log(f"[{name}] node and gateway up; load for {w.warmup_s + w.seconds:.0f} s")

        def opened() -> None:
            phase.served_start = dict(node_stats(node_url, pki).get("tenant_served_tokens", {}))

        def closed() -> None:
            stats = node_stats(node_url, pki)
            phase.served_end = dict(stats.get("tenant_served_tokens", {}))
            phase.node_stats = {k: stats.get(k) for k in ("preemptions_by_reason", "num_deadline_misses",
                                                          "num_preemptions")}

        asyncio.run(drive(w, f"https://127.0.0.1:{gw.port}", gw.ssl(), keys, phase, opened, closed))
    finally:
        lab.stop(gw.proc)
        lab.stop(node)
    return phase


# ---- summary ----------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    """Nearest rank."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, -(-int(q * len(ordered)) // 100) - 1))]


def summarise(phase: Phase, w: Workload, classes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    tenants: dict[str, Any] = {}
    for tenant, cls in TENANTS.items():
        target = classes[cls]
        ttft_t, tpot_t = target["ttft_ms"] / 1000.0, (target.get("tpot_ms") or 0) / 1000.0
        rows = [o for o in phase.outcomes if o.tenant == tenant]
        ran = [o for o in rows if o.status == 200]
        done = [o for o in ran if not o.code and o.tokens and o.finish in ("stop", "length")]
        met, missed = 0, {"ttft": 0, "tpot": 0}
        for o in done:
            tpot = (o.total_s - o.ttft_s) / (o.tokens - 1) if o.tokens > 1 else 0.0
            if o.ttft_s > ttft_t:
                missed["ttft"] += 1
            elif tpot_t and tpot > tpot_t:
                missed["tpot"] += 1
            else:
                met += 1
        rejected: dict[str, int] = {}
        for o in rows:
            if o.status != 200:
                rejected[o.code] = rejected.get(o.code, 0) + 1
        failed: dict[str, int] = {}
        for o in ran:
            if o not in done:
                why = o.code or o.finish or "no_tokens"
                failed[why] = failed.get(why, 0) + 1
        ttfts = [o.ttft_s for o in ran if o.ttft_s]
        p50, p99 = percentile(ttfts, 50), percentile(ttfts, 99)
        tenants[tenant] = {
            "sla_class": cls, "requests": len(rows), "ran": len(ran), "completed": len(done), "met": met,
            "attainment": round(met / len(ran), 4) if ran else None,
            "attainment_of_all": round(met / len(rows), 4) if rows else None,
            "ttft_p50_ms": None if p50 is None else round(p50 * 1000, 1),
            "ttft_p99_ms": None if p99 is None else round(p99 * 1000, 1),
            "goodput_rps": round(met / w.seconds, 3), "missed": missed, "rejected": rejected, "failed": failed,
            "tokens_per_s": round(sum(o.tokens for o in ran) / w.seconds, 2)}
    tenants["bulk"]["tokens_per_s"] = round(phase.bulk_window_tokens / w.seconds, 2)
    served = {t: phase.served_end.get(t, 0) - phase.served_start.get(t, 0) for t in TENANTS}
    requests = [[o.tenant, round(o.arrival_s, 3), o.status, o.code, round(o.ttft_s, 3), round(o.total_s, 3), o.tokens,
                 o.finish] for o in sorted(phase.outcomes, key=lambda o: o.arrival_s)]
    return {"tenants": tenants, "served_tokens_in_window": served, "node": phase.node_stats,
            "requests": {"fields": ["tenant", "arrival_s", "status", "code", "ttft_s", "total_s", "tokens", "finish"],
                         "rows": requests}}


def vtc_bound(w: Workload, prompt_tokens_max: int) -> float:
    """The VTC paper's bound on the service difference of two backlogged tenants, 2 * (w_p * L_in +
    w_q * M), in weighted tokens (w_p = 1, w_q = 2 as the engine's defaults)."""
    return 2.0 * (1.0 * prompt_tokens_max + 2.0 * max(w.alpha_max_tokens, w.beta_max_tokens))


def count_prompt_tokens(model_dir: Path, w: Workload) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    longest = max((p for p in prompts(w)["beta"]), key=lambda x: len(x[1]), default=(0.0, ""))[1]
    text = str(tok.apply_chat_template([{"role": "user", "content": longest}], add_generation_prompt=True,
                                       tokenize=False))
    return len(tok(text, add_special_tokens=False)["input_ids"])


def run(w: Workload, model_dir: Path, work_dir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    from policies import default_policy_dir

    classes = yaml.safe_load((default_policy_dir() / "sla_classes.yaml").read_text())["sla_classes"]
    started = time.time()
    phases = [run_phase(name, w, model_dir, work_dir / name, log) for name in ("fcfs", "sla")]
    summary = {p.name: summarise(p, w, classes) for p in phases}
    l_in = count_prompt_tokens(model_dir, w)
    bound = vtc_bound(w, l_in)
    fairness = {}
    for p in phases:
        served = summary[p.name]["served_tokens_in_window"]
        diff = abs(served["alpha"] - served["beta"])
        fairness[p.name] = {"alpha": served["alpha"], "beta": served["beta"], "difference": diff}
    result = {"workload": asdict(w), "model": lab.MODEL, "classes": classes, "phases": summary,
              "fairness": {"vtc_bound_weighted_tokens": bound, "longest_prompt_tokens": l_in, **fairness},
              "wall_s": round(time.time() - started, 1)}
    result["targets"] = targets(result)
    return result


def targets(result: dict[str, Any]) -> dict[str, Any]:
    f, s = result["phases"]["fcfs"]["tenants"], result["phases"]["sla"]["tenants"]

    def interactive(p: dict[str, Any], key: str) -> float:
        return float(sum((p[t][key] or 0) for t in ("alpha", "beta")))

    def attain(p: dict[str, Any]) -> float | None:
        ran = interactive(p, "ran")
        return interactive(p, "met") / ran if ran else None

    fa, sa = attain(f), attain(s)
    fg, sg = interactive(f, "goodput_rps"), interactive(s, "goodput_rps")
    fb, sb = f["bulk"]["tokens_per_s"], s["bulk"]["tokens_per_s"]
    bound = result["fairness"]["vtc_bound_weighted_tokens"]
    return {
        "interactive_attainment": {"fcfs": fa, "sla": sa, "met": sa is not None and sa >= 0.99
                                   and fa is not None and fa < sa},
        "batch_throughput_ratio": {"fcfs": fb, "sla": sb, "ratio": round(sb / fb, 3) if fb else None,
                                   "met": bool(fb) and sb >= 0.8 * fb},
        "interactive_goodput_ratio": {"fcfs": fg, "sla": sg, "ratio": round(sg / fg, 3) if fg else None,
                                      "fcfs_below_90": fa is not None and fa < 0.9,
                                      "met": (sg > 0 and sg >= 2 * fg) if fa is not None and fa < 0.9 else None},
        "vtc": {"difference_sla": result["fairness"]["sla"]["difference"], "bound": bound,
                "met": result["fairness"]["sla"]["difference"] <= bound}}
