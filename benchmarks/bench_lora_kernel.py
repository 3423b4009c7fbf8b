"""The LoRA delta kernel alone, at SmolLM2's shapes: one decode step's worth of calls (30 layers x
4 fused projections) for T tokens spread over k adapters, against the bytes floor (each distinct
adapter's A and B read once per step / memory read bandwidth measured now), plus the fixed cost
of a call (1 token, rank 1). Each dtype mix (activations x adapter weights: fp32 or bf16) is
measured in turn; bf16 adapters halve the bytes, so their floor is half the fp32 one.

    python benchmarks/bench_lora_kernel.py [--tokens 64] [--ks 1,8,32] [--rank 16]
        [--dtypes x32w32,x32w16,x16w16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from roofline import measure_mem_bandwidth

RESULTS = Path(__file__).resolve().parent / "results" / "bench_lora_kernel.json"
# SmolLM2-135M: hidden 576, 9 heads x 64, 3 kv heads, intermediate 1536, 30 layers
SHAPES = [(576, [576, 192, 192]), (576, [576]), (576, [1536, 1536]), (1536, [576])]
LAYERS = 30


DTYPES = {"x32w32": (torch.float32, torch.float32), "x32w16": (torch.float32, torch.bfloat16),
          "x16w16": (torch.bfloat16, torch.bfloat16), "x16w32": (torch.bfloat16, torch.float32),
          "x16w16plain": (torch.bfloat16, torch.bfloat16)}
# x16w16 takes the kernel's pair layout where the CPU has AVX512-BF16 (as the engine does);
# x16w16plain keeps the plain layout, widening bf16 to float32 FMAs, for comparison.


def build(slots: int, rank: int, wdtype: torch.dtype, pairs: bool = False):
    """Every layer's slots (rank `rank` in each) with random adapters: one step's modules."""
    return build_ranks(rank, [rank] * slots, wdtype, pairs=pairs)


def build_ranks(max_rank: int, ranks: list[int], wdtype: torch.dtype, packed: bool = True,
                pairs: bool = False, std: float = 1.0):
    """The same with slot s holding an adapter of rank ranks[s] (slots sized for max_rank);
    packed=False gives the torch path's layout."""
    from loraplex.lora.ops import LoRASlots

    g = torch.Generator().manual_seed(0)
    mods = []
    for _ in range(LAYERS):
        for fin, outs in SHAPES:
            m = LoRASlots(fin, outs, len(ranks) + 1, max_rank, torch.device("cpu"), wdtype,
                          packed=packed, pairs=pairs)
            for s, r in enumerate(ranks):
                for j, o in enumerate(outs):
                    m.write(s, j, torch.randn(r, fin, generator=g) * std,
                            torch.randn(o, r, generator=g) * std, 0.5)
            mods.append(m)
    return mods


def step_time(mods, batch, tokens: int, repeats: int, act: torch.dtype) -> float:
    xs = {fin: torch.randn(tokens, fin).to(act) for fin, _ in SHAPES}
    ys = {sum(o): torch.zeros(tokens, sum(o), dtype=act) for _, o in SHAPES}
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for m in mods:
            batch.apply(m, xs[m.in_features], ys[m.out_features])
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--ks", default="1,8,32")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--dtypes", default="x32w32,x32w16,x16w16,x16w16plain",
                    help=f"activation x adapter dtype mixes, of {','.join(DTYPES)}")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    from loraplex.kernels import kernels, lora_pairs_supported
    from loraplex.lora.ops import LoRABatch

    ks = [int(k) for k in args.ks.split(",")]
    kern = kernels().lora_delta_
    bw = measure_mem_bandwidth(768, kind="read")
    print(f"read bandwidth {bw:.1f} GB/s")
    rows = []
    one = LoRABatch.build([0], torch.device("cpu"), kern)
    for mix in args.dtypes.split(","):
        act, wt = DTYPES[mix]
        mods = build(max(ks), args.rank, wt, mix == "x16w16" and lora_pairs_supported())
        adapter_bytes = sum(m.slot_nbytes() for m in mods)
        fixed = step_time(mods, one, 1, args.repeats, act) / len(mods)
        print(f"[{mix}] adapter {adapter_bytes / 1e6:.1f} MB; fixed cost {1e6 * fixed:.1f} us "
              f"per call x {len(mods)} calls = {1e3 * fixed * len(mods):.2f} ms per step")
        for k in ks:
            batch = LoRABatch.build([i % k for i in range(args.tokens)], torch.device("cpu"),
                                    kern)
            t = step_time(mods, batch, args.tokens, args.repeats, act)
            floor = min(k, args.tokens) * adapter_bytes / (bw * 1e9)
            rows.append({"dtypes": mix, "k": k, "adapter_bytes": adapter_bytes,
                         "fixed_us_per_call": 1e6 * fixed, "step_ms": 1e3 * t,
                         "floor_ms": 1e3 * floor, "over_floor": t / floor,
                         "gbps": min(k, args.tokens) * adapter_bytes / t / 1e9})
            print(f"[{mix}] k={k:3d}: {1e3 * t:6.2f} ms/step, floor {1e3 * floor:6.2f} ms "
                  f"({t / floor:.2f}x), {rows[-1]['gbps']:.1f} GB/s", flush=True)
        del mods
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"bandwidth_gbps": bw, "rows": rows, "config": vars(args)},
                                  indent=2))


if __name__ == "__main__":
    main()
