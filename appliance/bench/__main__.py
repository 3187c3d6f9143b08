"""``python -m appliance.bench gateway``: the gateway overhead benchmark (see gateway_bench.py).
``python -m appliance.bench sla``: FCFS vs SLA scheduling + admission on the real model (sla_bench.py).

``node`` and ``upstream`` run the benchmark's fake node and fake OpenAI upstream in their own
processes (the benchmark starts them itself).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated worker counts like 1,2; found {text!r}") from None


def _stores(text: str) -> tuple[str, ...]:
    stores = tuple(x.strip() for x in text.split(",") if x.strip())
    if not stores or set(stores) - {"sqlite", "postgres"}:
        raise argparse.ArgumentTypeError(f"expected sqlite, postgres or sqlite,postgres; found {text!r}")
    return stores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m appliance.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    gw = sub.add_parser("gateway", help="our gateway vs the node directly vs LiteLLM, in one run")
    gw.add_argument("--model-dir", type=Path, default=Path(".cache/models/SmolLM2-135M-Instruct"),
                    help="model directory whose tokenizer the gateway and node serve (no weights are used)")
    gw.add_argument("--cache-dir", type=Path, default=Path(".cache"), help="where LiteLLM's own venv is cached")
    gw.add_argument("--concurrency", type=int, default=64, help="connections of the non-streaming closed loop")
    gw.add_argument("--streams", type=int, default=200, help="concurrent streams of the streaming closed loop")
    gw.add_argument("--seconds", type=float, default=5.0,
                    help="measured seconds per phase (at least; as long as the warm-up took if longer)")
    gw.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each phase's window")
    gw.add_argument("--rounds", type=int, default=3, help="rounds over all targets (order alternates)")
    gw.add_argument("--workers", type=_ints, default=(1, 2), help="gateway worker counts, e.g. 1,2")
    gw.add_argument("--stores", type=_stores, default=("sqlite", "postgres"), help="sqlite,postgres")
    gw.add_argument("--postgres-url", help="a PostgreSQL superuser URL (default: $SOVEREIGN_TEST_POSTGRES_URL, "
                                           "else a throwaway cluster via tests/pg.py)")
    gw.add_argument("--no-litellm", action="store_true", help="leave LiteLLM out (never builds its venv)")
    gw.add_argument("--out", type=Path, help="write the JSON result here (the table goes next to it as .md)")
    node = sub.add_parser("node", help="the fake engine node (real node server code, mutual TLS)")
    node.add_argument("--model-dir", type=Path, required=True)
    node.add_argument("--tls", type=Path, required=True)
    node.add_argument("--port", type=int, required=True)
    up = sub.add_parser("upstream", help="the fake OpenAI-compatible upstream (plain HTTP on loopback)")
    up.add_argument("--port", type=int, required=True)
    sla = sub.add_parser("sla", help="FCFS vs SLA scheduling + admission on the real model, in one run")
    sla.add_argument("--model-dir", type=Path, default=Path(".cache/models/SmolLM2-135M-Instruct"))
    sla.add_argument("--seconds", type=float, default=90.0, help="measured seconds per phase")
    sla.add_argument("--out", type=Path, default=Path("sla-bench"),
                     help="directory for sla-bench.json, .md, .png and the phases' roots and logs")
    args = parser.parse_args(argv)

    if args.cmd == "sla":
        from appliance.bench.sla_report import main as sla_main

        return sla_main(args.model_dir.resolve(), args.seconds, args.out.resolve())

    if args.cmd == "node":
        from appliance.bench.fakes import run_node

        run_node(args.model_dir, args.tls, args.port)
        return 0
    if args.cmd == "upstream":
        from appliance.bench.fakes import run_upstream

        run_upstream("127.0.0.1", args.port)
        return 0

    from appliance.bench.gateway_bench import Settings, run
    from appliance.bench.report import markdown

    try:
        settings = Settings(model_dir=args.model_dir.resolve(), cache_dir=args.cache_dir.resolve(),
                            concurrency=args.concurrency, streams=args.streams, seconds=args.seconds,
                            warmup_s=args.warmup, rounds=args.rounds, workers=args.workers, stores=args.stores,
                            litellm=not args.no_litellm, postgres_url=args.postgres_url)
    except ValueError as exc:
        parser.error(str(exc))
    result = run(settings, log=lambda line: print(line, file=sys.stderr, flush=True))
    table = markdown(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
