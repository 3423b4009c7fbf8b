"""What the LoRA kernel's calls cost beside other ops, against the same calls back to back.

One decode step's 120 LoRA calls (SmolLM2's shapes, bf16 activations and adapters in the
pair layout, r=16 on all 7 projections, `--tokens` tokens spread evenly over k adapters), each
call preceded by one of:
- none: nothing (the calls back to back, as the kernel benchmarks time them alone);
- gemm: its projection's base GEMM (oneDNN, packed as the engine packs it), as in the engine;
- sweep: a 1 MB float32 `sum()` (reads that push the caches as a GEMM's weights do, no AMX);
- tiny: a 64 x 64 x 64 bf16 `torch.mm` (a oneDNN call that evicts almost nothing).
Each "before" op also runs without the LoRA calls; sides rotate round by round. Printed per k:
the LoRA calls' extra over that op alone, per kind of neighbour.

    python benchmarks/probe_lora_beside.py [--ks 1,8] [--tokens 64] [--reps 25]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_lora_kernel import base_gemms
from bench_lora import save_results
from bench_lora_kernel import SHAPES, build

RESULTS = Path(__file__).resolve().parent / "results" / "probe_lora_beside.json"
NEIGHBOURS = ("none", "gemm", "sweep", "tiny")


def step(mods: list, gemms: list, batch, xs: dict, ys: dict, sweep: list, tiny: tuple,
         before: str, lora: bool) -> float:
    """One step's 120 projections: the neighbour op `before`, then (lora) the LoRA call.
    Returns its time in seconds."""
    t0 = time.perf_counter()
    for i, m in enumerate(mods):
        x = xs[m.in_features]
        if before == "gemm":
            y = gemms[i](x)
        else:
            y = ys[m.out_features]
            if before == "sweep":
                sweep[i % len(sweep)].sum()
            elif before == "tiny":
                torch.mm(*tiny)
        if lora:
            batch.apply(m, x, y)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", default="1,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    import loraplex.kernels as K
    from loraplex.lora.ops import LoRABatch

    if K.kernels() is None or not K.lora_pairs_supported():
        sys.exit("the LoRA kernel's pair layout is not built on this CPU (AVX512-BF16)")
    dt = torch.bfloat16
    kern = K.lora_kernel_for(torch.device("cpu"), dt, dt)
    sweep = [torch.randn(250_000) for _ in range(8)]  # 1 MB each, rotating
    tiny_a, tiny_b = torch.randn(64, 64).to(dt), torch.randn(64, 64).to(dt)
    rows = []
    for k in (int(v) for v in args.ks.split(",")):
        mods = build(k, args.rank, dt, pairs=True)
        gemms = base_gemms(mods, args.tokens, dt)
        batch = LoRABatch.build([i * k // args.tokens for i in range(args.tokens)],
                                torch.device("cpu"), kern)
        xs = {fin: torch.randn(args.tokens, fin).to(dt) for fin, _ in SHAPES}
        ys = {m.out_features: torch.zeros(args.tokens, m.out_features, dtype=dt) for m in mods}

        run = partial(step, mods, gemms, batch, xs, ys, sweep, (tiny_a, tiny_b))

        sides = [(b, lora) for b in NEIGHBOURS for lora in (False, True)]
        times: dict[tuple[str, bool], list[float]] = {s: [] for s in sides}
        for s in sides:
            run(*s)
        for rep in range(args.reps):
            for s in sides[rep % len(sides):] + sides[:rep % len(sides)]:
                times[s].append(run(*s))
        med = {s: 1e3 * statistics.median(v) for s, v in times.items()}
        row = {"k": k, "tokens": args.tokens, "amx_on": K.lora_amx_on()}
        for b in NEIGHBOURS:
            extra = med[(b, True)] - med[(b, False)]
            row[f"{b}_ms"], row[f"{b}_with_lora_ms"], row[f"lora_beside_{b}_ms"] = (
                med[(b, False)], med[(b, True)], extra)
            print(f"k={k}: beside {b:5s}: alone {med[(b, False)]:6.2f} ms, with the LoRA calls "
                  f"{med[(b, True)]:6.2f} ms -> the calls {extra:5.2f} ms", flush=True)
        rows.append(row)
    return save_results(args.out, {"rows": rows, "config": vars(args) | {"out": str(args.out)},
                                   "cpu": K.cpu_tag()})


if __name__ == "__main__":
    main()
