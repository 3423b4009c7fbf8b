// One vector trait for every loraplex CPU kernel: `Vec` is AVX-512 (F+BW+VL), AVX2+FMA or a
// single float lane, picked at compile time, so each kernel is written once and built for
// whatever the machine has. Arithmetic is always float32; `load` widens bfloat16 (and float16,
// for adapter weights; both exactly) and `store` rounds back to bfloat16 (to nearest even, NaN
// kept quiet: the same bits as c10's float -> BFloat16).
// A lane's result never depends on its neighbours, and the scalar tails use the same formulas
// (exp1 is exp16's polynomial), so a row's output does not depend on where it sits in a batch.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "vec_math.h"

namespace loraplex_vec {

using bf16 = c10::BFloat16;
using f16 = c10::Half;  // loaded only (adapter weights), never stored

inline float to_f(float v) { return v; }
inline float to_f(bf16 v) { return static_cast<float>(v); }
inline float to_f(f16 v) { return static_cast<float>(v); }
inline void put(float* p, float v) { *p = v; }
inline void put(bf16* p, float v) { *p = bf16(v); }  // round to nearest even
// The value a float takes once stored as T (what torch's bf16 ops round every result to).
template <typename T>
inline float round_to(float v) { return to_f(static_cast<T>(v)); }

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// 16 float lanes; 32 registers, 16 of them accumulators.
struct Vec {
  using R = __m512;
  using Mask = __mmask16;
  static constexpr int64_t W = 16;
  static constexpr int kAcc = 16;
  static R zero() { return _mm512_setzero_ps(); }
  static R set1(float v) { return _mm512_set1_ps(v); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static R div(R a, R b) { return _mm512_div_ps(a, b); }
  static R exp(R x) { return exp16(x); }
  static R max(R a, R b) { return _mm512_max_ps(a, b); }  // NaN: see argmax_rows
  static float reduce_add(R v) { return _mm512_reduce_add_ps(v); }
  static float reduce_max(R v) { return _mm512_reduce_max_ps(v); }
  // out[0..4) = the lane sums of a0..a3 (one shuffle tree for all four).
  static void sum4(R a0, R a1, R a2, R a3, float* out) {
    auto fold = [](R a) {
      return _mm256_add_ps(_mm512_castps512_ps256(a),
                           _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
    };
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(fold(a0), fold(a1)),
                                    _mm256_hadd_ps(fold(a2), fold(a3)));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  }
  static Mask mask(int64_t n) { return n >= 16 ? Mask(0xFFFF) : Mask((1u << n) - 1u); }
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static R load(const bf16* p) {  // bf16 is the high half of a float32
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static R load(const f16* p) {  // vcvtph2ps (AVX512F)
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static R load(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static R load(const bf16* p, Mask m) {
    const __m256i h = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static R load(const f16* p, Mask m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
  // Rounded to nearest even at bit 16, NaN -> quiet NaN: bf16's bits in the high half.
  static __m512i bf16_bits(R v) {
    const __m512i b = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r,
                                   _mm512_set1_epi32(0x7fc0));
  }
  static R round_bf16(R v) { return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(v), 16)); }
  static void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  static void store(bf16* p, R v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bf16_bits(v)));
  }
  static void keep(R&) {}  // AVX-512: 32 registers; measured at the GEMM peak on Zen 4 without it
  static void prefetch(const void* p) {
    _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1);  // into L2
  }
};
#elif defined(__AVX2__) && defined(__FMA__)
// 8 float lanes; 16 registers, 12 of them accumulators. No masked loads: callers either pad
// to 8 (LoRA ranks) or take their scalar path when a row is not a multiple of 8.
struct Vec {
  using R = __m256;
  struct Mask {};
  static constexpr int64_t W = 8;
  static constexpr int kAcc = 12;
  static R zero() { return _mm256_setzero_ps(); }
  static R set1(float v) { return _mm256_set1_ps(v); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static R div(R a, R b) { return _mm256_div_ps(a, b); }
  static R exp(R x) { return exp8(x); }
  static R max(R a, R b) { return _mm256_max_ps(a, b); }
  static float reduce_max(R v) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1)));
  }
  static float reduce_add(R v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
  }
  static void sum4(R a0, R a1, R a2, R a3, float* out) {
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  }
  static Mask mask(int64_t) { return {}; }
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static R load(const bf16* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static R load(const f16* p) {
#ifdef __F16C__
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else  // (every AVX2 CPU has F16C; kept for a compiler told otherwise)
    alignas(32) float f[8];
    for (int i = 0; i < 8; ++i) f[i] = to_f(p[i]);
    return _mm256_load_ps(f);
#endif
  }
  template <typename P>
  static R load(const P* p, Mask) { return load(p); }
  static __m256i bf16_bits(R v) {  // as the AVX-512 version
    const __m256i b = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
  }
  static R round_bf16(R v) { return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(v), 16)); }
  static void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static void store(bf16* p, R v) {
    const __m256i r = bf16_bits(v);
    const __m128i h =
        _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  }
  // Pins a loaded vector in a register: GCC would otherwise fold the load into every FMA
  // that uses it, and AVX2 (2 loads a cycle) then runs out of load slots before FMA slots.
  static void keep(R& v) { asm("" : "+x"(v)); }
  static void prefetch(const void* p) {
    _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1);  // into L2
  }
};
#else
// Portable fallback: one lane.
struct Vec {
  using R = float;
  struct Mask {};
  static constexpr int64_t W = 1;
  static constexpr int kAcc = 8;
  static R zero() { return 0.f; }
  static R set1(float v) { return v; }
  static R fma(R a, R b, R c) { return a * b + c; }
  static R add(R a, R b) { return a + b; }
  static R sub(R a, R b) { return a - b; }
  static R mul(R a, R b) { return a * b; }
  static R div(R a, R b) { return a / b; }
  static R exp(R x) { return exp1(x); }
  static R max(R a, R b) { return a > b ? a : b; }
  static float reduce_add(R v) { return v; }
  static float reduce_max(R v) { return v; }
  static void sum4(R a0, R a1, R a2, R a3, float* out) {
    out[0] = a0;
    out[1] = a1;
    out[2] = a2;
    out[3] = a3;
  }
  static Mask mask(int64_t) { return {}; }
  template <typename P>
  static R load(const P* p) { return to_f(*p); }
  template <typename P>
  static R load(const P* p, Mask) { return to_f(*p); }
  static R round_bf16(R v) { return round_to<bf16>(v); }
  template <typename P>
  static void store(P* p, R v) { put(p, v); }
  static void keep(R&) {}
  static void prefetch(const void*) {}
};
#endif

// round_to for a vector: round_bf16 for T = bf16, the identity for float.
template <typename T>
inline Vec::R vround_to(Vec::R v) {
  if constexpr (sizeof(T) == 2) return Vec::round_bf16(v);
  else return v;
}

}  // namespace loraplex_vec
