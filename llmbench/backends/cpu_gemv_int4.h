// The INT4 part of cpu_gemv.cpp, which includes it inside its anonymous namespace after the helpers it uses
// (widen, prefetch): activations quantized to int8 per 32 values, and the tile kernel.
#pragma once

// 32 values of x: their sum added to *sum, their int8 quantization q = round(x / d) with d = max |x| / 127.
inline void quantize_block(const float* x, float* sum, float* d, int8_t* q) {
#ifdef __AVX2__
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 v[4], amax = _mm256_setzero_ps(), total = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    amax = _mm256_max_ps(amax, _mm256_and_ps(v[i], magnitude));
    total = _mm256_add_ps(total, v[i]);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, amax);
  float top = 0.f;
  for (float lane : lanes) top = std::max(top, lane);
  *sum += hsum((v8f)total);
  *d = top / 127.f;
  const __m256 inv = _mm256_set1_ps(*d > 0.f ? 1.f / *d : 0.f);
  __m256i n[4];
  for (int i = 0; i < 4; ++i) n[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));  // to nearest, like nearbyint
  // packs interleave the 128-bit lanes: the permutation puts the 32 bytes back in order
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]), _mm256_packs_epi32(n[2], n[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
#else
  float amax = 0.f, total = 0.f;
  for (int t = 0; t < 32; ++t) { amax = std::max(amax, std::abs(x[t])); total += x[t]; }
  *sum += total;
  *d = amax / 127.f;
  const float inv = *d > 0.f ? 1.f / *d : 0.f;
  for (int t = 0; t < 32; ++t) q[t] = static_cast<int8_t>(std::nearbyint(x[t] * inv));
#endif
}


// M rows of x (K values each, a multiple of 32) quantized per 32 values by quantize_block: q (M, K), their scales d
// (M, K / 32), and the exact sums of x per group of group_size values (M, K / group_size); zero rows after them up
// to `rows` where that is more than M.
struct QuantizedRows {
  std::vector<int8_t> q;
  std::vector<float> d, sum;
};
inline QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K, int64_t group_size, int64_t rows = 0) {
  const int64_t blocks = K / 32, groups = K / group_size, P = std::max(M, rows);
  QuantizedRows out{std::vector<int8_t>(P * K), std::vector<float>(P * blocks), std::vector<float>(P * groups, 0.f)};
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < blocks; ++b)
      quantize_block(x + m * K + b * 32, &out.sum[m * groups + (b * 32) / group_size], &out.d[m * blocks + b],
                     &out.q[m * K + b * 32]);
  return out;
}

// int4, in tiles of eight output rows (N a multiple of 8), each tile one run of 8 * stride bytes: the scales of its
// groups (2^shift weights each, at least 32) as [group][row], then its zeros the same way (both bfloat16, or float32
// where the model's were not bfloat16), zero bytes up to 8 * meta, then per 32 weights 128 bytes: four vectors j
// of 32 bytes, whose 32-bit lane r holds row r's weights 8j..8j+3 in its low nibbles and 8j+4..8j+7 in its high
// ones. With the rows in the lanes, the integer dot products of a block of 32 weights land in one vector, one per
// row, which a single conversion and multiply by the eight rows' scales adds to the outputs: no per-row set-up, no
// horizontal sums, and every thread reads one stream.
// w = (q - 8) * scale + zero, so sum(x * w) = scale * sum(x * q) + (zero - 8 * scale) * sum(x) per group; the sums
// of x (exact, in float32) come precomputed per group in xsum. With AVX2, x is quantized to int8 per 32 values
// (xq, with scale xd, as llama.cpp does for its Q4 formats) and sum(x * q) is an integer dot product; without AVX2
// it is computed in float32.
struct Int4Args {
  const float* x; const int8_t* xq; const float* xd; const float* xsum;
  int64_t M, K; const uint8_t* w; int64_t stride; int shift;
};
constexpr int64_t kTile = 8;  // output rows per INT4 tile
#ifndef LLMBENCH_PREFETCH_TILES
#define LLMBENCH_PREFETCH_TILES 2
#endif

inline float scalar(float v) { return v; }
inline float scalar(at::BFloat16 v) { return static_cast<float>(v); }

#ifdef __AVX2__
// acc plus the sums of four products of unsigned bytes q and signed bytes x, per 32-bit lane: one VNNI instruction
// where the CPU has it (AVX-VNNI, or AVX512-VNNI with VL), whose products are 16-bit each, so q may take the high
// nibbles in place (0..240); else maddubs to 16 bits, whose pairwise sums saturate past 32767, so q must be 0..15,
// then madd against ones.
#if (defined(__AVX512VNNI__) && defined(__AVX512VL__) || defined(__AVXVNNI__)) && !defined(LLMBENCH_NO_VNNI)
constexpr bool kVnni = true;
inline __m256i dot_u8_s8(__m256i acc, __m256i q, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, q, x);
#else
  return _mm256_dpbusd_avx_epi32(acc, q, x);
#endif
}
#else
constexpr bool kVnni = false;
inline __m256i dot_u8_s8(__m256i acc, __m256i q, __m256i x) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), _mm256_set1_epi16(1)));
}
#endif

inline __m256i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return _mm256_set1_epi32(v);
}

// One tile against MR rows of x: acc[m] gets the eight rows' dot products with row m. The groups' offsets come
// first, even and odd groups in two accumulators: multiply-adds into one accumulator wait for each other (4
// cycles apiece), and after the blocks' loop that chain had bounded a tile against one row of x.
template <typename T, int MR>
void int4_tile(const Int4Args& a, const uint8_t* tile, const uint8_t* next, __m256* acc) {
  const int64_t K = a.K, groups = K >> a.shift, blocks = K / 32;
  const T* sc = reinterpret_cast<const T*>(tile);
  const T* zr = sc + kTile * groups;
  const uint8_t* q = tile + kTile * (a.stride - K / 2);
  const int64_t lines = (kTile * a.stride + 63) / 64, per_block = (lines + blocks - 1) / blocks;
  const __m256i low = _mm256_set1_epi8(0x0F), high = _mm256_set1_epi8(static_cast<char>(0xF0));
  const __m256 eight = _mm256_set1_ps(8.f);
  auto add_offsets = [&](int64_t g, __m256* into) {  // (zero - 8 * scale) * sum(x) of group g
    const __m256 offset = _mm256_fnmadd_ps(eight, (__m256)widen(sc + g * kTile), (__m256)widen(zr + g * kTile));
    for (int m = 0; m < MR; ++m) into[m] = _mm256_fmadd_ps(offset, _mm256_set1_ps(a.xsum[m * groups + g]), into[m]);
  };
  __m256 odd[MR];
  for (int m = 0; m < MR; ++m) acc[m] = odd[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; g += 2) {
    add_offsets(g, acc);
    if (g + 1 < groups) add_offsets(g + 1, odd);
  }
  for (int m = 0; m < MR; ++m) acc[m] = _mm256_add_ps(acc[m], odd[m]);
  for (int64_t b = 0; b < blocks; ++b) {
    if (next) {
      for (int64_t l = 0; l < per_block; ++l) prefetch_tile(next + (b * per_block + l) * 64);
    }
    __m256i lo[4], hi[4];
    for (int j = 0; j < 4; ++j) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + b * 128 + j * 32));
      lo[j] = _mm256_and_si256(v, low);
      hi[j] = kVnni ? _mm256_and_si256(v, high) : _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    }
    const __m256 scale = (__m256)widen(sc + ((b * 32) >> a.shift) * kTile);
    for (int m = 0; m < MR; ++m) {
      const int8_t* xb = a.xq + m * K + b * 32;
      __m256i sl = _mm256_setzero_si256(), sh = _mm256_setzero_si256();
      for (int j = 0; j < 4; ++j) {
        sl = dot_u8_s8(sl, lo[j], broadcast4(xb + 8 * j));
        sh = dot_u8_s8(sh, hi[j], broadcast4(xb + 8 * j + 4));
      }
      // high nibbles in place are 16 times their value: every product, so every sum, is a multiple of 16
      const __m256i s = _mm256_add_epi32(sl, kVnni ? _mm256_srai_epi32(sh, 4) : sh);
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(scale, _mm256_set1_ps(a.xd[m * blocks + b])),
                               acc[m]);
    }
  }
}

inline void store(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
#ifdef __AVX512F__
inline void store(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
#endif

// Whole tiles [n0, n1) of w (stride bytes a row, Rows rows a tile, their outputs in the lanes of a Vec) into out
// (M rows of ld values, from column 0 for row n0), MR rows of x at a time; with more rows (prompts: the quantized
// rows padded with zeros to a multiple of MR), each tile once for every MR of them while it is in cache, so the
// weights are read once per call. tile(m0, tile, next, acc) gives rows m0..m0+MR-1 of x against one tile (next: the
// tile to prefetch, on the first pass only). Shared by the INT4 and INT8 tiles.
template <int MR, int64_t Rows = kTile, typename Vec = __m256, typename Tile>
void each_tile(int64_t M, const uint8_t* w, int64_t stride, float* out, int64_t ld, int64_t n0, int64_t n1,
               Tile&& tile) {
  const int64_t ahead = LLMBENCH_PREFETCH_TILES * Rows;
  for (int64_t n = n0; n < n1; n += Rows) {
    const uint8_t* next = n + ahead < n1 ? w + (n + ahead) * stride : nullptr;
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
      Vec acc[MR];
      tile(m0, w + n * stride, m0 == 0 ? next : nullptr, acc);
      for (int m = 0; m < std::min<int64_t>(MR, M - m0); ++m) store(out + (m0 + m) * ld + (n - n0), acc[m]);
    }
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && !defined(LLMBENCH_NO_VNNI) && \
    !defined(LLMBENCH_NO_WIDE_TILES)
#define LLMBENCH_WIDE_TILES 1
// AVX-512 builds pack INT4 weights in tiles of 16 rows (int4_layout.int4_rows' tile_rows, int4_tile_rows()), whose
// lanes fill a 512-bit vector: each broadcast of x and each multiply-add serves 16 rows, half the instructions of two
// tiles of 8 (hot in cache 0.67-0.84x the time of 8-row tiles; from memory, one decode step's linears, 0.96-0.98x
// with one row of x, 0.76-0.89x with 4, 0.73-0.79x with 8, on a 2-core AVX-512 EPYC). Where N is an odd multiple of
// 8, its last tile has 8 rows. They stream from memory best prefetched into L2 (on that EPYC prefetchnta, the 8-row
// tiles' best, made them 1.12-1.28x slower than 8-row tiles).
constexpr int64_t kWideTile = 16;
#ifndef LLMBENCH_WIDE_TILE_PREFETCH_LOCALITY
#define LLMBENCH_WIDE_TILE_PREFETCH_LOCALITY LLMBENCH_TILE_PREFETCH_LOCALITY
#endif
inline void prefetch_wide_tile(const void* p) { __builtin_prefetch(p, 0, LLMBENCH_WIDE_TILE_PREFETCH_LOCALITY); }

// int4_tile for a tile of 16 rows, whose blocks of 32 weights are 256 bytes: four vectors j of 64 bytes whose 32-bit
// lane r holds row r's weights 8j..8j+3 in its low nibbles and 8j+4..8j+7 in its high ones.
template <typename T, int MR>
void int4_wide_tile(const Int4Args& a, const uint8_t* tile, const uint8_t* next, __m512* acc) {
  const int64_t K = a.K, groups = K >> a.shift, blocks = K / 32;
  const T* sc = reinterpret_cast<const T*>(tile);
  const T* zr = sc + kWideTile * groups;
  const uint8_t* q = tile + kWideTile * (a.stride - K / 2);
  const int64_t lines = (kWideTile * a.stride + 63) / 64, per_block = (lines + blocks - 1) / blocks;
  const __m512i low = _mm512_set1_epi8(0x0F), high = _mm512_set1_epi8(static_cast<char>(0xF0));
  const __m512 eight = _mm512_set1_ps(8.f);
  auto add_offsets = [&](int64_t g, __m512* into) {  // (zero - 8 * scale) * sum(x) of group g
    const __m512 offset = _mm512_fnmadd_ps(eight, widen16(sc + g * kWideTile), widen16(zr + g * kWideTile));
    for (int m = 0; m < MR; ++m) into[m] = _mm512_fmadd_ps(offset, _mm512_set1_ps(a.xsum[m * groups + g]), into[m]);
  };
  __m512 odd[MR];
  for (int m = 0; m < MR; ++m) acc[m] = odd[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; g += 2) {
    add_offsets(g, acc);
    if (g + 1 < groups) add_offsets(g + 1, odd);
  }
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_add_ps(acc[m], odd[m]);
  for (int64_t b = 0; b < blocks; ++b) {
    if (next) {
      for (int64_t l = 0; l < per_block; ++l) prefetch_wide_tile(next + (b * per_block + l) * 64);
    }
    __m512i lo[4], hi[4];
    for (int j = 0; j < 4; ++j) {
      const __m512i v = _mm512_loadu_si512(q + b * 256 + j * 64);
      lo[j] = _mm512_and_si512(v, low);
      hi[j] = _mm512_and_si512(v, high);  // 16 times the value in place (see int4_tile)
    }
    const __m512 scale = widen16(sc + ((b * 32) >> a.shift) * kWideTile);
    for (int m = 0; m < MR; ++m) {
      const int8_t* xb = a.xq + m * K + b * 32;
      __m512i sl = _mm512_setzero_si512(), sh = _mm512_setzero_si512();
      for (int j = 0; j < 4; ++j) {
        int32_t x0, x1;
        std::memcpy(&x0, xb + 8 * j, 4), std::memcpy(&x1, xb + 8 * j + 4, 4);
        sl = _mm512_dpbusd_epi32(sl, lo[j], _mm512_set1_epi32(x0));
        sh = _mm512_dpbusd_epi32(sh, hi[j], _mm512_set1_epi32(x1));
      }
      const __m512i s = _mm512_add_epi32(sl, _mm512_srai_epi32(sh, 4));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(scale, _mm512_set1_ps(a.xd[m * blocks + b])),
                               acc[m]);
    }
  }
}
#endif

// Calls f(std::integral_constant<int, MR>) with the rows of x as a constant (their accumulators stay in registers):
// M itself up to 7, else 8 a pass.
template <typename F>
void with_tile_rows(int64_t M, F&& f) {
  switch (M) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}
#endif

#ifndef LLMBENCH_WIDE_TILES
constexpr int64_t kWideTile = kTile;  // rows per INT4 tile in this build's layout
#endif

#ifdef __AVX2__
// Whole tiles [n0, n1) into out (M, n1 - n0), MR rows of x at a time (each_tile): the first rows in tiles of Wide
// rows where Wide is 16 (their outputs in 512-bit lanes, wide(m0, tile, next, acc)), the rest (all of them where
// Wide is 8) in tiles of 8 (narrow(...)). Shared by the INT4 and INT8 tiles.
template <int MR, int64_t Wide, typename WideTile, typename NarrowTile>
void wide_then_narrow(int64_t M, const uint8_t* w, int64_t stride, float* out, int64_t n0, int64_t n1, WideTile&& wide,
                      NarrowTile&& narrow) {
  int64_t n = n0;  // where the 8-row tiles start
  if constexpr (Wide > kTile) {
    n = n0 + (n1 - n0) / Wide * Wide;
    each_tile<MR, Wide, __m512>(M, w, stride, out, n1 - n0, n0, n, wide);
  }
  each_tile<MR>(M, w, stride, out + (n - n0), n1 - n0, n, n1, narrow);
}
#endif

// The outputs of rows [n0, n1) (whole tiles of kWideTile rows, the last of the call 8 where N is an odd multiple of
// 8) into out (M, n1 - n0).
template <typename T>
void int4_tiles(const Int4Args& a, float* out, int64_t n0, int64_t n1) {
#ifdef __AVX2__
  const int64_t blocks = a.K / 32, groups = a.K >> a.shift;
  return with_tile_rows(a.M, [&](auto c) {
    constexpr int MR = decltype(c)::value;
    auto rows_from = [&](int64_t m0) {
      Int4Args part = a;
      part.xq += m0 * a.K, part.xd += m0 * blocks, part.xsum += m0 * groups;
      return part;
    };
#ifdef LLMBENCH_WIDE_TILES
    auto wide = [&](int64_t m0, const uint8_t* tile, const uint8_t* next, __m512* acc) {
      int4_wide_tile<T, MR>(rows_from(m0), tile, next, acc);
    };
#else
    auto wide = nullptr;
#endif
    wide_then_narrow<MR, kWideTile>(a.M, a.w, a.stride, out, n0, n1, wide, [&](int64_t m0, const uint8_t* tile,
                                                                              const uint8_t* next, __m256* acc) {
      int4_tile<T, MR>(rows_from(m0), tile, next, acc);
    });
  });
#else
  const int64_t K = a.K, groups = K >> a.shift;
  for (int64_t n = n0; n < n1; n += kTile) {
    const uint8_t* tile = a.w + n * a.stride;
    const T* sc = reinterpret_cast<const T*>(tile);
    const T* zr = sc + kTile * groups;
    const uint8_t* q = tile + kTile * (a.stride - K / 2);
    for (int64_t r = 0; r < kTile; ++r) {
      for (int64_t m = 0; m < a.M; ++m) {
        const float* xm = a.x + m * K;
        float total = 0.f;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t o = k % 32, j = o / 8, i = o % 8;
          const uint8_t byte = q[(k / 32) * 128 + j * 32 + r * 4 + i % 4];
          total += xm[k] * static_cast<float>(i < 4 ? byte & 15 : byte >> 4) * scalar(sc[(k >> a.shift) * kTile + r]);
        }
        for (int64_t g = 0; g < groups; ++g)
          total += (scalar(zr[g * kTile + r]) - 8.f * scalar(sc[g * kTile + r])) * a.xsum[m * groups + g];
        out[m * (n1 - n0) + (n - n0) + r] = total;
      }
    }
  }
#endif
}
