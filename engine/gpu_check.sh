#!/usr/bin/env bash
# GPU checks for the engine, in under 8 minutes on one H200:
#   1. Triton kernels and CUDA graphs against the torch reference and transformers (real GPU, not
#      the interpreter): tests/engine/test_triton_gpu.py
#   2. The 8B-shaped benchmark: python -m engine bench --device cuda (random bf16 weights, 256
#      requests with prompt/output lengths uniform in [100, 1024], single-stream decode vs roofline)
# Usage: engine/gpu_check.sh RESULTS_DIR   (PYTHON=... to pick the interpreter; default python3)
# Writes env.txt, kernel_tests.log, bench_gpu.json, bench_gpu.log under RESULTS_DIR; prints a short
# table last. Exit status: 0 if the tests passed and the bench produced results, else 1.
set -uo pipefail
OUT_DIR=${1:?usage: engine/gpu_check.sh RESULTS_DIR}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset TRITON_INTERPRET

"$PY" - >"$OUT_DIR/env.txt" 2>&1 <<'PY'
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
PY

timeout 200 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" tests/engine/test_triton_gpu.py \
    >"$OUT_DIR/kernel_tests.log" 2>&1
tests_rc=$?

timeout 330 "$PY" -m engine bench --device cuda --json --out "$OUT_DIR/bench_gpu.json" \
    >"$OUT_DIR/bench_gpu.log" 2>&1
bench_rc=$?

"$PY" - "$OUT_DIR" "$tests_rc" "$bench_rc" <<'PY'
import json, pathlib, sys
out, tests_rc, bench_rc = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
print((out / "env.txt").read_text().strip())
log = (out / "kernel_tests.log").read_text().strip().splitlines()
print(f"{'kernel tests':34s} {'PASS' if tests_rc == 0 else 'FAIL'} ({log[-1] if log else 'no output'})")
path = out / "bench_gpu.json"
if bench_rc != 0 or not path.exists():
    print(f"{'bench':34s} FAIL (exit {bench_rc}; see bench_gpu.log)")
    sys.exit(1)
g = json.loads(path.read_text())["gpu"]
rows = [
    ("offline output tok/s (target 5000)", f"{g['offline_output_tokens_per_s']:.0f}"),
    ("offline seconds / steps", f"{g['offline_seconds']:.1f} / {g['offline_steps']}"),
    ("single-stream decode tok/s", f"{g['single_stream_tokens_per_s']:.1f}"),
    ("roofline tok/s (copy BW / weights)", f"{g['roofline_tokens_per_s']:.1f}"),
    ("fraction of roofline (target 0.80)", f"{g['fraction_of_roofline']:.2f}"),
    ("copy bandwidth GB/s", f"{g['copy_bandwidth_GBps']:.0f}"),
    ("cuda graphs", str(g["cuda_graphs"])),
]
for k, v in rows:
    print(f"{k:34s} {v}")
sys.exit(0 if tests_rc == 0 else 1)
PY
