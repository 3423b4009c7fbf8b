// Segmented multi-LoRA delta for CPU: y[t] += Bt_s^T (A_s x[t]) for every token t of every
// adapter group, in one call per projection and step (no per-row or per-adapter launches).
//
// Layout (see loraplex/lora/ops.py): a [S, nsh*R, in] (shard j's A in rows j*R .. j*R+r_j),
// bp [S, NB, R, 32] (scaled B^T in blocks of 32 output columns; shard j's blocks start at the
// block of its first column, every shard size being a multiple of 32 or padded),
// ranks [S, nsh] (r_j of the adapter in each slot; 0 = shard not adapted). Only the real rank
// is computed, so mixed ranks do not pay the largest rank. Tokens are grouped by slot
// (tokens[offsets[g]:offsets[g+1]] use slots[g]); work items are (group, chunk of <= 8 tokens),
// so each item writes disjoint rows of y and reads its adapter's A/B chunk from cache.
//
// dtypes: activations (x, y) float32 or bfloat16, adapter weights (a, bp) float32 or bfloat16,
// in any combination; products and sums are float32, y is rounded once (to nearest even) when a
// bfloat16 row is stored, as `y + delta` in torch would. bf16 weights halve the bytes a step
// must read, which is what bounds this kernel once a step uses many distinct adapters.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kChunk = 8;
using bf16 = c10::BFloat16;

inline float to_f(float v) { return v; }
inline float to_f(bf16 v) { return static_cast<float>(v); }
inline void put(float* p, float v) { *p = v; }
inline void put(bf16* p, float v) { *p = bf16(v); }  // round to nearest even

#if defined(__AVX2__) && defined(__FMA__)
inline __m256 ld8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 ld8(const bf16* p) {  // bf16 is the high half of a float32
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline void st8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void st8(bf16* p, __m256 v) {
  // Round to nearest even, NaN kept quiet: the same bits as c10's float -> BFloat16.
  const __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(
      _mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
  const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
}
#endif

#if defined(__AVX512F__)
// 16-wide paths: on CPUs with full-width AVX-512 FMA units they do twice the work per
// instruction of the 8-wide ones (and have 32 registers for accumulators).
inline __m512 ld16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 ld16(const bf16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline void st16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void st16(bf16* p, __m512 v) {  // as st8: round to nearest even, quiet NaN
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_blend_epi32(nan, r, _mm512_set1_epi32(0x7fc0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}
inline __m256 fold(__m512 v) {  // the two 8-lane halves added
  return _mm256_add_ps(_mm512_castps512_ps256(v),
                       _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}
// Four 8-lane partial sums -> their four totals.
inline __m128 sum4(__m256 c0, __m256 c1, __m256 c2, __m256 c3) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(c0, c1), _mm256_hadd_ps(c2, c3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// shrink for in % 16 == 0: rows i0.. (a multiple of 4) of z, as the 8-wide loop below.
template <typename W, typename T>
inline int64_t shrink16(float* z, int64_t ldz, const W* A, int64_t r, int64_t in, const T* x,
                        const int64_t* tok, int64_t n) {
  constexpr int64_t kLine = 64 / sizeof(W);
  int64_t i = 0;
  for (; i + 4 <= r; i += 4) {
    const W* a0 = A + i * in;
    int64_t t = 0;
    for (; t + 2 <= n; t += 2) {  // two tokens x four rows: each A load feeds two FMAs
      const T* xa = x + tok[t] * in;
      const T* xb = x + tok[t + 1] * in;
      __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
      __m512 d0 = c0, d1 = c0, d2 = c0, d3 = c0;
      const W* nxt = (t == 0 && i + 8 <= r) ? a0 + 4 * in : nullptr;
      for (int64_t k = 0; k < in; k += 16) {
        if (nxt != nullptr && (k & (kLine - 1)) == 0) {
          _mm_prefetch(reinterpret_cast<const char*>(nxt + k), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(nxt + in + k), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(nxt + 2 * in + k), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(nxt + 3 * in + k), _MM_HINT_T0);
        }
        const __m512 u = ld16(xa + k), v = ld16(xb + k);
        const __m512 r0 = ld16(a0 + k), r1 = ld16(a0 + in + k);
        const __m512 r2 = ld16(a0 + 2 * in + k), r3 = ld16(a0 + 3 * in + k);
        c0 = _mm512_fmadd_ps(r0, u, c0);
        c1 = _mm512_fmadd_ps(r1, u, c1);
        c2 = _mm512_fmadd_ps(r2, u, c2);
        c3 = _mm512_fmadd_ps(r3, u, c3);
        d0 = _mm512_fmadd_ps(r0, v, d0);
        d1 = _mm512_fmadd_ps(r1, v, d1);
        d2 = _mm512_fmadd_ps(r2, v, d2);
        d3 = _mm512_fmadd_ps(r3, v, d3);
      }
      _mm_storeu_ps(z + t * ldz + i, sum4(fold(c0), fold(c1), fold(c2), fold(c3)));
      _mm_storeu_ps(z + (t + 1) * ldz + i, sum4(fold(d0), fold(d1), fold(d2), fold(d3)));
    }
    for (; t < n; ++t) {
      const T* xt = x + tok[t] * in;
      __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
      for (int64_t k = 0; k < in; k += 16) {
        const __m512 xv = ld16(xt + k);
        c0 = _mm512_fmadd_ps(ld16(a0 + k), xv, c0);
        c1 = _mm512_fmadd_ps(ld16(a0 + in + k), xv, c1);
        c2 = _mm512_fmadd_ps(ld16(a0 + 2 * in + k), xv, c2);
        c3 = _mm512_fmadd_ps(ld16(a0 + 3 * in + k), xv, c3);
      }
      _mm_storeu_ps(z + t * ldz + i, sum4(fold(c0), fold(c1), fold(c2), fold(c3)));
    }
  }
  return i;  // rows done; the caller finishes r % 4
}

// One full 32-column block of expand: four tokens per pass (8 accumulators), then two, one.
template <typename W, typename T>
inline void expand_block16(T* y, int64_t ldy, int64_t col, const W* b, int64_t r,
                           const float* z, int64_t ldz, const int64_t* tok, int64_t n) {
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) {
    T* y0 = y + tok[t] * ldy + col;
    T* y1 = y + tok[t + 1] * ldy + col;
    T* y2 = y + tok[t + 2] * ldy + col;
    T* y3 = y + tok[t + 3] * ldy + col;
    const float* z0 = z + t * ldz;
    __m512 a0 = ld16(y0), a1 = ld16(y0 + 16), e0 = ld16(y1), e1 = ld16(y1 + 16);
    __m512 f0 = ld16(y2), f1 = ld16(y2 + 16), g0 = ld16(y3), g1 = ld16(y3 + 16);
    for (int64_t i = 0; i < r; ++i) {
      const __m512 b0 = ld16(b + i * 32), b1 = ld16(b + i * 32 + 16);
      const __m512 w0 = _mm512_set1_ps(z0[i]), w1 = _mm512_set1_ps(z0[ldz + i]);
      const __m512 w2 = _mm512_set1_ps(z0[2 * ldz + i]), w3 = _mm512_set1_ps(z0[3 * ldz + i]);
      a0 = _mm512_fmadd_ps(w0, b0, a0);
      a1 = _mm512_fmadd_ps(w0, b1, a1);
      e0 = _mm512_fmadd_ps(w1, b0, e0);
      e1 = _mm512_fmadd_ps(w1, b1, e1);
      f0 = _mm512_fmadd_ps(w2, b0, f0);
      f1 = _mm512_fmadd_ps(w2, b1, f1);
      g0 = _mm512_fmadd_ps(w3, b0, g0);
      g1 = _mm512_fmadd_ps(w3, b1, g1);
    }
    st16(y0, a0);
    st16(y0 + 16, a1);
    st16(y1, e0);
    st16(y1 + 16, e1);
    st16(y2, f0);
    st16(y2 + 16, f1);
    st16(y3, g0);
    st16(y3 + 16, g1);
  }
  for (; t < n; ++t) {
    T* yt = y + tok[t] * ldy + col;
    const float* zt = z + t * ldz;
    __m512 a0 = ld16(yt), a1 = ld16(yt + 16);
    for (int64_t i = 0; i < r; ++i) {
      const __m512 w = _mm512_set1_ps(zt[i]);
      a0 = _mm512_fmadd_ps(w, ld16(b + i * 32), a0);
      a1 = _mm512_fmadd_ps(w, ld16(b + i * 32 + 16), a1);
    }
    st16(yt, a0);
    st16(yt + 16, a1);
  }
}
#endif

template <typename W, typename T>
inline float dot_f(const W* a, const T* b, int64_t n) {
#if defined(__AVX2__) && defined(__FMA__)
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(ld8(a + i), ld8(b + i), s0);
    s1 = _mm256_fmadd_ps(ld8(a + i + 8), ld8(b + i + 8), s1);
  }
  s0 = _mm256_add_ps(s0, s1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s0), _mm256_extractf128_ps(s0, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
  float s = _mm_cvtss_f32(h);
  for (; i < n; ++i) s += to_f(a[i]) * to_f(b[i]);
  return s;
#else
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += to_f(a[i]) * to_f(b[i]);
  return s;
#endif
}

// z[t][i] = A[i] . x[tok[t]] for i < r, t < n. Four A rows at a time share each x load and one
// horizontal reduction; the rows stay in L1 while the item's tokens pass over them.
template <typename W, typename T>
inline void shrink(float* z, int64_t ldz, const W* A, int64_t r, int64_t in, const T* x,
                   const int64_t* tok, int64_t n) {
  constexpr int64_t kLine = 64 / sizeof(W);  // weights per cache line
  int64_t i = 0;
#if defined(__AVX512F__)
  if (in % 16 == 0) i = shrink16(z, ldz, A, r, in, x, tok, n);
#endif
#if defined(__AVX2__) && defined(__FMA__)
  if (in % 8 == 0) {
    for (; i + 4 <= r; i += 4) {
      const W* a0 = A + i * in;
      int64_t t = 0;
      for (; t + 2 <= n; t += 2) {  // two tokens x four rows: each A load feeds two FMAs
        const T* xa = x + tok[t] * in;
        const T* xb = x + tok[t + 1] * in;
        __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
        __m256 d0 = c0, d1 = c0, d2 = c0, d3 = c0;
        // First token pair of a row group: pull the next group's rows in (one line per
        // row per cache line) so they stream from DRAM while these FMAs run; the rows are
        // short (one `in` each), too short for the hardware prefetcher to ramp up.
        const W* nxt = (t == 0 && i + 8 <= r) ? a0 + 4 * in : nullptr;
        for (int64_t k = 0; k < in; k += 8) {
          if (nxt != nullptr && (k & (kLine - 1)) == 0) {
            _mm_prefetch(reinterpret_cast<const char*>(nxt + k), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(nxt + in + k), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(nxt + 2 * in + k), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(nxt + 3 * in + k), _MM_HINT_T0);
          }
          const __m256 u = ld8(xa + k), v = ld8(xb + k);
          const __m256 r0 = ld8(a0 + k), r1 = ld8(a0 + in + k);
          const __m256 r2 = ld8(a0 + 2 * in + k);
          const __m256 r3 = ld8(a0 + 3 * in + k);
          c0 = _mm256_fmadd_ps(r0, u, c0);
          c1 = _mm256_fmadd_ps(r1, u, c1);
          c2 = _mm256_fmadd_ps(r2, u, c2);
          c3 = _mm256_fmadd_ps(r3, u, c3);
          d0 = _mm256_fmadd_ps(r0, v, d0);
          d1 = _mm256_fmadd_ps(r1, v, d1);
          d2 = _mm256_fmadd_ps(r2, v, d2);
          d3 = _mm256_fmadd_ps(r3, v, d3);
        }
        const __m256 hc = _mm256_hadd_ps(_mm256_hadd_ps(c0, c1), _mm256_hadd_ps(c2, c3));
        const __m256 hd = _mm256_hadd_ps(_mm256_hadd_ps(d0, d1), _mm256_hadd_ps(d2, d3));
        _mm_storeu_ps(z + t * ldz + i,
                      _mm_add_ps(_mm256_castps256_ps128(hc), _mm256_extractf128_ps(hc, 1)));
        _mm_storeu_ps(z + (t + 1) * ldz + i,
                      _mm_add_ps(_mm256_castps256_ps128(hd), _mm256_extractf128_ps(hd, 1)));
      }
      for (; t < n; ++t) {
        const T* xt = x + tok[t] * in;
        __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
        for (int64_t k = 0; k < in; k += 8) {
          const __m256 xv = ld8(xt + k);
          c0 = _mm256_fmadd_ps(ld8(a0 + k), xv, c0);
          c1 = _mm256_fmadd_ps(ld8(a0 + in + k), xv, c1);
          c2 = _mm256_fmadd_ps(ld8(a0 + 2 * in + k), xv, c2);
          c3 = _mm256_fmadd_ps(ld8(a0 + 3 * in + k), xv, c3);
        }
        const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(c0, c1), _mm256_hadd_ps(c2, c3));
        _mm_storeu_ps(z + t * ldz + i,
                      _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
      }
    }
  }
#endif
  for (; i < r; ++i)
    for (int64_t t = 0; t < n; ++t) z[t * ldz + i] = dot_f(A + i * in, x + tok[t] * in, in);
}

// y[tok[t], o0 + 32c : +32] += sum_i z[t][i] * Bp[c][i][:] over the shard's column blocks c.
// Bp is the shard's scaled B^T packed as [blocks, R, 32]: each block is one contiguous run, so
// the loads stream (a [r, out] row-major B^T would stride by `out` floats per rank row).
template <typename W, typename T>
inline void expand(T* y, int64_t ldy, int64_t o0, int64_t on, const W* Bp, int64_t R,
                   int64_t r, const float* z, int64_t ldz, const int64_t* tok, int64_t n) {
  constexpr int64_t kLine = 64 / sizeof(W);
  const int64_t nblk = (on + 31) / 32;
  for (int64_t c = 0; c < nblk; ++c) {
    const W* b = Bp + c * R * 32;
    const int64_t w = std::min<int64_t>(32, on - c * 32);
#if defined(__AVX2__) && defined(__FMA__)
    if (c + 1 < nblk)  // the next block's r rows of 32 weights (one or two lines each)
      for (int64_t i = 0; i < r; ++i)
        for (int64_t l = 0; l < 32; l += kLine)
          _mm_prefetch(reinterpret_cast<const char*>(b + R * 32 + i * 32 + l), _MM_HINT_T0);
#endif
#if defined(__AVX512F__)
    if (w == 32) {
      expand_block16(y, ldy, o0 + c * 32, b, r, z, ldz, tok, n);
      continue;
    }
#endif
    int64_t t = 0;
#if defined(__AVX2__) && defined(__FMA__)
    if (w == 32) {
      // Two tokens per pass: each B load feeds two FMAs (8 accumulators in registers).
      for (; t + 2 <= n; t += 2) {
        T* ya = y + tok[t] * ldy + o0 + c * 32;
        T* yb = y + tok[t + 1] * ldy + o0 + c * 32;
        const float* za = z + t * ldz;
        const float* zb = z + (t + 1) * ldz;
        __m256 a0 = ld8(ya), a1 = ld8(ya + 8), a2 = ld8(ya + 16), a3 = ld8(ya + 24);
        __m256 e0 = ld8(yb), e1 = ld8(yb + 8), e2 = ld8(yb + 16), e3 = ld8(yb + 24);
        for (int64_t i = 0; i < r; ++i) {
          const W* bi = b + i * 32;
          const __m256 b0 = ld8(bi), b1 = ld8(bi + 8), b2 = ld8(bi + 16), b3 = ld8(bi + 24);
          const __m256 wa = _mm256_set1_ps(za[i]), wb = _mm256_set1_ps(zb[i]);
          a0 = _mm256_fmadd_ps(wa, b0, a0);
          a1 = _mm256_fmadd_ps(wa, b1, a1);
          a2 = _mm256_fmadd_ps(wa, b2, a2);
          a3 = _mm256_fmadd_ps(wa, b3, a3);
          e0 = _mm256_fmadd_ps(wb, b0, e0);
          e1 = _mm256_fmadd_ps(wb, b1, e1);
          e2 = _mm256_fmadd_ps(wb, b2, e2);
          e3 = _mm256_fmadd_ps(wb, b3, e3);
        }
        st8(ya, a0);
        st8(ya + 8, a1);
        st8(ya + 16, a2);
        st8(ya + 24, a3);
        st8(yb, e0);
        st8(yb + 8, e1);
        st8(yb + 16, e2);
        st8(yb + 24, e3);
      }
    }
#endif
    for (; t < n; ++t) {
      T* yt = y + tok[t] * ldy + o0 + c * 32;
      const float* zt = z + t * ldz;
#if defined(__AVX2__) && defined(__FMA__)
      if (w == 32) {
        __m256 a0 = ld8(yt), a1 = ld8(yt + 8), a2 = ld8(yt + 16), a3 = ld8(yt + 24);
        for (int64_t i = 0; i < r; ++i) {
          const __m256 wv = _mm256_set1_ps(zt[i]);
          const W* bi = b + i * 32;
          a0 = _mm256_fmadd_ps(wv, ld8(bi), a0);
          a1 = _mm256_fmadd_ps(wv, ld8(bi + 8), a1);
          a2 = _mm256_fmadd_ps(wv, ld8(bi + 16), a2);
          a3 = _mm256_fmadd_ps(wv, ld8(bi + 24), a3);
        }
        st8(yt, a0);
        st8(yt + 8, a1);
        st8(yt + 16, a2);
        st8(yt + 24, a3);
        continue;
      }
#endif
      // Partial block (or no AVX2): accumulate in float32, round once.
      for (int64_t col = 0; col < w; ++col) {
        float acc = to_f(yt[col]);
        for (int64_t i = 0; i < r; ++i) acc += zt[i] * to_f(b[i * 32 + col]);
        put(yt + col, acc);
      }
    }
  }
}

template <typename T, typename W>
void run(at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& bp,
         const at::Tensor& ranks, const at::Tensor& shard_sizes, const at::Tensor& tokens,
         const at::Tensor& offsets, const at::Tensor& slots) {
  const int64_t in = x.size(1), out = y.size(1), nsh = ranks.size(1);
  const int64_t R = a.size(1) / nsh;
  const int64_t NB = bp.size(1);
  const T* xp = x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const W* ap = a.data_ptr<W>();
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
  // work items: (group, first token index in `tokens`)
  std::vector<std::pair<int64_t, int64_t>> items;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t t = of[g]; t < of[g + 1]; t += kChunk) items.emplace_back(g, t);
  const int64_t n_items = static_cast<int64_t>(items.size());
  at::parallel_for(0, n_items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xa(kChunk * R);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t g = items[it].first, t0 = items[it].second;
      const int64_t t1 = std::min(t0 + kChunk, of[g + 1]);
      const int64_t s = sl[g];
      for (int64_t j = 0; j < nsh; ++j) {
        const int64_t r = rk[s * nsh + j];
        if (r == 0) continue;
        const W* A = ap + (s * nsh * R + j * R) * in;         // [r, in]
        const W* Bp = bpp + (s * NB + blk_off[j]) * R * 32;  // [blocks_j, R, 32]
        shrink(xa.data(), R, A, r, in, xp, tk + t0, t1 - t0);
        expand(yp, out, shard_off[j], ss[j], Bp, R, r, xa.data(), R, tk + t0, t1 - t0);
      }
    }
  });
}

}  // namespace

void lora_delta_(at::Tensor y, at::Tensor x, at::Tensor a, at::Tensor bp, at::Tensor ranks,
                 at::Tensor shard_sizes, at::Tensor tokens, at::Tensor offsets,
                 at::Tensor slots) {
  const auto act = x.scalar_type(), wt = a.scalar_type();
  TORCH_CHECK(y.scalar_type() == act && bp.scalar_type() == wt,
              "lora_delta_: y must have x's dtype and bp a's dtype");
  TORCH_CHECK((act == at::kFloat || act == at::kBFloat16) &&
                  (wt == at::kFloat || wt == at::kBFloat16),
              "lora_delta_: float32 or bfloat16 only");
  TORCH_CHECK(y.is_contiguous() && x.is_contiguous() && a.is_contiguous() && bp.is_contiguous());
  const int64_t nsh = ranks.size(1);
  TORCH_CHECK(a.size(2) == x.size(1) && bp.size(2) == a.size(1) / nsh && bp.size(3) == 32);
  if (act == at::kFloat && wt == at::kFloat)
    run<float, float>(y, x, a, bp, ranks, shard_sizes, tokens, offsets, slots);
  else if (act == at::kFloat)
    run<float, bf16>(y, x, a, bp, ranks, shard_sizes, tokens, offsets, slots);
  else if (wt == at::kFloat)
    run<bf16, float>(y, x, a, bp, ranks, shard_sizes, tokens, offsets, slots);
  else
    run<bf16, bf16>(y, x, a, bp, ranks, shard_sizes, tokens, offsets, slots);
}

TORCH_LIBRARY_FRAGMENT(loraplex, m) {
  m.def("lora_delta_(Tensor(a!) y, Tensor x, Tensor a, Tensor bp, Tensor ranks, "
        "Tensor shard_sizes, Tensor tokens, Tensor offsets, Tensor slots) -> ()");
}

TORCH_LIBRARY_IMPL(loraplex, CPU, m) { m.impl("lora_delta_", &lora_delta_); }
