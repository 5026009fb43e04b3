// The vector vocabulary specfleet's kernels are written in, for the CPU they are built on (-march=native):
// AVX-512 (16 floats a vector, 32 registers) or AVX2 with FMA and F16C (8 floats, 16 registers). A kernel
// says what it computes once; each operation here keeps the same order of arithmetic on every call, so a
// kernel's result does not depend on where in a batch its inputs sit.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace simd {

#if defined(__AVX512F__)

constexpr int64_t LANES = 16;  // floats per vector
constexpr int REGISTERS = 32;  // vector registers a kernel may keep values in
using Vec = __m512;

inline Vec zero() { return _mm512_setzero_ps(); }
inline Vec set1(float x) { return _mm512_set1_ps(x); }
inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
inline Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec max(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline Vec min(Vec a, Vec b) { return _mm512_min_ps(a, b); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec fnmadd(Vec a, Vec b, Vec c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b
inline float reduce_add(Vec v) { return _mm512_reduce_add_ps(v); }
inline float reduce_max(Vec v) { return _mm512_reduce_max_ps(v); }

// LANES float16 values from p, widened to float32
inline Vec load_halves(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
// LANES int8 values from p, widened to float32
inline Vec load_bytes(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

inline __mmask16 first(int64_t count) { return static_cast<__mmask16>((1u << count) - 1u); }  // lanes below count <= LANES
inline Vec load_first(const float* p, int64_t count) { return _mm512_maskz_loadu_ps(first(count), p); }  // others 0
inline void store_first(float* p, Vec v, int64_t count) { _mm512_mask_storeu_ps(p, first(count), v); }
inline Vec keep_first(Vec v, int64_t count) { return _mm512_maskz_mov_ps(first(count), v); }  // others 0
inline Vec max_first(Vec a, Vec b, int64_t count) { return _mm512_mask_max_ps(a, first(count), a, b); }  // others a

// 2^n * p for whole-number n
inline Vec scale_by_power_of_two(Vec p, Vec n) { return _mm512_scalef_ps(p, n); }
inline Vec round_to_whole(Vec x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

// The sums of LANES vectors' lanes, as one vector (lane j: the sum of s[j]'s lanes): a transpose tree that adds
// each vector's lanes in the same order whatever its index, instead of LANES horizontal reductions.
inline Vec sum_lanes(const Vec s[LANES]) {
  Vec pairs[8], quads[4];
  for (int j = 0; j < 8; ++j) {  // per 128-bit block: [a0+a2, b0+b2, a1+a3, b1+b3] of a = s[2j], b = s[2j+1]
    pairs[j] = _mm512_add_ps(_mm512_unpacklo_ps(s[2 * j], s[2 * j + 1]), _mm512_unpackhi_ps(s[2 * j], s[2 * j + 1]));
  }
  for (int j = 0; j < 4; ++j) {  // per 128-bit block: the block's sums of s[4j..4j+3]
    const __m512d a = _mm512_castps_pd(pairs[2 * j]), b = _mm512_castps_pd(pairs[2 * j + 1]);
    quads[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  Vec halves[2];
  for (int j = 0; j < 2; ++j) {  // [blocks 0+1 of quads[2j], blocks 2+3 of it, the same of quads[2j+1]]
    halves[j] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * j], quads[2 * j + 1], 0x88),
                              _mm512_shuffle_f32x4(quads[2 * j], quads[2 * j + 1], 0xDD));
  }
  return _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], 0x88),
                       _mm512_shuffle_f32x4(halves[0], halves[1], 0xDD));
}

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)

constexpr int64_t LANES = 8;
constexpr int REGISTERS = 16;
using Vec = __m256;

inline Vec zero() { return _mm256_setzero_ps(); }
inline Vec set1(float x) { return _mm256_set1_ps(x); }
inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec sub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
inline Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec max(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline Vec min(Vec a, Vec b) { return _mm256_min_ps(a, b); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec fnmadd(Vec a, Vec b, Vec c) { return _mm256_fnmadd_ps(a, b, c); }

inline float reduce_add(Vec v) {  // ((0+4) + (2+6)) + ((1+5) + (3+7))
  const __m128 quarter = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 half = _mm_add_ps(quarter, _mm_movehl_ps(quarter, quarter));
  return _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
}

inline float reduce_max(Vec v) {
  const __m128 quarter = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 half = _mm_max_ps(quarter, _mm_movehl_ps(quarter, quarter));
  return _mm_cvtss_f32(_mm_max_ss(half, _mm_movehdup_ps(half)));
}

inline Vec load_halves(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline Vec load_bytes(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

inline __m256i first(int64_t count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline Vec load_first(const float* p, int64_t count) { return _mm256_maskload_ps(p, first(count)); }
inline void store_first(float* p, Vec v, int64_t count) { _mm256_maskstore_ps(p, first(count), v); }
inline Vec keep_first(Vec v, int64_t count) { return _mm256_and_ps(v, _mm256_castsi256_ps(first(count))); }
inline Vec max_first(Vec a, Vec b, int64_t count) {
  return _mm256_blendv_ps(a, _mm256_max_ps(a, b), _mm256_castsi256_ps(first(count)));
}

// 2^n * p for whole n in [-254, 254], as two factors 2^(n/2) that stay normal floats (AVX2 has no scalef)
inline Vec scale_by_power_of_two(Vec p, Vec n) {
  const __m256i whole = _mm256_cvtps_epi32(n), half = _mm256_srai_epi32(whole, 1);
  const auto power = [](__m256i e) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23)); };
  return _mm256_mul_ps(_mm256_mul_ps(p, power(half)), power(_mm256_sub_epi32(whole, half)));
}
inline Vec round_to_whole(Vec x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

inline Vec sum_lanes(const Vec s[LANES]) {  // lane j: ((s[j]0+1 + s[j]2+3) + (s[j]4+5 + s[j]6+7))
  const Vec t0 = _mm256_hadd_ps(s[0], s[1]), t1 = _mm256_hadd_ps(s[2], s[3]);
  const Vec t2 = _mm256_hadd_ps(s[4], s[5]), t3 = _mm256_hadd_ps(s[6], s[7]);
  const Vec u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // per 128-bit half: the half's sums of 4
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

#else
#error "specfleet's kernels need AVX-512, or AVX2 with FMA and F16C"
#endif

// e^x (Cephes' expf: range reduction by ln 2, degree-5 polynomial; about 1 ulp)
inline Vec exp(Vec x) {
  x = max(min(x, set1(88.3762626647949f)), set1(-88.3762626647949f));
  const Vec n = round_to_whole(mul(x, set1(1.44269504088896341f)));
  Vec r = fnmadd(n, set1(0.693359375f), x);
  r = fnmadd(n, set1(-2.12194440e-4f), r);
  Vec p = set1(1.9875691500e-4f);
  p = fmadd(p, r, set1(1.3981999507e-3f));
  p = fmadd(p, r, set1(8.3334519073e-3f));
  p = fmadd(p, r, set1(4.1665795894e-2f));
  p = fmadd(p, r, set1(1.6666665459e-1f));
  p = fmadd(p, r, set1(5.0000001201e-1f));
  p = fmadd(mul(p, r), r, add(r, set1(1.0f)));
  return scale_by_power_of_two(p, n);
}

}  // namespace simd
