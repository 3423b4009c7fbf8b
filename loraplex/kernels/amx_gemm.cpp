// y = x W^T (+ b) in bf16 on AMX tiles (Intel CPUs with AMX-BF16): the engine's projections
// and lm_head when a bf16 model runs with cpu_gemm "amx" (opt-in; oneDNN stays the default).
//
// Why: at decode size (64 rows) oneDNN's AMX GEMMs stream their pre-packed weights from memory
// at 6-9 GB/s on the Intel AMX VM, against ~20 GB/s for a plain read. This kernel's calls take
// 0.67-0.96x oneDNN's time at SmolLM2's decode shapes, and a read of LoRA adapters right after
// each costs less than after oneDNN's (benchmarks/probe_amx_gemm.py). In the engine
// (benchmarks/bench_cpu_gemm.py) decode steps take 0.88-0.92x oneDNN's time with and without
// LoRA, but a 2048-token prefill step 1.21-1.24x: at large M its tile loop runs at ~45% of the
// tiles' peak, oneDNN's faster. oneDNN's bf16 rows are also not quite batch invariant here (a row
// computed alone and in a batch of 64 differed in a few of ~10^5 outputs); this kernel's are.
//
// Layout: W is packed once (pack_amx in loraplex/model/layers.py) as [NB, KC, 16, 16, 2] bf16,
// NB = ceil(N / 16) blocks of 16 output columns, KC = ceil(K / 32) chunks of 32 input values,
// zero-padded: tile (nb, kc) is 1 KB, pair row p, column c, lane l holding W[16 nb + c]
// [32 kc + 2 p + l], which is the B operand tdpbf16ps reads. A block's chunks follow each
// other, and a thread takes a contiguous run of blocks, so each thread reads one sequential
// stream. x is copied per call into A tiles ([M/16, KC] tiles of 16 rows x 32 values, each
// 1 KB contiguous: tile loads at x's own row stride of 1152 bytes ran 1.8x slower).
//
// Work: pairs of column blocks, split over the threads; for each pair and each two 16-row
// tiles of x, four float32 C tiles (2 row tiles x 2 blocks) sum over the K chunks with two A
// and two B loads for four tile multiplies, then are rounded to bf16 (after adding the bias in
// float32, as oneDNN does) and stored, a 64-byte line per row. Rows go in chunks of
// kRowTiles tiles so that x's chunk stays in L2 while the weight pairs pass by (prefill).
//
// Rounding: every output is the float32 sum of its K chunks' tile products in chunk order,
// rounded once, whatever M is and wherever the row sits: a row's result does not depend on the
// rest of the batch, bit for bit.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "amx_tiles.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && \
    defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define LORAPLEX_AMX_GEMM 1
#endif

namespace {

#ifdef LORAPLEX_AMX_GEMM
using bf16 = c10::BFloat16;
using loraplex_amx::Config;
using loraplex_amx::fence;

constexpr int64_t kTile = 512;      // bf16 values in one 1 KB tile (16 x 32)
constexpr int64_t kRowTiles = 32;   // row tiles per chunk of x (512 rows)

// C tiles 0..3 = (x0 w0, x0 w1, x1 w0, x1 w1) summed over kc chunks; A tiles 4 (x0), 5 (x1),
// B tiles 6 (w0), 7 (w1). TWO: the second row tile exists. (The tile intrinsics take register
// numbers as constants, hence the fixed roles.)
template <bool TWO>
inline void pass(const bf16* x0, const bf16* w0, const bf16* w1, int64_t kc_n) {
  _tile_zero(0);
  _tile_zero(1);
  if (TWO) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t kc = 0; kc < kc_n; ++kc) {
    _tile_loadd(4, x0 + kc * kTile, 64);
    _tile_loadd(6, w0 + kc * kTile, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, w1 + kc * kTile, 64);
    _tile_dpbf16ps(1, 4, 7);
    if (TWO) {
      _tile_loadd(5, x0 + (kc_n + kc) * kTile, 64);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
}

// Rows [m0, m0 + rows) of y's columns [col, col + 32) from two 16 x 16 float32 tiles c0, c1
// (c1 unused when `one`: an odd last block), bias bv0/bv1 added first. Whole lines go out in
// one store, streamed past the caches with `nt`.
inline void store(bf16* y, int64_t N, int64_t m0, int64_t rows, int64_t col, bool one,
                  const float* c0, const float* c1, __m512 bv0, __m512 bv1, bool nt) {
  if (!one && col + 32 <= N) {
    for (int64_t m = 0; m < rows; ++m) {
      const __m512i v = (__m512i)_mm512_cvtne2ps_pbh(
          _mm512_add_ps(_mm512_loadu_ps(c1 + m * 16), bv1),
          _mm512_add_ps(_mm512_loadu_ps(c0 + m * 16), bv0));
      bf16* dst = y + (m0 + m) * N + col;
      if (nt)
        _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), v);
      else
        _mm512_storeu_si512(dst, v);
    }
    return;
  }
  const int64_t w0 = std::min<int64_t>(16, N - col);
  const int64_t w1 = one ? 0 : std::max<int64_t>(0, std::min<int64_t>(16, N - col - 16));
  const __mmask16 k0 = static_cast<__mmask16>((1u << w0) - 1);
  const __mmask16 k1 = static_cast<__mmask16>((1u << w1) - 1);
  for (int64_t m = 0; m < rows; ++m) {
    bf16* dst = y + (m0 + m) * N + col;
    _mm256_mask_storeu_epi16(
        dst, k0, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_loadu_ps(c0 + m * 16), bv0)));
    if (w1 > 0)
      _mm256_mask_storeu_epi16(
          dst + 16, k1,
          (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_loadu_ps(c1 + m * 16), bv1)));
  }
}

inline __m512 bias16(const bf16* b, int64_t col, int64_t N) {
  if (b == nullptr || col >= N) return _mm512_setzero_ps();
  const int64_t w = std::min<int64_t>(16, N - col);
  const __m256i raw = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << w) - 1), b + col);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

void run(at::Tensor& y, const at::Tensor& x, const at::Tensor& wp, const bf16* bias) {
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1);
  const int64_t NB = wp.size(0), KC = wp.size(1);
  const int64_t nrt = (M + 15) / 16;
  // x as A tiles, zero-padded: tile (rt, kc) at (rt * KC + kc) * kTile, row i at + i * 32.
  const bf16* xp = x.data_ptr<bf16>();
  auto pack_rows = [&](bf16* xb, int64_t t0, int64_t t1) {
    for (int64_t rt = t0; rt < t1; ++rt)
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t m = rt * 16 + i;
        bf16* dst = xb + rt * KC * kTile + i * 32;
        for (int64_t kc = 0; kc < KC; ++kc) {
          const int64_t n = m < M ? std::max<int64_t>(0, std::min<int64_t>(32, K - kc * 32)) : 0;
          if (n > 0) std::memcpy(dst + kc * kTile, xp + m * K + kc * 32, n * 2);
          if (n < 32) std::memset(dst + kc * kTile + n, 0, (32 - n) * 2);
        }
      }
  };
  // (The buffers keep the largest x a thread has packed, as big as that x itself: one step's
  // activations for one projection, at most max_num_batched_tokens x K bf16.)
  // Up to kOwnCopyTiles row tiles (decode), each thread packs its own copy: tiles one core
  // packed and the other then read come through the other core's cache (a 64 x 576 x 576
  // call took 55 us with one shared copy, 30 us with two, its weight in cache; 65 and 58 us
  // from memory). Larger x is packed once, by both threads, into a shared buffer.
  constexpr int64_t kOwnCopyTiles = 8;
  const bool own_copy = nrt <= kOwnCopyTiles;
  thread_local std::vector<bf16> shared_buf;
  bf16* shared = nullptr;
  if (!own_copy) {
    if (static_cast<int64_t>(shared_buf.size()) < nrt * KC * kTile)
      shared_buf.resize(nrt * KC * kTile);
    shared = shared_buf.data();
    at::parallel_for(0, nrt, 1, [&](int64_t t0, int64_t t1) { pack_rows(shared, t0, t1); });
  }

  const bf16* w = wp.data_ptr<bf16>();
  bf16* yp = y.data_ptr<bf16>();
  // Stream y past the caches when it is large (a prefill's, or lm_head's: it would only evict
  // the next weights) and its rows are whole aligned lines; a decode step's next op reads it.
  const bool nt = M * N * 2 > (int64_t{1} << 21) && N % 32 == 0 &&
                  (reinterpret_cast<uintptr_t>(yp) & 63) == 0;
  const int64_t NP = (NB + 1) / 2;  // an odd last block pairs with itself (its copy unused)
  at::parallel_for(0, NP, 1, [&](int64_t p0, int64_t p1) {
    const bf16* xb = shared;
    if (own_copy) {
      thread_local std::vector<bf16> own;
      if (static_cast<int64_t>(own.size()) < nrt * KC * kTile) own.resize(nrt * KC * kTile);
      pack_rows(own.data(), 0, nrt);
      xb = own.data();
    }
    Config c;
    for (int t = 0; t < 8; ++t) c.set(t, 16, 64);
    fence();
    _tile_loadconfig(&c);
    alignas(64) float buf[4][256];
    for (int64_t rc = 0; rc < nrt; rc += kRowTiles)
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t b0 = 2 * p, b1 = std::min(2 * p + 1, NB - 1);
        const bf16* w0 = w + b0 * KC * kTile;
        const bf16* w1 = w + b1 * KC * kTile;
        const __m512 bv0 = bias16(bias, b0 * 16, N), bv1 = bias16(bias, b0 * 16 + 16, N);
        for (int64_t r = rc; r < std::min(nrt, rc + kRowTiles); r += 2) {
          const bool two = r + 1 < nrt;
          const bf16* x0 = xb + r * KC * kTile;
          if (two)
            pass<true>(x0, w0, w1, KC);
          else
            pass<false>(x0, w0, w1, KC);
          _tile_stored(0, buf[0], 64);
          _tile_stored(1, buf[1], 64);
          if (two) {
            _tile_stored(2, buf[2], 64);
            _tile_stored(3, buf[3], 64);
          }
          fence();
          const int64_t m0 = r * 16;
          store(yp, N, m0, std::min<int64_t>(16, M - m0), b0 * 16, b1 == b0, buf[0], buf[1],
                bv0, bv1, nt);
          if (two)
            store(yp, N, m0 + 16, std::min<int64_t>(16, M - m0 - 16), b0 * 16, b1 == b0,
                  buf[2], buf[3], bv0, bv1, nt);
        }
      }
    _tile_release();
    if (nt) _mm_sfence();
  });
}
#endif

}  // namespace

// Whether this build and process can run amx_linear (AMX-BF16 compiled in, tile state granted).
bool amx_gemm_supported() {
#ifdef LORAPLEX_AMX_GEMM
  return loraplex_amx::permitted();
#else
  return false;
#endif
}

// y [M, N] = x [M, K] W^T (+ bias [N]), bf16; wp: W packed [ceil(N/16), ceil(K/32), 16, 16, 2]
// (see the file header).
void amx_linear(at::Tensor y, at::Tensor x, at::Tensor wp, std::optional<at::Tensor> bias) {
  TORCH_CHECK(amx_gemm_supported(), "amx_linear: no AMX-BF16 here");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && y.scalar_type() == at::kBFloat16 &&
                  wp.scalar_type() == at::kBFloat16,
              "amx_linear: bf16 x, y and weights only");
  TORCH_CHECK(x.is_cpu() && y.is_cpu() && wp.is_cpu(), "amx_linear: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && wp.dim() == 5 && x.is_contiguous() &&
                  y.is_contiguous() && wp.is_contiguous(),
              "amx_linear: contiguous x [M, K], y [M, N], wp [NB, KC, 16, 16, 2]");
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1);
  TORCH_CHECK(y.size(0) == M && wp.size(0) == (N + 15) / 16 && wp.size(1) == (K + 31) / 32 &&
                  wp.size(2) == 16 && wp.size(3) == 16 && wp.size(4) == 2,
              "amx_linear: shapes do not match (x ", x.sizes(), ", y ", y.sizes(), ", wp ",
              wp.sizes(), ")");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->is_cpu() && bias->scalar_type() == at::kBFloat16 && bias->numel() == N &&
                    bias->is_contiguous(),
                "amx_linear: bias must be bf16 [N]");
  if (M == 0) return;
#ifdef LORAPLEX_AMX_GEMM
  run(y, x, wp, has_bias ? bias->data_ptr<c10::BFloat16>() : nullptr);
#endif
}
