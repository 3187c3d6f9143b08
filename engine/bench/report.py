"""Rich tables for `python -m engine bench` results (the JSON form holds the same numbers)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def print_report(result: dict[str, Any]) -> None:
    console = Console()
    machine = result.get("machine", {})
    console.print(f"machine: {machine}")
    offline = result.get("offline")
    if offline:
        table = Table(title=f"offline throughput: {offline['workload']}")
        for col in ("system", "output tokens/s (median)", "per repeat"):
            table.add_column(col)
        table.add_row("engine", f"{offline['engine_tokens_per_s']:.1f}",
                      ", ".join(f"{r['engine_tokens_per_s']:.1f}" for r in offline["repeats"]))
        if "hf_tokens_per_s" in offline:
            table.add_row(f"transformers (batch {offline['hf_batch_size']})", f"{offline['hf_tokens_per_s']:.1f}",
                          ", ".join(f"{r['hf_tokens_per_s']:.1f}" for r in offline["repeats"]))
        console.print(table)
        if "ratio" in offline:
            console.print(f"engine / transformers: {offline['ratio']:.2f}x (median of per-repeat ratios); "
                          f"greedy outputs identical: {offline['greedy_match']}")
    online = result.get("online")
    if online:
        table = Table(title="online latency (AsyncEngine, Poisson arrivals)")
        cols = ("rate req/s", "tok/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms",
                "e2e p50 s", "e2e p99 s")
        for col in cols:
            table.add_column(col)
        for row in online:
            table.add_row(str(row["rate"]), f"{row['output_tokens_per_s']:.1f}",
                          f"{row['ttft_p50_ms']:.0f}", f"{row['ttft_p99_ms']:.0f}", f"{row['tpot_p50_ms']:.0f}",
                          f"{row['tpot_p99_ms']:.0f}", f"{row['e2e_p50_s']:.2f}", f"{row['e2e_p99_s']:.2f}")
        console.print(table)
    gpu = result.get("gpu")
    if gpu:
        table = Table(title=f"GPU: Llama-3.1-8B shape, random bf16 weights on {gpu['device']}")
        table.add_column("metric")
        table.add_column("value")
        for key, value in gpu.items():
            table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
        console.print(table)
