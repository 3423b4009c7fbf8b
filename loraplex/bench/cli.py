"""Arguments of `loraplex bench serve` and `loraplex bench sweep`."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
from pathlib import Path

from loraplex.bench.loadgen import (
    BenchError,
    Lengths,
    Workload,
    discover_models,
    print_summary,
    run,
)


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: a comma list of integers") from None


def _lengths(s: str) -> Lengths:
    try:
        return Lengths.parse(s)
    except BenchError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraplex bench", description="serving benchmarks")
    sub = p.add_subparsers(dest="bench_cmd", required=True)

    s = sub.add_parser("serve", help="load generator against an OpenAI-compatible endpoint")
    s.add_argument("--base-url", default="http://127.0.0.1:8000/v1",
                   help="the endpoint's /v1 URL (ours or another server's)")
    s.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="bearer key (default: $OPENAI_API_KEY)")
    s.add_argument("--models", nargs="+", default=None,
                   help="model names to spread requests over (default: every adapter "
                        "GET /v1/models lists, else the base model)")
    s.add_argument("--num-adapters", type=int, default=None,
                   help="use only the first N of those names")
    s.add_argument("--base", action="store_true", help="send every request to the base model")
    s.add_argument("--num-requests", type=int, default=100)
    s.add_argument("--request-rate", type=float, default=math.inf,
                   help="Poisson arrivals per second (default inf: all at once, or closed "
                        "loop with --concurrency)")
    s.add_argument("--concurrency", type=int, default=None,
                   help="requests in flight at most; without --request-rate, a closed loop of "
                        "this many clients")
    s.add_argument("--popularity", default="uniform", help="uniform or zipf:S over the models")
    s.add_argument("--prompt-len", type=_lengths, default=Lengths("fixed", 64),
                   help="N, uniform:A:B or exp:MEAN (words; ~tokens)")
    s.add_argument("--output-len", type=_lengths, default=Lengths("fixed", 64),
                   help="N, uniform:A:B or exp:MEAN (max_tokens)")
    s.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    s.add_argument("--no-stream", action="store_true")
    s.add_argument("--no-ignore-eos", action="store_true",
                   help="do not send vLLM's ignore_eos (for servers that refuse it)")
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--timeout", type=float, default=600.0)
    s.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    s.add_argument("--quiet", action="store_true", help="no progress bar")

    w = sub.add_parser("sweep", help="start a server, make adapters, sweep adapters x "
                                     "concurrency, run baselines, write JSON and plots")
    w.add_argument("--model", default=None, help="HF folder or .gguf (default: embedded)")
    w.add_argument("--dtype", default="float32")
    w.add_argument("--out", type=Path, default=Path("bench-results"))
    w.add_argument("--adapters", type=_ints, default=[1, 8, 32, 128, 1000],
                   help="distinct adapter counts to sweep")
    w.add_argument("--concurrency", type=_ints, default=[8, 32])
    w.add_argument("--requests-per-client", type=int, default=3)
    w.add_argument("--prompt-len", type=_lengths, default=Lengths("fixed", 64))
    w.add_argument("--output-len", type=_lengths, default=Lengths("fixed", 64))
    w.add_argument("--popularity", default="uniform")
    w.add_argument("--rank", type=int, default=16)
    w.add_argument("--targets", default="all",
                   help="'all' (the 7 projections) or a comma list such as q_proj,v_proj")
    w.add_argument("--distinct-weights", type=int, default=128,
                   help="adapters beyond this many share weight files (hard links)")
    w.add_argument("--max-loras", type=int, default=32)
    w.add_argument("--max-cpu-loras", type=int, default=128)
    w.add_argument("--max-num-seqs", type=int, default=64)
    w.add_argument("--baselines", default="peft,merged,llama_cpp",
                   help="comma list of peft, merged, llama_cpp ('' for none)")
    w.add_argument("--adapter-dir", type=Path, default=None,
                   help="where the adapters are written (default: the user cache, "
                        "~/.cache/loraplex/bench-adapters/<model>; reused by later sweeps)")
    w.add_argument("--quick", action="store_true",
                   help="a smoke run: 1 and 4 adapters, concurrency 2, short requests")
    w.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        if args.bench_cmd == "serve":
            return _serve(args)
        return _sweep(args)
    except BenchError as e:
        print(f"loraplex bench: error: {e}", file=sys.stderr)
        return 2


def _serve(args: argparse.Namespace) -> int:
    if args.models and not args.base:
        models = args.models
    else:
        base, adapters = discover_models(args.base_url, args.api_key)
        models = [base] if args.base or not adapters else adapters
    if args.num_adapters is not None:
        models = models[:args.num_adapters]
    w = Workload(base_url=args.base_url, models=models, num_requests=args.num_requests,
                 request_rate=args.request_rate, concurrency=args.concurrency,
                 popularity=args.popularity, prompt_len=args.prompt_len,
                 output_len=args.output_len, endpoint=args.endpoint, stream=not args.no_stream,
                 ignore_eos=not args.no_ignore_eos, temperature=args.temperature,
                 api_key=args.api_key, seed=args.seed, timeout=args.timeout)
    res = asyncio.run(run(w, not args.quiet))
    print_summary(res["summary"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))
        print(f"wrote {args.out}")
    return 0 if res["summary"]["completed"] else 1


def _sweep(args: argparse.Namespace) -> int:
    from loraplex.bench.adapters import parse_targets
    from loraplex.bench.sweep import SweepConfig, run_sweep

    try:
        targets = parse_targets(args.targets)
    except ValueError as e:
        raise BenchError(str(e)) from None
    cfg = SweepConfig(out=args.out, model=args.model, dtype=args.dtype, adapters=args.adapters,
                      concurrency=args.concurrency,
                      requests_per_client=args.requests_per_client,
                      prompt_len=args.prompt_len, output_len=args.output_len,
                      popularity=args.popularity, rank=args.rank, targets=targets,
                      distinct_weights=args.distinct_weights, max_loras=args.max_loras,
                      max_cpu_loras=args.max_cpu_loras, max_num_seqs=args.max_num_seqs,
                      baselines=[b for b in args.baselines.split(",") if b],
                      adapter_dir=args.adapter_dir, progress=not args.quiet)
    if args.quick:
        cfg.adapters, cfg.concurrency, cfg.requests_per_client = [1, 4], [2], 2
        cfg.prompt_len, cfg.output_len = Lengths("fixed", 8), Lengths("fixed", 8)
        cfg.distinct_weights = min(cfg.distinct_weights, 4)
        cfg.max_loras, cfg.max_cpu_loras = min(cfg.max_loras, 2), min(cfg.max_cpu_loras, 4)
        cfg.gemm_n, cfg.bandwidth_mb = 512, 128
    run_sweep(cfg)
    return 0
