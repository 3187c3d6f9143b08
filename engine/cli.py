"""`python -m engine ...`: generate, chat, bench (and later serve)."""

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
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
) -> None:
    """Print the completion of one prompt."""
    from engine import LLM, EngineError, SamplingParams

    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
        llm = LLM(model=model, device=device, dtype=dtype)
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
    model: ModelOpt,
    num_prompts: Annotated[int, typer.Option(help="Concurrent requests.")] = 8,
    max_tokens: Annotated[int, typer.Option(help="Tokens generated per request.")] = 32,
    device: Annotated[str, typer.Option(help="cpu or cuda[:N].")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    compare_transformers: Annotated[bool, typer.Option(help="Also time HF transformers.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
) -> None:
    """Greedy throughput of this engine vs Hugging Face transformers, same prompts, same run."""
    from engine.bench import run_bench

    result = run_bench(model, num_prompts, max_tokens, device, dtype, compare_transformers)
    if as_json:
        typer.echo(json.dumps(result))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="engine bench")
    for col in ("system", "requests", "output tokens", "seconds", "tokens/s"):
        table.add_column(col)
    for row in result["rows"]:
        table.add_row(row["system"], str(row["requests"]), str(row["output_tokens"]),
                      f"{row['seconds']:.2f}", f"{row['tokens_per_s']:.1f}")
    Console().print(table)
    if "greedy_match" in result:
        Console().print(f"greedy outputs identical to transformers: {result['greedy_match']}")


def main() -> None:
    app()
