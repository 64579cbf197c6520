// The INT8 part of cpu_gemv.cpp, included inside its anonymous namespace after cpu_gemv_int4.h (quantize_block,
// kVnni): int8 weights as TorchAO stores them (row-major, symmetric, a float scale per row or per group of a
// multiple of 32) against x quantized to int8 per 32 values (xq, scale xd, as for INT4 and llama.cpp's Q8_0 dot
// products). Per 32 weights of a row, one integer dot product, one conversion and one multiply-add by the block's
// scale: a fifth of the instructions of widening every weight to float32, so the loop is bound by memory.
#pragma once

#ifdef __AVX2__
// Per 32-bit lane, the sum of four products of signed bytes w and x. With VNNI, w is made unsigned (w + 128, one
// xor) for dpbusd, so the lanes hold sum(w * x) + 128 * sum(x): the caller takes 128 * sum(x) off per block (corr).
// Without it, maddubs takes |w| against x with w's sign (pair sums at most 2 * 128 * 127, no saturation).
inline __m256i dot_s8_s8(__m256i w, __m256i x) {
  if constexpr (kVnni) return dot_u8_s8(_mm256_setzero_si256(), _mm256_xor_si256(w, _mm256_set1_epi8(-128)), x);
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w)), _mm256_set1_epi16(1));
}

inline __m256i load_bytes(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// Every block of R weight rows in [n0, n1) against every row of x. corr (M, groups): what the VNNI sums hold beyond
// sum(w * x) per group, in x's units (128 * sum of xd * sum(xq) over the group's blocks; zeros without VNNI).
void int8_rows(const int8_t* xq, const float* xd, const float* corr, int64_t M, int64_t K, const int8_t* w,
               const float* scale, int64_t groups, float* out, int64_t n0, int64_t n1) {
  const int64_t gs = K / groups, blocks = K / 32;
  each_block(w, K, M, n0, n1, out, [&](const int8_t* (&wr)[R], int64_t n, int64_t rows, bool ahead, int64_t m,
                                       float* sums) {
      const int8_t* xm = xq + m * K;
      __m256 a[R];
      float c[R] = {};
      for (int64_t r = 0; r < R; ++r) a[r] = _mm256_setzero_ps();
      for (int64_t g = 0; g < groups; ++g) {
        __m256 t[R];
        for (int64_t r = 0; r < R; ++r) t[r] = _mm256_setzero_ps();
        for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {
          if (m == 0 && ahead && k % 64 == 0) {
            for (int64_t r = 0; r < R; ++r) prefetch(wr[r] + D * R * K + k);
          }
          const __m256i xv = load_bytes(xm + k);
          const __m256 d = _mm256_set1_ps(xd[m * blocks + k / 32]);
#pragma GCC unroll 4
          for (int64_t r = 0; r < R; ++r)
            t[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_s8_s8(load_bytes(wr[r] + k), xv)), d, t[r]);
        }
        for (int64_t r = 0; r < R; ++r) {
          const float s = scale[(n + std::min(r, rows - 1)) * groups + g];
          a[r] = _mm256_fmadd_ps(t[r], _mm256_set1_ps(s), a[r]);
          c[r] += s * corr[m * groups + g];
        }
      }
      for (int64_t r = 0; r < R; ++r) sums[r] = hsum((v8f)a[r]) - c[r];
  });
}
#endif
