"""Summaries, machine facts, and the Markdown table of the gateway benchmark."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from appliance.bench.loadgen import PhaseResult


def pct(values: list[float], q: float) -> float | None:
    """The q-quantile in milliseconds (nearest rank), None without samples."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000.0, 3)


def summarize(phases: list[PhaseResult], stream: bool) -> dict[str, Any]:
    ok = sum(p.ok for p in phases)
    wall = sum(p.wall_s for p in phases)
    cpu = sum(p.client_cpu_s for p in phases)
    server = [p.server_cpu_s for p in phases if p.server_cpu_s is not None]
    errors: dict[str, int] = {}
    samples: dict[str, str] = {}
    for p in phases:
        for what, n in p.errors.items():
            errors[what] = errors.get(what, 0) + n
        for what, text in p.error_samples.items():
            samples.setdefault(what, text)
    total = [t for p in phases for t in p.total_s]
    out: dict[str, Any] = {
        "requests": ok, "errors": errors, "error_samples": samples, "seconds": round(wall, 3),
        "warmup_s_max": round(max((p.warmup_s for p in phases), default=0.0), 2),
        "requests_per_s": round(ok / wall, 1) if wall else None,
        "total_p50_ms": pct(total, 0.5), "total_p99_ms": pct(total, 0.99),
        "client_cpu_ms_per_request": round(cpu / ok * 1000.0, 3) if ok else None,
        "client_cores": round(cpu / wall, 2) if wall else None,
        "server_cpu_ms_per_request": round(sum(server) / ok * 1000.0, 3) if ok and server else None,
        "server_cores": round(sum(server) / wall, 2) if wall and server else None,
    }
    if stream:
        ttft = [t for p in phases for t in p.ttft_s]
        out.update(ttft_p50_ms=pct(ttft, 0.5), ttft_p99_ms=pct(ttft, 0.99))
    return out


def added(gateway: dict[str, Any], direct: dict[str, Any]) -> dict[str, float | None]:
    """Gateway minus its own direct baseline, quantile by quantile (streaming phase)."""
    out: dict[str, float | None] = {}
    for key in ("ttft_p50_ms", "ttft_p99_ms", "total_p50_ms", "total_p99_ms"):
        g, d = gateway.get(key), direct.get(key)
        out[key] = round(g - d, 3) if g is not None and d is not None else None
    return out


def machine_info(repo: Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "load_average_before": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "commit": git("rev-parse", "--short", "HEAD"),
            "dirty_paths": len(git("status", "--porcelain").splitlines()),
            "started_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _pair(a: float | None, b: float | None) -> str:
    return f"{_ms(a)} / {_ms(b)}"


def markdown(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    lines = [
        f"Gateway overhead benchmark (the engine is a FAKE on purpose: it answers {s['tokens']} tokens at once, "
        "so what is measured is the gateways, not a model).",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), load average {m['load_average_before']} before, "
        f"{result.get('load_average_after')} after; commit {m['commit']}"
        f"{' + uncommitted changes' if m['dirty_paths'] else ''}; {m['started_utc']} UTC.",
        f"Non-streaming: closed loop of {s['concurrency']} keep-alive connections; streaming: {s['streams']} "
        f"concurrent streams; {s['rounds']} rounds; each phase measured over {s['seconds']} s (or as long "
        "as its warm-up took), once every connection has "
        f"completed a request (and {s['warmup_s']} s at least), targets alternating. CPU ms/req: non-stream / "
        "stream; server = the target's own process tree (not the node, upstream or PostgreSQL behind it).",
        "",
        "| target | workers | store | non-stream req/s | stream TTFT p50 / p99 ms | added TTFT p50 / p99 ms "
        "| stream end p50 / p99 ms | added end p50 / p99 ms | errors | server CPU ms/req | client CPU ms/req |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in result["targets"]:
        plain, stream, add = t["plain"], t["stream"], t.get("added") or {}
        errors = sum(plain["errors"].values()) + sum(stream["errors"].values())
        lines.append(
            f"| {t['name']} | {t.get('workers') or '-'} | {t.get('store') or '-'} | {plain['requests_per_s']} "
            f"| {_pair(stream.get('ttft_p50_ms'), stream.get('ttft_p99_ms'))} "
            f"| {_pair(add.get('ttft_p50_ms'), add.get('ttft_p99_ms')) if add else 'baseline'} "
            f"| {_pair(stream.get('total_p50_ms'), stream.get('total_p99_ms'))} "
            f"| {_pair(add.get('total_p50_ms'), add.get('total_p99_ms')) if add else 'baseline'} "
            f"| {errors} | {_pair(plain['server_cpu_ms_per_request'], stream['server_cpu_ms_per_request'])} "
            f"| {_pair(plain['client_cpu_ms_per_request'], stream['client_cpu_ms_per_request'])} |")
    refused = []
    for t in result["targets"]:
        for mode in ("plain", "stream"):
            for what, n in t[mode]["errors"].items():
                sample = " ".join(t[mode].get("error_samples", {}).get(what, "").split())[:200]
                refused.append(f"{t['name']}, {'non-stream' if mode == 'plain' else 'stream'}: {n} x {what}"
                               + (f", e.g. `{sample}`" if sample else ""))
    if result.get("notes") or refused:
        lines += ["", *(f"- {note}" for note in [*refused, *result.get("notes", [])])]
    return "\n".join(lines)
