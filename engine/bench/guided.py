"""Structured output overhead: decode tok/s of N concurrent json_schema requests vs the same N
unconstrained, same prompts and max_tokens, in one run (alternating, best of `repeats`).

    python -m engine.bench.guided --model DIR [--n 8] [--max-tokens 96] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time

from engine import LLM, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 40},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 5},
    },
    "required": ["name", "age", "city", "hobbies"],
}
TOPICS = ["a teacher", "a sailor", "a baker", "a pilot", "a doctor", "a painter", "a farmer", "a chemist",
          "a poet", "a judge", "a nurse", "a miner", "a chef", "a diver", "a tailor", "a monk"]


def run(llm: LLM, prompts: list[str], params: SamplingParams) -> tuple[int, float]:
    started = time.perf_counter()
    outs = llm.generate(prompts, params)
    return sum(len(o.token_ids) for o in outs), time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    llm = LLM(model=args.model)
    prompts = [llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Describe {TOPICS[i % len(TOPICS)]} as a JSON object."}])
        for i in range(args.n)]
    modes = {
        "unconstrained": SamplingParams(temperature=0, max_tokens=args.max_tokens),
        "json_schema": SamplingParams(temperature=0, max_tokens=args.max_tokens, guided={"json_schema": SCHEMA}),
    }
    run(llm, prompts, modes["json_schema"])  # warm-up: compile the grammar, fill caches
    best: dict[str, tuple[float, int, float]] = {}
    for _ in range(args.repeats):
        for name, params in modes.items():
            llm.engine.reset_prefix_cache()
            tokens, secs = run(llm, prompts, params)
            rate = tokens / secs
            if name not in best or rate > best[name][0]:
                best[name] = (rate, tokens, secs)
    base, guided = best["unconstrained"][0], best["json_schema"][0]
    print(json.dumps({"n": args.n, "max_tokens": args.max_tokens,
                      **{f"{k}_tok_s": round(v[0], 1) for k, v in best.items()},
                      **{f"{k}_tokens": v[1] for k, v in best.items()},
                      "overhead_pct": round(100 * (1 - guided / base), 1)}))


if __name__ == "__main__":
    main()
