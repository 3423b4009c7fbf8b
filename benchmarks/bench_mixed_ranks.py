"""Mixed ranks in one batch: does a step pay the largest rank for every row?

One decode step's LoRA calls at SmolLM2's shapes (30 layers x 4 fused projections), 64 tokens
spread evenly over 8 adapters, r on all 7 projections, fp32 unless --dtype says otherwise.
Slot sets (each its own weights), timed in rotating order, median over rounds:
  all-64:        max_lora_rank 64, every adapter r=64
  one-64:        max_lora_rank 64, one adapter r=64 and seven r=8
  all-8 in 64:   max_lora_rank 64, every adapter r=8 (slots sized for 64)
  all-8 in 8:    max_lora_rank 8, every adapter r=8
For the C++ kernel (the CPU path) one-64 should cost about all-8 plus an eighth of the gap to
all-64, and all-8 the same in slots sized for 8 or 64: each adapter's real rank is computed
and read, no more. The pure-torch path (gather + bmm, for other devices) pads every row to
max_lora_rank unless it is given each slot's rank (the runner gives it): then it runs one
gather + bmm pair per rank bucket, each at its bucket's rank. Timed beside for contrast.

    python benchmarks/bench_mixed_ranks.py [--rounds 15] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora import save_results
from bench_lora_kernel import LAYERS, SHAPES, build_ranks

RESULTS = Path(__file__).resolve().parent / "results"
ADAPTERS, TOKENS = 8, 64
CASES = {  # name -> (max_lora_rank, the adapters' ranks)
    "all-64": (64, [64] * ADAPTERS),
    "one-64": (64, [64] + [8] * (ADAPTERS - 1)),
    "all-8 in 64": (64, [8] * ADAPTERS),
    "all-8 in 8": (8, [8] * ADAPTERS),
}
TORCH_CASES = ("all-64", "one-64", "all-8 in 64")


def step(mods, batch, xs, ys) -> float:
    t0 = time.perf_counter()
    for m in mods:
        batch.apply(m, xs[m.in_features], ys[m.out_features])
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--skip-torch", action="store_true", help="time the C++ kernel only")
    ap.add_argument("--out", default=None, help="JSON path (default results/bench_mixed_ranks"
                    "[_bf16].json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    from loraplex.kernels import kernels, lora_pairs_supported
    from loraplex.lora.ops import LoRABatch

    dtype = getattr(torch, args.dtype)
    pairs = dtype == torch.bfloat16 and lora_pairs_supported()
    token_slots = [i * ADAPTERS // TOKENS for i in range(TOKENS)]  # grouped, as the runner does
    kernel_batch = LoRABatch.build(token_slots, torch.device("cpu"), kernels().lora_delta_)
    sides = {}  # (path, case) -> (mods, batch)
    for name, (max_rank, ranks) in CASES.items():
        sides[("C++ kernel", name)] = (build_ranks(max_rank, ranks, dtype, True, pairs, 0.05),
                                       kernel_batch)
    if not args.skip_torch:
        for name in TORCH_CASES:
            max_rank, ranks = CASES[name]
            # the runner gives the torch path each slot's rank: it runs one bmm pair per
            # rank bucket
            torch_batch = LoRABatch.build(token_slots, torch.device("cpu"), None,
                                          dict(enumerate(ranks)))
            sides[("torch", name)] = (build_ranks(max_rank, ranks, dtype, False, False, 0.05),
                                  torch_batch)
    xs = {fin: torch.randn(TOKENS, fin).to(dtype) for fin, _ in SHAPES}
    ys = {sum(o): torch.zeros(TOKENS, sum(o), dtype=dtype) for _, o in SHAPES}
    times: dict[tuple[str, str], list[float]] = {key: [] for key in sides}
    keys = list(sides)
    for key in keys:  # warm-up: first touches, kernel dispatch
        step(*sides[key], xs, ys)
    for rnd in range(args.rounds):
        for key in keys[rnd % len(keys):] + keys[:rnd % len(keys)]:  # rotating order
            times[key].append(step(*sides[key], xs, ys))
    rows = []
    for (path, name), ts in times.items():
        max_rank, ranks = CASES[name]
        ms = 1e3 * statistics.median(ts)
        rows.append({"path": path, "case": name, "max_lora_rank": max_rank, "ranks": ranks,
                     "step_ms": ms, "runs_ms": [1e3 * t for t in ts]})
    by = {(r["path"], r["case"]): r["step_ms"] for r in rows}
    print(f"one decode step's LoRA calls ({LAYERS} layers x {len(SHAPES)} projections), "
          f"{TOKENS} tokens over {ADAPTERS} adapters, {args.dtype}, median of {args.rounds} "
          f"rounds:")
    for r in rows:
        print(f"  {r['path']:10s} {r['case']:12s} {r['step_ms']:7.2f} ms")
    k = "C++ kernel"
    a64, one, a8, a8n = (by[(k, c)] for c in CASES)
    # what one r=64 adapter among r=8 ones should cost if only real ranks are paid
    expected = a8 + (a64 - a8) / ADAPTERS
    summary = {"kernel_one64_over_all64": one / a64, "kernel_one64_expected_ms": expected,
               "kernel_one64_over_expected": one / expected,
               "kernel_all8_slots64_over_slots8": a8 / a8n}
    print(f"  C++ kernel: one-64 / all-64 = {one / a64:.2f} (real ranks only: "
          f"{expected:.2f} ms expected, measured {one / expected:.2f}x that); all-8 in slots of "
          f"64 / of 8 = {a8 / a8n:.2f}")
    if not args.skip_torch:
        ratio = by[("torch", "one-64")] / by[("torch", "all-64")]
        low = by[("torch", "all-8 in 64")] / by[("torch", "all-64")]
        summary["torch_one64_over_all64"] = ratio
        summary["torch_all8_over_all64"] = low
        print(f"  torch path (rank buckets): one-64 / all-64 = {ratio:.2f}, all-8 / all-64 = "
              f"{low:.2f} (without buckets both ~1)")
    res = {"rows": rows, "summary": summary, "config": vars(args)}
    default = RESULTS / f"bench_mixed_ranks{'_bf16' if dtype == torch.bfloat16 else ''}.json"
    return save_results(Path(args.out) if args.out else default, res)


if __name__ == "__main__":
    main()
