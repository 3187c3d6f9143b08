"""`python -m engine ...`: generate, bench, serve."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Sovereign paged-attention inference engine.", no_args_is_help=True)

ModelOpt = Annotated[Path, typer.Option("--model", "-m", help="Hugging Face model directory.")]


@app.command()
def generate(
    model: ModelOpt,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Prompt text.")],
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    seed: Annotated[int | None, typer.Option(help="Per-request sampling seed.")] = None,
    chat: Annotated[bool, typer.Option("--chat/--raw", help="Wrap the prompt in the chat template.")] = True,
    device: Annotated[str, typer.Option(help="cpu or cuda[:N].")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    quantization: Annotated[str | None, typer.Option(
        help="Weight-only quantization of the linear layers at load: int8 or int4 (default: as stored).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
) -> None:
    """Print the completion of one prompt."""
    from engine import LLM, EngineError, SamplingParams

    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
        llm = LLM(model=model, device=device, dtype=dtype, quantization=quantization)
        if chat and llm.tokenizer.has_chat_template:
            out = llm.chat([[{"role": "user", "content": prompt}]], params)[0]
        else:
            out = llm.generate([prompt], params)[0]
    except (EngineError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if as_json:
        typer.echo(json.dumps({"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason}))
    else:
        typer.echo(out.text)


@app.command()
def bench(
    model: Annotated[Path | None, typer.Option("--model", "-m", help="Model directory (CPU mode).")] = None,
    num_prompts: Annotated[int, typer.Option(help="Requests in the offline workload.")] = 64,
    input_len_min: Annotated[int, typer.Option(help="Shortest prompt (tokens).")] = 16,
    input_len_max: Annotated[int, typer.Option(help="Longest prompt (tokens).")] = 256,
    output_len_min: Annotated[int, typer.Option(help="Shortest output (tokens).")] = 16,
    output_len_max: Annotated[int, typer.Option(help="Longest output (tokens).")] = 128,
    max_tokens: Annotated[int | None, typer.Option(help="Fixed output length (sets min = max).")] = None,
    seed: Annotated[int, typer.Option(help="Workload seed.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, or cuda for the 8B-shaped GPU run.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16 (CPU mode).")] = "float32",
    compare_transformers: Annotated[bool, typer.Option(help="Also time HF transformers generate.")] = True,
    hf_batch_size: Annotated[int | None, typer.Option(help="transformers batch (default: min(64, n)).")] = None,
    repeats: Annotated[int, typer.Option(help="Alternating engine/transformers runs; medians reported.")] = 1,
    threads: Annotated[int | None, typer.Option(help="CPU threads for both systems (default: all cores).")] = None,
    online: Annotated[bool, typer.Option(help="Also measure online latency through AsyncEngine.")] = True,
    rates: Annotated[str, typer.Option(help="Online request rates (req/s), comma-separated; inf = burst.")] = (
        "0.5,1,inf"
    ),
    online_prompts: Annotated[int, typer.Option(help="Requests per online rate.")] = 32,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
    out: Annotated[Path | None, typer.Option(help="Also write the JSON result to this file.")] = None,
) -> None:
    """Offline throughput vs transformers on a seeded random workload, then online latency."""
    import torch

    from engine.bench import WorkloadSpec, machine_info

    if max_tokens is not None:
        output_len_min = output_len_max = max_tokens
    try:
        if device.startswith("cuda"):
            from engine.bench.gpu import run_gpu_bench

            machine = machine_info()

            def partial(gpu: dict[str, object]) -> None:  # a run cut short keeps what it measured
                if out is not None:
                    out.write_text(json.dumps({"machine": machine, "gpu": gpu, "partial": True}, indent=2))

            result: dict[str, object] = {"machine": machine, "gpu": run_gpu_bench(device, on_progress=partial)}
        else:
            if model is None:
                raise ValueError("--model is required on CPU")
            from engine.bench import run_offline_compare, run_online_rates

            if threads is not None:
                torch.set_num_threads(threads)  # process-wide: transformers runs with the same setting
            kwargs = {"num_threads": threads}
            spec = WorkloadSpec(num_prompts, input_len_min, input_len_max, output_len_min, output_len_max, seed)
            result = {"machine": machine_info(), "offline": run_offline_compare(
                model, spec, device, dtype, compare_transformers, hf_batch_size or min(64, num_prompts), repeats,
                kwargs)}
            if online:
                rate_list = [float(r) for r in rates.split(",") if r.strip()]
                online_spec = WorkloadSpec(online_prompts, input_len_min, input_len_max, output_len_min,
                                           output_len_max, seed + 100)
                result["online"] = run_online_rates(model, online_spec, device, dtype, rate_list, kwargs)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if out is not None:
        out.write_text(json.dumps(result, indent=2))
    if as_json:
        typer.echo(json.dumps(result))
        return
    from engine.bench.report import print_report

    print_report(result)


@app.command()
def serve(
    model: ModelOpt,
    tls_cert: Annotated[Path, typer.Option(help="Server certificate (PEM).")],
    tls_key: Annotated[Path, typer.Option(help="Server private key (PEM, mode 0600).")],
    client_ca: Annotated[Path, typer.Option(help="CA that signs the certificates clients must present.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8443,
    device: Annotated[str, typer.Option(help="cpu or cuda[:N].")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    max_num_seqs: Annotated[int, typer.Option(help="Sequences batched together at most.")] = 64,
    kv_cache_bytes: Annotated[int | None, typer.Option(
        help="KV-cache memory budget in bytes (default: sized from the device's memory).")] = None,
    max_model_len: Annotated[int | None, typer.Option(help="Context length limit.")] = None,
    quantization: Annotated[str | None, typer.Option(
        help="Weight-only quantization of the linear layers at load: int8 or int4 (default: as stored).")] = None,
    speculative_tokens: Annotated[int, typer.Option(
        help="Prompt-lookup speculative decoding: drafts per greedy sequence and step, 0 to 16 (0 = off).")] = 0,
) -> None:
    """Serve the engine's internal streaming API over mutual TLS (for a gateway on another node)."""
    from engine.server.serve import ServeConfig
    from engine.server.serve import serve as run_server

    engine: dict[str, object] = {"device": device, "dtype": dtype, "max_num_seqs": max_num_seqs}
    if kv_cache_bytes is not None:
        engine["kv_cache_bytes"] = kv_cache_bytes
    if max_model_len is not None:
        engine["max_model_len"] = max_model_len
    if quantization is not None:
        engine["quantization"] = quantization
    if speculative_tokens:
        engine["speculative_tokens"] = speculative_tokens
    try:
        config = ServeConfig(model=model, tls_cert=tls_cert, tls_key=tls_key, client_ca=client_ca, host=host,
                             port=port, engine=engine)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    run_server(config)


def main() -> None:
    app()
