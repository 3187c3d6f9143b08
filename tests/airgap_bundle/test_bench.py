"""The benchmark runs end to end on a tiny bundle. A benchmark is not a test: no timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from airgap_bundle.bench import print_table, run_benchmark


def test_benchmark_runs_small_and_reports_every_step(tmp_path: Path) -> None:
    work = tmp_path / "bench"
    results = run_benchmark(work, size_mb=2, files=2, workers=2, repeats=1)
    assert results["bundle_bytes"] > results["input_bytes"] >= 2 * 1024 * 1024
    summary = results["summary"]
    for phase in ("verify_warm", "verify_cold"):
        assert summary[phase]["verify_mb_s"] > 0 and summary[phase]["sha256sum_mb_s"] > 0
    assert 0 < summary["verify_peak_rss_mb"] and summary["build"]["build_s"] > 0
    assert results["machine"]["cpus"] and "loadavg_end" in results["machine"]
    assert not (work / "bundle.tar").exists() and not (work / "inputs").exists()
    console = Console(record=True, width=200)
    print_table(results, console)
    assert "verify warm" in console.export_text()


def test_child_reports_its_own_peak_memory() -> None:
    out = subprocess.run([sys.executable, "-m", "airgap_bundle.bench_child", "idle"], check=True,
                         capture_output=True, text=True).stdout
    result = json.loads(out)
    assert result["ok"] and result["peak_rss_kb"] > 0
