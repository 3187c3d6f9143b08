"""Quantized weights benchmark: fp32, bf16, int8 and int4 (group 32) in one run.

    python -m engine.bench.quant --model DIR [--max-tokens 64] [--batch 16] [--repeats 2]

Per variant: bytes of the decoder's linear weights (q/k/v/o, gate/up/down, scales included; the
embedding and the tied lm_head are the same in every variant and left out), single-stream and
batched greedy decode tok/s through the engine (`LLM`, ignore_eos), free-running greedy agreement
with fp32 over a fixed prompt set (tokens before the first divergence / tokens generated), and, on
a ~2k-token public-domain text kept in the repo (engine/bench/data/heldout.txt), perplexity and
teacher-forced top-1 agreement with fp32. The last two run transformers' model with its linears
replaced by the very same quantized layers (engine/model/quant.py; per-row int8 scales and per-row
int4 groups are the same whether q/k/v are fused or not), because the engine has no prompt-logits API.
int8 / int4 variants keep fp32 activations.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from engine import LLM, SamplingParams
from engine.model.cpu_linear import PackedLinear
from engine.model.quant import Int4Linear, Int8Linear, quantize_model

HELDOUT = Path(__file__).with_name("data") / "heldout.txt"
PROMPTS = [
    "The history of the printing press", "Explain how a refrigerator works.", "Write a haiku about the sea.",
    "What causes the seasons on Earth?", "List three uses of copper.", "Describe a walk through a forest.",
    "Why is the sky blue?", "How do vaccines train the immune system?", "Summarize the plot of Hamlet.",
    "Give advice to a new gardener.", "What is a prime number?", "Describe the water cycle.",
    "How does a bicycle stay upright?", "Write a short letter to a friend.", "What is photosynthesis?",
    "Explain compound interest.",
]
VARIANTS = {"fp32": ("float32", None), "bf16": ("bfloat16", None), "int8": ("float32", "int8"),
            "int4": ("float32", "int4")}


def decoder_linear_bytes(llm: LLM) -> int:
    total = 0
    for layer in llm.engine.runner.model.model.layers:
        for module in layer.modules():
            if isinstance(module, (Int8Linear, Int4Linear)):
                total += module.weight_bytes()
            elif isinstance(module, (torch.nn.Linear, PackedLinear)):
                total += module.in_features * module.out_features * llm.config.torch_dtype.itemsize
    return total


def decode_rate(llm: LLM, prompts: list[list[int]], max_tokens: int, repeats: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    best, outs = 0.0, []
    for _ in range(repeats):
        llm.engine.reset_prefix_cache()
        started = time.perf_counter()
        res = llm.generate(prompts, params)  # type: ignore[arg-type]
        secs = time.perf_counter() - started
        best = max(best, sum(len(o.token_ids) for o in res) / secs)
        outs = [list(o.token_ids) for o in res]
    return best, outs


def prefix_agreement(ref: list[list[int]], got: list[list[int]]) -> float:
    same = 0
    for a, b in zip(ref, got, strict=True):
        for x, y in zip(a, b, strict=False):
            if x != y:
                break
            same += 1
    return same / sum(len(a) for a in ref)


def hf_logits(model_dir: str, dtype: torch.dtype, mode: str | None, ids: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    if mode is not None:
        quantize_model(model.model.layers, mode)  # the decoder's linears; embedding and lm_head kept
    with torch.inference_mode():
        return model(input_ids=ids[None]).logits[0, :-1].float()  # [T-1, V] predicting ids[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    results: dict[str, dict[str, float]] = {}
    greedy: dict[str, list[list[int]]] = {}
    ref_logits: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    for name in args.variants.split(","):
        dtype, mode = VARIANTS[name]
        llm = LLM(model=args.model, dtype=dtype, quantization=mode, max_num_seqs=max(args.batch, 1))
        chats = [llm.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
        single, _ = decode_rate(llm, chats[:1], args.max_tokens, args.repeats)
        batch, _ = decode_rate(llm, (chats * args.batch)[: args.batch], args.max_tokens, args.repeats)
        _, greedy[name] = decode_rate(llm, chats, args.max_tokens, 1)
        row: dict[str, float] = {"linear_weight_bytes": decoder_linear_bytes(llm), "single_tok_s": round(single, 1),
                                 "batch_tok_s": round(batch, 1)}
        if ids is None:
            ids = torch.tensor(llm.tokenizer.encode(HELDOUT.read_text()))
        del llm
        logits = hf_logits(args.model, getattr(torch, dtype), mode, ids)
        nll = torch.nn.functional.cross_entropy(logits, ids[1:])
        row["perplexity"] = round(math.exp(float(nll)), 4)
        if ref_logits is None:
            ref_logits = logits
        row["top1_agreement"] = round(float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()), 4)
        row["greedy_agreement"] = round(prefix_agreement(greedy[next(iter(greedy))], greedy[name]), 4)
        results[name] = row
        print(json.dumps({name: row}), flush=True)
    print(json.dumps({"max_tokens": args.max_tokens, "batch": args.batch, "heldout_tokens": int(ids.numel())
                      if ids is not None else 0, "results": results}, indent=1))


if __name__ == "__main__":
    main()
