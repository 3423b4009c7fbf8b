// Paged decode attention for CPU: one query token per row, K/V read in place from the block pool.
//
// The pure-torch path gathers every row's blocks into a padded copy before attention, which
// moves the whole KV context through memory three times (read, write, read). This kernel reads
// each K/V vector once, straight from its block, and serves the G query heads of a KV group
// from that single read (GQA). Work is split over (row, kv head) with at::parallel_for.
//
// dtypes: q, the caches and the output are all float32 or all bfloat16. Scores, softmax and the
// p.V sums are float32 either way; a bf16 output is rounded once, as ATen's bf16 SDPA does.
// Written once over `Vec` (vec.h): AVX-512, AVX2 or scalar.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "vec.h"

namespace {

using loraplex_vec::bf16;
using loraplex_vec::put;
using loraplex_vec::to_f;
using loraplex_vec::Vec;
using V = Vec::R;

// Each (block, kv head) chunk is one page-sized run in a random place: the hardware prefetcher
// restarts at every chunk, so software fetches each chunk (into L2) kAhead chunks before its
// use. An item reads its K chunks, then its V chunks; the first V chunks are fetched while the
// last K ones are consumed. Measured at 32 rows x 190 keys x 30 layers (SmolLM2's shapes,
// fp32): 17-19 ms per step fetching only the next K chunk (into L1, non-temporal), 14 ms so,
// and 3, 4 or 6 chunks ahead were all slower than 2. Merely loading every line of the same
// chunks in the same order takes 12.5 ms (a contiguous read of the same bytes 10 ms): the fp32
// kernel is within ~20% of its memory floor.
constexpr int64_t kAhead = 2;

template <typename T>
inline void prefetch_chunk(const T* p, int64_t elems) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < elems * static_cast<int64_t>(sizeof(T)); off += 64)
    __builtin_prefetch(c + off, 0, 2);
}

// s[t] = scale * q . k_t for t in [t0, t1), k_t = k + (t - base) * D, D = NV * W (q: float32).
// Four keys at a time share one reduction tree.
template <int NV, typename T>
inline void qk_run(float* s, const float* q, const T* k, int64_t base, int64_t t0, int64_t t1,
                   float scale) {
  constexpr int64_t D = NV * Vec::W;
  V qv[NV];
  for (int i = 0; i < NV; ++i) qv[i] = Vec::load(q + i * Vec::W);
  int64_t t = t0;
  for (; t + 4 <= t1; t += 4) {
    const T* k0 = k + (t - base) * D;
    V a0 = Vec::zero(), a1 = a0, a2 = a0, a3 = a0;
    for (int i = 0; i < NV; ++i) {
      a0 = Vec::fma(qv[i], Vec::load(k0 + i * Vec::W), a0);
      a1 = Vec::fma(qv[i], Vec::load(k0 + D + i * Vec::W), a1);
      a2 = Vec::fma(qv[i], Vec::load(k0 + 2 * D + i * Vec::W), a2);
      a3 = Vec::fma(qv[i], Vec::load(k0 + 3 * D + i * Vec::W), a3);
    }
    Vec::sum4(a0, a1, a2, a3, s + t);
    for (int j = 0; j < 4; ++j) s[t + j] *= scale;
  }
  for (; t < t1; ++t) {
    const T* kt = k + (t - base) * D;
    V a = Vec::zero();
    for (int i = 0; i < NV; ++i) a = Vec::fma(qv[i], Vec::load(kt + i * Vec::W), a);
    s[t] = Vec::reduce_add(a) * scale;
  }
}

// out = sum over t in [first, len) of p[t] * v_t, v_t read in place from the paged cache.
// pf: fetch V ahead (the first head's pass; the others find V in cache).
template <int NV, typename T>
inline void pv_row(T* out, const float* p, const T* vp, const int64_t* table, int64_t Hkv,
                   int64_t hk, int64_t bs, int64_t first, int64_t len, bool pf) {
  constexpr int64_t D = NV * Vec::W;
  V a[NV];
  for (int i = 0; i < NV; ++i) a[i] = Vec::zero();
  for (int64_t j = first / bs; j * bs < len; ++j) {
    const T* v = vp + ((table[j] * Hkv + hk) * bs) * D;
    if (pf && (j + kAhead) * bs < len)
      prefetch_chunk(vp + ((table[j + kAhead] * Hkv + hk) * bs) * D, bs * D);
    for (int64_t t = std::max(first, j * bs); t < std::min(len, (j + 1) * bs); ++t) {
      const T* vt = v + (t - j * bs) * D;
      const V w = Vec::set1(p[t]);
      for (int i = 0; i < NV; ++i) a[i] = Vec::fma(w, Vec::load(vt + i * Vec::W), a[i]);
    }
  }
  for (int i = 0; i < NV; ++i) Vec::store(out + i * Vec::W, a[i]);
}

// Any head dim: plain loops (a head dim that is not a multiple of the vector width).
template <typename T>
inline void qk_run_any(float* s, const float* q, const T* k, int64_t base, int64_t t0,
                       int64_t t1, int64_t D, float scale) {
  for (int64_t t = t0; t < t1; ++t) {
    const T* kt = k + (t - base) * D;
    float acc = 0.f;
    for (int64_t i = 0; i < D; ++i) acc += q[i] * to_f(kt[i]);
    s[t] = acc * scale;
  }
}

template <typename T>
inline void pv_row_any(T* out, float* acc, const float* p, const T* vp, const int64_t* table,
                       int64_t Hkv, int64_t hk, int64_t bs, int64_t D, int64_t first,
                       int64_t len) {
  std::fill(acc, acc + D, 0.f);
  for (int64_t j = first / bs; j * bs < len; ++j) {
    const T* v = vp + ((table[j] * Hkv + hk) * bs) * D;
    for (int64_t t = std::max(first, j * bs); t < std::min(len, (j + 1) * bs); ++t)
      for (int64_t i = 0; i < D; ++i) acc[i] += p[t] * to_f(v[(t - j * bs) * D + i]);
  }
  for (int64_t i = 0; i < D; ++i) put(out + i, acc[i]);
}

// s[0:n] = softmax(s[0:n]) in place: exp(s - max) / sum, as ATen computes it.
inline void softmax_(float* s, int64_t n) {
  float mx = -INFINITY;
  for (int64_t t = 0; t < n; ++t) mx = std::max(mx, s[t]);
  const V vm = Vec::set1(mx);
  V acc = Vec::zero();
  int64_t t = 0;
  for (; t + Vec::W <= n; t += Vec::W) {
    const V e = Vec::exp(Vec::sub(Vec::load(s + t), vm));
    Vec::store(s + t, e);
    acc = Vec::add(acc, e);
  }
  float sum = Vec::reduce_add(acc);
  for (; t < n; ++t) {
    s[t] = loraplex_vec::exp1(s[t] - mx);
    sum += s[t];
  }
  const float inv = 1.f / sum;
  for (t = 0; t < n; ++t) s[t] *= inv;
}

// The whole kernel for one element type and head dim (NV vectors per head; 0 = any D).
template <int NV, typename T>
void attend(const T* qp, int64_t ldq, const T* kp, const T* vp, const int64_t* tp,
            const int64_t* lp, T* op, int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t bs,
            int64_t max_blocks, float scale, int64_t window) {
  const int64_t G = H / Hkv;
  // One pass per (row, kv head), in one parallel region: the G heads' scores for the visible
  // keys into a per-thread buffer (K read once from its blocks), softmax in place (ATen's
  // expression: exp(s - max) / sum), then out = p . V (V read once). No [B, H, max_len] score
  // tensor, no separate softmax: those cost as much as the arithmetic at decode sizes.
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf, qf(static_cast<size_t>(G * D)), acc(static_cast<size_t>(D));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / Hkv, hk = item % Hkv, len = lp[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t* table = tp + b * max_blocks;
      const T* qrow = qp + b * ldq + hk * G * D;  // the G query heads of this KV head
      for (int64_t i = 0; i < G * D; ++i) qf[i] = to_f(qrow[i]);
      buf.resize(static_cast<size_t>(G * len));
      float* srow = buf.data();  // [G, len]; entries before `first` are never touched
      // Walk whole blocks: no integer division per token (it cost more than the dot products).
      for (int64_t j = first / bs; j * bs < len; ++j) {
        const T* k = kp + ((table[j] * Hkv + hk) * bs) * D;
        if ((j + kAhead) * bs < len) {
          prefetch_chunk(kp + ((table[j + kAhead] * Hkv + hk) * bs) * D, bs * D);
        } else {  // past the last K chunk: V's first ones
          const int64_t jv = first / bs + (j + kAhead - (len - 1) / bs - 1);
          if (jv * bs < len) prefetch_chunk(vp + ((table[jv] * Hkv + hk) * bs) * D, bs * D);
        }
        const int64_t t0 = std::max(first, j * bs), t1 = std::min(len, (j + 1) * bs);
        for (int64_t g = 0; g < G; ++g) {
          if constexpr (NV > 0)
            qk_run<NV>(srow + g * len, qf.data() + g * D, k, j * bs, t0, t1, scale);
          else
            qk_run_any(srow + g * len, qf.data() + g * D, k, j * bs, t0, t1, D, scale);
        }
      }
      for (int64_t g = 0; g < G; ++g) softmax_(srow + g * len + first, len - first);
      for (int64_t g = 0; g < G; ++g) {
        T* out = op + (b * H + hk * G + g) * D;
        if constexpr (NV > 0)
          pv_row<NV>(out, srow + g * len, vp, table, Hkv, hk, bs, first, len, g == 0);
        else
          pv_row_any(out, acc.data(), srow + g * len, vp, table, Hkv, hk, bs, D, first, len);
      }
    }
  });
}

template <typename T>
void attend_any_d(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                  const at::Tensor& tables, const at::Tensor& lens, at::Tensor& out, float scale,
                  int64_t window) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t Hkv = kc.size(1), bs = kc.size(2), mb = tables.size(1);
  auto args = std::make_tuple(q.data_ptr<T>(), q.stride(0), kc.data_ptr<T>(), vc.data_ptr<T>(),
                              tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(),
                              out.data_ptr<T>(), B, H, Hkv, D, bs, mb, scale, window);
  // The head dims of the families we serve (64, 128) get register-resident accumulators.
  if (D == 64 && 64 % Vec::W == 0)
    std::apply(attend<64 / Vec::W, T>, args);
  else if (D == 128 && 128 % Vec::W == 0)
    std::apply(attend<128 / Vec::W, T>, args);
  else
    std::apply(attend<0, T>, args);
}

}  // namespace

// q: [B, H, D]; k_cache, v_cache: [num_blocks, Hkv, block_size, D]; block_tables: [B, max_blocks]
// (int64); context_lens: [B] (int64, keys 0..len-1 visible); window: 0 = none, else only the
// last `window` keys are visible. Returns [B, H, D]. q, caches: all float32 or all bfloat16.
at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                                  at::Tensor block_tables, at::Tensor context_lens,
                                  double scale, int64_t window) {
  const auto dt = q.scalar_type();
  TORCH_CHECK((dt == at::kFloat || dt == at::kBFloat16) && k_cache.scalar_type() == dt &&
                  v_cache.scalar_type() == dt,
              "paged_decode_attention: q and the caches must all be float32 or all bfloat16");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "paged_decode_attention: int64 block tables and lengths");
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
  TORCH_CHECK(block_tables.size(0) == B && context_lens.size(0) == B,
              "paged_decode_attention: one block table and length per row");
  const int64_t max_blocks = block_tables.size(1);
  const int64_t* lp = context_lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= max_blocks * bs, "context length outside its block table");
  auto out = at::empty({B, H, D}, q.options());
  const float fscale = static_cast<float>(scale);
  if (dt == at::kFloat)
    attend_any_d<float>(q, k_cache, v_cache, block_tables, context_lens, out, fscale, window);
  else
    attend_any_d<bf16>(q, k_cache, v_cache, block_tables, context_lens, out, fscale, window);
  return out;
}

TORCH_LIBRARY(loraplex, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, float scale, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(loraplex, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
}
