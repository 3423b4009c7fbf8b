"""The forward's row layout, A/B in one run: one adapter's rows side by side vs the scheduler's
order, each against the base, in steady decode on the embedded SmolLM2.

The runner lays out a step's rows grouped by adapter (`ModelRunner._forward_order`): the LoRA
kernel's work items are runs of one adapter's tokens split between the threads in order, and
the ops after it split rows in contiguous halves, so grouped rows keep each thread on the rows
of y it wrote. This measures what that buys. Three engines of one configuration decode the same
`--requests` requests: on the base model, over k adapters as the runner lays them out, and over
k adapters in the scheduler's order (its `_forward_order` replaced by the identity). Requests
are assigned adapters round-robin, as a server sees them arrive, with every `--base-every`-th
on the base model if set. Steps are interleaved one by one in rotating order, and the engines
rotate through the three roles, so neither placement nor drift favours a side.

    python benchmarks/ab_row_order.py [--ks 1,8,32] [--dtype float32] [--steps 30]
        [--requests 64] [--base-every 0]

Prints per k each LoRA side's median step, its median base/step ratio over rounds and its
median paired extra over the base, and the grouped side's steps over the scheduler-order
side's (median of rounds). Saves benchmarks/results/ab_row_order.json (or --out).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora import bench_prompts, save_results, start_decoding, stop_decoding

from loraplex.bench.adapters import write_adapter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).resolve().parent / "results" / "ab_row_order.json"
SIDES = ("base", "grouped", "scheduler order")


def run_k(llms, prompts, names, steps: int) -> dict[str, list[float]]:
    """`steps` rounds of one step per side, three times, the engines rotating through the
    sides; side -> step times (s)."""
    from loraplex import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=3 * steps + 8, ignore_eos=True)
    times: dict[str, list[float]] = {s: [] for s in SIDES}
    for rnd in range(3):
        engines = [llms[(rnd + j) % 3].engine for j in range(3)]  # in SIDES order
        unordered = engines[2].runner
        unordered._forward_order = lambda rows: list(range(len(rows)))  # the scheduler's order
        try:
            rids = [start_decoding(e, prompts, nm, sp)
                    for e, nm in zip(engines, (None, names, names))]
            for s in range(steps):
                for j in [(s + o) % 3 for o in range(3)]:
                    t0 = time.perf_counter()
                    engines[j].step()
                    times[SIDES[j]].append(time.perf_counter() - t0)
        finally:
            del unordered._forward_order
        for e, ids in zip(engines, rids):
            stop_decoding(e, ids)
    return times


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ks", default="1,8,32")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=30, help="rounds per engine rotation (3 of them)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--base-every", type=int, default=0,
                    help="every n-th request on the base model (0: none)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    torch.set_num_threads(os.cpu_count() or 1)

    from loraplex import LLM
    from loraplex.model.gguf_convert import converted_folder, embedded_gguf_path

    folder = converted_folder(embedded_gguf_path())
    llms = [LLM(str(folder), dtype=args.dtype, enable_lora=True, max_loras=max(ks),
                max_lora_rank=args.rank, max_num_seqs=max(64, args.requests)) for _ in SIDES]
    cfg = llms[0].engine.model_config
    tmp = Path(tempfile.mkdtemp(prefix="loraplex-roworder-"))
    paths = [write_adapter(tmp / f"a{i}", cfg, args.rank, i) for i in range(max(ks))]
    for llm in llms:
        for i, p in enumerate(paths):
            llm.add_lora(f"a{i}", str(p))
    prompts = bench_prompts(llms[0].engine.tokenizer, args.requests, args.prompt_len)
    print(f"model {llms[0].engine.dtype}, r={args.rank} on all 7 projections, "
          f"{args.requests} requests", flush=True)
    rows = []
    for k in ks:
        names = [None if args.base_every and i % args.base_every == 0 else f"a{i % k}"
                 for i in range(args.requests)]
        times = run_k(llms, prompts, names, args.steps)
        base = times["base"]
        row = {"k": k, "base_rows": sum(n is None for n in names), "rounds": len(base),
               "base_step_ms": 1e3 * statistics.median(base)}
        for side in SIDES[1:]:
            t = times[side]
            key = side.replace(" ", "_")
            row[f"{key}_step_ms"] = 1e3 * statistics.median(t)
            row[f"{key}_ratio"] = statistics.median(b / x for b, x in zip(base, t))
            row[f"{key}_extra_ms"] = 1e3 * statistics.median(x - b for b, x in zip(base, t))
        row["grouped_over_scheduler_order"] = statistics.median(
            g / u for g, u in zip(times["grouped"], times["scheduler order"]))
        rows.append(row)
        print(f"k={k:3d} ({row['base_rows']} base rows), {row['rounds']} rounds: base "
              f"{row['base_step_ms']:.1f} ms | grouped {row['grouped_step_ms']:.1f} ms, "
              f"{row['grouped_ratio']:.3f}x base, +{row['grouped_extra_ms']:.2f} ms | "
              f"scheduler order {row['scheduler_order_step_ms']:.1f} ms, "
              f"{row['scheduler_order_ratio']:.3f}x base, "
              f"+{row['scheduler_order_extra_ms']:.2f} ms | grouped / scheduler order "
              f"{row['grouped_over_scheduler_order']:.3f}", flush=True)
    res = {"rows": rows, "config": {k: str(v) for k, v in vars(args).items()}}
    return save_results(args.out, res)


if __name__ == "__main__":
    main()
