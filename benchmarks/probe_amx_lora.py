"""Would AMX tiles speed up the bf16 LoRA kernel on CPUs that have them (Intel Xeon, AMX)?

On session 16's Intel Xeon VM the base model's bf16 GEMMs run on AMX tiles (decode step 38-42
ms, against 65-86 ms on Zen 4), while the LoRA kernel uses AVX-512 `vdpbf16ps`: even one
adapter costs the bf16 step 11.5% there (`bench_lora.py`), its arithmetic running at ~120-140
GFLOP/s. The kernel's pair layout (A^T as [in/2, rp, 2], B blocks as [r/2, 32, 2]) is already
the pair-interleaved operand layout AMX's `tdpbf16ps` reads, so this probe runs one decode
step's 120 projections (SmolLM2's shapes, 64 tokens over k adapters, r=16) through a minimal
AMX shrink + expand built on those slots, checks it against the kernel (bf16 rounding of y
only), and times both, alternated, weights in memory. A probe, not the engine's path: groups
must be contiguous token runs and every rank 16.

    python benchmarks/probe_amx_lora.py [--ks 1,8] [--reps 20]

Sides: the kernel, the AMX probe, and the AMX probe with software prefetch (A^T 4 KB and B two
blocks ahead, as the kernel does). Session 16 (Intel VM), see benchmarks/RESULTS.md.
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
from bench_lora import save_results
from bench_lora_kernel import SHAPES, build

RESULTS = Path(__file__).resolve().parent / "results" / "probe_amx_lora.json"
SRC = r"""
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <vector>

// Probe only: the bf16 pair layout's shrink and expand on AMX tiles (tdpbf16ps reads the pair
// layout's A^T and B blocks as they are). Every slot has rank R=16 on every shard; group g =
// slot g holds tokens [g*n, (g+1)*n) of x, contiguous.
struct alignas(64) TileCfg {
  uint8_t palette = 1, start_row = 0, res[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool amx_init() { return syscall(SYS_arch_prctl, 0x1023, 18) == 0; }

static void config(int64_t M) {
  TileCfg c;
  c.rows[0] = M; c.colsb[0] = 64;   // z acc: M x 16 fp32
  c.rows[1] = M; c.colsb[1] = 64;   // x: M x 32 bf16
  c.rows[2] = 16; c.colsb[2] = 64;  // A^T pairs: 16 pair rows x 16 lanes
  c.rows[3] = M; c.colsb[3] = 64;   // delta acc: M x 16 fp32
  c.rows[4] = M; c.colsb[4] = 32;   // z bf16: M x 16
  c.rows[5] = 8; c.colsb[5] = 64;   // B half block: 8 pair rows x 16 lanes
  _tile_loadconfig(&c);
}

void lora_amx(at::Tensor y, at::Tensor x, at::Tensor ap, at::Tensor bp, int64_t k,
              std::vector<int64_t> sizes, bool pf) {
  using bf = at::BFloat16;
  const int64_t T = x.size(0), in = x.size(1), out = y.size(1), nsh = sizes.size();
  const int64_t R = 16, RP = ap.size(2) / in, NB = bp.size(1), RB = bp.size(2);
  const int64_t n = T / k;
  std::vector<int64_t> blk_off(nsh + 1, 0), col_off(nsh + 1, 0);
  for (int64_t j = 0; j < nsh; ++j) {
    blk_off[j + 1] = blk_off[j] + (sizes[j] + 31) / 32;
    col_off[j + 1] = col_off[j] + sizes[j];
  }
  const bf* xp = x.data_ptr<bf>();
  bf* yp = y.data_ptr<bf>();
  const bf* app = ap.data_ptr<bf>();
  const bf* bpp = bp.data_ptr<bf>();
  // items: (group, chunk of <= 16 tokens)
  std::vector<std::pair<int64_t, int64_t>> items;
  for (int64_t g = 0; g < k; ++g)
    for (int64_t t = 0; t < n; t += 16) items.push_back({g, t});
  at::parallel_for(0, (int64_t)items.size(), 1, [&](int64_t b, int64_t e) {
    alignas(64) float zf[16 * 16], df[16 * 16];
    alignas(64) bf zb[16 * 16];
    int64_t cur_m = -1;
    for (int64_t it = b; it < e; ++it) {
      const int64_t g = items[it].first, t0 = g * n + items[it].second;
      const int64_t M = std::min<int64_t>(16, n - items[it].second);
      if (M != cur_m) { config(M); cur_m = M; }
      for (int64_t j = 0; j < nsh; ++j) {
        const bf* At = app + (g * nsh + j) * RP * in;  // [in/2, 16, 2]
        _tile_zero(0);
        for (int64_t kc = 0; kc < in / 32; ++kc) {
          if (pf) {  // A^T's chunk kc + 4 (1 KB, 16 lines), 4 KB ahead
            const char* ahead = reinterpret_cast<const char*>(At + (kc + 4) * 16 * R * 2);
            for (int l = 0; l < 16; ++l) _mm_prefetch(ahead + 64 * l, _MM_HINT_T1);
          }
          _tile_loadd(1, xp + t0 * in + kc * 32, in * 2);
          _tile_loadd(2, At + kc * 16 * R * 2, R * 4);
          _tile_dpbf16ps(0, 1, 2);
        }
        _tile_stored(0, zf, 64);
        for (int64_t t = 0; t < M; ++t)
          _mm256_storeu_si256((__m256i*)(zb + t * 16),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(zf + t * 16)));
        _tile_loadd(4, zb, 32);
        const bf* Bj = bpp + (g * NB + blk_off[j]) * RB * 32;  // [blocks, 8, 32, 2]
        const int64_t nblk = (sizes[j] + 31) / 32;
        for (int64_t c = 0; c < nblk; ++c) {
          if (pf) {  // B's block c + 2 (1 KB)
            const char* ahead = reinterpret_cast<const char*>(Bj + (c + 2) * RB * 32);
            for (int l = 0; l < 16; ++l) _mm_prefetch(ahead + 64 * l, _MM_HINT_T1);
          }
          for (int64_t h = 0; h < 2; ++h) {
            _tile_loadd(5, Bj + c * RB * 32 + h * 32, 128);
            _tile_zero(3);
            _tile_dpbf16ps(3, 4, 5);
            _tile_stored(3, df, 64);
            for (int64_t t = 0; t < M; ++t) {
              bf* yr = yp + (t0 + t) * out + col_off[j] + c * 32 + h * 16;
              __m512 yv = _mm512_castsi512_ps(_mm512_slli_epi32(
                  _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)yr)), 16));
              yv = _mm512_add_ps(yv, _mm512_load_ps(df + t * 16));
              _mm256_storeu_si256((__m256i*)yr, (__m256i)_mm512_cvtneps_pbh(yv));
            }
          }
        }
      }
    }
    _tile_release();
  });
}
"""


def run_kernel(mods, batch, xs, ys) -> None:
    """One step's calls of loraplex's kernel."""
    for m in mods:
        batch.apply(m, xs[m.in_features], ys[m.out_features])


def run_amx(ext, mods, k: int, xs, ys, pf: bool) -> None:
    """The same calls through the AMX probe (pf: with software prefetch ahead of the tiles)."""
    for m in mods:
        ext.lora_amx(ys[m.out_features], xs[m.in_features], m.ap, m.bp, k, m.output_sizes, pf)


def has_amx() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "amx_bf16" in flags and "amx_tile" in flags


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", default="1,8")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if not has_amx():
        sys.exit("this CPU has no AMX (amx_tile, amx_bf16 in /proc/cpuinfo)")
    from torch.utils.cpp_extension import load_inline

    from loraplex.kernels import kernels, lora_pairs_supported
    from loraplex.lora.ops import LoRABatch

    if not lora_pairs_supported():
        sys.exit("the LoRA kernel's pair layout is not built on this CPU")
    ext = load_inline(name="loraplex_probe_amx", cpp_sources=[SRC],
                      functions=["amx_init", "lora_amx"],
                      extra_cflags=["-O3", "-mamx-tile", "-mamx-bf16", "-mavx512f",
                                    "-mavx512bf16", "-mavx512bw", "-mavx512vl"])
    if not ext.amx_init():
        sys.exit("the kernel refused this process AMX's tile state (arch_prctl)")
    dt, tokens, rank = torch.bfloat16, 64, 16
    rows = []
    for k in (int(v) for v in args.ks.split(",")):
        mods = build(k, rank, dt, pairs=True)
        batch = LoRABatch.build([i * k // tokens for i in range(tokens)], torch.device("cpu"),
                                kernels().lora_delta_)
        xs = {fin: torch.randn(tokens, fin).to(dt) for fin, _ in SHAPES}
        worst = 0.0
        for m in mods[:len(SHAPES)]:  # one layer: every shape
            y0 = torch.randn(tokens, m.out_features).to(dt)
            want = batch.apply(m, xs[m.in_features], y0.clone()).float()
            got = y0.clone()
            ext.lora_amx(got, xs[m.in_features], m.ap, m.bp, k, m.output_sizes, True)
            worst = max(worst, float((got.float() - want).abs().max()))
        ys = {sum(o): torch.zeros(tokens, sum(o), dtype=dt) for _, o in SHAPES}

        kernel_step = partial(run_kernel, mods, batch, xs, ys)
        sides = [("kernel", kernel_step), ("amx", partial(run_amx, ext, mods, k, xs, ys, False)),
                 ("amx_prefetch", partial(run_amx, ext, mods, k, xs, ys, True))]
        times: dict[str, list[float]] = {name: [] for name, _ in sides}
        for _, fn in sides:
            fn()
        for rep in range(args.reps):
            for name, fn in sides[rep % 3:] + sides[:rep % 3]:  # rotating order
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        med = {n: 1e3 * statistics.median(v) for n, v in times.items()}
        rows.append({"k": k, **{f"{n}_ms": v for n, v in med.items()}, "max_abs_diff": worst,
                     **{f"{n}_runs_ms": [1e3 * t for t in v] for n, v in times.items()}})
        print(f"k={k}: one step's {len(mods)} calls, {tokens} tokens, weights in memory: kernel "
              f"{med['kernel']:.2f} ms, AMX probe {med['amx']:.2f} ms, with prefetch "
              f"{med['amx_prefetch']:.2f} ms; max |AMX - kernel| {worst:.3g} (bf16 rounding "
              f"of y)", flush=True)
    return save_results(args.out, {"rows": rows, "config": vars(args) | {"out": str(args.out)}})


if __name__ == "__main__":
    main()
