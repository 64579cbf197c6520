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
            c[i][r] = std::fma(s, corr[m[i] * groups + g], c[i][r]);  // fused in every instantiation
          }
        }
      }
      for (int i = 0; i < C; ++i)
        for (int64_t r = 0; r < R; ++r) sums[i][r] = V::sum(a[i][r]) - c[i][r];
  });
}

// int8 in tiles of eight output rows (N a multiple of 8), each one run of 8 * stride bytes: the float32 scales of
// its groups as [group][row], then per 32 weights 256 bytes: eight vectors j of 32 bytes whose 32-bit lane r holds
// row r's weights 4j..4j+3 (as stored, signed). As in INT4's tiles, the eight rows' integer dot products of a block
// land in the lanes of one vector, which one conversion and one multiply-add by the rows' scales times x's block
// scale add to the outputs: no per-row conversion, no horizontal sums. Each weight vector is loaded (and made
// unsigned for VNNI) once for every row of x in the pass.
struct Int8Tiles {
  const int8_t* xq; const float* xd; const float* corr;
  int64_t M, K, groups; const uint8_t* w; int64_t stride;
};

template <int MR>
void int8_tile(const Int8Tiles& a, const uint8_t* tile, const uint8_t* next, __m256* acc) {
  const int64_t K = a.K, blocks = K / 32, per_group = blocks / a.groups;
  const float* sc = reinterpret_cast<const float*>(tile);
  const int8_t* q = reinterpret_cast<const int8_t*>(tile + kTile * 4 * a.groups);
  const int64_t lines = (kTile * a.stride + 63) / 64, per_block = (lines + blocks - 1) / blocks;
  for (int m = 0; m < MR; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < a.groups; ++g) {
    const __m256 scale = _mm256_loadu_ps(sc + g * kTile);
    for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
      if (next) {
        for (int64_t l = 0; l < per_block; ++l) prefetch_tile(next + (b * per_block + l) * 64);
      }
      __m256i s[MR];
      for (int m = 0; m < MR; ++m) s[m] = _mm256_setzero_si256();
      for (int j = 0; j < 8; ++j) {
        const __m256i w = load_bytes(q + b * 256 + j * 32);
        if constexpr (kVnni) {
          const __m256i u = _mm256_xor_si256(w, _mm256_set1_epi8(-128));
          for (int m = 0; m < MR; ++m) s[m] = dot_u8_s8(s[m], u, broadcast4(a.xq + m * K + b * 32 + 4 * j));
        } else {
          const __m256i magnitude = _mm256_abs_epi8(w);
          for (int m = 0; m < MR; ++m) {
            const __m256i x = _mm256_sign_epi8(broadcast4(a.xq + m * K + b * 32 + 4 * j), w);
            s[m] = _mm256_add_epi32(s[m], _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, x), _mm256_set1_epi16(1)));
          }
        }
      }
      for (int m = 0; m < MR; ++m)
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[m]), _mm256_mul_ps(scale, _mm256_set1_ps(a.xd[m * blocks + b])),
                                 acc[m]);
    }
    if constexpr (kVnni) {  // the VNNI sums' 128 * sum(x) per group, taken off
      for (int m = 0; m < MR; ++m) acc[m] = _mm256_fnmadd_ps(scale, _mm256_set1_ps(a.corr[m * a.groups + g]), acc[m]);
    }
  }
}

#if defined(LLMBENCH_WIDE_TILES) && !defined(LLMBENCH_NO_INT8_WIDE_TILES)
#define LLMBENCH_INT8_WIDE_TILES 1
constexpr int64_t kInt8Tile = kWideTile;
// int8_tile for a tile of 16 rows (AVX-512 VNNI builds, as INT4's), whose blocks of 32 weights are 512 bytes: eight
// vectors j of 64 bytes whose 32-bit lane r holds row r's weights 4j..4j+3. Each broadcast of x and each dot product
// serves 16 rows: half the instructions per weight of the 8-row tiles, which bound those with several rows of x.
// Prefetched as the 8-row tiles are (prefetch_tile: INT4's 16-row locality made one row of x 1.08x slower), the
// even and odd vectors' dot products in two chains. One decode step's int8 linears, default model, 2-core family 26
// EPYC, against 8-row tiles: 0.99 / 1.02 / 1.11 / 1.43x as fast with 1 / 2 / 4 / 8 rows of x.
template <int MR>
void int8_wide_tile(const Int8Tiles& a, const uint8_t* tile, const uint8_t* next, __m512* acc) {
  const int64_t K = a.K, blocks = K / 32, per_group = blocks / a.groups;
  const float* sc = reinterpret_cast<const float*>(tile);
  const int8_t* q = reinterpret_cast<const int8_t*>(tile + kWideTile * 4 * a.groups);
  const int64_t lines = (kWideTile * a.stride + 63) / 64, per_block = (lines + blocks - 1) / blocks;
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < a.groups; ++g) {
    const __m512 scale = _mm512_loadu_ps(sc + g * kWideTile);
    for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
      if (next) {
        for (int64_t l = 0; l < per_block; ++l) prefetch_tile(next + (b * per_block + l) * 64);
      }
      __m512i u[8];
      for (int j = 0; j < 8; ++j)
        u[j] = _mm512_xor_si512(_mm512_loadu_si512(q + b * 512 + j * 64), _mm512_set1_epi8(-128));
      for (int m = 0; m < MR; ++m) {
        const int8_t* xb = a.xq + m * K + b * 32;
        __m512i s[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
        for (int j = 0; j < 8; ++j) {
          int32_t v;
          std::memcpy(&v, xb + 4 * j, 4);
          s[j % 2] = _mm512_dpbusd_epi32(s[j % 2], u[j], _mm512_set1_epi32(v));
        }
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s[0], s[1])),
                                 _mm512_mul_ps(scale, _mm512_set1_ps(a.xd[m * blocks + b])), acc[m]);
      }
    }
    for (int m = 0; m < MR; ++m) acc[m] = _mm512_fnmadd_ps(scale, _mm512_set1_ps(a.corr[m * a.groups + g]), acc[m]);
  }
}
#else
constexpr int64_t kInt8Tile = kTile;  // rows per INT8 tile in this build's layout
#endif

// The outputs of rows [n0, n1) (whole tiles of kInt8Tile rows, the last of the call 8 where N is an odd multiple of
// 8) into out (M, n1 - n0).
void int8_tiles(const Int8Tiles& a, float* out, int64_t n0, int64_t n1) {
  const int64_t blocks = a.K / 32;
  with_tile_rows(a.M, [&](auto c) {
    constexpr int MR = decltype(c)::value;
    auto rows_from = [&](int64_t m0) {
      Int8Tiles part = a;
      part.xq += m0 * a.K, part.xd += m0 * blocks, part.corr += m0 * a.groups;
      return part;
    };
#ifdef LLMBENCH_INT8_WIDE_TILES
    auto wide = [&](int64_t m0, const uint8_t* tile, const uint8_t* next, __m512* acc) {
      int8_wide_tile<MR>(rows_from(m0), tile, next, acc);
    };
#else
    auto wide = nullptr;
#endif
    wide_then_narrow<MR, kInt8Tile>(a.M, a.w, a.stride, out, n0, n1, wide, [&](int64_t m0, const uint8_t* tile,
                                                                              const uint8_t* next, __m256* acc) {
      int8_tile<MR>(rows_from(m0), tile, next, acc);
    });
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

// Per row of x and weight group, what the VNNI sums hold beyond sum(w * x) (128 * the sum of xd * sum(xq) over the
// group's blocks, in x's units; zeros without VNNI). Rows of xq beyond M (padding) get none.
std::vector<float> vnni_corrections(const QuantizedRows& xq, int64_t M, int64_t K, int64_t groups) {
  const int64_t blocks = K / 32;
  std::vector<float> corr(std::max<int64_t>(M, xq.d.size() / blocks) * groups, 0.f);
  for (int64_t m = 0; kVnni && m < M; ++m) {
    for (int64_t b = 0; b < blocks; ++b) {
      int32_t total = 0;
      for (int t = 0; t < 32; ++t) total += xq.q[m * K + b * 32 + t];
      corr[m * groups + b * 32 * groups / K] += 128.f * xq.d[m * blocks + b] * static_cast<float>(total);
    }
  }
  return corr;
}
#endif
#ifndef __AVX2__
constexpr int64_t kInt8Tile = kTile;  // rows per INT8 tile in this build's layout
#endif

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias, int64_t act) {
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
    const QuantizedRows xq = quantize_rows(xr, M, K, K / groups);
    const std::vector<float> corr = vnni_corrections(xq, M, K, groups);
    const int8_t* q = xq.q.data();
    const float *d = xq.d.data(), *c = corr.data();
    return run(x, M, N, bias, act,
               [=](float* o, int64_t n0, int64_t n1) { int8_rows(q, d, c, M, K, w, s, groups, o, n0, n1); });
  }
#endif
  return run(x, M, N, bias, act, [=](float* o, int64_t n0, int64_t n1) { dense_rows(xr, M, K, w, s, groups, o, n0, n1); });
}

// x against int8 tiles (Int8Tiles' layout, packed (N, 4 * groups + K) bytes, N a multiple of 8, groups of a multiple
// of 32 weights): the integer dot products of linear_int8, with the tiles' lanes as rows.
at::Tensor linear_int8_tiles(const at::Tensor& x, const at::Tensor& packed, int64_t groups,
                             const c10::optional<at::Tensor>& bias, int64_t act) {
  TORCH_CHECK(packed.dim() == 2 && packed.is_contiguous() && packed.scalar_type() == at::kByte,
              "linear_int8_tiles: packed weight must be contiguous 2-D uint8");
  const int64_t N = packed.size(0), K = x.size(-1);
  TORCH_CHECK(groups > 0 && K % groups == 0 && (K / groups) % 32 == 0,
              "linear_int8_tiles: groups must be of a multiple of 32 weights");
  TORCH_CHECK(N % kTile == 0, "linear_int8_tiles: the output size must be a multiple of ", kTile, ", got ", N);
  TORCH_CHECK(packed.size(1) == 4 * groups + K, "linear_int8_tiles: a packed row of ", packed.size(1),
              " bytes is not ", K, " weights after ", groups, " float32 scales");
#ifdef __AVX2__
  const Rows rows = rows_of(x, K, false, "linear_int8_tiles", kAnyRows);
  const int64_t M = rows.M;
  const int64_t padded = M > kMaxRows ? (M + kMaxRows - 1) / kMaxRows * kMaxRows : 0;  // int8_tiles_of's passes
  const QuantizedRows xq = quantize_rows(rows.x.data(), M, K, K / groups, padded);
  const std::vector<float> corr = vnni_corrections(xq, M, K, groups);
  const Int8Tiles args{xq.q.data(), xq.d.data(), corr.data(), M, K, groups, packed.data_ptr<uint8_t>(),
                       packed.size(1)};
  return run(x, M, N, bias, act, [=](float* o, int64_t n0, int64_t n1) { int8_tiles(args, o, n0, n1); }, kInt8Tile);
#else
  TORCH_CHECK(false, "linear_int8_tiles: built without AVX2 (use linear_int8)");
#endif
}
