"""Benchmark: build and verify a multi-GB synthetic bundle against ``sha256sum`` in the same run.

    python -m airgap_bundle.bench --size-mb 2560 --files 5 --repeats 3 --out var/bench/airgap_bundle

Targets (issue 4): verification at >= 1.5x the throughput of ``sha256sum`` over the same bytes,
with peak memory under 200 MB; build at >= 1x "sha256sum plus the tar write", i.e. build time
<= time(``sha256sum`` of the inputs) + time(GNU ``tar -cf`` of the same inputs, then ``sync``).

Every measured step runs in a fresh process (``bench_child``; ``sha256sum``/``tar`` are
processes anyway), so each peak memory (VmHWM) is that step's own. Steps are interleaved
(baseline, ours, baseline, ours, ...) so that load from other processes on a shared machine
falls on both alike; medians of ``--repeats`` are reported with the load average seen.

Page cache: "warm" runs read what the previous step left in the page cache, so they measure
hashing, not the disk; "cold" runs first fsync and drop the file's cached pages
(``posix_fadvise(DONTNEED)``), for the baseline and for ours alike.

Inputs are incompressible (one random MiB repeated; hashing cost does not depend on content)
and live in a fresh work directory under $TMPDIR, deleted at the end unless ``--keep``.
Writes ``OUT/bench.json`` and prints a table.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from .keys import init_keys

MIB = 1024 * 1024
VERIFY_RATIO_TARGET = 1.5
MEMORY_TARGET_MB = 200.0


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                            "openssl": ssl.OPENSSL_VERSION, "kernel": platform.release()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                           if line.startswith("model name"))
        info["sha_ni"] = " sha_ni" in cpuinfo
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
        info["memory_gb"] = round(mem_kb / 1024 / 1024, 1)
    except (OSError, StopIteration, ValueError):
        pass
    if shutil.which("sha256sum"):
        version = subprocess.run(["sha256sum", "--version"], capture_output=True, text=True).stdout
        info["sha256sum"] = version.splitlines()[0] if version else "?"
    info["loadavg_start"] = list(os.getloadavg())
    return info


def make_inputs(base: Path, size_mb: int, files: int) -> Path:
    """A model directory of ``files`` weight files totalling about ``size_mb`` MiB, plus config.json."""
    model = base / "model"
    model.mkdir(parents=True)
    per_file = max(1, size_mb // files)
    block = os.urandom(MIB)
    for n in range(files):
        with open(model / f"model-{n:05d}-of-{files:05d}.safetensors", "wb") as out:
            for _ in range(per_file):
                out.write(block)
            out.flush()
            os.fsync(out.fileno())  # on disk before timing starts: no writeback competes with step 1
    (model / "config.json").write_text("{}\n")
    return model


def drop_cache(paths: list[Path]) -> None:
    """Write back, then evict each file's pages from the page cache (no root needed)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(argv: list[str], cpu: list[float] | None = None) -> float:
    """Wall seconds of a command; its CPU seconds (user + system, children included) go to ``cpu``."""
    start, cpu_start = time.perf_counter(), _children_cpu()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    if cpu is not None:
        cpu.append(_children_cpu() - cpu_start)
    return time.perf_counter() - start


def _child(*args: str) -> dict[str, Any]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "airgap_bundle.bench_child", *args], check=True,
                          capture_output=True, text=True)
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - start
    if not result["ok"]:
        raise RuntimeError(f"benchmark step {args[0]} failed: {result.get('failure')}")
    return result


def _mb_s(nbytes: int, seconds: float) -> float:
    return round(nbytes / 1e6 / seconds, 1)


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def run_benchmark(work: Path | None = None, size_mb: int = 2560, files: int = 5, workers: int | None = None,
                  repeats: int = 3, cold: bool = True, keep: bool = False) -> dict[str, Any]:
    """Run every step ``repeats`` times in ``work`` (default: a new temp dir); return raw runs and medians."""
    owned = work is None
    work = Path(tempfile.mkdtemp(prefix="airgap-bench-")) if work is None else Path(work)
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine(),
                               "params": {"size_mb": size_mb, "files": files, "workers": workers,
                                          "repeats": repeats, "work": str(work)}}
    worker_args = ["--workers", str(workers)] if workers else []
    try:
        init_keys(work / "keys", thresholds={"root": 1}, counts={"root": 1})
        model = make_inputs(work / "inputs", size_mb, files)
        inputs = _files(model)
        input_bytes = sum(p.stat().st_size for p in inputs)
        baseline_tar = work / "baseline.tar"
        build: dict[str, list[float]] = {"sha256sum_inputs_s": [], "tar_write_s": [], "build_s": [],
                                         "build_cpu_s": [], "build_peak_rss_mb": []}
        bundle = work / "bundle.tar"
        for r in range(repeats):
            build["sha256sum_inputs_s"].append(_timed(["sha256sum", *map(str, inputs)]))
            build["tar_write_s"].append(_timed(["sh", "-c", 'tar -cf "$1" -C "$2" model && sync "$1"', "sh",
                                                str(baseline_tar), str(work / "inputs")]))
            baseline_tar.unlink()
            out = bundle if r == 0 else work / "rebuilt.tar"
            step = _child("build", str(work / "keys"), str(model), str(out), *worker_args)
            build["build_s"].append(step["seconds"])
            build["build_cpu_s"].append(step["cpu_seconds"])
            build["build_peak_rss_mb"].append(step["peak_rss_kb"] / 1024)
            if r:
                out.unlink()
        results["input_bytes"], results["bundle_bytes"] = input_bytes, bundle.stat().st_size
        results["build"] = build
        root = str(work / "keys" / "root.json")
        warm: dict[str, list[float]] = {"sha256sum_s": [], "verify_s": [], "verify_1_worker_s": [],
                                        "hashlib_1_thread_s": [], "verify_peak_rss_mb": [], "sha256sum_cpu_s": [],
                                        "verify_cpu_s": [], "verify_1_worker_cpu_s": [], "hashlib_1_thread_cpu_s": []}
        for _ in range(repeats):
            warm["sha256sum_s"].append(_timed(["sha256sum", str(bundle)], warm["sha256sum_cpu_s"]))
            step = _child("verify", str(bundle), root, *worker_args)
            warm["verify_s"].append(step["seconds"])
            warm["verify_cpu_s"].append(step["cpu_seconds"])
            warm["verify_peak_rss_mb"].append(step["peak_rss_kb"] / 1024)
            one = _child("verify", str(bundle), root, "--workers", "1")
            warm["verify_1_worker_s"].append(one["seconds"])
            warm["verify_1_worker_cpu_s"].append(one["cpu_seconds"])
            plain = _child("hashlib", str(bundle))
            warm["hashlib_1_thread_s"].append(plain["seconds"])
            warm["hashlib_1_thread_cpu_s"].append(plain["cpu_seconds"])
        results["verify_detail"] = step["detail"]
        results["verify_warm"] = warm
        if cold:
            cold_runs: dict[str, list[float]] = {"sha256sum_s": [], "verify_s": [], "verify_peak_rss_mb": []}
            for _ in range(repeats):
                drop_cache([bundle])
                cold_runs["sha256sum_s"].append(_timed(["sha256sum", str(bundle)]))
                drop_cache([bundle])
                step = _child("verify", str(bundle), root, *worker_args)
                cold_runs["verify_s"].append(step["seconds"])
                cold_runs["verify_peak_rss_mb"].append(step["peak_rss_kb"] / 1024)
            results["verify_cold"] = cold_runs
        results["idle_peak_rss_mb"] = _child("idle")["peak_rss_kb"] / 1024
    finally:
        results["machine"]["loadavg_end"] = list(os.getloadavg())
        if not keep:
            shutil.rmtree(work if owned else work / "inputs", ignore_errors=True)
            for name in ("bundle.tar", "rebuilt.tar", "baseline.tar"):
                (work / name).unlink(missing_ok=True)
    results["summary"] = summarize(results)
    return results


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Medians, throughputs, ratios and whether each target is met."""
    size, inputs = results["bundle_bytes"], results["input_bytes"]
    out: dict[str, Any] = {}
    peaks = list(results["verify_warm"]["verify_peak_rss_mb"])
    for phase in ("verify_warm", "verify_cold"):
        if phase not in results:
            continue
        runs = results[phase]
        sha, ours = _median(runs["sha256sum_s"]), _median(runs["verify_s"])
        row = {"sha256sum_s": sha, "verify_s": ours, "sha256sum_mb_s": _mb_s(size, sha),
               "verify_mb_s": _mb_s(size, ours), "ratio": round(sha / ours, 2), "target": VERIFY_RATIO_TARGET,
               "met": sha / ours >= VERIFY_RATIO_TARGET,
               "runs_met": sum(1 for a, b in zip(runs["sha256sum_s"], runs["verify_s"], strict=True)
                               if a / b >= VERIFY_RATIO_TARGET)}
        if phase == "verify_warm":
            one, hashlib_1 = _median(runs["verify_1_worker_s"]), _median(runs["hashlib_1_thread_s"])
            row.update(verify_1_worker_mb_s=_mb_s(size, one), hashlib_1_thread_mb_s=_mb_s(size, hashlib_1),
                       ratio_vs_hashlib_1_thread=round(hashlib_1 / ours, 2))
            # CPU seconds per GB: the work done, which load from other processes does not inflate
            # the way it inflates wall time; wall / CPU shows how much of the machine a step got.
            for name in ("sha256sum", "verify", "verify_1_worker", "hashlib_1_thread"):
                cpu = _median(runs[f"{name}_cpu_s"])
                row[f"{name}_cpu_s_per_gb"] = round(cpu / (size / 1e9), 3)
                row[f"{name}_cores_used"] = round(cpu / _median(runs[f"{name}_s"]), 2)
        else:
            peaks += runs["verify_peak_rss_mb"]
        out[phase] = row
    out["verify_peak_rss_mb"] = round(max(peaks), 1)
    out["memory_met"] = max(peaks) < MEMORY_TARGET_MB
    build = results["build"]
    sha, tar, ours = (_median(build["sha256sum_inputs_s"]), _median(build["tar_write_s"]), _median(build["build_s"]))
    out["build"] = {"sha256sum_inputs_s": sha, "tar_write_s": tar, "budget_s": round(sha + tar, 3), "build_s": ours,
                    "build_mb_s": _mb_s(inputs, ours), "ratio": round((sha + tar) / ours, 2), "target": 1.0,
                    "met": (sha + tar) / ours >= 1.0, "peak_rss_mb": round(max(build["build_peak_rss_mb"]), 1),
                    "runs_met": sum(1 for s_, t_, b_ in zip(build["sha256sum_inputs_s"], build["tar_write_s"],
                                                            build["build_s"], strict=True) if s_ + t_ >= b_),
                    "cpu_s_per_gb": round(_median(build["build_cpu_s"]) / (inputs / 1e9), 3)}
    return out


def print_table(results: dict[str, Any], console: Console) -> None:
    summary, repeats = results["summary"], results["params"]["repeats"]
    table = Table(title=f"airgap-bundle benchmark: {results['bundle_bytes'] / 1e9:.2f} GB bundle, "
                        f"{results['params']['files']} weight files, medians of {results['params']['repeats']}")
    for column in ("step", "baseline", "ours", "ratio", "target", "met"):
        table.add_column(column)
    for phase in ("verify_warm", "verify_cold"):
        if phase in summary:
            row = summary[phase]
            table.add_row(phase.replace("_", " "), f"sha256sum {row['sha256sum_mb_s']} MB/s",
                          f"{row['verify_mb_s']} MB/s", f"{row['ratio']}x", f">= {row['target']}x",
                          f"{'yes' if row['met'] else 'NO'} ({row['runs_met']}/{repeats} runs)")
    warm = summary["verify_warm"]
    table.add_row("verify warm, 1 worker", f"hashlib 1 thread {warm['hashlib_1_thread_mb_s']} MB/s",
                  f"{warm['verify_1_worker_mb_s']} MB/s", f"{warm['ratio_vs_hashlib_1_thread']}x (parallel)", "", "")
    table.add_row("CPU s/GB (cores used)",
                  f"sha256sum {warm['sha256sum_cpu_s_per_gb']} ({warm['sha256sum_cores_used']}), "
                  f"hashlib {warm['hashlib_1_thread_cpu_s_per_gb']} ({warm['hashlib_1_thread_cores_used']})",
                  f"{warm['verify_cpu_s_per_gb']} ({warm['verify_cores_used']}), 1 worker "
                  f"{warm['verify_1_worker_cpu_s_per_gb']} ({warm['verify_1_worker_cores_used']})", "", "", "")
    table.add_row("verify peak RSS", f"idle interpreter {results['idle_peak_rss_mb']:.1f} MB",
                  f"{summary['verify_peak_rss_mb']} MB", "", f"< {MEMORY_TARGET_MB:.0f} MB",
                  "yes" if summary["memory_met"] else "NO")
    build = summary["build"]
    table.add_row("build", f"sha256sum {build['sha256sum_inputs_s']} s + tar {build['tar_write_s']} s",
                  f"{build['build_s']} s ({build['build_mb_s']} MB/s)", f"{build['ratio']}x", ">= 1.0x",
                  f"{'yes' if build['met'] else 'NO'} ({build['runs_met']}/{repeats} runs)")
    console.print(table)
    load = results["machine"]
    console.print(f"load average start {load['loadavg_start']}, end {load['loadavg_end']} on {load.get('cpus')} CPUs")


def main(
    out: Annotated[Path, typer.Option(help="Directory for bench.json.")] = Path("var/bench/airgap_bundle"),
    size_mb: Annotated[int, typer.Option(min=1, help="Total size of the weight files, MiB.")] = 2560,
    files: Annotated[int, typer.Option(min=1, help="Number of weight files.")] = 5,
    workers: Annotated[int | None, typer.Option(min=1, help="Hashing threads (default: one per CPU).")] = None,
    repeats: Annotated[int, typer.Option(min=1)] = 3,
    cold: Annotated[bool, typer.Option(help="Also measure with the bundle dropped from the page cache.")] = True,
    work: Annotated[Path | None, typer.Option(help="Work directory (default: a new one under $TMPDIR).")] = None,
    keep: Annotated[bool, typer.Option(help="Keep the work directory.")] = False,
) -> None:
    results = run_benchmark(work, size_mb, files, workers, repeats, cold, keep)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    print_table(results, Console())


if __name__ == "__main__":
    typer.run(main)
