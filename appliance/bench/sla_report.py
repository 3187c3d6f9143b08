"""The SLA benchmark's outputs: a Markdown table and a PNG chart from its JSON result, and the
``python -m appliance.bench sla`` entry point that writes all three."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from appliance.bench.sla_bench import TENANTS, Workload, run


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{x:.0f}"


def _codes(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "—"


def markdown(result: dict[str, Any]) -> str:
    w = result["workload"]
    lines = [
        f"Workload per phase: {w['seconds']:.0f} s measured after {w['warmup_s']:.0f} s; alpha (interactive) "
        f"{w['alpha_rate']} req/s short prompts, max_tokens {w['alpha_max_tokens']}; beta (interactive) "
        f"{w['beta_rate']} req/s prompts of {result['fairness']['longest_prompt_tokens']} tokens, max_tokens "
        f"{w['beta_max_tokens']}; bulk (batch) {w['bulk_streams']} concurrent streams of max_tokens "
        f"{w['bulk_max_tokens']}; node max_num_seqs {w['max_num_seqs']}; seed {w['seed']}.",
        "",
        "| phase | tenant (class) | requests | ran | met | attainment | TTFT p50 ms | TTFT p99 ms | goodput req/s "
        "| tokens/s | rejected | failed |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for name, phase in result["phases"].items():
        for tenant, cls in TENANTS.items():
            t = phase["tenants"][tenant]
            lines.append(f"| {name} | {tenant} ({cls}) | {t['requests']} | {t['ran']} | {t['met']} | "
                         f"{_pct(t['attainment'])} | {_ms(t['ttft_p50_ms'])} | {_ms(t['ttft_p99_ms'])} | "
                         f"{t['goodput_rps']:.2f} | {t['tokens_per_s']:.1f} | {_codes(t['rejected'])} | "
                         f"{_codes(t['failed'])} |")
    fair = result["fairness"]
    lines += ["", "Served tokens in the window (node's `tenant_served_tokens`, prompt + generated):", "",
              "| phase | alpha | beta | bulk | alpha − beta | node preemptions | deadline misses |",
              "|---|---:|---:|---:|---:|---|---:|"]
    for name, phase in result["phases"].items():
        s, node = phase["served_tokens_in_window"], phase["node"]
        lines.append(f"| {name} | {s['alpha']} | {s['beta']} | {s['bulk']} | {s['alpha'] - s['beta']} | "
                     f"{_codes(node.get('preemptions_by_reason') or {})} | {node.get('num_deadline_misses') or 0} |")
    lines += ["", f"VTC bound (two backlogged tenants, 2·(w_p·L_in + w_q·M)): {fair['vtc_bound_weighted_tokens']:.0f} "
              f"weighted tokens.", "", "Targets:", ""]
    tg = result["targets"]
    ia, bt, gp, vtc = (tg["interactive_attainment"], tg["batch_throughput_ratio"], tg["interactive_goodput_ratio"],
                       tg["vtc"])
    lines += [
        f"- interactive attainment ≥ 99% with SLA, lower with FCFS: SLA {_pct(ia['sla'])}, FCFS {_pct(ia['fcfs'])}: "
        f"{'met' if ia['met'] else 'NOT met'}",
        f"- batch throughput within 20% of FCFS: {bt['sla']:.1f} vs {bt['fcfs']:.1f} tokens/s (×{bt['ratio']}): "
        f"{'met' if bt['met'] else 'NOT met'}",
        f"- interactive goodput ≥ 2× FCFS where FCFS attainment < 90%: {gp['sla']:.2f} vs {gp['fcfs']:.2f} req/s "
        + (f"(×{gp['ratio']}): " if gp["ratio"] is not None else "(FCFS goodput 0): ")
        + ("not applicable (FCFS attainment ≥ 90%)" if gp["met"] is None else "met" if gp["met"] else "NOT met"),
        f"- interactive tenants' served tokens within the VTC bound (SLA phase): |difference| {vtc['difference_sla']} "
        f"vs {vtc['bound']:.0f}: {'met' if vtc['met'] else 'NOT met'}"]
    return "\n".join(lines)


def chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = list(result["phases"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    width = 0.38
    for i, name in enumerate(phases):
        tenants = result["phases"][name]["tenants"]
        xs = [j + (i - 0.5) * width for j in range(2)]
        axes[0].bar(xs, [100 * (tenants[t]["attainment"] or 0) for t in ("alpha", "beta")], width, label=name)
        axes[1].bar(xs, [tenants[t]["ttft_p99_ms"] or 0 for t in ("alpha", "beta")], width, label=name)
        axes[2].bar([i], [tenants["bulk"]["tokens_per_s"]], 0.6, label=name)
    axes[0].axhline(99, color="black", linestyle="--", linewidth=1)
    axes[0].set_title("interactive SLO attainment (%)")
    axes[1].axhline(result["classes"]["interactive"]["ttft_ms"], color="black", linestyle="--", linewidth=1)
    axes[1].set_title("interactive TTFT p99 (ms)")
    axes[1].set_yscale("log")
    for ax in axes[:2]:
        ax.set_xticks([0, 1], ["alpha (short)", "beta (long)"])
        ax.legend()
    axes[2].set_xticks(range(len(phases)), phases)
    axes[2].set_title("batch throughput (tokens/s)")
    fig.suptitle(f"FCFS vs SLA scheduling + admission, {result['model']} on CPU through the gateway")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(model_dir: Path, seconds: float, out: Path, workload: Workload | None = None) -> int:
    if not (model_dir / "config.json").exists():
        print(f"--model-dir {model_dir}: expected a model directory with config.json", file=sys.stderr)
        return 2
    try:
        w = workload or Workload(seconds=seconds)
    except ValueError as exc:
        print(f"invalid benchmark settings: {exc}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    roots = Path(tempfile.mkdtemp(prefix="roots-", dir=out))
    result = run(w, model_dir, roots, lambda line: print(line, file=sys.stderr, flush=True))
    result["roots"] = str(roots)
    table = markdown(result)
    (out / "sla-bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "sla-bench.md").write_text(table + "\n")
    chart(result, out / "sla-bench.png")
    print(table)
    return 0
