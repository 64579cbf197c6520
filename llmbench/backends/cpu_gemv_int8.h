// The INT8 part of cpu_gemv.cpp, included inside its anonymous namespace after the helpers it uses (each_block,
// rows_of, run; quantize_rows and kVnni from cpu_gemv_int4.h): int8 weights as TorchAO stores them (row-major,
// symmetric, a float scale per row or per group of a multiple of 32) against x quantized to int8 per 32 values (xq,
// scale xd, as for INT4 and llama.cpp's Q8_0 dot products). Per 32 weights of a row (64 on AVX-512 VNNI CPUs, below),
// one integer dot product, one conversion and one multiply-add by the block's scale: a fifth of the instructions of
// widening every weight to float32, so the loop is bound by memory.
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

// The vectors of int8_rows_of: 32 weights per integer dot product, one block of x's quantization (scale d).
struct Int8x32 {
  using I = __m256i;
  using F = __m256;
  static constexpr int64_t kWeights = 32;
  static I weights(const int8_t* p) { return load_bytes(p); }
  static I values(const int8_t* p) { return load_bytes(p); }
  static F scales(const float* d) { return _mm256_set1_ps(d[0]); }
  static F dot(I w, I x) { return _mm256_cvtepi32_ps(dot_s8_s8(w, x)); }
  static F zero() { return _mm256_setzero_ps(); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static float sum(F v) { return hsum((v8f)v); }
};

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && !defined(LLMBENCH_NO_VNNI)
#define LLMBENCH_INT8_WIDE 1
// AVX-512 VNNI, weight groups a multiple of 64: 64 weights per 512-bit integer dot product (the weights made
// unsigned as loaded), which spans two blocks of x's quantization (32 values, a scale each): its sums are scaled by
// [d of the first block x 8, d of the second x 8]. Half the instructions of the 256-bit form per weight, and one load
// per cache line: one step's int8 linears of the default model on a 2-core AMX Xeon, best ms at 1 / 4 / 8 rows,
// builds alternating, 3 rounds: 256-bit 7.15 / 9.68 / 15.18, 7.31 / 9.99 / 15.37, 7.19 / 9.91 / 14.86; 512-bit
// 6.25 / 8.83 / 13.38, 5.88 / 8.55 / 13.30, 6.63 / 9.49 / 13.98. LLMBENCH_INT8_NARROW keeps the 256-bit form, for
// such measurements.
struct Int8x64 {
  using I = __m512i;
  using F = __m512;
  static constexpr int64_t kWeights = 64;
  static I weights(const int8_t* p) { return _mm512_xor_si512(_mm512_loadu_si512(p), _mm512_set1_epi8(-128)); }
  static I values(const int8_t* p) { return _mm512_loadu_si512(p); }
  static F scales(const float* d) { return _mm512_insertf32x8(_mm512_set1_ps(d[0]), _mm256_set1_ps(d[1]), 1); }
  static F dot(I w, I x) { return _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x)); }
  static F zero() { return _mm512_setzero_ps(); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static float sum(F v) { return _mm512_reduce_add_ps(v); }
};
#endif

// Every block of R weight rows in [n0, n1) against every row of x, C rows of x per pass (each weight vector loaded
// and made unsigned once for them), V::kWeights weights per integer dot product. corr (M, groups): what the VNNI
// sums hold beyond sum(w * x) per group, in x's units (128 * sum of xd * sum(xq) over the group's blocks; zeros
// without VNNI).
template <typename V, int C>
void int8_rows_of(const int8_t* xq, const float* xd, const float* corr, int64_t M, int64_t K, const int8_t* w,
                  const float* scale, int64_t groups, float* out, int64_t n0, int64_t n1) {
  const int64_t gs = K / groups, blocks = K / 32;
  each_block<C>(w, K, M, n0, n1, out, [&](const int8_t* (&wr)[R], int64_t n, int64_t rows, bool ahead, int64_t m0,
                                          float (&sums)[C][R]) {
      int64_t m[C];
      for (int i = 0; i < C; ++i) m[i] = std::min<int64_t>(m0 + i, M - 1);
      typename V::F a[C][R];
      float c[C][R] = {};
      for (int i = 0; i < C; ++i)
        for (int64_t r = 0; r < R; ++r) a[i][r] = V::zero();
      for (int64_t g = 0; g < groups; ++g) {
        typename V::F t[C][R];
        for (int i = 0; i < C; ++i)
          for (int64_t r = 0; r < R; ++r) t[i][r] = V::zero();
        for (int64_t k = g * gs; k < (g + 1) * gs; k += V::kWeights) {
          if (ahead && k % 64 == 0) {
            for (int64_t r = 0; r < R; ++r) prefetch(wr[r] + D * R * K + k);
          }
          typename V::I wv[R];
#pragma GCC unroll 4
          for (int64_t r = 0; r < R; ++r) wv[r] = V::weights(wr[r] + k);
#pragma GCC unroll 4
          for (int i = 0; i < C; ++i) {
            const typename V::I xv = V::values(xq + m[i] * K + k);
            const typename V::F d = V::scales(xd + m[i] * blocks + k / 32);
#pragma GCC unroll 4
            for (int64_t r = 0; r < R; ++r) t[i][r] = V::fmadd(V::dot(wv[r], xv), d, t[i][r]);
          }
        }
        for (int64_t r = 0; r < R; ++r) {
          const float s = scale[(n + std::min(r, rows - 1)) * groups + g];
          for (int i = 0; i < C; ++i) {
            a[i][r] = V::fmadd(t[i][r], V::set1(s), a[i][r]);
            c[i][r] += s * corr[m[i] * groups + g];
          }
        }
      }
      for (int i = 0; i < C; ++i)
        for (int64_t r = 0; r < R; ++r) sums[i][r] = V::sum(a[i][r]) - c[i][r];
  });
}

// Rows of x per pass: as many as the vector registers hold accumulators for (AVX-512 has 32, AVX2 16; groups keep
// a second set), for R weight rows each.
void int8_rows(const int8_t* xq, const float* xd, const float* corr, int64_t M, int64_t K, const int8_t* w,
               const float* scale, int64_t groups, float* out, int64_t n0, int64_t n1) {
#ifdef __AVX512F__
  const int most = groups == 1 ? 4 : 2;
#else
  const int most = groups == 1 ? 2 : 1;
#endif
#if defined(LLMBENCH_INT8_WIDE) && !defined(LLMBENCH_INT8_NARROW)
  if ((K / groups) % 64 == 0)
    return with_rows_per_pass(M, most, [&](auto c) {
      int8_rows_of<Int8x64, decltype(c)::value>(xq, xd, corr, M, K, w, scale, groups, out, n0, n1);
    });
#endif
  with_rows_per_pass(M, most, [&](auto c) {
    int8_rows_of<Int8x32, decltype(c)::value>(xq, xd, corr, M, K, w, scale, groups, out, n0, n1);
  });
}
#endif

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(qdata.dim() == 2 && qdata.is_contiguous() && qdata.scalar_type() == at::kChar,
              "linear_int8: weight must be contiguous 2-D int8");
  const int64_t N = qdata.size(0), K = qdata.size(1);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() % N == 0,
              "linear_int8: scale must be contiguous float32 (N, groups)");
  const int64_t groups = scale.numel() / N;
  TORCH_CHECK(K % groups == 0 && (K / groups) % 8 == 0, "linear_int8: group size must be a multiple of 8");
  const Rows rows = rows_of(x, K, false, "linear_int8", kAnyRows);
  const float* xr = rows.x.data();
  const int8_t* w = qdata.data_ptr<int8_t>();
  const float* s = scale.data_ptr<float>();
  const int64_t M = rows.M;
#ifdef __AVX2__
  if ((K / groups) % 32 == 0) {  // x quantized per 32 values, integer dot products
    const int64_t blocks = K / 32;
    const QuantizedRows xq = quantize_rows(xr, M, K, K / groups);
    std::vector<float> corr(M * groups, 0.f);
    for (int64_t m = 0; kVnni && m < M; ++m) {
      for (int64_t b = 0; b < blocks; ++b) {
        int32_t total = 0;
        for (int t = 0; t < 32; ++t) total += xq.q[m * K + b * 32 + t];
        corr[m * groups + b * 32 * groups / K] += 128.f * xq.d[m * blocks + b] * static_cast<float>(total);
      }
    }
    return run(x, M, N, bias, [&](float* o, int64_t n0, int64_t n1) {
      int8_rows(xq.q.data(), xq.d.data(), corr.data(), M, K, w, s, groups, o, n0, n1);
    });
  }
#endif
  return run(x, M, N, bias, [&](float* o, int64_t n0, int64_t n1) { dense_rows(xr, M, K, w, s, groups, o, n0, n1); });
}
