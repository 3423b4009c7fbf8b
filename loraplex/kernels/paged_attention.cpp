// Paged decode attention for CPU: one query token per row, K/V read in place from the block pool.
//
// The pure-torch path gathers every row's blocks into a padded copy before attention, which
// moves the whole KV context through memory three times (read, write, read). This kernel reads
// each K/V vector once, straight from its block, and serves the G query heads of a KV group
// from that single read (GQA). Work is split over (row, kv head) with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "vec_math.h"

namespace {

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
// Head dims of the families we serve are multiples of 16 (64, 128); others take the tail loop.
inline float dot(const float* a, const float* b, int64_t d) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  s0 = _mm256_add_ps(s0, s1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s0), _mm256_extractf128_ps(s0, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
  float s = _mm_cvtss_f32(h);
  for (; i < d; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float* y, float a, const float* x, int64_t d) {
  const __m256 va = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= d; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < d; ++i) y[i] += a * x[i];
}
#else
inline float dot(const float* a, const float* b, int64_t d) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < d; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float* y, float a, const float* x, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) y[i] += a * x[i];
}
#endif

// Each (block, kv head) chunk is one page-sized run in a random place: the hardware prefetcher
// restarts at every chunk, so software fetches each chunk (into L2) kAhead chunks before its
// use. An item reads its K chunks, then its V chunks; the first V chunks are fetched while the
// last K ones are consumed. Measured at 32 rows x 190 keys x 30 layers (SmolLM2's shapes):
// 17-19 ms per step fetching only the next K chunk (into L1, non-temporal), 14 ms so. The
// kernel is bound by memory, not arithmetic: with K/V in cache the same step takes 5.7 ms, and
// 16-wide AVX-512 bodies did not change that (tried: 5.7 vs 5.8 ms), so they are not here.
constexpr int64_t kAhead = 2;

inline void prefetch_chunk(const float* p, int64_t floats) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < floats * 4; off += 64) __builtin_prefetch(c + off, 0, 2);
}

// s[t] = scale * q . k_t for t in [t0, t1), k_t = k + (t - base) * D (one block's chunk).
inline void qk_run(float* s, const float* q, const float* k, int64_t base, int64_t t0, int64_t t1,
                   int64_t D, float scale) {
  int64_t t = t0;
#if defined(__AVX2__) && defined(__FMA__)
  if (D == 64) {
    __m256 qv[8];
    for (int i = 0; i < 8; ++i) qv[i] = _mm256_loadu_ps(q + 8 * i);
    for (; t + 4 <= t1; t += 4) {  // four keys at a time: one horizontal reduction for all four
      const float* k0 = k + (t - base) * D;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int i = 0; i < 8; ++i) {
        a0 = _mm256_fmadd_ps(qv[i], _mm256_loadu_ps(k0 + 8 * i), a0);
        a1 = _mm256_fmadd_ps(qv[i], _mm256_loadu_ps(k0 + D + 8 * i), a1);
        a2 = _mm256_fmadd_ps(qv[i], _mm256_loadu_ps(k0 + 2 * D + 8 * i), a2);
        a3 = _mm256_fmadd_ps(qv[i], _mm256_loadu_ps(k0 + 3 * D + 8 * i), a3);
      }
      const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
      const __m128 r = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
      _mm_storeu_ps(s + t, _mm_mul_ps(r, _mm_set1_ps(scale)));
    }
  }
#endif
  for (; t < t1; ++t) s[t] = dot(q, k + (t - base) * D, D) * scale;
}

// acc = sum over t in [first, len) of p[t] * v_t, v_t read in place from the paged cache.
// pf: fetch V ahead (the first head's pass; the others find V in cache).
inline void pv_row(float* out, const float* p, const float* vp, const int64_t* table, int64_t Hkv,
                   int64_t hk, int64_t bs, int64_t D, int64_t first, int64_t len, bool pf) {
#if defined(__AVX2__) && defined(__FMA__)
  if (D == 64) {
    __m256 a[8];
    for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
    for (int64_t j = first / bs; j * bs < len; ++j) {
      const float* v = vp + ((table[j] * Hkv + hk) * bs) * D;
      if (pf && (j + kAhead) * bs < len)
        prefetch_chunk(vp + ((table[j + kAhead] * Hkv + hk) * bs) * D, bs * D);
      for (int64_t t = std::max(first, j * bs); t < std::min(len, (j + 1) * bs); ++t) {
        const float* vt = v + (t - j * bs) * D;
        const __m256 w = _mm256_set1_ps(p[t]);
        for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vt + 8 * i), a[i]);
      }
    }
    for (int i = 0; i < 8; ++i) _mm256_storeu_ps(out + 8 * i, a[i]);
    return;
  }
#endif
  std::fill(out, out + D, 0.f);
  for (int64_t j = first / bs; j * bs < len; ++j) {
    const float* v = vp + ((table[j] * Hkv + hk) * bs) * D;
    if (pf && (j + kAhead) * bs < len)
      prefetch_chunk(vp + ((table[j + kAhead] * Hkv + hk) * bs) * D, bs * D);
    for (int64_t t = std::max(first, j * bs); t < std::min(len, (j + 1) * bs); ++t)
      axpy(out, p[t], v + (t - j * bs) * D, D);
  }
}

// s[0:n] = softmax(s[0:n]) in place: exp(s - max) / sum, as ATen computes it.
inline void softmax_(float* s, int64_t n) {
  using namespace loraplex_vec;
  float mx = -INFINITY;
  for (int64_t t = 0; t < n; ++t) mx = std::max(mx, s[t]);
  float sum = 0.f;
  int64_t t = 0;
#if defined(__AVX512F__)
  const __m512 vm = _mm512_set1_ps(mx);
  __m512 acc = _mm512_setzero_ps();
  for (; t + 16 <= n; t += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + t), vm));
    _mm512_storeu_ps(s + t, e);
    acc = _mm512_add_ps(acc, e);
  }
  sum = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__) && defined(__FMA__)
  const __m256 vm = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  for (; t + 8 <= n; t += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), vm));
    _mm256_storeu_ps(s + t, e);
    acc = _mm256_add_ps(acc, e);
  }
  alignas(32) float part[8];
  _mm256_store_ps(part, acc);
  for (float v : part) sum += v;
#endif
  for (; t < n; ++t) {
    s[t] = exp1(s[t] - mx);
    sum += s[t];
  }
  const float inv = 1.f / sum;
  for (t = 0; t < n; ++t) s[t] *= inv;
}

}  // namespace

// q: [B, H, D]; k_cache, v_cache: [num_blocks, Hkv, block_size, D]; block_tables: [B, max_blocks]
// (int64); context_lens: [B] (int64, keys 0..len-1 visible); window: 0 = none, else only the
// last `window` keys are visible. Returns [B, H, D]. All float32, contiguous.
at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                                     at::Tensor block_tables, at::Tensor context_lens,
                                     double scale, int64_t window) {
  TORCH_CHECK(q.dtype() == at::kFloat && k_cache.dtype() == at::kFloat &&
                  v_cache.dtype() == at::kFloat,
              "paged_decode_attention: float32 only");
  // q's rows may be strided (a view of the fused qkv output: no copy); each row's heads are
  // contiguous. The output is a new contiguous [B, H, D].
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2),
              "paged_decode_attention: q must be [B, H, D] with contiguous heads");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  block_tables.is_contiguous() && context_lens.is_contiguous(),
              "paged_decode_attention: contiguous inputs required");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t Hkv = k_cache.size(1), bs = k_cache.size(2);
  TORCH_CHECK(H % Hkv == 0 && k_cache.size(3) == D, "paged_decode_attention: bad head shapes");
  const int64_t G = H / Hkv, max_blocks = block_tables.size(1);
  auto out = at::empty({B, H, D}, q.options());
  const int64_t ldq = q.stride(0);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* tp = block_tables.data_ptr<int64_t>();
  const int64_t* lp = context_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);

  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= max_blocks * bs, "context length outside its block table");
  // One pass per (row, kv head), in one parallel region: the G heads' scores for the visible
  // keys into a per-thread buffer (K read once from its blocks), softmax in place (ATen's
  // expression: exp(s - max) / sum), then out = p . V (V read once). No [B, H, max_len] score
  // tensor, no separate softmax: those cost as much as the arithmetic at decode sizes.
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / Hkv, hk = item % Hkv, len = lp[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t* table = tp + b * max_blocks;
      const float* qrow = qp + b * ldq + hk * G * D;  // the G query heads of this KV head
      buf.resize(static_cast<size_t>(G * len));
      float* srow = buf.data();  // [G, len]; entries before `first` are never touched
      // Walk whole blocks: no integer division per token (it cost more than the dot products).
      for (int64_t j = first / bs; j * bs < len; ++j) {
        const float* k = kp + ((table[j] * Hkv + hk) * bs) * D;
        if ((j + kAhead) * bs < len) {
          prefetch_chunk(kp + ((table[j + kAhead] * Hkv + hk) * bs) * D, bs * D);
        } else {  // past the last K chunk: V's first ones
          const int64_t jv = first / bs + (j + kAhead - (len - 1) / bs - 1);
          if (jv * bs < len) prefetch_chunk(vp + ((table[jv] * Hkv + hk) * bs) * D, bs * D);
        }
        const int64_t t0 = std::max(first, j * bs), t1 = std::min(len, (j + 1) * bs);
        for (int64_t g = 0; g < G; ++g)
          qk_run(srow + g * len, qrow + g * D, k, j * bs, t0, t1, D, fscale);
      }
      for (int64_t g = 0; g < G; ++g) softmax_(srow + g * len + first, len - first);
      for (int64_t g = 0; g < G; ++g)
        pv_row(op + (b * H + hk * G + g) * D, srow + g * len, vp, table, Hkv, hk, bs, D, first,
               len, g == 0);
    }
  });
  return out;
}

TORCH_LIBRARY(loraplex, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, float scale, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(loraplex, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
}
