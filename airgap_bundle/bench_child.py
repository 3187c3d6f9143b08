"""One measured step of ``airgap_bundle.bench``, in its own process so that its peak memory is its own.

    python -m airgap_bundle.bench_child verify BUNDLE ROOT [--workers N]
    python -m airgap_bundle.bench_child build KEYDIR MODEL_DIR OUT.tar [--workers N]
    python -m airgap_bundle.bench_child hashlib FILE        one sequential sha256 (OpenSSL), 1 MiB reads
    python -m airgap_bundle.bench_child idle                imports only: the interpreter's own footprint

Prints one JSON line: ``seconds`` (the library call only, not interpreter start-up or imports),
``cpu_seconds`` (user + system CPU of all its threads during that call), ``peak_rss_kb`` (VmHWM
from /proc/self/status: the resident high-water mark of this process), ``ok``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from .build import build_bundle
from .verify import verify_bundle

BENCH_CREATED = datetime(2026, 1, 1, tzinfo=UTC)


def peak_rss_kb() -> int:
    """VmHWM of this process in KiB (0 where /proc is not available)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _hashlib(path: str) -> str:
    digest = hashlib.sha256()
    buf = memoryview(bytearray(1024 * 1024))
    with open(path, "rb", buffering=0) as stream:
        while got := stream.readinto(buf):
            digest.update(buf[:got])
    return digest.hexdigest()


def run_step(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m airgap_bundle.bench_child")
    steps = parser.add_subparsers(dest="step", required=True)
    verify = steps.add_parser("verify")
    verify.add_argument("bundle")
    verify.add_argument("root")
    verify.add_argument("--workers", type=int, default=None)
    build = steps.add_parser("build")
    build.add_argument("keys")
    build.add_argument("model")
    build.add_argument("out")
    build.add_argument("--workers", type=int, default=None)
    steps.add_parser("hashlib").add_argument("file")
    steps.add_parser("idle")
    args = parser.parse_args(argv)

    start, cpu_start = time.perf_counter(), time.process_time()
    result: dict[str, Any] = {"step": args.step, "ok": True}
    if args.step == "verify":
        report = verify_bundle(Path(args.bundle), Path(args.root), workers=args.workers)
        result.update(ok=report.ok, failure=str(report.first_failure() or ""), detail=report.checks[7].detail)
    elif args.step == "build":
        bundle = build_bundle(Path(args.out), Path(args.keys), "bench", BENCH_CREATED + timedelta(days=3650),
                              model_dir=Path(args.model), policies_dir=None, created=BENCH_CREATED,
                              workers=args.workers)
        result["bytes"] = bundle.stat().st_size
    elif args.step == "hashlib":
        result["sha256"] = _hashlib(args.file)
    result["seconds"] = time.perf_counter() - start
    result["cpu_seconds"] = time.process_time() - cpu_start  # all threads, user + system
    result["peak_rss_kb"] = peak_rss_kb()
    result["pid"] = os.getpid()
    return result


def main() -> None:
    print(json.dumps(run_step(sys.argv[1:])), flush=True)


if __name__ == "__main__":
    main()
