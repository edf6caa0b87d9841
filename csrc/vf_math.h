// Vector-friendly scalar math shared by every CPU kernel.
//
// Why this file exists: a loop that calls libm's expf/logf scalar-by-scalar is no
// faster than eager PyTorch. Declaring the libm functions with
// `simd("notinbranch")` lets GCC call glibc's libmvec variants (_ZGVeN16v_expf on
// AVX-512, _ZGVdN8v_expf on AVX2, _ZGVbN4v_expf on SSE) from `#pragma omp simd`
// loops, *without* -ffast-math (which would break inf/NaN semantics). Everything
// below is branch-free (`?:` on values) so the loops stay vectorisable.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

#define VF_SIMD_DECL __attribute__((simd("notinbranch")))
extern "C" {
VF_SIMD_DECL float expf(float) noexcept;
VF_SIMD_DECL float logf(float) noexcept;
VF_SIMD_DECL float sinf(float) noexcept;
VF_SIMD_DECL float cosf(float) noexcept;
VF_SIMD_DECL double exp(double) noexcept;
VF_SIMD_DECL double log(double) noexcept;
}

// Each compilation of the kernels for one instruction set lives in its own
// namespace (VF_ISA is avx512, avx2 or baseline; see CMakeLists.txt).
#ifndef VF_ISA
#define VF_ISA baseline
#endif

namespace vae_fast {
namespace VF_ISA {

inline float vexp(float x) { return expf(x); }
inline double vexp(double x) { return exp(x); }
inline float vlog(float x) { return logf(x); }
inline double vlog(double x) { return log(x); }

// log1p(t) for t >= 0 from one log, accurate to a few ulps (Goldberg's trick:
// the rounding error of 1 + t is divided back out). Used with t = exp(-|l|) in
// softplus, where plain log(1 + t) would lose every digit for large |l|.
template <typename T>
inline T log1p_nonneg(T t) {
  const T u = T(1) + t;
  const T safe_den = (u == T(1)) ? T(1) : (u - T(1));
  return (u == T(1)) ? t : vlog(u) * (t / safe_den);
}

// log1p(t) for t in [0, 1] (softplus' t = exp(-|l|)). float: no log call, which made the
// Bernoulli-family kernels compute-bound: log1p(t) = 2 atanh(s), s = t / (2 + t) <= 1/3,
// odd series to s^15 (truncation < 3e-9 relative, below fp32 rounding; a few ulps in all).
// double keeps the log-based form.
inline float log1p_unit(float t) {
  const float s = t / (2.0f + t);
  const float s2 = s * s;
  float p = 1.0f / 15.0f;
  p = p * s2 + 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}
inline double log1p_unit(double t) { return log1p_nonneg(t); }

// e^y - 1 for y <= 0 from one exp and one log (Kahan's trick: the rounding of e^y is
// divided back out, so tiny |y| keep their digits). libmvec has no expm1 on older glibc.
template <typename T>
inline T expm1_nonpos(T y) {
  const T u = vexp(y);
  const T u_minus_1 = u - T(1);
  const bool tiny = u == T(1);
  const bool saturated = u_minus_1 == T(-1);
  const T safe_log = (tiny || saturated) ? T(1) : vlog(u);
  return tiny ? y : saturated ? T(-1) : u_minus_1 * (y / safe_log);
}

// log sigmoid(y) and sigmoid(-y), sharing t = e^-|y| (no overflow for any y).
template <typename T>
inline void log_sigmoid_and_complement(T y, T& log_sig, T& sig_neg) {
  const T t = vexp(-std::fabs(y));
  const T inv_one_plus_t = T(1) / (T(1) + t);
  log_sig = (y < T(0) ? y : T(0)) - log1p_unit(t);
  sig_neg = y >= T(0) ? t * inv_one_plus_t : inv_one_plus_t;
}

constexpr double kLn2 = 0.69314718055994530942;
constexpr double kLog2Pi = 1.8378770664093454836;

// ---------------------------------------------------------------------------
// Philox-4x32-10 normals, bit-compatible with Triton's tl.randn4x(seed, offset):
//   key = (seed_lo, seed_hi), counter = (offset_lo, offset_hi, 0, 0); each 32-bit
//   output w becomes u = int32(w) * 4.6566127342e-10 (negatives mirrored), and
//   Box-Muller turns (u0, u1) into (r cos, r sin), (u2, u3) likewise.
// Element i of a noise stream is tl.randn4x(seed, i / 4)[i % 4]: one Philox call
// and two logs serve four normals.
// ---------------------------------------------------------------------------
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u, kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u, kPhiloxRoundB = 0xCD9E8D57u;

// Philox rounds on W counters at once. Compilers do not vectorise the 32x32->64 bit
// products of the textbook loop well (15 cycles per call measured), so the rounds
// use the one instruction every x86-64 level has for them: mul_epu32 (even lanes),
// applied to the even and the shifted odd lanes.
#if defined(__AVX512F__)
struct U32Vec {
  using V = __m512i;
  static constexpr int kWidth = 16;
  static V load(const uint32_t* p) { return _mm512_load_si512(p); }
  static void store(uint32_t* p, V v) { _mm512_store_si512(p, v); }
  static V splat(uint32_t x) { return _mm512_set1_epi32(int(x)); }
  static V splat64(uint64_t x) { return _mm512_set1_epi64(int64_t(x)); }
  static V vxor(V a, V b) { return _mm512_xor_si512(a, b); }
  static V vand(V a, V b) { return _mm512_and_si512(a, b); }
  static V vor(V a, V b) { return _mm512_or_si512(a, b); }
  static V mul_even(V a, V b) { return _mm512_mul_epu32(a, b); }
  static V shr64(V a) { return _mm512_srli_epi64(a, 32); }
  static V shl64(V a) { return _mm512_slli_epi64(a, 32); }
  static V odd_from(V a, V b) { return _mm512_mask_blend_epi32(__mmask16(0xAAAA), a, b); }  // odd lanes of b
};
#elif defined(__AVX2__)
struct U32Vec {
  using V = __m256i;
  static constexpr int kWidth = 8;
  static V load(const uint32_t* p) { return _mm256_load_si256(reinterpret_cast<const V*>(p)); }
  static void store(uint32_t* p, V v) { _mm256_store_si256(reinterpret_cast<V*>(p), v); }
  static V splat(uint32_t x) { return _mm256_set1_epi32(int(x)); }
  static V splat64(uint64_t x) { return _mm256_set1_epi64x(int64_t(x)); }
  static V vxor(V a, V b) { return _mm256_xor_si256(a, b); }
  static V vand(V a, V b) { return _mm256_and_si256(a, b); }
  static V vor(V a, V b) { return _mm256_or_si256(a, b); }
  static V mul_even(V a, V b) { return _mm256_mul_epu32(a, b); }
  static V shr64(V a) { return _mm256_srli_epi64(a, 32); }
  static V shl64(V a) { return _mm256_slli_epi64(a, 32); }
  static V odd_from(V a, V b) { return _mm256_blend_epi32(a, b, 0xAA); }
};
#else  // SSE2: part of every x86-64 CPU
struct U32Vec {
  using V = __m128i;
  static constexpr int kWidth = 4;
  static V load(const uint32_t* p) { return _mm_load_si128(reinterpret_cast<const V*>(p)); }
  static void store(uint32_t* p, V v) { _mm_store_si128(reinterpret_cast<V*>(p), v); }
  static V splat(uint32_t x) { return _mm_set1_epi32(int(x)); }
  static V splat64(uint64_t x) { return _mm_set1_epi64x(int64_t(x)); }
  static V vxor(V a, V b) { return _mm_xor_si128(a, b); }
  static V vand(V a, V b) { return _mm_and_si128(a, b); }
  static V vor(V a, V b) { return _mm_or_si128(a, b); }
  static V mul_even(V a, V b) { return _mm_mul_epu32(a, b); }
  static V shr64(V a) { return _mm_srli_epi64(a, 32); }
  static V shl64(V a) { return _mm_slli_epi64(a, 32); }
  static V odd_from(V a, V b) {  // SSE2 has no 32-bit blend
    const V odd_mask = _mm_set1_epi64x(int64_t(0xFFFFFFFF00000000ull));
    return _mm_or_si128(_mm_andnot_si128(odd_mask, a), _mm_and_si128(odd_mask, b));
  }
};
#endif

// (hi, lo) 32-bit halves of multiplier * x in every lane: mul_epu32 multiplies the even
// lanes; the odd lanes are shifted down, multiplied, and the halves blended back in place.
inline void mulhilo(typename U32Vec::V multiplier, typename U32Vec::V x, typename U32Vec::V& hi,
                    typename U32Vec::V& lo) {
  using O = U32Vec;
  const typename O::V even = O::mul_even(x, multiplier);           // products of lanes 0, 2, ...
  const typename O::V odd = O::mul_even(O::shr64(x), multiplier);  // products of lanes 1, 3, ...
  lo = O::odd_from(even, O::shl64(odd));
  hi = O::odd_from(O::shr64(even), odd);
}

// Philox-4x32-10 of counters (c0[i], c1[i], 0, 0), i < n rounded up to the vector
// width (arrays must have room), key (k0, k1); outputs w0..w3.
inline void philox4x32_10(const uint32_t* c0_in, const uint32_t* c1_in, int64_t n, uint32_t k0, uint32_t k1,
                          uint32_t* w0, uint32_t* w1, uint32_t* w2, uint32_t* w3) {
  using O = U32Vec;
  const typename O::V round_a = O::splat(kPhiloxRoundA), round_b = O::splat(kPhiloxRoundB);
  for (int64_t i = 0; i < n; i += O::kWidth) {
    typename O::V c0 = O::load(c0_in + i), c1 = O::load(c1_in + i);
    typename O::V c2 = O::splat(0), c3 = O::splat(0);
    uint32_t key0 = k0, key1 = k1;
    for (int round = 0; round < 10; ++round) {
      typename O::V hi_b, lo_b, hi_a, lo_a;
      mulhilo(round_b, c2, hi_b, lo_b);
      mulhilo(round_a, c0, hi_a, lo_a);
      c0 = O::vxor(O::vxor(hi_b, c1), O::splat(key0));
      c2 = O::vxor(O::vxor(hi_a, c3), O::splat(key1));
      c1 = lo_b;
      c3 = lo_a;
      key0 += kPhiloxKeyA;
      key1 += kPhiloxKeyB;
    }
    O::store(w0 + i, c0);
    O::store(w1 + i, c1);
    O::store(w2 + i, c2);
    O::store(w3 + i, c3);
  }
}

// Triton's uint_to_uniform_float for 32-bit draws.
inline float uint_to_uniform(uint32_t bits) {
  int32_t x = int32_t(bits);
  x = x < 0 ? ~x : x;
  return float(x) * 4.6566127342e-10f;
}

constexpr int64_t kNoiseGroups = 80;  // Philox calls per block (320 normals); a multiple of 16

// Fills normal[0..n) with stream elements first_index .. first_index + n - 1
// (n <= 4 * kNoiseGroups - 3). Separate loops so that each vectorises cleanly:
// Philox (explicit vectors); uniforms; log + sqrt; cos; sin; interleave.
inline void philox_normal_block(uint64_t seed, uint64_t first_index, int64_t n, float* __restrict normal) {
  const uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  const uint64_t first_group = first_index >> 2;
  const int64_t skip = int64_t(first_index & 3);
  // Rounded up to 16 groups (arrays have room): a few spare normals are much cheaper
  // than the scalar libm calls of a vector loop's remainder.
  const int64_t groups = (((skip + n + 3) >> 2) + 15) & ~int64_t(15);
  alignas(64) float u0[kNoiseGroups], u1[kNoiseGroups], u2[kNoiseGroups], u3[kNoiseGroups];
  alignas(64) float r01[kNoiseGroups], r23[kNoiseGroups], n0[kNoiseGroups], n1[kNoiseGroups], n2[kNoiseGroups],
      n3[kNoiseGroups];
  alignas(64) float out[4 * kNoiseGroups];
  alignas(64) uint32_t c0[kNoiseGroups], c1[kNoiseGroups], w0[kNoiseGroups], w1[kNoiseGroups],
      w2[kNoiseGroups], w3[kNoiseGroups];
  for (int64_t g = 0; g < kNoiseGroups; ++g) {
    const uint64_t counter = first_group + uint64_t(g);
    c0[g] = uint32_t(counter);
    c1[g] = uint32_t(counter >> 32);
  }
  philox4x32_10(c0, c1, groups, k0, k1, w0, w1, w2, w3);
#pragma omp simd
  for (int64_t g = 0; g < groups; ++g) {
    u0[g] = uint_to_uniform(w0[g]);
    u1[g] = 6.283185307179586f * uint_to_uniform(w1[g]);
    u2[g] = uint_to_uniform(w2[g]);
    u3[g] = 6.283185307179586f * uint_to_uniform(w3[g]);
  }
#pragma omp simd
  for (int64_t g = 0; g < groups; ++g) {
    r01[g] = std::sqrt(-2.0f * logf(u0[g] > 1.0e-7f ? u0[g] : 1.0e-7f));
    r23[g] = std::sqrt(-2.0f * logf(u2[g] > 1.0e-7f ? u2[g] : 1.0e-7f));
  }
  // sin and cos in separate loops with unit-stride stores: interleaving inside the
  // trig loops made them 10x slower; one interleaving pass afterwards is cheap.
#pragma omp simd
  for (int64_t g = 0; g < groups; ++g) {
    n0[g] = r01[g] * cosf(u1[g]);
    n2[g] = r23[g] * cosf(u3[g]);
  }
#pragma omp simd
  for (int64_t g = 0; g < groups; ++g) {
    n1[g] = r01[g] * sinf(u1[g]);
    n3[g] = r23[g] * sinf(u3[g]);
  }
#pragma omp simd
  for (int64_t g = 0; g < groups; ++g) {
    out[4 * g + 0] = n0[g];
    out[4 * g + 1] = n1[g];
    out[4 * g + 2] = n2[g];
    out[4 * g + 3] = n3[g];
  }
  for (int64_t i = 0; i < n; ++i) normal[i] = out[skip + i];
}

// The sum of row `row`'s per-block partial sums, partial[row * blocks + b] for b = 0 .. blocks - 1, added in that
// order: the kernels cut long rows into blocks that the threads share, and a fixed order makes the result the same
// on any number of threads.
template <typename T>
inline T row_total(const std::vector<T>& partial, int64_t row, int64_t blocks) {
  T total = T(0);
  for (int64_t b = 0; b < blocks; ++b) total += partial[row * blocks + b];
  return total;
}

}  // namespace VF_ISA
}  // namespace vae_fast
