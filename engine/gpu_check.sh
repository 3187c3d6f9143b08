#!/usr/bin/env bash
# GPU checks for the engine, in under 8 minutes on one H200 (timeouts 170 s + 290 s; expected 1-2 min each):
#   1. Triton kernels and CUDA graphs against the torch reference and transformers (real GPU, not
#      the interpreter): tests/engine/test_triton_gpu.py
#   2. The 8B-shaped benchmark: python -m engine bench --device cuda (random bf16 weights, 256
#      requests with prompt/output lengths uniform in [100, 1024], single-stream decode vs roofline)
# Usage: engine/gpu_check.sh RESULTS_DIR   (PYTHON=... to pick the interpreter; default python3)
# Writes env.txt, kernel_tests.log, bench_gpu.json, bench_gpu.log under RESULTS_DIR; prints a short
# table last (with the logs' tails when something failed; a bench cut short still reports what it
# measured). Exit status: 0 if the tests passed and the bench produced results, else 1.
set -uo pipefail
OUT_DIR=${1:?usage: engine/gpu_check.sh RESULTS_DIR}
mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR/bench_gpu.json"  # a stale result must not pass for this run's
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset TRITON_INTERPRET

"$PY" - >"$OUT_DIR/env.txt" 2>&1 <<'PY'
import importlib.util, os, shutil, sysconfig
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
if torch.cuda.is_available():
    free, total = torch.cuda.mem_get_info()
    print(f"memory free {free / 2**30:.1f} / {total / 2**30:.1f} GiB")
# Triton builds its launcher with a C compiler against Python.h the first time it runs a kernel
cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
print("C compiler", cc or "MISSING", "| Python.h",
      "ok" if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else "MISSING")
print("modules", " ".join(f"{m}={'ok' if importlib.util.find_spec(m) else 'MISSING'}"
                          for m in ("pytest", "transformers", "tokenizers", "safetensors", "typer")))
PY

timeout 170 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" tests/engine/test_triton_gpu.py \
    >"$OUT_DIR/kernel_tests.log" 2>&1
tests_rc=$?

timeout 290 "$PY" -m engine bench --device cuda --json --out "$OUT_DIR/bench_gpu.json" \
    >"$OUT_DIR/bench_gpu.log" 2>&1
bench_rc=$?

"$PY" - "$OUT_DIR" "$tests_rc" "$bench_rc" <<'PY'
import json, pathlib, sys
out, tests_rc, bench_rc = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
print((out / "env.txt").read_text().strip())
log = (out / "kernel_tests.log").read_text().strip().splitlines()
tests_ok = tests_rc == 0 and bool(log) and " passed" in log[-1]  # all skipped (no CUDA?) is no pass
print(f"{'kernel tests':34s} {'PASS' if tests_ok else 'FAIL'} ({log[-1] if log else 'no output'})")
if not tests_ok:
    print("--- kernel_tests.log (last 25 lines)", *log[-25:], sep="\n")
path = out / "bench_gpu.json"
ok = bench_rc == 0 and path.exists()
if not ok:
    print(f"{'bench':34s} FAIL (exit {bench_rc}; see bench_gpu.log)")
    blog = (out / "bench_gpu.log").read_text(errors="replace").strip().splitlines()
    print("--- bench_gpu.log (last 25 lines)", *blog[-25:], sep="\n")
if not path.exists():
    sys.exit(1)
g = json.loads(path.read_text())["gpu"]  # partial when the bench was cut short: print what it measured
rows = [
    ("offline output tok/s (target 5000)", [("offline_output_tokens_per_s", "{:.0f}")]),
    ("offline seconds / steps / preempt.", [("offline_seconds", "{:.1f}"), ("offline_steps", "{}"),
                                            ("offline_preemptions", "{}")]),
    ("single-stream decode tok/s", [("single_stream_tokens_per_s", "{:.1f}")]),
    ("roofline tok/s (copy BW / weights)", [("roofline_tokens_per_s", "{:.1f}")]),
    ("fraction of roofline (target 0.80)", [("fraction_of_roofline", "{:.2f}")]),
    ("copy bandwidth GB/s", [("copy_bandwidth_GBps", "{:.0f}")]),
    ("attention backend / cuda graphs", [("attention_backend", "{}"), ("cuda_graphs", "{}")]),
    ("KV cache tokens / init seconds", [("kv_cache_tokens", "{}"), ("init_seconds", "{:.1f}")]),
]
for label, fields in rows:
    print(f"{label:34s}", " / ".join(fmt.format(g[key]) if key in g else "-" for key, fmt in fields))
sys.exit(0 if tests_ok and ok else 1)
PY
