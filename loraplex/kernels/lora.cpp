// Segmented multi-LoRA delta for CPU: y[t] += Bt_s^T (A_s x[t]) for every token t of every
// adapter group, in one call per projection and step (no per-row or per-adapter launches).
//
// Layout (see loraplex/lora/ops.py): a [S, nsh*R, in] (shard j's A in rows j*R .. j*R+r_j),
// bt [S, nsh*R, out] (shard j's scaled B transposed, non-zero only in its output columns),
// ranks [S, nsh] (r_j of the adapter in each slot; 0 = shard not adapted). Only the real rank
// is computed, so mixed ranks do not pay the largest rank. Tokens are grouped by slot
// (tokens[offsets[g]:offsets[g+1]] use slots[g]); work items are (group, chunk of <= 8 tokens),
// so each item writes disjoint rows of y and reads its adapter's A/B chunk from cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kChunk = 8;

inline float dot_f(const float* a, const float* b, int64_t n) {
#if defined(__AVX2__) && defined(__FMA__)
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  s0 = _mm256_add_ps(s0, s1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s0), _mm256_extractf128_ps(s0, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
  float s = _mm_cvtss_f32(h);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
#else
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
#endif
}

inline void axpy_f(float* y, float w, const float* x, int64_t n) {
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 vw = _mm256_set1_ps(w);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(vw, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += w * x[i];
#else
  for (int64_t i = 0; i < n; ++i) y[i] += w * x[i];
#endif
}

}  // namespace

void lora_delta_(at::Tensor y, at::Tensor x, at::Tensor a, at::Tensor bt, at::Tensor ranks,
                 at::Tensor shard_sizes, at::Tensor tokens, at::Tensor offsets,
                 at::Tensor slots) {
  TORCH_CHECK(y.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat &&
                  a.scalar_type() == at::kFloat && bt.scalar_type() == at::kFloat,
              "lora_delta_: float32 only");
  TORCH_CHECK(y.is_contiguous() && x.is_contiguous() && a.is_contiguous() && bt.is_contiguous());
  const int64_t in = x.size(1), out = y.size(1), nsh = ranks.size(1);
  const int64_t R = a.size(1) / nsh;
  TORCH_CHECK(a.size(2) == in && bt.size(2) == out && bt.size(1) == a.size(1));
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float* ap = a.data_ptr<float>();
  const float* bp = bt.data_ptr<float>();
  const int64_t* rk = ranks.data_ptr<int64_t>();
  const int64_t* ss = shard_sizes.data_ptr<int64_t>();
  const int64_t* tk = tokens.data_ptr<int64_t>();
  const int64_t* of = offsets.data_ptr<int64_t>();
  const int64_t* sl = slots.data_ptr<int64_t>();
  const int64_t G = slots.size(0);
  std::vector<int64_t> shard_off(nsh + 1, 0);
  for (int64_t j = 0; j < nsh; ++j) shard_off[j + 1] = shard_off[j] + ss[j];
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
        const float* A = ap + (s * nsh * R + j * R) * in;   // [r, in]
        const float* Bt = bp + (s * nsh * R + j * R) * out;  // [r, out]
        for (int64_t t = t0; t < t1; ++t) {
          const float* xt = xp + tk[t] * in;
          float* z = xa.data() + (t - t0) * R;
          for (int64_t i = 0; i < r; ++i) z[i] = dot_f(A + i * in, xt, in);
        }
        const int64_t o0 = shard_off[j], on = ss[j];
        for (int64_t t = t0; t < t1; ++t) {
          float* yt = yp + tk[t] * out + o0;
          const float* z = xa.data() + (t - t0) * R;
          for (int64_t i = 0; i < r; ++i) axpy_f(yt, z[i], Bt + i * out + o0, on);
        }
      }
    }
  });
}

TORCH_LIBRARY_FRAGMENT(loraplex, m) {
  m.def("lora_delta_(Tensor(a!) y, Tensor x, Tensor a, Tensor bt, Tensor ranks, "
        "Tensor shard_sizes, Tensor tokens, Tensor offsets, Tensor slots) -> ()");
}

TORCH_LIBRARY_IMPL(loraplex, CPU, m) { m.impl("lora_delta_", &lora_delta_); }
