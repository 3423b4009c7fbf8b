"""Probe: loraplex's bf16 AMX GEMM (kernels/amx_gemm.cpp) against oneDNN's, weights streaming
from memory, and what a read of LoRA adapters' bytes costs right after each.

Why: on the Intel AMX VM oneDNN's bf16 GEMMs at decode size (64 rows) read their pre-packed
weights at 5-9 GB/s when they come from memory, against ~20 GB/s for a plain read; a LoRA op
between the projections then finds the memory bus idle most of the step but cannot use it.

Part 1, per shape (SmolLM2's four projections and lm_head, --rows rows): `cold` cycles through
--mb of distinct weights (each call's weight comes from memory), `hot` repeats one weight.
Sides interleaved round by round; prints us a call and GB/s of weight read.

Part 2, per step: one decode step's 120 projections (30 layers x qkv, o, gate_up, down; 64 rows)
through each GEMM, alone and each followed by a separate call that reads k=8 r=16 adapters'
bytes for that projection (both threads, integer sums, no arithmetic: the read-only op of
bench_lora_read_floor.py, in miniature). Sides rotate round by round; prints the median step
and the read's extra over the GEMMs alone.

    python benchmarks/probe_amx_gemm.py [--rows 64] [--mb 300] [--rounds 5] [--steps 15]

Saves results/probe_amx_gemm.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load_inline

from loraplex.kernels import amx_linear_op
from loraplex.model.layers import amx_linear, pack_amx, pack_weight, packed_linear

RESULTS = Path(__file__).resolve().parent / "results" / "probe_amx_gemm.json"

READ_SRC = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <atomic>

static std::atomic<uint64_t> g_sink{0};

// Each thread sums its half of `buf` as 64-bit integers (a read of its bytes, nothing else).
void read_bytes(at::Tensor buf) {
  const char* p = reinterpret_cast<const char*>(buf.data_ptr());
  const int64_t n = buf.numel() * buf.element_size();
  const int nth = at::get_num_threads();
  at::parallel_for(0, nth, 1, [&](int64_t t0, int64_t t1) {
    const int64_t share = (n / nth) & ~int64_t(63);
    for (int64_t t = t0; t < t1; ++t) {
      __m512i acc = _mm512_setzero_si512();
      for (int64_t o = t * share; o < (t + 1) * share; o += 64)
        acc = _mm512_add_epi64(acc, _mm512_loadu_si512(p + o));
      g_sink += _mm512_reduce_add_epi64(acc);
    }
  });
}
"""

# (out, in) of SmolLM2's projections (q/k/v and gate/up fused) and their LoRA shards
PROJ = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
SHARDS = [3, 1, 2, 1]
LM_HEAD = (49152, 576)


def adapter_bytes(n: int, k: int, shards: int, adapters: int = 8, rank: int = 16) -> int:
    """Bytes of `adapters` bf16 adapters' A (one [rank, k] per shard) and B ([n, rank])."""
    return adapters * rank * (n + shards * k) * 2


def shapes_part(op, m: int, mb: int, rounds: int) -> dict:
    out = {}
    for n, k in [*PROJ, LM_HEAD]:
        count = max(1, mb * (1 << 20) // (n * k * 2))
        plain = [torch.randn(n, k).to(torch.bfloat16) * 0.05 for _ in range(count)]
        sides = {"onednn": [pack_weight(w, m) for w in plain], "amx": [pack_amx(w) for w in plain]}
        del plain
        x = torch.randn(m, k).to(torch.bfloat16)
        call = {"onednn": lambda w, x=x: packed_linear(x, w, None),
                "amx": lambda w, x=x, n=n: amx_linear(op, x, w, None, n)}
        res = {s: {"cold": [], "hot": []} for s in sides}
        for r in range(rounds):
            for s in (("onednn", "amx") if r % 2 == 0 else ("amx", "onednn")):
                ws, f = sides[s], call[s]
                for w in ws[:3]:
                    f(w)
                t0 = time.perf_counter()
                for w in ws:
                    f(w)
                res[s]["cold"].append((time.perf_counter() - t0) / count)
                t0 = time.perf_counter()
                for _ in range(50):
                    f(ws[0])
                res[s]["hot"].append((time.perf_counter() - t0) / 50)
        row = {}
        print(f"{m}x{k} . {k}x{n} ({n * k * 2 / 1e6:.2f} MB, {count} weights cycled)")
        for s in sides:
            cold = sorted(res[s]["cold"])[rounds // 2]
            hot = sorted(res[s]["hot"])[rounds // 2]
            row[s] = {"cold_us": 1e6 * cold, "hot_us": 1e6 * hot,
                      "cold_gbs": n * k * 2 / cold / 1e9}
            print(f"  {s:7s} cold {1e6 * cold:8.1f} us ({row[s]['cold_gbs']:5.1f} GB/s)  hot "
                  f"{1e6 * hot:8.1f} us")
        row["amx_over_onednn_cold"] = row["amx"]["cold_us"] / row["onednn"]["cold_us"]
        out[f"{n}x{k}"] = row
        del sides
    return out


def step_part(op, read, m: int, steps: int, layers: int = 30) -> dict:
    packed = {"onednn": [], "amx": []}
    extra = []
    for _ in range(layers):
        ws = [torch.randn(n, k).to(torch.bfloat16) * 0.05 for n, k in PROJ]
        packed["onednn"].append([pack_weight(w, m) for w in ws])
        packed["amx"].append([pack_amx(w) for w in ws])
        extra.append([torch.ones(adapter_bytes(n, k, sh) // 2, dtype=torch.bfloat16)
                      for (n, k), sh in zip(PROJ, SHARDS)])
    xs = [torch.randn(m, k).to(torch.bfloat16) for _, k in PROJ]

    def step(gemm: str, with_read: bool) -> None:
        for li in range(layers):
            for j, (n, _) in enumerate(PROJ):
                w = packed[gemm][li][j]
                if gemm == "amx":
                    amx_linear(op, xs[j], w, None, n)
                else:
                    packed_linear(xs[j], w, None)
                if with_read:
                    read(extra[li][j])

    sides = [("onednn", False), ("onednn", True), ("amx", False), ("amx", True)]
    times = {s: [] for s in sides}
    for r in range(steps):
        for s in sides[r % 4:] + sides[:r % 4]:
            step(*s)  # an untimed step of the same side first
            t0 = time.perf_counter()
            step(*s)
            times[s].append(time.perf_counter() - t0)
    med = {s: sorted(v)[len(v) // 2] for s, v in times.items()}
    total = sum(adapter_bytes(n, k, sh) for (n, k), sh in zip(PROJ, SHARDS)) * layers
    out = {"adapter_bytes_per_step": total}
    print(f"one decode step's 120 projections, {m} rows; reads of 8 adapters' bytes "
          f"({total / 1e6:.1f} MB a step) after each:")
    for g in ("onednn", "amx"):
        alone, read_too = med[(g, False)], med[(g, True)]
        out[g] = {"gemms_ms": 1e3 * alone, "with_read_ms": 1e3 * read_too,
                  "read_extra_ms": 1e3 * (read_too - alone),
                  "read_gbs": total / (read_too - alone) / 1e9}
        print(f"  {g:7s} GEMMs {1e3 * alone:6.2f} ms, with the reads {1e3 * read_too:6.2f} ms: "
              f"the reads add {1e3 * (read_too - alone):5.2f} ms ({out[g]['read_gbs']:.1f} GB/s)")
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--mb", type=int, default=300, help="distinct weights cycled (cold)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    op = amx_linear_op()
    if op is None:
        raise SystemExit("no AMX-BF16 here: nothing to compare")
    read = load_inline(name="probe_amx_read", cpp_sources=[READ_SRC], functions=["read_bytes"],
                       extra_cflags=["-O3", "-march=native", "-fopenmp"],
                       extra_ldflags=["-fopenmp"], verbose=False).read_bytes
    out = {"rows": args.rows, "shapes": shapes_part(op, args.rows, args.mb, args.rounds),
           "step": step_part(op, read, args.rows, args.steps)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
