"""Throughput benchmark: this engine (continuous batching) vs HF transformers (batched generate)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

PROMPTS = [
    "Write a short story about a robot learning to paint.",
    "Explain how a bicycle works.",
    "What are the main causes of inflation?",
    "Describe the water cycle in simple terms.",
    "Give three tips for writing clean Python code.",
    "Why is the sky blue?",
    "Summarize the history of the printing press.",
    "How do vaccines train the immune system?",
]


def run_bench(
    model: Path, num_prompts: int, max_tokens: int, device: str, dtype: str, compare_transformers: bool
) -> dict[str, Any]:
    from engine import LLM, SamplingParams

    llm = LLM(model=model, device=device, dtype=dtype)
    chats = [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(num_prompts)]
    prompts = [llm.tokenizer.encode_chat(c) for c in chats]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate([prompts[0]], SamplingParams(temperature=0.0, max_tokens=2))  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    ours = time.perf_counter() - t0
    n_out = sum(len(o.token_ids) for o in outs)
    rows = [{"system": "engine", "requests": num_prompts, "output_tokens": n_out, "seconds": ours,
             "tokens_per_s": n_out / ours}]
    result: dict[str, Any] = {"rows": rows}
    if compare_transformers:
        hf_tokens, hf_secs = _transformers_run(model, prompts, max_tokens, device, dtype)
        rows.append({"system": "transformers", "requests": num_prompts,
                     "output_tokens": sum(len(t) for t in hf_tokens), "seconds": hf_secs,
                     "tokens_per_s": sum(len(t) for t in hf_tokens) / hf_secs})
        result["greedy_match"] = sum(o.token_ids == t for o, t in zip(outs, hf_tokens, strict=True))
        result["greedy_match"] = f"{result['greedy_match']}/{num_prompts}"
    return result


def _transformers_run(
    model: Path, prompts: list[list[int]], max_tokens: int, device: str, dtype: str
) -> tuple[list[list[int]], float]:
    """Left-padded batched greedy generate; returns new tokens per prompt and seconds."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype))
    ref = ref.to(torch.device(device)).eval()  # type: ignore[arg-type]
    pad = int(ref.config.eos_token_id if isinstance(ref.config.eos_token_id, int) else 0)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    kwargs = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=pad)
    with torch.inference_mode():
        ref.generate(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=2, do_sample=False,
                     pad_token_id=pad)
        t0 = time.perf_counter()
        out = ref.generate(input_ids=ids, attention_mask=mask, **kwargs)
        secs = time.perf_counter() - t0
    return [row[width:].tolist() for row in out], secs
