"""Renderings of an SLA report (``sla_report.compute_report``): Markdown and a PNG chart.

The chart shows attainment per day for each SLA class, with the class's objective (its
percentile) as a dashed line. matplotlib draws it with the Agg backend: no display, no network,
no font download (its own DejaVu fonts).
"""

from __future__ import annotations

import io
from typing import Any


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


def render_markdown(report: dict[str, Any]) -> str:
    period, policy = report["period"], report["policy"]
    lines = [
        f"# SLA report: tenant `{report['tenant']}`, {period['month']} (UTC)", "",
        f"Period {period['since']} to {period['until']} (exclusive); made {report['created']} from the audit log.",
        f"Percentiles are {report['percentile_method']}; TPOT = (latency - TTFT) / (completion tokens - 1) for "
        "requests with more than one token.", "",
        "## Policy", "",
        f"Targets are those of the policy in force when the report was made: `{policy['targets_from']}`.",
        f"In force when the period began: `{policy['at_start'] or 'not recorded'}`.",
    ]
    for change in policy["changes"]:
        lines.append(f"- {change['ts']}: {change['event']} `{change['old_digest']}` -> `{change['new_digest']}`")
    if not policy["targets_were_in_force"]:
        lines.append("")
        lines.append("**Note:** the policy whose targets are used was not recorded as in force during this period; "
                     "the targets may have differed.")
    lines += ["", "## Summary", "",
              "| Class | Requests | Completed | Failed | Aborted | Rejected | SLO met | Attainment | Objective "
              "| Goodput (req/s) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, c in report["classes"].items():
        objective = c["objective"]
        verdict = "-" if objective is None else (
            f"{'met' if objective['met'] else 'MISSED'} (>= {_pct(objective['attainment_needed'])})")
        goodput = "-" if c["goodput_rps"] is None else f"{c['goodput_rps']:.6f}"
        lines.append(f"| {name} | {c['requests']} | {c['completed']} | {c['failed']} | {c['aborted']} | "
                     f"{c['rejected']} | {c['slo_met']} | {_pct(c['attainment'])} | {verdict} | {goodput} |")
    for name, c in report["classes"].items():
        targets = c["targets"]
        lines += ["", f"## Class `{name}`", ""]
        if targets is None:
            lines.append("This class is not in the policy in force: no targets to judge against.")
        else:
            tpot = "none" if targets["tpot_ms"] is None else f"{targets['tpot_ms']} ms"
            lines.append(f"Targets: TTFT {targets['ttft_ms']} ms, TPOT {tpot}, at p{targets['percentile']:g}; "
                         f"priority {targets['priority']}, deadline {targets['deadline_ms']} ms.")
        lines += ["", "| Latency (ms) | p50 | p90 | p99 |", "|---|---|---|---|"]
        for metric in ("ttft_ms", "tpot_ms"):
            q = c[metric]
            lines.append(f"| {metric[:4].upper()} | {_ms(q['p50'])} | {_ms(q['p90'])} | {_ms(q['p99'])} |")
        if c["objective"] is not None:
            o = c["objective"]
            lines.append("")
            lines.append(f"At the class's percentile: TTFT {_ms(o['ttft_at_percentile_ms'])} ms, "
                         f"TPOT {_ms(o['tpot_at_percentile_ms'])} ms.")
        if c["rejected_by_code"]:
            lines += ["", "Rejected: " + ", ".join(f"{code}: {n}" for code, n in c["rejected_by_code"].items())]
        if c["slo_missed_by_reason"]:
            lines += ["", "SLO missed: " + ", ".join(f"{why}: {n}" for why, n in c["slo_missed_by_reason"].items())]
    if not report["classes"]:
        lines += ["", "No requests of this tenant in this period."]
    return "\n".join(lines) + "\n"


def render_png(report: dict[str, Any]) -> bytes:
    """Attainment per day and class, with each class's objective dashed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.5), dpi=100)
    ax = fig.subplots()
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
    for i, (name, c) in enumerate(report["classes"].items()):
        color = colors[i % len(colors)]
        days = sorted(c["attainment_by_day"])
        if days:
            ax.plot([d[5:] for d in days], [c["attainment_by_day"][d] * 100 for d in days], marker="o",
                    color=color, label=f"{name} attainment")
        if c["objective"] is not None:
            ax.axhline(c["objective"]["attainment_needed"] * 100, color=color, linestyle="--",
                       label=f"{name} objective (p{c['targets']['percentile']:g})")
    ax.set_ylim(0, 101)
    ax.set_ylabel("requests within targets (%)")
    ax.set_xlabel(f"day of {report['period']['month']} (UTC)")
    ax.set_title(f"SLA attainment per day: tenant {report['tenant']}, {report['period']['month']}")
    if report["classes"]:
        ax.legend(loc="lower left", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no requests in this period", ha="center", va="center", transform=ax.transAxes)
    ax.tick_params(axis="x", labelrotation=45)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()
