from __future__ import annotations

from pathlib import Path

from airgap_bundle.bench import run_benchmark


def test_benchmark_runs_small_and_reports_throughput(tmp_path: Path) -> None:
    results = run_benchmark(tmp_path / "bench", size_mb=2, files=2, workers=2)
    assert results["bundle_bytes"] > 2 * 1024 * 1024
    for step in ("build", "verify_1_worker", "verify_parallel", "unpack"):
        assert results[step]["seconds"] > 0 and results[step]["mb_per_s"] > 0
    assert not (tmp_path / "bench" / "bench.tar").exists()
