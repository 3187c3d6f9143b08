"""Prompt-lookup speculative decoding: single-stream greedy decode tok/s with and without drafts,
one engine, alternating runs (best of `repeats`), on an editing workload (rewrite a ~300-word text,
fixing its typos) and a free-form one; asserts the greedy outputs are identical token for token.

    python -m engine.bench.spec --model DIR [--device cpu|cuda] [--dtype float32] [--k 4]
                                [--max-tokens 256] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from engine import LLM, SamplingParams

EDIT_TEXT = (
    "The city library opened its doors in 1923, when a group of local teachers decided that every child "
    "in town should have acess to books. At first the colection was small: a few hundred volumes donated "
    "by families, kept on wooden shelves in the back room of the old post office. Over the years the "
    "library grew, moving twice before it settled in the red brick building on Market Street that it "
    "still ocupies today. The building has three floors. The ground floor holds the childrens section, "
    "with low tables, bright carpets and a reading corner where stories are told every Saturday morning. "
    "The second floor is quiet and houses the reference books, the newspapers and a long row of desks "
    "by the windows, where students prepare for their exams. The top floor keeps the local history "
    "archive: maps, photographs, letters and records of the families who built the town. Volunteers "
    "have spent many years sorting these documents, and a small team is now scaning them so that "
    "anyone can read them online. The library also lends tools, seeds and musical instruments, and it "
    "runs evening classes on cooking, computers and languages. Last year more than forty thousand "
    "people visited, and the number keeps rising. The librarians say the secret is simple: they listen "
    "to what the town needs and they try to provide it. When the factory closed, they organised "
    "workshops to help people write their resumes. When families arrived from abroad, they started "
    "conversation groups and bought books in new languages. The library is not only a place for "
    "books; it is a place where the town meets itself, and where every visitor is welcome."
)
WORKLOADS = {
    "edit": f"{EDIT_TEXT}\n\nRewrite the text above, fixing the typos. Keep everything else the same.",
    "free": "What do you think the world will look like in fifty years? Describe it in detail.",
}


def run_once(llm: LLM, prompt: list[int], params: SamplingParams) -> dict[str, Any]:
    """One request alone; decode rate = tokens after the first / time after the first token."""
    core = llm.engine
    core.reset_prefix_cache()
    before = core.stats()
    seq = core.add_request(f"bench-{time.monotonic_ns()}", prompt, params)
    started = time.perf_counter()
    first_at = None
    steps = 0
    while not seq.is_finished:
        core.step()
        if first_at is None and seq.output_token_ids:
            first_at = time.perf_counter()
        elif first_at is not None:
            steps += 1
    ended = time.perf_counter()
    after = core.stats()
    n = len(seq.output_token_ids)
    decode_s = ended - (first_at or started)
    drafted = after["spec_draft_tokens"] - before["spec_draft_tokens"]
    accepted = after["spec_accepted_tokens"] - before["spec_accepted_tokens"]
    chunks = after["spec_chunks"] - before["spec_chunks"]
    return {
        "tokens": list(seq.output_token_ids),
        "decode_tok_s": (n - 1) / decode_s if decode_s > 0 else 0.0,
        "decode_steps": steps,
        "tokens_per_step": (n - 1) / steps if steps else 0.0,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "mean_accepted_per_draft_step": accepted / chunks if chunks else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--k", type=int, default=4, help="speculative_tokens when on")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    llm = LLM(model=args.model, device=args.device, dtype=args.dtype, speculative_tokens=args.k)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=False)
    sched = llm.engine.scheduler
    report: dict[str, Any] = {"device": args.device, "dtype": args.dtype, "k": args.k, "max_tokens": args.max_tokens}
    failed = False
    for name, text in WORKLOADS.items():
        prompt = llm.tokenizer.encode_chat([{"role": "user", "content": text}], True)
        best: dict[int, dict[str, Any]] = {}
        for k in (0, args.k):  # warm-up both paths
            sched.speculative_tokens = k
            run_once(llm, prompt, SamplingParams(temperature=0, max_tokens=16))
        for _ in range(args.repeats):
            for k in (0, args.k):
                sched.speculative_tokens = k
                res = run_once(llm, prompt, params)
                if k not in best or res["decode_tok_s"] > best[k]["decode_tok_s"]:
                    best[k] = res
        off, on = best[0], best[args.k]
        identical = off["tokens"] == on["tokens"]
        failed |= not identical
        report[name] = {
            "prompt_tokens": len(prompt),
            "output_tokens": len(on["tokens"]),
            "off_tok_s": round(off["decode_tok_s"], 1),
            "on_tok_s": round(on["decode_tok_s"], 1),
            "speedup": round(on["decode_tok_s"] / off["decode_tok_s"], 2) if off["decode_tok_s"] else None,
            "acceptance_rate": round(on["acceptance_rate"], 3),
            "mean_accepted_per_draft_step": round(on["mean_accepted_per_draft_step"], 2),
            "tokens_per_decode_step": round(on["tokens_per_step"], 2),
            "greedy_identical": identical,
        }
    sched.speculative_tokens = args.k
    print(json.dumps(report, indent=2))
    if failed:
        print("error: speculative greedy output differs from plain decoding", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
