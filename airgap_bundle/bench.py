"""Benchmark: build / verify / unpack throughput on a synthetic bundle, against ``sha256sum``.

    python -m airgap_bundle.bench --size-mb 512 --files 4 --out DIR

Writes DIR/bench.json and prints a table. ``sha256sum`` of the bundle is the floor: one
sequential hash of every byte. ``verify`` hashes every byte twice (whole-bundle digest in
check 1, targets in check 8), the second pass over several targets in parallel threads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from .build import build_bundle
from .keys import init_keys
from .unpack import unpack_bundle
from .verify import verify_bundle

CHUNK = 1024 * 1024


def _timed(action: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    result = action()
    return result, time.perf_counter() - start


def _make_inputs(base: Path, size_mb: int, files: int) -> Path:
    model = base / "model"
    model.mkdir(parents=True)
    per_file = max(1, size_mb // files)
    block = os.urandom(CHUNK)  # incompressible, reused: hashing cost does not depend on repetition
    for n in range(files):
        with open(model / f"model-{n:05d}.safetensors", "wb") as out:
            for _ in range(per_file):
                out.write(block)
    (model / "config.json").write_text("{}\n")
    return model


def run_benchmark(work: Path, size_mb: int = 256, files: int = 4, workers: int | None = None) -> dict[str, Any]:
    """Run the benchmark in ``work`` (created, then cleaned of bulky files); return the results."""
    work.mkdir(parents=True, exist_ok=True)
    init_keys(work / "keys", thresholds={"root": 1}, counts={"root": 1})
    model = _make_inputs(work / "inputs", size_mb, files)
    now = datetime.now(UTC).replace(microsecond=0)
    bundle, t_build = _timed(lambda: build_bundle(work / "bench.tar", work / "keys", "bench", now + timedelta(days=1),
                                                  model_dir=model, policies_dir=None, created=now))
    size = bundle.stat().st_size
    _, t_verify_1 = _timed(lambda: verify_bundle(bundle, work / "keys" / "root.json", workers=1))
    report, t_verify_n = _timed(lambda: verify_bundle(bundle, work / "keys" / "root.json", workers=workers))
    if not report.ok:
        raise RuntimeError(f"benchmark bundle failed verification: {report.first_failure()}")
    _, t_unpack = _timed(lambda: unpack_bundle(bundle, work / "unpacked", report))
    t_sha = None
    if shutil.which("sha256sum"):
        _, t_sha = _timed(lambda: subprocess.run(["sha256sum", str(bundle)], check=True, capture_output=True))
    shutil.rmtree(work / "inputs")
    shutil.rmtree(work / "unpacked")
    bundle.unlink()

    def row(seconds: float | None) -> dict[str, float | None]:
        if seconds is None:
            return {"seconds": None, "mb_per_s": None}
        return {"seconds": round(seconds, 3), "mb_per_s": round(size / 1e6 / seconds, 1)}

    return {
        "bundle_bytes": size, "files": files, "cpus": os.cpu_count(), "workers": workers,
        "build": row(t_build), "verify_1_worker": row(t_verify_1), "verify_parallel": row(t_verify_n),
        "unpack": row(t_unpack), "sha256sum": row(t_sha),
    }


def main(
    out: Annotated[Path, typer.Option(help="Work/result directory.")] = Path("var/bench/airgap_bundle"),
    size_mb: Annotated[int, typer.Option(min=1)] = 256,
    files: Annotated[int, typer.Option(min=1)] = 4,
    workers: Annotated[int | None, typer.Option(min=1)] = None,
) -> None:
    results = run_benchmark(out, size_mb, files, workers)
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    table = Table(title=f"airgap-bundle benchmark ({results['bundle_bytes'] / 1e6:.0f} MB, {files} files)")
    for column in ("step", "seconds", "MB/s"):
        table.add_column(column)
    for step in ("build", "verify_1_worker", "verify_parallel", "unpack", "sha256sum"):
        table.add_row(step, str(results[step]["seconds"]), str(results[step]["mb_per_s"]))
    Console().print(table)


if __name__ == "__main__":
    typer.run(main)
