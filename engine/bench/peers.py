"""`python -m engine.bench.peers`: the engine against its peers in one run (issue 19).

Batch throughput on one seeded workload: our engine (fp32, bf16), transformers swept over static batch
sizes with and without length-sorted batches (best setting reported, whole sweep kept), llama.cpp's
`llama-server` (F32 with a few server flag sets tried on the first repeat, the best then used for F32
and Q4_1), alternating over `--repeats`. Single stream: time per output token for 256 tokens from a
32-token prompt, beside the memory-bandwidth ceiling (measured copy bandwidth / weight bytes per
token). Greedy equality with transformers (batch 1, unpadded) is checked on every repeat for the
engine and for llama.cpp F32; Q4_1 is expected to differ (it quantizes activations to int8).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from engine.bench import llama_cpp
from engine.bench.gpu import copy_bandwidth, single_stream_decode, weight_bytes_per_token
from engine.bench.hf_reference import load_hf_model
from engine.bench.hf_sweep import DEFAULT_BATCH_SIZES, hf_single_stream, pick_best, run_setting, sweep_settings
from engine.bench.offline import run_offline
from engine.bench.runner import machine_info
from engine.bench.workload import WorkloadSpec, make_workload

PEER_WORKLOAD = WorkloadSpec(num_prompts=32, input_len_min=32, input_len_max=256,
                             output_len_min=16, output_len_max=128, seed=0)
LLAMA_FLAG_CANDIDATES = [  # (parallel slots, -b, -ub, unified KV)
    (32, 2048, 512, True), (32, 512, 512, True), (16, 2048, 512, True), (32, 2048, 512, False),
]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _matches(a: list[list[int]], ref: list[list[int]]) -> str:
    return f"{sum(x == y for x, y in zip(a, ref, strict=True))}/{len(ref)}"


def run_peers(model: Path, spec: WorkloadSpec, threads: int, repeats: int, batch_sizes: list[int],
              single_tokens: int = 256, single_prompt: int = 32, llama: bool = True,
              copy_bytes: int = 1 << 30, log: Any = print) -> dict[str, Any]:
    from engine import LLM

    torch.set_num_threads(threads)
    engines = {d: LLM(model=model, dtype=d, num_threads=threads) for d in ("float32", "bfloat16")}
    cfg = engines["float32"].engine.model_config
    requests = make_workload(spec, cfg.vocab_size)
    ref = load_hf_model(model, "cpu", "float32")
    settings = sweep_settings(batch_sizes, len(requests))
    build: llama_cpp.LlamaCppBuild | None = None
    result: dict[str, Any] = {"workload": spec.describe(), "seed": spec.seed, "threads": threads,
                              "commit": git_commit(), "machine": machine_info(), "repeats": repeats,
                              "output_tokens": sum(r.output_len for r in requests)}
    if llama:
        try:
            build = llama_cpp.find_llama_cpp()
        except llama_cpp.LlamaCppUnavailable as e:
            result["llama_cpp_skipped"] = str(e)
            log(str(e))
    else:
        result["llama_cpp_skipped"] = "llama.cpp peer skipped: --no-llama-cpp"
    tps: dict[str, list[float]] = {}
    checks: list[dict[str, str]] = []
    flags_tried: dict[str, float] = {}
    candidates = {f.describe(): f for f in (llama_cpp.ServerFlags(threads, min(par, len(requests)), b, ub, kvu)
                                            for par, b, ub, kvu in LLAMA_FLAG_CANDIDATES)}
    best_flags: llama_cpp.ServerFlags | None = None
    for rep in range(repeats):
        check: dict[str, str] = {}
        hf_tokens: list[list[int]] | None = None
        for s in settings:
            run = run_setting(ref, requests, s, "cpu")
            tps.setdefault(f"transformers {s.name}", []).append(run["tokens_per_s"])
            if s.batch_size == 1:
                hf_tokens = run["token_ids"]
            log(f"[{rep}] transformers {s.name}: {run['tokens_per_s']:.1f} tok/s")
        for dtype, llm in engines.items():
            llm.engine.block_manager.reset_prefix_cache()
            ours = run_offline(llm, requests)
            tps.setdefault(f"engine {dtype}", []).append(ours.output_tokens / ours.seconds)
            if hf_tokens is not None:
                check[f"engine {dtype}"] = _matches(ours.token_ids, hf_tokens)
            log(f"[{rep}] engine {dtype}: {ours.output_tokens / ours.seconds:.1f} tok/s")
        if build is not None:
            if best_flags is None:
                for flags in candidates.values():
                    with llama_cpp.LlamaServer(build.server, build.ggufs["F32"], flags) as srv:
                        lr = llama_cpp.run_workload(srv, requests)
                    flags_tried[flags.describe()] = lr.output_tokens / lr.seconds
                    log(f"[{rep}] llama.cpp F32 {flags.describe()}: {flags_tried[flags.describe()]:.1f} tok/s")
                best_flags = candidates[max(flags_tried, key=lambda k: flags_tried[k])]
            for prec, gguf in build.ggufs.items():
                with llama_cpp.LlamaServer(build.server, gguf, best_flags) as srv:
                    lr = llama_cpp.run_workload(srv, requests)
                tps.setdefault(f"llama.cpp {prec}", []).append(lr.output_tokens / lr.seconds)
                if hf_tokens is not None:
                    check[f"llama.cpp {prec}"] = _matches(lr.token_ids, hf_tokens)
                log(f"[{rep}] llama.cpp {prec}: {lr.output_tokens / lr.seconds:.1f} tok/s")
        checks.append(check)
    hf_runs = {k: v for k, v in tps.items() if k.startswith("transformers")}
    best_hf, best_hf_tps = pick_best(hf_runs)
    result["throughput"] = {k: {"median_tokens_per_s": statistics.median(v), "per_repeat": v}
                            for k, v in tps.items()}
    result["transformers_best"] = {"setting": best_hf, "median_tokens_per_s": best_hf_tps}
    result["greedy_match_vs_transformers_batch1"] = checks
    if best_flags is not None:
        result["llama_cpp_flags_tried_F32_tokens_per_s"] = flags_tried
        result["llama_cpp_best_flags"] = best_flags.describe()
    result["single_stream"] = single_stream_section(engines, ref, build, threads, single_tokens, single_prompt,
                                                    copy_bytes, log)
    return result


def single_stream_section(engines: dict[str, Any], ref: Any, build: llama_cpp.LlamaCppBuild | None, threads: int,
                          n_tokens: int, prompt_len: int, copy_bytes: int, log: Any) -> dict[str, Any]:
    cfg = engines["float32"].engine.model_config
    prompt = [(1000 + i) % cfg.vocab_size for i in range(prompt_len)]
    bw = copy_bandwidth(torch.device("cpu"), copy_bytes, iters=5)
    n_weights = weight_bytes_per_token(cfg, torch.float32) // 4
    wbytes = {"fp32": n_weights * 4, "bf16": n_weights * 2}
    rows: dict[str, dict[str, Any]] = {}
    for dtype, llm in engines.items():
        s = single_stream_decode(llm, prompt_len=prompt_len, output_len=n_tokens)
        rows[f"engine {dtype}"] = {"tokens_per_s": s["tokens_per_s"], "ms_per_token": 1000 / s["tokens_per_s"],
                                   "weight_bytes": wbytes["fp32" if dtype == "float32" else "bf16"]}
    rows["transformers batch 1 float32"] = {**hf_single_stream(ref, prompt, n_tokens, "cpu"),
                                            "weight_bytes": wbytes["fp32"]}
    if build is not None:
        for prec, gguf in build.ggufs.items():
            with llama_cpp.LlamaServer(build.server, gguf, llama_cpp.ServerFlags(threads)) as srv:
                s = llama_cpp.single_stream(srv, prompt, n_tokens)
            s.pop("token_ids")
            # the GGUF's size: every tensor at its own type (tied embedding = LM head, read every token)
            rows[f"llama.cpp {prec}"] = {**s, "weight_bytes": gguf.stat().st_size}
    for name, row in rows.items():
        row["ceiling_tokens_per_s"] = bw / row["weight_bytes"]
        row["fraction_of_ceiling"] = row["tokens_per_s"] / row["ceiling_tokens_per_s"]
        log(f"single stream {name}: {row['tokens_per_s']:.1f} tok/s ({row['ms_per_token']:.1f} ms/token), "
            f"ceiling {row['ceiling_tokens_per_s']:.0f}")
    return {"prompt_tokens": prompt_len, "output_tokens": n_tokens, "copy_bandwidth_GBps": bw / 1e9, "rows": rows}


def format_table(result: dict[str, Any]) -> str:
    lines = [f"workload: {result['workload']}; threads {result['threads']}; commit {result['commit'][:10]}",
             "", "| system | output tok/s (median) | per repeat |", "|---|---:|---|"]
    for name, v in result["throughput"].items():
        mark = " **(best)**" if name == result["transformers_best"]["setting"] else ""
        lines.append(f"| {name}{mark} | {v['median_tokens_per_s']:.1f} | "
                     + ", ".join(f"{x:.1f}" for x in v["per_repeat"]) + " |")
    if "llama_cpp_skipped" in result:
        lines.append(f"\n{result['llama_cpp_skipped']}")
    if "llama_cpp_best_flags" in result:
        lines.append("\nllama-server flags tried (F32, first repeat): "
                     + "; ".join(f"`{k}` {v:.1f}" for k, v in result["llama_cpp_flags_tried_F32_tokens_per_s"].items())
                     + f"; best `{result['llama_cpp_best_flags']}`")
    lines.append("\ngreedy equality with transformers batch 1, per repeat: "
                 f"{result['greedy_match_vs_transformers_batch1']}")
    ss = result["single_stream"]
    lines += ["", f"single stream: {ss['output_tokens']} tokens from a {ss['prompt_tokens']}-token prompt; "
              f"copy bandwidth {ss['copy_bandwidth_GBps']:.1f} GB/s", "",
              "| system | tok/s | ms/token | weight MB/token | ceiling tok/s | of ceiling |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, r in ss["rows"].items():
        lines.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['ms_per_token']:.1f} | {r['weight_bytes'] / 1e6:.0f} | "
                     f"{r['ceiling_tokens_per_s']:.0f} | {100 * r['fraction_of_ceiling']:.0f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.bench.peers", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--num-prompts", type=int, default=PEER_WORKLOAD.num_prompts)
    p.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)))
    p.add_argument("--single-stream-tokens", type=int, default=256)
    p.add_argument("--no-llama-cpp", action="store_true")
    p.add_argument("--json", type=Path, help="write the whole result here")
    a = p.parse_args(argv)
    if a.threads < 1 or a.repeats < 1 or a.single_stream_tokens < 2:
        p.error("--threads and --repeats must be >= 1 and --single-stream-tokens >= 2")
    try:
        sizes = [int(x) for x in a.batch_sizes.split(",")]
    except ValueError:
        p.error(f"--batch-sizes must be comma-separated integers like 1,8,16; got {a.batch_sizes!r}")
    spec = WorkloadSpec(**{**PEER_WORKLOAD.__dict__, "num_prompts": a.num_prompts})
    result = run_peers(a.model, spec, a.threads, a.repeats, sizes, single_tokens=a.single_stream_tokens,
                       llama=not a.no_llama_cpp, log=lambda m: print(m, file=sys.stderr, flush=True))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
    print(format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
