// Fused elementwise ops for the CPU decode path. Each replaces a chain of 3-10 small ATen ops
// whose dispatch overhead, not their arithmetic, dominated a single-stream decode step.
// CPU, float32 or bfloat16. Each op computes what the model's torch expression computes: in
// bfloat16 every intermediate that torch would store as a bf16 tensor is rounded the same way
// (vround_to / round_to), so the two paths agree to the last bit or one rounding step.
// Written once over `Vec` (vec.h): AVX-512, AVX2 or scalar.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "vec.h"

namespace {

using loraplex_vec::bf16;
using loraplex_vec::put;
using loraplex_vec::round_to;
using loraplex_vec::to_f;
using loraplex_vec::Vec;
using loraplex_vec::vround_to;
using V = Vec::R;

inline void check_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() &&
                  (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16),
              name, ": float32 or bfloat16 CPU tensors only");
}

template <typename T>
void add_rms_norm_impl(const T* xp, T* rp, const T* wp, T* op, int64_t rows, int64_t d,
                       float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      T* h = rp + r * d;
      const T* xi = xp + r * d;
      V acc = Vec::zero();
      int64_t i = 0;
      for (; i + Vec::W <= d; i += Vec::W) {  // residual = x + residual, stored as T
        const V hv = vround_to<T>(Vec::add(Vec::load(h + i), Vec::load(xi + i)));
        Vec::store(h + i, hv);
        acc = Vec::fma(hv, hv, acc);
      }
      float ss = Vec::reduce_add(acc);
      for (; i < d; ++i) {
        const float hv = round_to<T>(to_f(h[i]) + to_f(xi[i]));
        put(h + i, hv);
        ss += hv * hv;
      }
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
      const V vinv = Vec::set1(inv);
      T* o = op + r * d;
      i = 0;  // weight * (h * inv), the normalized row stored as T before the weight multiplies
      for (; i + Vec::W <= d; i += Vec::W)
        Vec::store(o + i, Vec::mul(Vec::load(wp + i),
                                   vround_to<T>(Vec::mul(Vec::load(h + i), vinv))));
      for (; i < d; ++i) put(o + i, to_f(wp[i]) * round_to<T>(to_f(h[i]) * inv));
    }
  });
}

template <typename T>
void silu_mul_impl(const T* gp, int64_t ld, T* op, int64_t t, int64_t inter) {
  // ATen's expression, g / (1 + exp(-g)) * u, with a vector exp (std::exp is not vectorized
  // without -ffast-math: scalar, it took 160 us per call at 32 x 1536, now ~15). In bf16,
  // silu(g) is stored as bf16 before the product, as F.silu(gate) * up does.
  at::parallel_for(0, t, 4, [&](int64_t b, int64_t e) {
    const V one = Vec::set1(1.f);
    for (int64_t r = b; r < e; ++r) {
      const T* g = gp + r * ld;
      const T* u = g + inter;
      T* o = op + r * inter;
      int64_t i = 0;
      for (; i + Vec::W <= inter; i += Vec::W) {
        const V gv = Vec::load(g + i);
        const V den = Vec::add(one, Vec::exp(Vec::sub(Vec::zero(), gv)));
        Vec::store(o + i, Vec::mul(vround_to<T>(Vec::div(gv, den)), Vec::load(u + i)));
      }
      for (; i < inter; ++i) {
        const float gv = to_f(g[i]);
        put(o + i, round_to<T>(gv / (1.f + loraplex_vec::exp1(-gv))) * to_f(u[i]));
      }
    }
  });
}

template <typename T>
void rope_impl(T* xp, int64_t ld, const T* cp, const T* sp, int64_t t, int64_t nh, int64_t d) {
  const int64_t half = d / 2;
  // x * cos + rotate_half(x) * sin with every product stored as T before the sum, as the three
  // torch ops do (in float32 the roundings are the identity).
  at::parallel_for(0, t * nh, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t r = i / nh, h = i % nh;
      T* v = xp + r * ld + h * d;
      const T* c = cp + r * d;
      const T* s = sp + r * d;
      int64_t j = 0;
      for (; j + Vec::W <= half; j += Vec::W) {
        const V a = Vec::load(v + j), bb = Vec::load(v + j + half);
        const V lo = Vec::sub(vround_to<T>(Vec::mul(a, Vec::load(c + j))),
                              vround_to<T>(Vec::mul(bb, Vec::load(s + j))));
        const V hi = Vec::add(vround_to<T>(Vec::mul(bb, Vec::load(c + j + half))),
                              vround_to<T>(Vec::mul(a, Vec::load(s + j + half))));
        Vec::store(v + j, lo);
        Vec::store(v + j + half, hi);
      }
      for (; j < half; ++j) {
        const float a = to_f(v[j]), bb = to_f(v[j + half]);
        put(v + j, round_to<T>(a * to_f(c[j])) - round_to<T>(bb * to_f(s[j])));
        put(v + j + half,
            round_to<T>(bb * to_f(c[j + half])) + round_to<T>(a * to_f(s[j + half])));
      }
    }
  });
}

template <typename T>
void cache_write_impl(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                      at::Tensor& v_cache, const int64_t* rows) {
  const int64_t t = k.size(0), hkv = k.size(1), d = k.size(2);
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* kc = k_cache.data_ptr<T>();
  T* vc = v_cache.data_ptr<T>();
  const int64_t lk = k.stride(0), lv = v.stride(0);
  for (int64_t r = 0; r < t; ++r)
    for (int64_t h = 0; h < hkv; ++h) {
      const int64_t dst = rows[r * hkv + h] * d;
      std::copy(kp + r * lk + h * d, kp + r * lk + (h + 1) * d, kc + dst);
      std::copy(vp + r * lv + h * d, vp + r * lv + (h + 1) * d, vc + dst);
    }
}

// First index of the row's maximum, as torch.argmax: ties go to the first, a NaN is the
// maximum (the first NaN wins). One vector pass keeps the max of each block of kArgBlock
// values and whether the row holds a NaN or an infinity (x - x is then NaN; such rows take a
// plain scalar scan); then only the first block whose max is the row's max is scanned.
constexpr int64_t kArgBlock = 512;

inline int64_t argmax_row(const float* x, int64_t n) {
  float best = -INFINITY, odd = 0.f;
  int64_t best_block = 0;
  for (int64_t b0 = 0; b0 < n; b0 += kArgBlock) {
    const int64_t b1 = std::min(n, b0 + kArgBlock);
    V vmax = Vec::set1(-INFINITY), vodd = Vec::zero();
    int64_t i = b0;
    for (; i + Vec::W <= b1; i += Vec::W) {
      const V v = Vec::load(x + i);
      vmax = Vec::max(vmax, v);
      vodd = Vec::add(vodd, Vec::sub(v, v));
    }
    float m = Vec::reduce_max(vmax);
    odd += Vec::reduce_add(vodd);
    for (; i < b1; ++i) {
      m = std::max(m, x[i]);
      odd += x[i] - x[i];
    }
    if (m > best) {  // strictly greater: an equal max in a later block loses the tie
      best = m;
      best_block = b0;
    }
  }
  if (std::isnan(odd)) {  // NaN or +-inf somewhere: torch's comparison order, exactly
    int64_t arg = 0;
    for (int64_t j = 0; j < n; ++j) {
      if (std::isnan(x[j])) return j;
      if (x[j] > x[arg]) arg = j;
    }
    return arg;
  }
  for (int64_t i = best_block; i < n; ++i)
    if (x[i] == best) return i;
  return best_block;  // unreachable: best is one of the block's values
}

}  // namespace

// logits: [R, V] float32 with a unit inner stride -> [R] int64, torch.argmax(logits, -1).
// ATen's reduction took 1.35 ms for 64 x 49152 here (~21 us a row, 43 us for a lone row).
at::Tensor argmax_rows(at::Tensor logits) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat &&
                  logits.dim() == 2 && logits.stride(1) == 1 && logits.size(1) > 0,
              "argmax_rows: [R, V] float32 CPU logits with V > 0 and a unit inner stride");
  const int64_t r = logits.size(0), n = logits.size(1), ld = logits.stride(0);
  auto out = at::empty({r}, logits.options().dtype(at::kLong));
  const float* xp = logits.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, r, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) op[i] = argmax_row(xp + i * ld, n);
  });
  return out;
}

// residual = residual + x (in place); returns rms_norm(residual) * weight. Same math as
// transformers' LlamaRMSNorm: h * rsqrt(mean(h^2) + eps) in float32.
at::Tensor add_rms_norm(at::Tensor x, at::Tensor residual, at::Tensor weight, double eps) {
  check_dtype(x, "add_rms_norm");
  TORCH_CHECK(residual.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type(),
              "add_rms_norm: x, residual and weight must share a dtype");
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous() && weight.is_contiguous() &&
                  residual.sizes() == x.sizes() && weight.numel() == x.size(-1),
              "add_rms_norm: contiguous x, residual of x's shape, weight of x's last dim");
  const int64_t d = x.size(-1), rows = x.numel() / d;
  auto out = at::empty_like(x);
  if (x.scalar_type() == at::kFloat)
    add_rms_norm_impl(x.data_ptr<float>(), residual.data_ptr<float>(), weight.data_ptr<float>(),
                      out.data_ptr<float>(), rows, d, static_cast<float>(eps));
  else
    add_rms_norm_impl(x.data_ptr<bf16>(), residual.data_ptr<bf16>(), weight.data_ptr<bf16>(),
                      out.data_ptr<bf16>(), rows, d, static_cast<float>(eps));
  return out;
}

// gu: [T, 2I] (gate | up) -> silu(gate) * up, [T, I].
at::Tensor silu_mul(at::Tensor gu) {
  check_dtype(gu, "silu_mul");
  TORCH_CHECK(gu.dim() == 2 && gu.stride(1) == 1 && gu.size(1) % 2 == 0,
              "silu_mul: [T, 2I] with unit inner stride");
  const int64_t t = gu.size(0), inter = gu.size(1) / 2, ld = gu.stride(0);
  auto out = at::empty({t, inter}, gu.options());
  if (gu.scalar_type() == at::kFloat)
    silu_mul_impl(gu.data_ptr<float>(), ld, out.data_ptr<float>(), t, inter);
  else
    silu_mul_impl(gu.data_ptr<bf16>(), ld, out.data_ptr<bf16>(), t, inter);
  return out;
}

// In place rotate-half RoPE on x: [T, heads, D] (any row stride, unit inner strides);
// cos, sin: [T, 1, D] contiguous, x's dtype. Same expression as transformers:
// x*cos + rotate_half(x)*sin.
void rope_(at::Tensor x, at::Tensor cos, at::Tensor sin) {
  check_dtype(x, "rope_");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
              "rope_: cos and sin must have x's dtype");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2) && x.size(2) % 2 == 0,
              "rope_: x must be [T, heads, D] with contiguous heads and an even D");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.size(-1) == x.size(2) &&
                  cos.numel() == x.size(0) * x.size(2) && sin.numel() == cos.numel(),
              "rope_: cos and sin must be contiguous [T, 1, D]");
  const int64_t t = x.size(0), nh = x.size(1), d = x.size(2), ld = x.stride(0);
  if (x.scalar_type() == at::kFloat)
    rope_impl(x.data_ptr<float>(), ld, cos.data_ptr<float>(), sin.data_ptr<float>(), t, nh, d);
  else
    rope_impl(x.data_ptr<bf16>(), ld, cos.data_ptr<bf16>(), sin.data_ptr<bf16>(), t, nh, d);
}

// Scatter this step's K and V ([T, Hkv, D], any row stride) into the paged caches
// ([num_blocks, Hkv, bs, D]) at rows kv_rows ([T * Hkv], token-major) of cache.view(-1, D).
void cache_write_(at::Tensor k, at::Tensor v, at::Tensor k_cache, at::Tensor v_cache,
                  at::Tensor kv_rows) {
  check_dtype(k, "cache_write_");
  const auto dt = k.scalar_type();
  TORCH_CHECK(v.scalar_type() == dt && k_cache.scalar_type() == dt && v_cache.scalar_type() == dt,
              "cache_write_: k, v and the caches must share a dtype");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1 && k.stride(1) == k.size(2) &&
                  v.stride(1) == v.size(2) && kv_rows.is_contiguous() &&
                  kv_rows.scalar_type() == at::kLong && kv_rows.numel() == k.size(0) * k.size(1),
              "cache_write_: [T, Hkv, D] k and v with contiguous heads, int64 kv_rows [T*Hkv]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(),
              "cache_write_: contiguous caches");
  const int64_t* rows = kv_rows.data_ptr<int64_t>();
  if (dt == at::kFloat)
    cache_write_impl<float>(k, v, k_cache, v_cache, rows);
  else
    cache_write_impl<bf16>(k, v, k_cache, v_cache, rows);
}

TORCH_LIBRARY_FRAGMENT(loraplex, m) {
  m.def("add_rms_norm(Tensor x, Tensor(a!) residual, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gu) -> Tensor");
  m.def("rope_(Tensor(a!) x, Tensor cos, Tensor sin) -> ()");
  m.def("cache_write_(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor kv_rows) -> ()");
  m.def("argmax_rows(Tensor logits) -> Tensor");
}

TORCH_LIBRARY_IMPL(loraplex, CPU, m) {
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("rope_", &rope_);
  m.impl("cache_write_", &cache_write_);
  m.impl("argmax_rows", &argmax_rows);
}
