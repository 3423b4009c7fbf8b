"""The LoRA kernel's AMX tile path against its vdpbf16ps path, in one build and one process
(toggled with `lora_set_amx`), on CPUs with AMX-BF16 (Intel Xeon Sapphire Rapids and later).

bf16 activations and adapters in the pair layout, SmolLM2's shapes (30 layers x 4 fused
projections), r=16 on all 7 projections. Each case is one step's 120 calls for T tokens spread
evenly over k adapters, each call after its projection's base GEMM (oneDNN, bf16, packed as the
engine packs them), so the caches hold what they hold in the engine. Sides alternate in a
rotating order: the base GEMMs alone, GEMMs + kernel on the vdpbf16ps path, GEMMs + kernel with
the tile path on (groups of >= 4 tokens take it). Printed: each side's median step, the LoRA
calls' share (side - GEMMs alone), and tiles / vdpbf16ps for that share.

    python benchmarks/bench_lora_amx.py [--cases 64x1,64x2,64x4,64x8,64x32,2048x1,2048x8]
        [--reps 21]
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

RESULTS = Path(__file__).resolve().parent / "results" / "bench_lora_amx.json"


def step(set_tiles, mods: list, gemms: list, batch, xs: dict, lora: bool, tiles: bool) -> float:
    """One step's 120 projections: the base GEMM, then (lora) the LoRA call with the tile path
    on or off (set_tiles: loraplex.kernels.set_lora_amx). Returns its time in seconds."""
    set_tiles(tiles)
    t0 = time.perf_counter()
    for m, gemm in zip(mods, gemms):
        x = xs[m.in_features]
        y = gemm(x)
        if lora:
            batch.apply(m, x, y)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="64x1,64x2,64x4,64x8,64x32,2048x1,2048x8",
                    help="TOKENSxADAPTERS, comma-separated")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    import loraplex.kernels as K
    from loraplex.lora.ops import LoRABatch

    if K.kernels() is None or not K.lora_pairs_supported():
        sys.exit("the LoRA kernel's pair layout is not built on this CPU (AVX512-BF16)")
    if not K.lora_amx_supported():
        sys.exit("this kernel build has no AMX tile path here (no AMX-BF16, or not permitted)")
    dt = torch.bfloat16
    kern = K.lora_kernel_for(torch.device("cpu"), dt, dt)
    was_on = K.lora_amx_on()
    rows = []
    mods_by_k: dict[int, list] = {}
    try:
        for case in args.cases.split(","):
            tokens, k = (int(v) for v in case.split("x"))
            if k not in mods_by_k:
                mods_by_k.clear()  # one set of slots at a time (k=32: 300 MB)
                mods_by_k[k] = build(k, args.rank, dt, pairs=True)
            mods = mods_by_k[k]
            gemms = base_gemms(mods, tokens, dt)
            batch = LoRABatch.build([i * k // tokens for i in range(tokens)],
                                    torch.device("cpu"), kern)
            xs = {fin: torch.randn(tokens, fin).to(dt) for fin, _ in SHAPES}
            run = partial(step, K.set_lora_amx, mods, gemms, batch, xs)
            sides = {"gemms": (False, False), "vdpbf16ps": (True, False), "tiles": (True, True)}
            names = list(sides)
            times: dict[str, list[float]] = {n: [] for n in names}
            for n in names:
                run(*sides[n])
            for rep in range(args.reps):
                for n in names[rep % 3:] + names[:rep % 3]:
                    times[n].append(run(*sides[n]))
            # The VM's speed moves within seconds: a round's three sides run back to back, so
            # the median of per-round ratios is the steadier figure.
            paired = statistics.median(t / v for t, v in zip(times["tiles"], times["vdpbf16ps"]))
            med = {n: 1e3 * statistics.median(v) for n, v in times.items()}
            extra = {n: med[n] - med["gemms"] for n in ("vdpbf16ps", "tiles")}
            row = {"tokens": tokens, "k": k, **{f"{n}_ms": v for n, v in med.items()},
                   **{f"{n}_extra_ms": v for n, v in extra.items()},
                   "tiles_over_vdpbf16ps_extra": extra["tiles"] / extra["vdpbf16ps"],
                   "step_ratio_tiles_over_vdpbf16ps": med["tiles"] / med["vdpbf16ps"],
                   "step_ratio_paired": paired,
                   **{f"{n}_runs_ms": [1e3 * t for t in v] for n, v in times.items()}}
            rows.append(row)
            print(f"{tokens} tokens over {k} adapters ({tokens // k} a group): GEMMs "
                  f"{med['gemms']:.1f} ms; + LoRA vdpbf16ps {extra['vdpbf16ps']:.2f} ms, tiles "
                  f"{extra['tiles']:.2f} ms ({row['tiles_over_vdpbf16ps_extra']:.2f}x); steps "
                  f"tiles / vdpbf16ps {row['step_ratio_tiles_over_vdpbf16ps']:.3f} (median of "
                  f"rounds {paired:.3f})", flush=True)
    finally:
        K.set_lora_amx(was_on)
    return save_results(args.out, {"rows": rows, "config": vars(args) | {"out": str(args.out)},
                                   "cpu": K.cpu_tag()})


if __name__ == "__main__":
    main()
