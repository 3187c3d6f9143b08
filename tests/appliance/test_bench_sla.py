"""The SLA benchmark (``python -m appliance.bench sla``) in a tiny configuration.

Real processes throughout: two engine node processes on the real model (``appliance node serve``,
one FCFS, one SLA) behind two real gateways (``appliance serve``). No timed assertions: both phases
must run the same seeded arrivals, every tenant must be served and counted by the node, and the
JSON, Markdown and chart must hold every field the docs describe.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.bench.sla_bench import TENANTS, Workload, admission_off
from appliance.bench.sla_report import main

REPO = Path(__file__).resolve().parents[2]
TINY = Workload(seconds=4, warmup_s=1, alpha_rate=1.5, alpha_max_tokens=4, beta_rate=1.0, beta_prompt_words=60,
                beta_max_tokens=4, bulk_streams=3, bulk_max_tokens=12, max_num_seqs=2)


@pytest.mark.slow
def test_both_phases_run_the_same_load_and_report_every_field(model_dir: Path, tmp_path: Path) -> None:
    assert main(model_dir, TINY.seconds, tmp_path, TINY) == 0
    result = json.loads((tmp_path / "sla-bench.json").read_text())
    assert set(result["phases"]) == {"fcfs", "sla"}
    fcfs, sla = result["phases"]["fcfs"], result["phases"]["sla"]
    for phase in (fcfs, sla):
        assert set(phase["tenants"]) == set(TENANTS)
        for tenant, body in phase["tenants"].items():
            assert body["sla_class"] == TENANTS[tenant]
            assert body["requests"] == body["ran"] + sum(body["rejected"].values()), body
            assert body["met"] + sum(body["missed"].values()) == body["completed"] <= body["ran"], body
            for key in ("attainment", "ttft_p50_ms", "ttft_p99_ms", "goodput_rps", "tokens_per_s"):
                assert key in body
        assert phase["tenants"]["bulk"]["tokens_per_s"] > 0, phase
        assert all(phase["served_tokens_in_window"][t] > 0 for t in TENANTS), phase["served_tokens_in_window"]
        rows = phase["requests"]["rows"]
        assert rows and all(row[1] >= TINY.warmup_s for row in rows)
    # identical open-loop load: the interactive tenants' arrivals are the same seeded schedule
    for tenant in ("alpha", "beta"):
        arrivals = [[r[1] for r in p["requests"]["rows"] if r[0] == tenant] for p in (fcfs, sla)]
        assert arrivals[0] == arrivals[1] and arrivals[0], tenant
    # FCFS never refuses (admission effectively off): every refusal there would be a setup error
    assert all(not body["rejected"] for body in fcfs["tenants"].values()), fcfs["tenants"]
    # the FCFS node never preempts for priority
    fcfs_preempt = fcfs["node"]["preemptions_by_reason"] or {}
    assert not fcfs_preempt.get("priority_slot") and not fcfs_preempt.get("priority_kv_cache"), fcfs_preempt
    assert result["fairness"]["longest_prompt_tokens"] > TINY.beta_prompt_words
    assert set(result["targets"]) == {"interactive_attainment", "batch_throughput_ratio",
                                      "interactive_goodput_ratio", "vtc"}
    table = (tmp_path / "sla-bench.md").read_text()
    assert "| fcfs | alpha (interactive) |" in table and "| sla | bulk (batch) |" in table and "VTC bound" in table
    assert (tmp_path / "sla-bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_admission_off_keeps_the_classes_but_lifts_their_targets() -> None:
    from policies import default_policy_dir

    doc = admission_off(default_policy_dir() / "sla_classes.yaml")
    assert set(doc["sla_classes"]) >= {"interactive", "standard", "batch"}
    for body in doc["sla_classes"].values():
        assert body["ttft_ms"] == body["deadline_ms"] == 3_600_000 and "tpot_ms" not in body


@pytest.mark.parametrize(("args", "expected"), [
    (["--seconds", "0"], "seconds must be > 0"),
    (["--seconds", "-3"], "seconds must be > 0"),
    (["--model-dir", "/nonexistent"], "expected a model directory with config.json"),
])
def test_bad_settings_are_refused_with_the_reason(args: list[str], expected: str, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "appliance.bench", "sla", "--out", str(tmp_path), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert done.returncode == 2, done.stdout + done.stderr
    assert expected in done.stderr, done.stderr
    assert not list(tmp_path.iterdir())  # nothing started, nothing written
