// Segmented multi-LoRA delta for CPU: y[t] += Bt_s^T (A_s x[t]) for every token t of every
// adapter group, in one call per projection and step (no per-row or per-adapter launches).
//
// Layout (see loraplex/lora/ops.py): ap [S, nsh, RP*in] holds each shard j's A^T, [in, rp]
// row-major, rp = r_j rounded up to 8 with zero columns (RP = max rank rounded up to 8);
// bp [S, NB, R, 32] each shard's scaled B^T in blocks of 32 output columns, [blocks_j, r_j, 32]
// (every shard size being a multiple of 32 or padded). The shapes are capacities: within a
// slot the shards sit back to back at their real ranks (shard_at), so a step reads each used
// slot's A and B as two contiguous runs whatever R is (with R-sized places, r=8 adapters in
// slots of max rank 64 cost 1.5x the same adapters in slots of 8: bench_mixed_ranks.py).
// ranks [S, nsh] (r_j of the adapter in each slot; 0 = shard not adapted). Only the real rank
// is computed and read, so mixed ranks do not pay the largest rank. Tokens are grouped by slot
// (tokens[offsets[g]:offsets[g+1]] use slots[g]); work items are (group, chunk of <= 8 tokens),
// so each item writes disjoint rows of y and reads its adapter's A and B once from memory (with
// fewer items than threads, items are split by shard, which write disjoint columns). At decode
// with several adapters a thread runs two such items side by side in the shrink (shrink_two),
// so two adapters' A^T stream at once.
//
// Both halves are register-tiled outer products, with no horizontal sums: shrink keeps a
// tokens x rank tile of z = x A^T in registers while it streams A^T's rows (one rank vector per
// input feature, broadcasting x[t][k]); expand keeps a tokens x 32-column tile of the delta
// (16 columns on AVX2) while it streams B^T's rows (broadcasting z[t][i]), then adds it to y.
// Each weight load feeds up to 8 tokens' FMAs and stays in a register for all of them
// (`Vec::keep`), so the FMA units, not the loads, set the pace. One body serves every ISA
// through `Vec` (AVX-512, AVX2 or scalar). A token's sums run in the same order whatever tile
// it lands in, so a row's result does not depend on the rest of the batch.
//
// dtypes: activations (x, y) float32 or bfloat16, adapter weights (ap, bp) float32, bfloat16 or
// float16, in any combination; products and sums are float32, y is rounded once (to nearest
// even) when a bfloat16 row is stored, as `y + delta` in torch would. 16-bit weights halve the
// bytes a step must read, which is what bounds this kernel once a step uses many distinct
// adapters; float16 keeps 3 more mantissa bits than bfloat16 (widened by vcvtph2ps, exact).
//
// With `pairs` (bf16 activations and weights, built with AVX512-BF16): the same tensors in the
// pair layout (see namespace pairs), run with vdpbf16ps, two multiply-adds per lane and
// instruction; z = A x is rounded to bf16 between shrink and expand, as in PEFT's bf16 forward.
// One SmolLM2 decode step's calls, 64 tokens, caches flushed, paired against the plain layout
// (benchmarks/ab_lora_kernel.py --pairs, Zen 4): 1 adapter 0.65x the time, 8 adapters 0.72x,
// 32 adapters 0.85x.
//
// With AMX-BF16 (Intel Xeon), the pair layout's groups of >= 4 tokens in a call (decode over
// up to 16 adapters in 64 rows, most prefills; a decode row joins them when its adapter has a
// prefill in the same step) run on AMX tiles instead (namespace amx), from the same slots.
// Their sums run in another order, so on such CPUs a row's bits depend on which path its group
// takes (see namespace amx); everywhere else, and with lora_set_amx(false), a row's result
// does not depend on the rest of the batch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "vec.h"

#include "amx_tiles.h"

namespace {

using loraplex_vec::bf16;
using loraplex_vec::f16;
using loraplex_vec::put;
using loraplex_vec::to_f;
using loraplex_vec::Vec;

constexpr int64_t kChunk = 8;  // tokens per work item (and the widest token tile)
// Software prefetch into L2, ahead of the loads: shrink reads A^T this many bytes ahead, expand
// pulls in the B block kSpreadAhead blocks ahead, row by row from inside the current block's
// first tile (one line per rank row and tile). A rank-16 fp32 A^T row is one cache line used
// by 8 FMAs, faster than the hardware prefetcher ramps up on these short streams, and L1 holds
// too few outstanding misses to cover DRAM latency. Measured on the 8 adapters x 8 tokens step
// (benchmarks/bench_lora_kernel.py): 7.6-8.0 ms with one block ahead into L1, 6.1-6.6 ms so.
// The B prefetches were first issued in a burst, a whole block two blocks ahead at each
// block's start. On AVX2 (Zen 2) the burst measured neutral to 5-10% slower than spreading
// them one block ahead, which took 8 adapters x 8 tokens from 11.2 to 9.6 ms a step. On
// AVX-512 (Zen 4) spreading them two blocks ahead, with the paired shrink below, cut the
// LoRA calls of a decode step beside the base GEMMs (benchmarks/ab_lora_kernel.py --with-base)
// at 8 adapters x 8 tokens by 0.35-0.8 ms (see shrink_two). 4 KB ahead is the best distance
// measured there: 2 KB cost ~0.9 ms more a step, 8 and 16 KB 0.2-0.5 ms.
constexpr int64_t kAheadBytes = 4096;
constexpr int64_t kSpreadAhead = Vec::W == 8 ? 1 : 2;
// The pair layout's expand still prefetches in a burst, two blocks ahead (it reads at the
// read-only op's pace; see namespace pairs).
constexpr int64_t kPairsAheadBlocks = 2;
// Rows of A^T per shrink block when an item streams its adapter's A^T from memory and takes
// more than one token tile (see shrink_pass).
constexpr int64_t kShrinkBlock = 16;

using V = Vec::R;

// Rank lanes per shrink pass: two vectors (one on the scalar path).
constexpr int kShrinkCG = Vec::W > 1 ? 2 : 1;
// Widest power-of-two token tile whose accumulators fit in `regs_per_token` each.
constexpr int tile_tokens(int regs_per_token) {
  int nt = 8;
  while (nt > 1 && nt * regs_per_token > Vec::kAcc) nt /= 2;
  return nt;
}

// z[t][c0 + l] += sum_{k0 <= k < k1} x_t[k] * at[k * rp + c0 + l] for t < NT and the CG
// vectors of lanes from c0 (the last one masked to the rank's end; its dead lanes come out 0);
// k0 == 0 starts the sums at 0. Partial sums pass through z exactly (float32 stores), so a
// token's sum is the same chain of FMAs however the k range is cut.
template <int NT, int CG, bool PF, typename W, typename T>
inline void shrink_tile(float* z, int64_t ldz, const W* at, int64_t rp, int64_t c0, int64_t k0,
                        int64_t k1, const T* const* xs, Vec::Mask last) {
  V acc[NT][CG];
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t)
#pragma GCC unroll 2
    for (int c = 0; c < CG; ++c)
      acc[t][c] = k0 == 0 ? Vec::zero() : Vec::load(z + t * ldz + c0 + c * Vec::W);
  const W* row = at + k0 * rp + c0;
  const int64_t ahead = kAheadBytes / static_cast<int64_t>(sizeof(W));
  for (int64_t k = k0; k < k1; ++k, row += rp) {
    if (PF) Vec::prefetch(row + ahead);  // may point past the tensor: prefetches never fault
    V a[CG];
#pragma GCC unroll 2
    for (int c = 0; c + 1 < CG; ++c) a[c] = Vec::load(row + c * Vec::W);
    a[CG - 1] = Vec::load(row + (CG - 1) * Vec::W, last);
#pragma GCC unroll 2
    for (int c = 0; c < CG; ++c) Vec::keep(a[c]);
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      const V xv = Vec::set1(to_f(xs[t][k]));
#pragma GCC unroll 2
      for (int c = 0; c < CG; ++c) acc[t][c] = Vec::fma(a[c], xv, acc[t][c]);
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t)
#pragma GCC unroll 2
    for (int c = 0; c < CG; ++c) Vec::store(z + t * ldz + c0 + c * Vec::W, acc[t][c]);
}

template <int CG, typename W, typename T>
inline void shrink_pass(float* z, int64_t ldz, const W* at, int64_t rp, int64_t c0, int64_t in,
                        const T* x, const int64_t* tok, int64_t n, Vec::Mask last,
                        bool stream) {
  constexpr int kNT = tile_tokens(CG);
  const T* xs[kChunk];
  for (int64_t t = 0; t < n; ++t) xs[t] = x + tok[t] * in;
  // The first tile streams A^T from memory (prefetching ahead); later ones find it in cache.
  // When A^T comes from memory (`stream`) and there is more than one tile (AVX2: 8 tokens are
  // two tiles of 4), the tiles take A^T in blocks of kShrinkBlock rows, all tiles per block:
  // run whole, the first tile would wait on memory while the later ones left it idle; so the
  // stream runs under all of them. Measured: 8 adapters x 8 tokens, 12.1 -> 10.9 ms a step.
  // With A^T in cache the blocks only cost their partial-sum round trips (3-5%).
  const int64_t blk = stream && n > kNT ? kShrinkBlock : in;
  for (int64_t k0 = 0; k0 < in; k0 += blk) {
    const int64_t k1 = std::min(in, k0 + blk);
    int64_t t = 0;
    if (n >= kNT) {
      shrink_tile<kNT, CG, true>(z, ldz, at, rp, c0, k0, k1, xs, last);
      t = kNT;
    }
    for (; t + kNT <= n; t += kNT)
      shrink_tile<kNT, CG, false>(z + t * ldz, ldz, at, rp, c0, k0, k1, xs + t, last);
    if (kNT > 4 && t + 4 <= n) {
      shrink_tile<(kNT > 4 ? 4 : 1), CG, false>(z + t * ldz, ldz, at, rp, c0, k0, k1, xs + t,
                                                last);
      t += 4;
    }
    if (kNT > 2 && t + 2 <= n) {
      shrink_tile<(kNT > 2 ? 2 : 1), CG, false>(z + t * ldz, ldz, at, rp, c0, k0, k1, xs + t,
                                                last);
      t += 2;
    }
    for (; t < n; ++t)
      shrink_tile<1, CG, false>(z + t * ldz, ldz, at, rp, c0, k0, k1, xs + t, last);
  }
}

// z[t][0:rp] = A x[tok[t]] for t < n; at is A^T, [in, rp].
template <typename W, typename T>
inline void shrink(float* z, int64_t ldz, const W* at, int64_t rp, int64_t in, const T* x,
                   const int64_t* tok, int64_t n, bool stream) {
  constexpr int64_t kPass = kShrinkCG * Vec::W;
  for (int64_t c0 = 0; c0 < rp; c0 += kPass) {
    const int64_t width = std::min(kPass, rp - c0);
    const Vec::Mask last = Vec::mask(width - (width > Vec::W ? Vec::W : 0));
    if (width > Vec::W)
      shrink_pass<kShrinkCG>(z, ldz, at, rp, c0, in, x, tok, n, last, stream);
    else
      shrink_pass<1>(z, ldz, at, rp, c0, in, x, tok, n, last, stream);
  }
}

// Two work items' shrinks in one pass: z1[t][0:rp1] = A1 x1[t] and z2[t][0:rp2] = A2 x2[t]
// for t < kChunk (fp32 x and weights; rp1, rp2 <= Vec::W, one rank vector each, dead lanes 0).
// The two adapters' A^T stream side by side, each prefetched kAheadBytes ahead, so each thread
// keeps two streams in flight and has two tiles' FMAs to run under them. Each token's sums are
// the same chain of FMAs as in shrink_tile, so its result is bit for bit the single-item one.
// Measured with the expand's spread prefetch (see kSpreadAhead), fp32, 8 adapters x 8 tokens,
// a decode step's LoRA calls beside the base GEMMs (benchmarks/ab_lora_kernel.py --with-base,
// Zen 4, three runs): 7.35 -> 6.55, 8.06 -> 7.70 and 8.22 -> 7.87 ms (steps 0.992-0.994;
// 32 adapters unchanged); the shrink pairing alone 7.43 -> 7.14 ms. In the engine
// (bench_lora_read_floor.py --before) k=8's extra went 8.4 -> 7.9 ms, within that run's noise
// (steps 0.998). Pairing the expands too (two B streams, block by block) was 0.9 ms slower.
inline void shrink_two(float* z1, float* z2, int64_t ldz, const float* at1, int64_t rp1,
                       const float* at2, int64_t rp2, int64_t in, const float* const* xs1,
                       const float* const* xs2) {
  V acc1[kChunk], acc2[kChunk];
#pragma GCC unroll 8
  for (int t = 0; t < kChunk; ++t) acc1[t] = acc2[t] = Vec::zero();
  const Vec::Mask m1 = Vec::mask(rp1), m2 = Vec::mask(rp2);
  const int64_t ahead = kAheadBytes / static_cast<int64_t>(sizeof(float));
  const float* row1 = at1;
  const float* row2 = at2;
  for (int64_t k = 0; k < in; ++k, row1 += rp1, row2 += rp2) {
    Vec::prefetch(row1 + ahead);  // may point past the tensor: prefetches never fault
    Vec::prefetch(row2 + ahead);
    V a1 = Vec::load(row1, m1), a2 = Vec::load(row2, m2);
    Vec::keep(a1);
    Vec::keep(a2);
#pragma GCC unroll 8
    for (int t = 0; t < kChunk; ++t) {
      acc1[t] = Vec::fma(a1, Vec::set1(xs1[t][k]), acc1[t]);
      acc2[t] = Vec::fma(a2, Vec::set1(xs2[t][k]), acc2[t]);
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < kChunk; ++t) {
    Vec::store(z1 + t * ldz, acc1[t]);
    Vec::store(z2 + t * ldz, acc2[t]);
  }
}

// ys[t][col : col + NV*W] += sum_i z[t][i] * b[i * 32 + col : ...] for t < NT (b: one packed
// block of 32 columns, r rows). PF: also prefetch the same lines of the block at `next`.
// The sums start at zero and y is added once at the end (y + delta, as torch would add a
// delta), so no multiply-add waits for y's loads (y was just written by the base GEMM, partly
// from the other core; at r = 16 a tile is only 16 rank steps). Measured on an Intel Xeon VM
// (AVX-512, no bf16; fp32, 64 rows), paired with the y-start kernel: in the engine
// (bench_lora_read_floor.py --before, two runs) steps 0.983-0.990x the time at 1 adapter and
// 0.977-0.981x at 8; in ab_lora_kernel.py's steps neutral (0.99-1.01). See RESULTS.md.
template <int NT, int NV, bool PF, typename W, typename T>
inline void expand_tile(T* const* ys, const W* b, int64_t r, const float* z, int64_t ldz,
                        int64_t col, const W* next) {
  constexpr int64_t kLine = 64 / sizeof(W);
  V acc[NT][NV];
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[t][v] = Vec::zero();
  for (int64_t i = 0; i < r; ++i) {
    V bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = Vec::load(b + i * 32 + col + v * Vec::W);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) Vec::keep(bv[v]);
    if (PF)
#pragma GCC unroll 4
      for (int64_t l = col / kLine * kLine; l < col + NV * Vec::W; l += kLine)
        Vec::prefetch(next + i * 32 + l);
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      const V w = Vec::set1(z[t * ldz + i]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[t][v] = Vec::fma(w, bv[v], acc[t][v]);
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      Vec::store(ys[t] + col + v * Vec::W,
                 Vec::add(Vec::load(ys[t] + col + v * Vec::W), acc[t][v]));
}

// All of one 32-column block for NT tokens, NV vectors at a time; prefetches the block at
// `next` unless it is null. (Two instantiations: a branch or prefetch left in the loop of the
// tiles that do not prefetch measured 5% slower with B in cache.)
template <int NT, int NV, typename W, typename T>
inline void expand_block(T* const* ys, const W* b, int64_t r, const float* z, int64_t ldz,
                         const W* next) {
  for (int64_t col = 0; col < 32; col += NV * Vec::W)
    if (next != nullptr)
      expand_tile<NT, NV, true>(ys, b, r, z, ldz, col, next);
    else
      expand_tile<NT, NV, false>(ys, b, r, z, ldz, col, next);
}

// n <= kChunk tokens of one full block; the first token tile also prefetches the block at
// `next` (if not null), so the stream runs under the block's arithmetic.
template <typename W, typename T>
inline void expand_tokens(T* const* ys, const W* b, int64_t r, const float* z, int64_t ldz,
                          int64_t n, const W* next) {
  constexpr int kFull = static_cast<int>(32 / Vec::W);
  int64_t t = 0;
  // One tile of NT tokens at t, NV vectors wide; only the first one prefetches.
  auto tile = [&](auto nt, auto nv) {
    expand_block<decltype(nt)::value, decltype(nv)::value>(ys + t, b, r, z + t * ldz, ldz, next);
    next = nullptr;
    t += decltype(nt)::value;
  };
  using std::integral_constant;
  if constexpr (Vec::W == 8) {
    // AVX2: 16 registers and a 5-cycle FMA latency on 2 pipes want >= 10 independent sums:
    // tiles of 6 tokens x 16 columns (12 sums, 2 weight vectors, 1 broadcast); the 1-2 token
    // rest takes whole 32-column rows (4-8 sums).
    while (t + 6 <= n) tile(integral_constant<int, 6>{}, integral_constant<int, 2>{});
    switch (n - t) {
      case 5: tile(integral_constant<int, 5>{}, integral_constant<int, 2>{}); break;
      case 4: tile(integral_constant<int, 4>{}, integral_constant<int, 2>{}); break;
      case 3: tile(integral_constant<int, 3>{}, integral_constant<int, 2>{}); break;
      case 2: tile(integral_constant<int, 2>{}, integral_constant<int, 4>{}); break;
      case 1: tile(integral_constant<int, 1>{}, integral_constant<int, 4>{}); break;
      default: break;
    }
  } else {
    constexpr int kNT = tile_tokens(kFull);
    using Full = integral_constant<int, kFull>;
    while (t + kNT <= n) tile(integral_constant<int, kNT>{}, Full{});
    if (kNT > 4 && t + 4 <= n) tile(integral_constant<int, (kNT > 4 ? 4 : 1)>{}, Full{});
    if (kNT > 2 && t + 2 <= n) tile(integral_constant<int, (kNT > 2 ? 2 : 1)>{}, Full{});
    while (t < n) tile(integral_constant<int, 1>{}, Full{});
  }
}

// y[tok[t], o0 + 32c : +32] += sum_i z[t][i] * Bp[c][i][:] over the shard's column blocks c.
// Bp is the shard's scaled B^T packed as [blocks, r, 32]: the blocks are one contiguous run, so
// the loads stream (a [r, out] row-major B^T would stride by `out` floats per rank row).
// `stream`: this call is the first reader of the shard's B (the first chunk of its group);
// later chunks find B in cache and do not prefetch.
template <typename W, typename T>
inline void expand(T* y, int64_t ldy, int64_t o0, int64_t on, const W* Bp, int64_t r,
                   const float* z, int64_t ldz, const int64_t* tok, int64_t n, bool stream) {
  const int64_t nblk = (on + 31) / 32;
  T* ys[kChunk];
  for (int64_t c = 0; c < nblk; ++c) {
    const W* b = Bp + c * r * 32;
    const int64_t w = std::min<int64_t>(32, on - c * 32);
    if (w == 32) {
      for (int64_t t = 0; t < n; ++t) ys[t] = y + tok[t] * ldy + o0 + c * 32;
      // Past the shard's last block: the next shard's first when r == R, else the unused
      // end of this shard's region (or another slot's: prefetches never fault).
      expand_tokens(ys, b, r, z, ldz, n, stream ? b + kSpreadAhead * r * 32 : nullptr);
      continue;
    }
    // Partial block: accumulate in float32, round once.
    for (int64_t t = 0; t < n; ++t) {
      T* yt = y + tok[t] * ldy + o0 + c * 32;
      const float* zt = z + t * ldz;
      for (int64_t col = 0; col < w; ++col) {
        float acc = 0.f;  // the delta, then y + delta, as in expand_tile
        for (int64_t i = 0; i < r; ++i) acc += zt[i] * to_f(b[i * 32 + col]);
        put(yt + col, to_f(yt[col]) + acc);
      }
    }
  }
}

#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__) && \
    defined(__AVX512VL__)
#define LORAPLEX_LORA_PAIRS 1
// The pair layout: bf16 activations and bf16 weights on CPUs with AVX512-BF16, where one
// vdpbf16ps does two multiply-adds per float32 lane (a lane holds two bf16 values), twice what
// an FMA does, and the weights need no widening. The pairs run along the summed axis:
//   ap: shard j's A^T as [in/2, rp, 2]: lane c of pair row p holds (A[c][2p], A[c][2p+1]), and
//       x[t] read as 32-bit words gives the matching (x[2p], x[2p+1]) to broadcast;
//   bp: each 32-column block as [re/2, 32, 2], re = r_j rounded up to even (packed back to
//       back as in the plain layout): lane col of pair row q holds
//       (Bt[2q][col], Bt[2q+1][col]) (a row past an odd rank is zero).
// Same bytes as the plain layout. z = x A^T is summed in float32 and rounded to bf16 once
// before the expand (as PEFT's bf16 lora_A output is); each lane's sum is a fixed chain of
// vdpbf16ps over its pairs, so a row's result still does not depend on the rest of the batch
// (on AMX CPUs with the tile path on, only among the batches where its group takes this path:
// see namespace amx).
namespace pairs {

using u32 = uint32_t;

inline __m512 dp(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

// z[t][c0 + 16c + l] = sum_p the pair products, for t < NT and CG vectors of rank lanes (the
// last masked to the rank's end: dead lanes hold zero weights and come out 0).
template <int NT, int CG, bool PF>
inline void shrink_tile(float* z, int64_t ldz, const u32* at, int64_t rp, int64_t c0,
                        int64_t pairs_in, const u32* const* xs, __mmask16 last) {
  __m512 acc[NT][CG];
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t)
#pragma GCC unroll 2
    for (int c = 0; c < CG; ++c) acc[t][c] = _mm512_setzero_ps();
  const u32* row = at + c0;
  const int64_t ahead = kAheadBytes / 4;
  for (int64_t p = 0; p < pairs_in; ++p, row += rp) {
    if (PF) Vec::prefetch(row + ahead);  // may point past the tensor: prefetches never fault
    __m512i a[CG];
#pragma GCC unroll 2
    for (int c = 0; c + 1 < CG; ++c) a[c] = _mm512_loadu_si512(row + c * 16);
    a[CG - 1] = _mm512_maskz_loadu_epi32(last, row + (CG - 1) * 16);
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      const __m512i xv = _mm512_set1_epi32(static_cast<int>(xs[t][p]));
#pragma GCC unroll 2
      for (int c = 0; c < CG; ++c) acc[t][c] = dp(acc[t][c], a[c], xv);
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t)
#pragma GCC unroll 2
    for (int c = 0; c < CG; ++c) _mm512_storeu_ps(z + t * ldz + c0 + c * 16, acc[t][c]);
}

template <int CG>
inline void shrink_pass(float* z, int64_t ldz, const u32* at, int64_t rp, int64_t c0,
                        int64_t pairs_in, const u32* const* xs, int64_t n, __mmask16 last) {
  // n <= kChunk = 8 = the widest tile; the first tile, whatever its width, reads A^T first
  // and prefetches ahead of it.
  int64_t t = 0;
  bool first = true;
  auto tile = [&](auto nt) {
    constexpr int NT = decltype(nt)::value;
    if (first)
      shrink_tile<NT, CG, true>(z + t * ldz, ldz, at, rp, c0, pairs_in, xs + t, last);
    else
      shrink_tile<NT, CG, false>(z + t * ldz, ldz, at, rp, c0, pairs_in, xs + t, last);
    first = false;
    t += NT;
  };
  using std::integral_constant;
  if (t + 8 <= n) tile(integral_constant<int, 8>{});
  if (t + 4 <= n) tile(integral_constant<int, 4>{});
  if (t + 2 <= n) tile(integral_constant<int, 2>{});
  if (t < n) tile(integral_constant<int, 1>{});
}

// z[t][0:rp] = A x_t for t < n (xs: the tokens' rows as pairs); at is [in/2, rp] pairs.
inline void shrink(float* z, int64_t ldz, const u32* at, int64_t rp, int64_t pairs_in,
                   const u32* const* xs, int64_t n) {
  for (int64_t c0 = 0; c0 < rp; c0 += 32) {
    const int64_t width = std::min<int64_t>(32, rp - c0);
    const __mmask16 last = Vec::mask(width - (width > 16 ? 16 : 0));
    if (width > 16)
      shrink_pass<2>(z, ldz, at, rp, c0, pairs_in, xs, n, last);
    else
      shrink_pass<1>(z, ldz, at, rp, c0, pairs_in, xs, n, last);
  }
}

// zb[q * kChunk + t] = (z[t][2q], z[t][2q + 1]) rounded to bf16 (nearest even) for q < rp/2:
// transposed, so the expand finds a pair row's broadcasts for all tokens at fixed offsets from
// one pointer (with a pointer per token it ran out of registers and reloaded them).
inline void round_pairs(u32* zb, const float* z, int64_t ldz, int64_t rp, int64_t n) {
  alignas(64) u32 tmp[8];
  for (int64_t t = 0; t < n; ++t)
    for (int64_t c = 0; c < rp; c += 16) {
      const __mmask16 m = Vec::mask(rp - c);
      const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, z + t * ldz + c));
      _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), (__m256i)h);
      for (int64_t q = 0; q < std::min<int64_t>(8, (rp - c) / 2); ++q)
        zb[(c / 2 + q) * kChunk + t] = tmp[q];
    }
}

// A float32 vector stored as bf16, rounded to nearest even in one instruction (vcvtneps2bf16;
// unlike Vec::store it flushes float32 denormals to zero, as vdpbf16ps does with its inputs).
inline void store_bf16(bf16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
}

// ys[t][0:32] += sum over pair rows q < qn of the block b ([qn, 32] pairs) times the
// broadcast zb[q * kChunk + t].
template <int NT>
inline void expand_tile(bf16* const* ys, const u32* b, int64_t qn, const u32* zb) {
  __m512 acc[NT][2];
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t)
#pragma GCC unroll 2
    for (int v = 0; v < 2; ++v) acc[t][v] = Vec::load(ys[t] + v * 16);
  for (int64_t q = 0; q < qn; ++q) {
    const __m512i b0 = _mm512_loadu_si512(b + q * 32), b1 = _mm512_loadu_si512(b + q * 32 + 16);
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      const __m512i w = _mm512_set1_epi32(static_cast<int>(zb[q * kChunk + t]));
      acc[t][0] = dp(acc[t][0], b0, w);
      acc[t][1] = dp(acc[t][1], b1, w);
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t)
#pragma GCC unroll 2
    for (int v = 0; v < 2; ++v) store_bf16(ys[t] + v * 16, acc[t][v]);
}

// y[tok[t], o0 + 32c : +32] += the shard's blocks c; as ::expand, for the pair layout (blocks
// of qn = ceil(r / 2) pair rows, back to back).
inline void expand(bf16* y, int64_t ldy, int64_t o0, int64_t on, const u32* Bp, int64_t r,
                   const u32* zb, const int64_t* tok, int64_t n) {
  const int64_t nblk = (on + 31) / 32, qn = (r + 1) / 2, blk = qn * 32;
  bf16* ys[kChunk];
  for (int64_t c = 0; c < nblk; ++c) {
    const u32* b = Bp + c * blk;
    const int64_t w = std::min<int64_t>(32, on - c * 32);
    if (c + kPairsAheadBlocks < nblk)  // a later block's pair rows (128 bytes each)
      for (int64_t q = 0; q < qn; ++q) {
        Vec::prefetch(b + kPairsAheadBlocks * blk + q * 32);
        Vec::prefetch(b + kPairsAheadBlocks * blk + q * 32 + 16);
      }
    if (w == 32) {
      for (int64_t t = 0; t < n; ++t) ys[t] = y + tok[t] * ldy + o0 + c * 32;
      int64_t t = 0;
      if (t + 8 <= n) {  // n <= kChunk = 8
        expand_tile<8>(ys, b, qn, zb);
        t = 8;
      }
      if (t + 4 <= n) {
        expand_tile<4>(ys + t, b, qn, zb + t);
        t += 4;
      }
      if (t + 2 <= n) {
        expand_tile<2>(ys + t, b, qn, zb + t);
        t += 2;
      }
      if (t < n) expand_tile<1>(ys + t, b, qn, zb + t);
      continue;
    }
    // Partial block: the same products, summed in float32 lane by lane, rounded once.
    for (int64_t t = 0; t < n; ++t) {
      bf16* yt = y + tok[t] * ldy + o0 + c * 32;
      const bf16* bb = reinterpret_cast<const bf16*>(b);
      for (int64_t col = 0; col < w; ++col) {
        float acc = to_f(yt[col]);
        for (int64_t i = 0; i < 2 * qn; ++i) {
          const bf16 zi = reinterpret_cast<const bf16*>(zb + i / 2 * kChunk + t)[i % 2];
          acc += to_f(zi) * to_f(bb[(i / 2 * 32 + col) * 2 + i % 2]);
        }
        put(yt + col, acc);
      }
    }
  }
}

}  // namespace pairs

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define LORAPLEX_LORA_AMX 1
// AMX tiles for the pair layout (Intel CPUs with AMX-BF16): tdpbf16ps multiplies a 16-token x
// 32-value tile of x by a 16-pair-row x 16-lane tile of A^T pairs in one instruction, and the
// pair layout's A^T ([in/2, rp, 2]) and B blocks ([qn, 32, 2]) are already the operand layout
// it reads, so the slots serve both paths. Work items take up to 16 tokens of one group (a
// tile's rows; rows side by side in x are read in place, others gathered); the shrink sums z
// in a tile over 32-value chunks of x (and a tail tile for in % 32), the expand runs one tile
// multiply per 16 columns of y (several for ranks above 32, summed in float32 before y).
// With one adapter's 64 decode tokens the vdpbf16ps path runs at ~120 GFLOP/s beside base
// GEMMs that oneDNN runs on AMX several times faster. One SmolLM2 decode step's 120 calls,
// weights in memory (Intel Xeon VM, paired, tiles / vdpbf16ps): 64 tokens of 1 adapter
// 2.46 / 5.26 ms, 8 adapters x 8 tokens 0.79x, 16 x 4 0.93x, 32 x 2 0.98x, 32 x 1 1.09-1.23x
// (a one-token tile's fixed costs: config, tile loads and stores, with nothing to amortize
// them); a 2048-token prefill over 8 adapters 0.39-0.42x. So groups of at least kMinTokens
// tokens take the tiles and smaller ones the vdpbf16ps path (benchmarks/bench_lora_amx.py
// measures both beside the base GEMMs).
//
// Rounding: a tile multiply sums each output's pair products in float32 like vdpbf16ps, but
// not in the same order (measured: the two differ in the last bits; the tiles' sums are the
// closer to exact), so a row's bits depend on which path its group takes: on AMX CPUs, in
// bf16, a row's result is the same in any batch where its adapter has >= kMinTokens tokens
// (the tile path) or in any where it has fewer (the vdpbf16ps path). Between the two, y
// usually differs by at most its bf16 rounding (a few elements in 10^4 differ); when z's two
// float32 sums straddle a bf16 rounding boundary, the term moves by about 2^-8 of itself.
// lora_set_amx(false) turns the tile path off. (The base GEMMs' rounding already depends on
// the batch's row count.)
namespace amx {

constexpr int64_t kMinTokens = 4;  // tokens a group needs to take the tile path
constexpr int64_t kRows = 16;       // tokens per work item: a tile's rows

// Tile registers by role. Shrink: z (16 or 8 rank lanes) += x (32 values) . A^T pairs, with
// a tail pair for the last in % 32 values. Expand: y's 16 columns += zb . a B half block.
// (Macros: GCC's tile intrinsics paste their register numbers into the assembly text.)
#define LX_Z 0
#define LX_X 1
#define LX_A 2
#define LX_XT 3
#define LX_AT 4
#define LX_ZB 5
#define LX_B 6
#define LX_Y 7

using loraplex_amx::Config;
using loraplex_amx::fence;
using loraplex_amx::permitted;

// One thread's tile state within one call: the config it last loaded. Each call starts with
// none and releases the tiles at its end, as the other tile users on these threads do at the
// end of each of theirs (oneDNN's AMX GEMMs; PyTorch's brgemm-based CPU kernels, such as its
// flash attention, call brgemm_release, which also forgets the config they cached).
// The shrink's and the expand's tiles are set apart, each keeping the other's as they are,
// so a shard's shrink and expand share one config whenever their shapes repeat (two loads a
// call and thread when every shard has the same rank, as in SmolLM2's adapters: the first
// shrink's, then that plus the first expand's).
struct Tiles {
  Config cur;
  bool loaded = false;
  void use(const Config& c) {
    if (loaded && std::memcmp(&c, &cur, sizeof(Config)) == 0) return;
    fence();
    _tile_loadconfig(&c);
    cur = c;
    loaded = true;
  }
  // M token rows, cw rank lanes (16 or 8), kt tail values (in % 32, even; 0 = none).
  void shrink_shape(int64_t M, int64_t cw, int64_t kt) {
    Config c = cur;
    c.set(LX_Z, M, 4 * cw);
    c.set(LX_X, M, 64);
    c.set(LX_A, 16, 4 * cw);
    c.set(LX_XT, kt > 0 ? M : 0, 2 * kt);
    c.set(LX_AT, kt / 2, kt > 0 ? 4 * cw : 0);
    use(c);
  }
  // M token rows, qc pair rows of z per tile multiply (<= 16).
  void expand_shape(int64_t M, int64_t qc) {
    Config c = cur;
    c.set(LX_ZB, M, 4 * qc);
    c.set(LX_B, qc, 64);
    c.set(LX_Y, M, 64);
    use(c);
  }
  ~Tiles() {
    if (loaded) _tile_release();
  }
};

std::atomic<bool> g_enabled{true};
// Work items run on the tiles since the process started (tests check the path really runs).
std::atomic<int64_t> g_items{0};

// A thread's buffers for the tile path, grown as needed and kept across calls.
struct Scratch {
  std::vector<bf16> x, zb;
  std::vector<float> z, acc;
  template <typename E>
  E* get(std::vector<E>& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(n);
    return v.data();
  }
};
inline Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// z[t][0:rp] = A x_t for t < M (xb: the M tokens' rows, contiguous, row stride in); at: A^T
// pairs [in/2, rp]. `stream`: the first reader of these weights in this call, which prefetches
// A^T into L2 four 32-value chunks ahead (the tile loads stall on memory otherwise: session
// 16's AMX probe, 8 adapters x 8 tokens, went 6.9 -> 5.6 ms a step with prefetching;
// RESULTS.md).
inline void shrink(Tiles& tl, float* z, int64_t ldz, const uint32_t* at, int64_t rp,
                   int64_t in, const bf16* xb, int64_t M, bool stream) {
  const int64_t kfull = in / 32, kt = in % 32, chunk = 16 * rp;  // a chunk: 16 pair rows
  for (int64_t c0 = 0; c0 < rp; c0 += 16) {
    const int64_t cw = std::min<int64_t>(16, rp - c0);  // 16 or 8 (rp is a multiple of 8)
    tl.shrink_shape(M, cw, kt);
    _tile_zero(LX_Z);
    for (int64_t kc = 0; kc < kfull; ++kc) {
      if (stream && c0 == 0) {  // may point past the tensor: prefetches never fault
        const char* ahead = reinterpret_cast<const char*>(at + (kc + 4) * chunk);
        for (int64_t l = 0; l < rp; ++l) Vec::prefetch(ahead + 64 * l);
      }
      _tile_loadd(LX_X, xb + kc * 32, in * 2);
      _tile_loadd(LX_A, at + kc * chunk + c0, rp * 4);
      _tile_dpbf16ps(LX_Z, LX_X, LX_A);
    }
    if (kt > 0) {
      _tile_loadd(LX_XT, xb + kfull * 32, in * 2);
      _tile_loadd(LX_AT, at + kfull * chunk + c0, rp * 4);
      _tile_dpbf16ps(LX_Z, LX_XT, LX_AT);
    }
    _tile_stored(LX_Z, z + c0, ldz * 4);
  }
}

// y[t] = round(y[t] + d[t]) for the M rows' columns [c, c + w) (d: [M, ldd] float32 sums).
inline void add_rows(bf16* y, int64_t ldy, int64_t o0, const int64_t* tok, int64_t M,
                     const float* d, int64_t ldd, int64_t c, int64_t w) {
  const __mmask16 m = Vec::mask(w);
  for (int64_t t = 0; t < M; ++t) {
    bf16* yt = y + tok[t] * ldy + o0 + c;
    const __m512 v = _mm512_add_ps(Vec::load(yt, m), _mm512_maskz_loadu_ps(m, d + t * ldd));
    if (w == 16)
      pairs::store_bf16(yt, v);
    else
      _mm256_mask_storeu_epi16(yt, m, (__m256i)_mm512_cvtneps_pbh(v));
  }
}

// y[tok[t], o0 : o0 + on] += the shard's blocks (B pairs [nblk, qn, 32], qn = ceil(r / 2))
// times zb[t] (z rounded to bf16, [M, ldzb]), 16 columns at a time: each 16 x 16 sum is one
// tile multiply (r <= 32) summed in float32 and added to y with one rounding. Ranks above 32
// take several multiplies of up to 16 pair rows, summed in acc ([M, nblk * 32] float32)
// before y is added to.
inline void expand(Tiles& tl, bf16* y, int64_t ldy, int64_t o0, int64_t on, const uint32_t* Bp,
                   int64_t r, const bf16* zb, int64_t ldzb, float* acc, const int64_t* tok,
                   int64_t M, bool stream) {
  const int64_t nblk = (on + 31) / 32, qn = (r + 1) / 2, blk = qn * 32, lda = nblk * 32;
  const bool one = qn <= 16;
  alignas(64) float d[16 * 16];
  for (int64_t q0 = 0; q0 < qn; q0 += 16) {
    const int64_t qc = std::min<int64_t>(16, qn - q0);
    tl.expand_shape(M, qc);  // a new qc reloads the config: acc carries the sums
    _tile_loadd(LX_ZB, zb + 2 * q0, ldzb * 2);
    for (int64_t c = 0; c < nblk; ++c) {
      const uint32_t* b = Bp + c * blk + q0 * 32;
      if (stream && q0 == 0 && c + kPairsAheadBlocks < nblk)  // 2 * qn lines, 2 blocks ahead
        for (int64_t q = 0; q < qn; ++q) {
          Vec::prefetch(Bp + (c + kPairsAheadBlocks) * blk + q * 32);
          Vec::prefetch(Bp + (c + kPairsAheadBlocks) * blk + q * 32 + 16);
        }
      for (int64_t h = 0; h < 2; ++h) {
        const int64_t col = c * 32 + h * 16;
        if (col >= on) break;
        float* a = acc + col;
        if (q0 == 0)
          _tile_zero(LX_Y);
        else
          _tile_loadd(LX_Y, a, lda * 4);
        _tile_loadd(LX_B, b + h * 16, 128);
        _tile_dpbf16ps(LX_Y, LX_ZB, LX_B);
        if (one) {
          _tile_stored(LX_Y, d, 64);
          add_rows(y, ldy, o0, tok, M, d, 16, col, std::min<int64_t>(16, on - col));
        } else {
          _tile_stored(LX_Y, a, lda * 4);
        }
      }
    }
  }
  if (!one)
    for (int64_t col = 0; col < on; col += 16)
      add_rows(y, ldy, o0, tok, M, acc + col, lda, col, std::min<int64_t>(16, on - col));
}

// zb[t][0:rp] = z[t][0:rp] rounded to bf16 (nearest even, as pairs::round_pairs).
inline void round_z(bf16* zb, int64_t ldzb, const float* z, int64_t ldz, int64_t rp,
                    int64_t M) {
  for (int64_t t = 0; t < M; ++t)
    for (int64_t c = 0; c < rp; c += 16) {
      const __mmask16 m = Vec::mask(rp - c);
      const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, z + t * ldz + c));
      _mm256_mask_storeu_epi16(zb + t * ldzb + c, m, (__m256i)h);
    }
}

// One work item on the tiles: M <= kRows tokens of one group (tok: their rows in x) over the
// shards [j0, j1) of slot s. shard_at(s, j) gives a shard's A^T and B (as in run()); xt, zb,
// zf, acc: the thread's scratch (acc only used for ranks above 32).
template <typename ShardAt>
void run_item(Tiles& tl, bf16* y, int64_t ldy, const bf16* x, int64_t in, const int64_t* tok,
              int64_t M, bool stream, int64_t s, int64_t j0, int64_t j1, int64_t nsh,
              const int64_t* ranks, const int64_t* shard_off, const int64_t* shard_sizes,
              ShardAt shard_at, int64_t RP, int64_t ldz, bf16* xt, bf16* zb, float* zf,
              float* acc) {
  g_items.fetch_add(1, std::memory_order_relaxed);
  // The rows as one tile operand: in place when consecutive (the runner lays out each
  // adapter's rows side by side), else gathered.
  bool consecutive = true;
  for (int64_t t = 1; t < M; ++t) consecutive = consecutive && tok[t] == tok[0] + t;
  const bf16* xrows = x + tok[0] * in;
  if (!consecutive) {
    for (int64_t t = 0; t < M; ++t) std::memcpy(xt + t * in, x + tok[t] * in, in * sizeof(bf16));
    xrows = xt;
  }
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t r = ranks[s * nsh + j], rp = (r + 7) / 8 * 8;
    if (r == 0) continue;
    const auto [a, b] = shard_at(s, j);  // [in/2, rp, 2] and [blocks_j, qn, 32, 2]
    fence();  // the gathered rows, and y's rows written by the previous shard's expand
    shrink(tl, zf, ldz, reinterpret_cast<const uint32_t*>(a), rp, in, xrows, M, stream);
    round_z(zb, RP, zf, ldz, rp, M);
    fence();  // zb, just stored, is read by tile loads
    expand(tl, y, ldy, shard_off[j], shard_sizes[j], reinterpret_cast<const uint32_t*>(b), r,
           zb, RP, acc, tok, M, stream);
  }
}

}  // namespace amx
#undef LX_Z
#undef LX_X
#undef LX_A
#undef LX_XT
#undef LX_AT
#undef LX_ZB
#undef LX_B
#undef LX_Y
#endif
#endif

// P: the pair layout (T = W = bf16, AVX512-BF16 only; see namespace pairs).
template <typename T, typename W, bool P = false>
void run(at::Tensor& y, const at::Tensor& x, const at::Tensor& ap, const at::Tensor& bp,
         const at::Tensor& ranks, const at::Tensor& shard_sizes, const at::Tensor& tokens,
         const at::Tensor& offsets, const at::Tensor& slots) {
  const int64_t in = x.size(1), out = y.size(1), nsh = ranks.size(1);
  const int64_t RP = ap.size(2) / in;  // max rank rounded up to 8
  const int64_t R = bp.size(2), NB = bp.size(1);
  const int64_t ldz = (RP + 15) / 16 * 16;  // whole vectors of any width
  const T* xp = x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const W* app = ap.data_ptr<W>();
  const W* bpp = bp.data_ptr<W>();
  const int64_t* rk = ranks.data_ptr<int64_t>();
  const int64_t* ss = shard_sizes.data_ptr<int64_t>();
  const int64_t* tk = tokens.data_ptr<int64_t>();
  const int64_t* of = offsets.data_ptr<int64_t>();
  const int64_t* sl = slots.data_ptr<int64_t>();
  const int64_t G = slots.size(0);
  std::vector<int64_t> shard_off(nsh + 1, 0), blk_off(nsh + 1, 0);
  for (int64_t j = 0; j < nsh; ++j) {
    shard_off[j + 1] = shard_off[j] + ss[j];
    blk_off[j + 1] = blk_off[j] + (ss[j] + 31) / 32;
  }
  TORCH_CHECK(blk_off[nsh] == NB, "lora_delta_: packed B has the wrong number of blocks");
  // Where shard j of slot s starts: after the slot's shards before it, each at its real rank
  // (rows of a B block: r, or r rounded up to even in the pair layout), as ops.py packs them.
  auto shard_at = [&](int64_t s, int64_t j) {
    int64_t ao = s * nsh * RP * in, bo = s * NB * R * 32;
    for (int64_t i = 0; i < j; ++i) {
      const int64_t r = rk[s * nsh + i];
      ao += (r + 7) / 8 * 8 * in;
      bo += (blk_off[i + 1] - blk_off[i]) * (P ? r + r % 2 : r) * 32;
    }
    return std::pair<const W*, const W*>(app + ao, bpp + bo);
  };
  // Work items: (group, first token index in `tokens`, first shard, end shard). A step with
  // fewer items than threads (one stream, or a few rows of one adapter) splits its items by
  // shard: shards read their own A and B and write their own columns of y, so they need no
  // synchronization, and a row's result is the same either way.
  // `n`: the item's tokens (<= kChunk, or <= amx::kRows on the tile path, `on_tiles`).
  struct Item {
    int64_t g, t0, j0, j1, n;
    bool on_tiles;
  };
#ifdef LORAPLEX_LORA_AMX
  const bool amx_on = P && amx::g_enabled.load(std::memory_order_relaxed) && amx::permitted();
  constexpr int64_t kTileMin = amx::kMinTokens, kTileRows = amx::kRows;
#else
  const bool amx_on = false;  // (the two constants below are then never used)
  constexpr int64_t kTileMin = 1, kTileRows = kChunk;
#endif
  std::vector<Item> items;
  for (int64_t g = 0; g < G; ++g) {
    const bool on_tiles = amx_on && of[g + 1] - of[g] >= kTileMin;
    const int64_t step = on_tiles ? kTileRows : kChunk;
    for (int64_t t = of[g]; t < of[g + 1]; t += step)
      items.push_back({g, t, 0, nsh, std::min(step, of[g + 1] - t), on_tiles});
  }
  if (nsh > 1 && static_cast<int64_t>(items.size()) < at::get_num_threads()) {
    std::vector<Item> split;
    for (const Item& item : items)
      for (int64_t j = 0; j < nsh; ++j)
        split.push_back({item.g, item.t0, j, j + 1, item.n, item.on_tiles});
    items.swap(split);
  }
  const int64_t n_items = static_cast<int64_t>(items.size());
  constexpr bool kWidenX = sizeof(T) == 2 && !P;
  // Two items run as a pair (shrink_two) when both are a group's first chunk of kChunk tokens
  // (each streams its adapter from memory: decode with several adapters), over the same
  // shards; fp32 x and weights, AVX-512 (a rank vector is 16 lanes).
  constexpr bool kPairItems =
      std::is_same_v<T, float> && std::is_same_v<W, float> && !P && Vec::W == 16;
  auto full_first_chunk = [&](const Item& item) {
    return item.t0 == of[item.g] && item.n == kChunk;
  };
  const int64_t rows[kChunk] = {0, 1, 2, 3, 4, 5, 6, 7};
  // Threads take contiguous runs of items (each adds into its own rows of y) of about equal
  // cost, not equal count: with mixed ranks an r=64 item costs as much as eight r=8 ones, and
  // halving the items by count left one thread with most of the work (bench_mixed_ranks.py).
  // An item's cost: its shards' padded ranks x (its tokens, plus kChunk when it is the first
  // to read its adapter's weights, which then dominate). Equal costs split as by count.
  std::vector<int64_t> cost(n_items + 1, 0);  // prefix sums
  for (int64_t i = 0; i < n_items; ++i) {
    const Item& item = items[i];
    const int64_t s = sl[item.g];
    const int64_t weight = item.n + (item.t0 == of[item.g] ? kChunk : 0);
    int64_t c = 0;
    for (int64_t j = item.j0; j < item.j1; ++j) c += (rk[s * nsh + j] + 7) / 8 * 8 * weight;
    cost[i + 1] = cost[i] + c;
  }
  const int64_t n_runs = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_items));
  std::vector<int64_t> bound(n_runs + 1, n_items);
  bound[0] = 0;
  for (int64_t t = 1; t < n_runs; ++t) {  // the item boundary nearest to t/n_runs of the cost
    const int64_t target = cost[n_items] * t / n_runs;
    int64_t b = std::lower_bound(cost.begin(), cost.end(), target) - cost.begin();
    if (b > 0 && target - cost[b - 1] < cost[b] - target) --b;
    bound[t] = std::max(bound[t - 1], std::min(b, n_items));
  }
  at::parallel_for(0, n_runs, 1, [&](int64_t run0, int64_t run1) {
    const int64_t begin = bound[run0], end = bound[run1];
    std::vector<float> z(kChunk * ldz), xf(kWidenX ? kChunk * in : 0);
    std::vector<float> z2(kPairItems ? kChunk * ldz : 0);  // the second item of a pair
    std::vector<uint32_t> zb(P ? kChunk * ldz / 2 : 0);
#ifdef LORAPLEX_LORA_AMX
    // The tile path's buffers: its rows of x gathered (row stride in), z rounded to bf16, and
    // the float32 sums of y's columns of one shard.
    // Kept per thread across calls, uninitialized: zeroing ~100 KB per call and thread cost
    // ~1 ms a decode step. acc (float32 sums of a shard's y columns) only for ranks above 32.
    amx::Tiles tile_state;
    bf16 *xt = nullptr, *zt = nullptr;
    float *zf = nullptr, *yacc = nullptr;
    if (amx_on) {
      amx::Scratch& sc = amx::scratch();
      xt = sc.get(sc.x, amx::kRows * in);
      zt = sc.get(sc.zb, amx::kRows * RP);
      zf = sc.get(sc.z, amx::kRows * ldz);
      if (RP > 32) {
        int64_t widest = 0;
        for (int64_t j = 0; j < nsh; ++j) widest = std::max(widest, blk_off[j + 1] - blk_off[j]);
        yacc = sc.get(sc.acc, amx::kRows * widest * 32);
      }
    }
#endif
    for (int64_t it = begin; it < end; ++it) {
#ifdef LORAPLEX_LORA_AMX
      if constexpr (P) {
        if (items[it].on_tiles) {
          const Item& item = items[it];
          amx::run_item(tile_state, yp, out, xp, in, tk + item.t0, item.n, item.t0 == of[item.g],
                        sl[item.g], item.j0, item.j1, nsh, rk, shard_off.data(), ss, shard_at,
                        RP, ldz, xt, zt, zf, yacc);
          continue;
        }
      }
#endif
      if constexpr (kPairItems) {
        const Item& i1 = items[it];
        if (it + 1 < end && full_first_chunk(i1) && full_first_chunk(items[it + 1]) &&
            items[it + 1].j0 == i1.j0 && items[it + 1].j1 == i1.j1) {
          const Item& i2 = items[it + 1];
          const int64_t s1 = sl[i1.g], s2 = sl[i2.g];
          const float* xs1[kChunk];
          const float* xs2[kChunk];
          for (int64_t t = 0; t < kChunk; ++t) {
            xs1[t] = xp + tk[i1.t0 + t] * in;
            xs2[t] = xp + tk[i2.t0 + t] * in;
          }
          for (int64_t j = i1.j0; j < i1.j1; ++j) {
            const int64_t r1 = rk[s1 * nsh + j], r2 = rk[s2 * nsh + j];
            const int64_t rp1 = (r1 + 7) / 8 * 8, rp2 = (r2 + 7) / 8 * 8;
            const auto [A1, B1] = shard_at(s1, j);
            const auto [A2, B2] = shard_at(s2, j);
            if (r1 > 0 && r2 > 0 && rp1 <= Vec::W && rp2 <= Vec::W) {
              shrink_two(z.data(), z2.data(), ldz, A1, rp1, A2, rp2, in, xs1, xs2);
            } else {  // a shard one of them does not adapt, or a rank above 16
              if (r1 > 0) shrink(z.data(), ldz, A1, rp1, in, xp, tk + i1.t0, kChunk, true);
              if (r2 > 0) shrink(z2.data(), ldz, A2, rp2, in, xp, tk + i2.t0, kChunk, true);
            }
            if (r1 > 0)
              expand(yp, out, shard_off[j], ss[j], B1, r1, z.data(), ldz, tk + i1.t0, kChunk,
                     true);
            if (r2 > 0)
              expand(yp, out, shard_off[j], ss[j], B2, r2, z2.data(), ldz, tk + i2.t0, kChunk,
                     true);
          }
          ++it;
          continue;
        }
      }
      const int64_t g = items[it].g, t0 = items[it].t0, n = items[it].n;
      const int64_t s = sl[g];
#ifdef LORAPLEX_LORA_PAIRS
      if constexpr (P) {
        // x rows as pairs of bf16 (in is even); A^T and B blocks as pairs (see namespace pairs)
        const uint32_t* xs[kChunk];
        for (int64_t t = 0; t < n; ++t)
          xs[t] = reinterpret_cast<const uint32_t*>(xp + tk[t0 + t] * in);
        for (int64_t j = items[it].j0; j < items[it].j1; ++j) {
          const int64_t r = rk[s * nsh + j], rp = (r + 7) / 8 * 8;
          if (r == 0) continue;
          const auto [a, b] = shard_at(s, j);  // [in/2, rp, 2] and [blocks_j, qn, 32, 2]
          const auto* At = reinterpret_cast<const uint32_t*>(a);
          const auto* Bp = reinterpret_cast<const uint32_t*>(b);
          pairs::shrink(z.data(), ldz, At, rp, in / 2, xs, n);
          pairs::round_pairs(zb.data(), z.data(), ldz, rp, n);
          pairs::expand(yp, out, shard_off[j], ss[j], Bp, r, zb.data(), tk + t0, n);
        }
        continue;
      }
#endif
      // The group's first chunk is the first to read its adapter's weights in this call: it
      // streams them from memory, later chunks find them in cache (see shrink_pass, expand).
      const bool stream = t0 == of[g];
      // bf16 activations: the item's rows widened to float32 once, for all its shards. The
      // shrink broadcasts each x value to a vector, and a bf16 one costs three more µops
      // there than a float load (measured: 64 tokens of 1 adapter, 5.95 -> 4.45 ms a step).
      if constexpr (kWidenX) {
        for (int64_t t = 0; t < n; ++t) {
          const T* src = xp + tk[t0 + t] * in;
          float* dst = xf.data() + t * in;
          int64_t k = 0;
          for (; k + Vec::W <= in; k += Vec::W) Vec::store(dst + k, Vec::load(src + k));
          for (; k < in; ++k) dst[k] = to_f(src[k]);
        }
      }
      for (int64_t j = items[it].j0; j < items[it].j1; ++j) {
        const int64_t r = rk[s * nsh + j];
        if (r == 0) continue;
        const auto [At, Bp] = shard_at(s, j);  // [in, rp] and [blocks_j, r, 32]
        if constexpr (kWidenX)
          shrink(z.data(), ldz, At, (r + 7) / 8 * 8, in, xf.data(), rows, n, stream);
        else
          shrink(z.data(), ldz, At, (r + 7) / 8 * 8, in, xp, tk + t0, n, stream);
        expand(yp, out, shard_off[j], ss[j], Bp, r, z.data(), ldz, tk + t0, n, stream);
      }
    }
  });
}

}  // namespace

// Whether this build has the pair layout (bf16 activations and weights, AVX512-BF16).
bool lora_pairs_supported() {
#ifdef LORAPLEX_LORA_PAIRS
  return true;
#else
  return false;
#endif
}

// Whether this build has the AMX tile path (bf16 pair layout, groups of >= 4 tokens; see
// namespace amx) and may use it in this process.
bool lora_amx_supported() {
#ifdef LORAPLEX_LORA_AMX
  return amx::permitted();
#else
  return false;
#endif
}

// Whether the tile path is on for later calls (supported and not turned off).
bool lora_amx_on() {
#ifdef LORAPLEX_LORA_AMX
  return amx::g_enabled.load() && amx::permitted();
#else
  return false;
#endif
}

// Work items run on the tiles since the process started (for tests: the path really runs).
int64_t lora_amx_items() {
#ifdef LORAPLEX_LORA_AMX
  return amx::g_items.load();
#else
  return 0;
#endif
}

// Turns the tile path on or off for later calls (on by default where supported); returns
// whether it is now on.
bool lora_set_amx(bool on) {
#ifdef LORAPLEX_LORA_AMX
  amx::g_enabled.store(on);
  return on && amx::permitted();
#else
  (void)on;
  return false;
#endif
}

void lora_delta_(at::Tensor y, at::Tensor x, at::Tensor ap, at::Tensor bp, at::Tensor ranks,
                 at::Tensor shard_sizes, at::Tensor tokens, at::Tensor offsets, at::Tensor slots,
                 bool pairs) {
  const auto act = x.scalar_type(), wt = ap.scalar_type();
  TORCH_CHECK(y.scalar_type() == act && bp.scalar_type() == wt,
              "lora_delta_: y must have x's dtype and bp ap's dtype");
  TORCH_CHECK((act == at::kFloat || act == at::kBFloat16) &&
                  (wt == at::kFloat || wt == at::kBFloat16 || wt == at::kHalf),
              "lora_delta_: float32 or bfloat16 activations, float32, bfloat16 or float16 "
              "weights only");
  TORCH_CHECK(y.is_contiguous() && x.is_contiguous() && ap.is_contiguous() &&
              bp.is_contiguous());
  const int64_t in = x.size(1), nsh = ranks.size(1);
  TORCH_CHECK(ap.dim() == 3 && ap.size(1) == nsh && ap.size(2) % (8 * in) == 0 &&
                  bp.size(3) == 32 && bp.size(2) <= ap.size(2) / in,
              "lora_delta_: ap must be [S, nsh, RP*in] with RP a multiple of 8 >= bp's R");
  if (pairs) {
    TORCH_CHECK(lora_pairs_supported(), "lora_delta_: this build has no pair layout");
    TORCH_CHECK(act == at::kBFloat16 && wt == at::kBFloat16 && in % 2 == 0 &&
                    bp.size(2) % 2 == 0,
                "lora_delta_: the pair layout takes bf16 x and weights, an even input width "
                "and an even R");
#ifdef LORAPLEX_LORA_PAIRS
    run<bf16, bf16, true>(y, x, ap, bp, ranks, shard_sizes, tokens, offsets, slots);
#endif
    return;
  }
  if (act == at::kFloat && wt == at::kFloat)
    run<float, float>(y, x, ap, bp, ranks, shard_sizes, tokens, offsets, slots);
  else if (act == at::kFloat && wt == at::kBFloat16)
    run<float, bf16>(y, x, ap, bp, ranks, shard_sizes, tokens, offsets, slots);
  else if (act == at::kFloat)
    run<float, f16>(y, x, ap, bp, ranks, shard_sizes, tokens, offsets, slots);
  else if (wt == at::kFloat)
    run<bf16, float>(y, x, ap, bp, ranks, shard_sizes, tokens, offsets, slots);
  else if (wt == at::kBFloat16)
    run<bf16, bf16>(y, x, ap, bp, ranks, shard_sizes, tokens, offsets, slots);
  else
    run<bf16, f16>(y, x, ap, bp, ranks, shard_sizes, tokens, offsets, slots);
}

TORCH_LIBRARY_FRAGMENT(loraplex, m) {
  m.def("lora_delta_(Tensor(a!) y, Tensor x, Tensor ap, Tensor bp, Tensor ranks, "
        "Tensor shard_sizes, Tensor tokens, Tensor offsets, Tensor slots, bool pairs=False) "
        "-> ()");
}

TORCH_LIBRARY_IMPL(loraplex, CPU, m) { m.impl("lora_delta_", &lora_delta_); }

// amx_gemm.cpp (bound here: an extension has one module init)
bool amx_gemm_supported();
void amx_linear(at::Tensor y, at::Tensor x, at::Tensor wp, std::optional<at::Tensor> bias);

// The same function bound directly, which the engine calls (120 times a SmolLM2 decode step):
// a torch.ops call spends ~3.5 us in the dispatcher on its 9 tensors, a pybind11 call ~1.2 us
// (measured on the Zen 2 dev VM). The op above stays for tests and tools that want the schema.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lora_delta_", &lora_delta_,
        "y += the LoRA deltas of x's tokens, grouped by adapter slot (see the file header)",
        pybind11::arg("y"), pybind11::arg("x"), pybind11::arg("ap"), pybind11::arg("bp"),
        pybind11::arg("ranks"), pybind11::arg("shard_sizes"), pybind11::arg("tokens"),
        pybind11::arg("offsets"), pybind11::arg("slots"), pybind11::arg("pairs") = false);
  m.def("lora_amx_supported", &lora_amx_supported,
        "whether the bf16 pair layout can run groups of >= 4 tokens on AMX tiles here");
  m.def("lora_amx_on", &lora_amx_on, "whether the AMX tile path is on for later calls");
  m.def("lora_amx_items", &lora_amx_items, "work items run on AMX tiles since the start");
  m.def("lora_set_amx", &lora_set_amx, pybind11::arg("on"),
        "turn the AMX tile path on or off; returns whether it is on");
  m.def("amx_linear", &amx_linear,
        "y = x W^T (+ bias) in bf16 on AMX tiles, W packed by layers.pack_amx (amx_gemm.cpp)",
        pybind11::arg("y"), pybind11::arg("x"), pybind11::arg("wp"), pybind11::arg("bias"));
  m.def("amx_gemm_supported", &amx_gemm_supported,
        "whether amx_linear runs here (AMX-BF16 built in and the tile state granted)");
  m.def("lora_pairs_supported", &lora_pairs_supported,
        "whether lora_delta_ takes the pair layout here (bf16 x and weights, AVX512-BF16)");
}
