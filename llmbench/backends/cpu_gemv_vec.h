// Float vectors of the host's widest kind, shared by cpu_attention.cpp and cpu_gemv.cpp (beam search's softmax),
// included inside their anonymous namespaces after <immintrin.h>.
#pragma once

// The vector path's registers: 16 floats (AVX-512) or 8 (AVX2 with FMA and F16C); Vec::W is 0 where neither was built.
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#define LLMBENCH_VEC 1
#endif
#if defined(__AVX512F__)
struct Vec {
  using R = __m512;
  static constexpr int W = 16;
  static R zero() { return _mm512_setzero_ps(); }
  static R set1(float v) { return _mm512_set1_ps(v); }
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R max(R a, R b) { return _mm512_max_ps(a, b); }
  static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static R div(R a, R b) { return _mm512_div_ps(a, b); }
  static R fmadd(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R fnmadd(R a, R b, R c) { return _mm512_fnmadd_ps(a, b, c); }
  static float sum(R v) { return _mm512_reduce_add_ps(v); }
  static R round(R v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // p 2^n, exactly 0 for x below -104 (the caller's clamp keeps n from underflowing scalef's exponent)
  static R scale2(R p, R n, R x) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, set1(-104.f), _CMP_GE_OQ),
                                                               _mm512_scalef_ps(p, n)); }
  static constexpr float kLowest = -104.f;
  template <typename T>
  static R widen(const T* p) {
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else if constexpr (std::is_same_v<T, at::Half>) {
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    } else {
      return _mm512_loadu_ps(p);
    }
  }
};
// The sums of 16 vectors at once: element 4 * (n % 4) + n / 4 of the result is v[n]'s sum (a transpose of 128-bit
// lanes, then of floats within them: 30 instructions, not 16 reductions of 8).
inline __m512 sum16(const __m512 (&v)[16]) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0xDD));
  const __m512 p0 = _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], 0x44), _mm512_shuffle_ps(u[0], u[1], 0xEE));
  const __m512 p1 = _mm512_add_ps(_mm512_shuffle_ps(u[2], u[3], 0x44), _mm512_shuffle_ps(u[2], u[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(p0, p1, 0x88), _mm512_shuffle_ps(p0, p1, 0xDD));
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
struct Vec {
  using R = __m256;
  static constexpr int W = 8;
  static R zero() { return _mm256_setzero_ps(); }
  static R set1(float v) { return _mm256_set1_ps(v); }
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R max(R a, R b) { return _mm256_max_ps(a, b); }
  static R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static R div(R a, R b) { return _mm256_div_ps(a, b); }
  static R fmadd(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R fnmadd(R a, R b, R c) { return _mm256_fnmadd_ps(a, b, c); }
  static float sum(R v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static R round(R v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // p 2^n through the exponent bits (n >= -126 after the caller's clamp), 0 for x below that clamp
  static R scale2(R p, R n, R x) {
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(bits)), _mm256_cmp_ps(x, set1(kLowest), _CMP_GE_OQ));
  }
  static constexpr float kLowest = -87.f;
  template <typename T>
  static R widen(const T* p) {
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else if constexpr (std::is_same_v<T, at::Half>) {
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    } else {
      return _mm256_loadu_ps(p);
    }
  }
};
#else
struct Vec {
  static constexpr int W = 0;
};
#endif

#if defined(LLMBENCH_VEC)
// e^x for a vector of floats (Cephes' expf polynomial after x = n ln2 + r, |r| <= ln2/2; ~1 ulp), exactly 0 below
// Vec::kLowest (-104, or -87 where 2^n is built from exponent bits: e^-87 is 1.6e-38).
inline Vec::R vexp(Vec::R x) {
  const Vec::R xc = Vec::max(x, Vec::set1(Vec::kLowest));
  const Vec::R n = Vec::round(Vec::mul(xc, Vec::set1(1.44269504088896341f)));
  Vec::R r = Vec::fnmadd(n, Vec::set1(0.693359375f), xc);
  r = Vec::fnmadd(n, Vec::set1(-2.12194440e-4f), r);
  Vec::R p = Vec::set1(1.9875691500e-4f);
  p = Vec::fmadd(p, r, Vec::set1(1.3981999507e-3f));
  p = Vec::fmadd(p, r, Vec::set1(8.3334519073e-3f));
  p = Vec::fmadd(p, r, Vec::set1(4.1665795894e-2f));
  p = Vec::fmadd(p, r, Vec::set1(1.6666665459e-1f));
  p = Vec::fmadd(p, r, Vec::set1(5.0000001201e-1f));
  p = Vec::fmadd(Vec::mul(p, r), r, Vec::add(r, Vec::set1(1.f)));
  return Vec::scale2(p, n, x);
}
#endif
