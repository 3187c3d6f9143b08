"""Benchmark: export and verify-export of N audit records (default 1,000,000) on SQLite.

    .venv/bin/python tests/appliance/audit/bench_export.py --records 1000000 [--format csv] [--dir DIR]

1. Fills a fresh SQLite log with N records of one tenant through the log's own group-commit
   writer (``GroupWriter._process``, batches of 5,000, the writer's timer checkpoint every
   100,000 records): the same code, hashes, tree nodes and signed checkpoints as a running
   appliance, so the content verifies; only the waiting of N callers is left out.
2. Times ``appliance audit export`` of the whole stream (which verifies the stream from genesis
   first, signs its head, then writes the tar), ``verify-export`` of that tar, and ``sha256sum``
   of the same tar as the reference for reading the bytes once.

Each step runs in its own process and reports wall and CPU seconds and its peak RSS
(``resource.getrusage``), so the numbers are not hidden by the fill's; on a shared machine the
CPU seconds say what the step costs when it has a core to itself. Run with two sizes to see
memory stay flat; ``--dir`` with an existing ``audit.db`` skips the fill. Not a test: nothing
here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STREAM = "acme"


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def fill(db: Path, key: Path, n: int) -> None:
    from appliance.audit import AuditLog
    from appliance.audit.canonical import canonical_json
    from appliance.audit.writer import CheckpointRequest, Pending

    log = AuditLog(f"sqlite:///{db}", key, checkpoint_every=None)
    batch_size, every = 5000, 100_000
    try:
        for start in range(0, n, batch_size):
            batch = []
            for i in range(start, min(n, start + batch_size)):
                data = {"model": "smollm2", "prompt_tokens": i % 900, "completion_tokens": i % 300,
                        "latency_ms": 12.5 + i % 7, "node": "node-1", "client_ip": "10.0.0.7",
                        "user_agent": "OpenAI/Python 1.54.0"}
                text = canonical_json(data)
                fields = {"event_type": "completed" if i % 2 else "accepted", "actor": "key:k1", "tenant": STREAM,
                          "request_id": f"req-{i // 2}", "data": json.loads(text)}
                batch.append(Pending(STREAM, fields, text))
            end = start + len(batch)
            due = end % every == 0 or end == n
            log.writer._process(batch, [CheckpointRequest(STREAM, explicit=False)] if due else [])
    finally:
        log.close()


def step(args: argparse.Namespace) -> dict[str, object]:
    from appliance.audit import AuditLog, export_stream, verify_export

    work = Path(args.dir)
    db, key, tar, pem = work / "audit.db", work / "audit.key", work / f"export-{args.format}.tar", work / "audit.pem"
    started, cpu = time.perf_counter(), _cpu_s()
    result: dict[str, object] = {"step": args.step}
    if args.step == "fill":
        fill(db, key, args.records)
        with AuditLog(f"sqlite:///{db}", key, create=False) as log:
            pem.write_bytes(log.public_key_pem())
    elif args.step == "export":
        tar.unlink(missing_ok=True)
        with AuditLog(f"sqlite:///{db}", key, create=False, checkpoint_every=None) as log:
            export_stream(log, STREAM, None, None, tar, fmt=args.format, proofs=args.proofs)
        result["bytes"] = tar.stat().st_size
    elif args.step == "verify":
        report = verify_export(tar, pem)
        if not report.ok:
            raise SystemExit(f"verify-export failed: {report.first_failure}")
        result["count"] = report.count
    result["seconds"] = round(time.perf_counter() - started, 2)
    result["cpu_seconds"] = round(_cpu_s() - cpu, 2)  # wall minus this is time spent waiting for a core
    result["peak_rss_mib"] = round(_rss_mib(), 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--format", choices=("jsonl", "csv", "ocsf"), default="jsonl")
    parser.add_argument("--proofs", choices=("ends", "all"), default="ends")
    parser.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed)")
    parser.add_argument("--step", choices=("fill", "export", "verify"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step is not None:
        print(json.dumps(step(args)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        work = Path(args.dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = []
        for name in ("fill", "export", "verify"):
            if name == "fill" and (work / "audit.db").exists():
                continue
            cmd = [sys.executable, __file__, "--step", name, "--dir", str(work), "--records", str(args.records),
                   "--format", args.format, "--proofs", args.proofs]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
        tar = work / f"export-{args.format}.tar"
        started = time.perf_counter()
        subprocess.run(["sha256sum", str(tar)], check=True, capture_output=True)
        rows.append({"step": "sha256sum (same tar)", "seconds": round(time.perf_counter() - started, 2)})
        print(f"{args.records} records, format {args.format}, proofs {args.proofs}")
        for row in rows:
            print("  " + ", ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
