// AMX part of cpu_gemv.cpp (bf16 weights, bf16 x, several rows of x), included inside its anonymous namespace.
//
// With several rows of x the vdpbf16ps kernel runs out of arithmetic before it runs out of memory bandwidth (8 rows
// of x on a 2-core AMX Xeon: 13 GB/s). AMX tiles do the arithmetic of 16 weight rows by 32 inputs by up to 16 rows
// of x in one instruction, so the same pass over the weights streams them at the one-row rate. The weights are read
// as stored (no repacking): a tile of 16 weight rows x 32 inputs is the A operand, x is the B operand, transposed
// once per call into AMX's pair layout, and the 16 x M product tile is the output transposed.
#pragma once

// The tiles serve only where linear_dense takes its bf16 path (AVX512_BF16): a build without AVX-512 on an AMX CPU
// (LLMBENCH_CPU_KERNEL_FLAGS=-mno-avx512f) has no AMX path either, so amx_max_rows() never promises one.
#if defined(__AVX512BF16__) && defined(__AMX_BF16__) && defined(__AMX_TILE__)
#define LLMBENCH_AMX 1
#endif

#if defined(LLMBENCH_AMX)
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdlib>

constexpr int64_t kAmxRows = 16;      // weight rows per tile, and rows of x per pass
constexpr int64_t kAmxMaxRows = 64;  // rows of x the AMX path takes (prefills of short prompts included)

// Whether Linux lets this process use AMX tile data (asked once; refused on kernels before 5.16 or by policy).
bool amx_permitted() {
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
  }();
  return ok;
}

// The fewest rows of x whose bf16 linears run on AMX tiles: LLMBENCH_AMX_MIN_ROWS (1-8, or 0: never; checked by
// compile_settings.amx_min_rows_env before the kernels load), else 3 (AMX_DEFAULT_MIN_ROWS there, with the
// measurements behind it); 0 where the process may not use AMX.
int64_t amx_min_rows() {
  static const int64_t rows = [] {
    const char* forced = std::getenv("LLMBENCH_AMX_MIN_ROWS");
    const int64_t wanted = forced && *forced ? std::atoll(forced) : 3;
    return amx_permitted() ? wanted : 0;
  }();
  return rows;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: sums (16 weight rows x M rows of x, float32); 4 and 5: weights (16 rows x 32 bf16, by turns); 6: x
// (16 pairs of inputs x M rows of x).
void configure_tiles(int64_t M) {
  TileConfig cfg;
  for (int t = 0; t < 7; ++t) {
    cfg.rows[t] = 16;
    cfg.bytes_per_row[t] = t == 4 || t == 5 ? 64 : 4 * M;
  }
  _tile_loadconfig(&cfg);
}

// T tiles of weight rows from row n (16 T rows) against every row of x: sums (16 T, M) into c.
template <int T>
void amx_tiles(const uint32_t* xp, int64_t M, int64_t K, const at::BFloat16* w, float* c) {
  _tile_zero(0);
  if (T > 1) _tile_zero(1);
  if (T > 2) _tile_zero(2);
  if (T > 3) _tile_zero(3);
  const int64_t ld = 2 * K;  // bytes from one weight row to the next
  for (int64_t k = 0; k < K; k += 32) {
    _tile_loadd(6, xp + k / 2 * M, 4 * M);
    _tile_loadd(4, w + k, ld);
    _tile_dpbf16ps(0, 4, 6);
    if (T > 1) { _tile_loadd(5, w + 16 * K + k, ld); _tile_dpbf16ps(1, 5, 6); }
    if (T > 2) { _tile_loadd(4, w + 32 * K + k, ld); _tile_dpbf16ps(2, 4, 6); }
    if (T > 3) { _tile_loadd(5, w + 48 * K + k, ld); _tile_dpbf16ps(3, 5, 6); }
  }
  _tile_stored(0, c, 4 * M);
  if (T > 1) _tile_stored(1, c + 16 * M, 4 * M);
  if (T > 2) _tile_stored(2, c + 32 * M, 4 * M);
  if (T > 3) _tile_stored(3, c + 48 * M, 4 * M);
}

// Weight rows [n0, n1) (a multiple of 16 apart) against x in pair layout, in groups of C rows of x (the last one
// zero-padded where M > C): out (M, n1 - n0). A block of up to 64 weight rows is read from memory for the first group
// and from cache for the others.
void amx_rows(const uint32_t* xp, int64_t M, int64_t C, int64_t K, const at::BFloat16* w, float* out, int64_t n0,
              int64_t n1) {
  configure_tiles(C);  // tile state is per thread
  float c[4 * kAmxRows * kAmxRows];
  for (int64_t n = n0; n < n1;) {
    const int64_t tiles = std::min<int64_t>(4, (n1 - n) / kAmxRows);
    const at::BFloat16* wn = w + n * K;
    for (int64_t m0 = 0; m0 < M; m0 += C) {
      const uint32_t* xg = xp + m0 * K / 2;
      switch (tiles) {
        case 4: amx_tiles<4>(xg, C, K, wn, c); break;
        case 3: amx_tiles<3>(xg, C, K, wn, c); break;
        case 2: amx_tiles<2>(xg, C, K, wn, c); break;
        default: amx_tiles<1>(xg, C, K, wn, c); break;
      }
      for (int64_t m = m0; m < std::min(M, m0 + C); ++m)
        for (int64_t i = 0; i < tiles * kAmxRows; ++i) out[m * (n1 - n0) + (n - n0) + i] = c[i * C + m - m0];
    }
    n += tiles * kAmxRows;
  }
  _tile_release();  // leaves no configuration behind for oneDNN's AMX kernels in this thread
}

// x (M, K) bf16 as AMX's B operand, in groups of C rows (-> C: M itself up to 16, else 16 with the last group
// zero-padded): per group, pairs of inputs (one 32-bit lane) for each of its rows, input pair by input pair.
std::vector<uint32_t> amx_pairs(const at::BFloat16* x, int64_t M, int64_t K, int64_t& C) {
  C = std::min<int64_t>(M, kAmxRows);
  const uint32_t* x32 = reinterpret_cast<const uint32_t*>(x);
  std::vector<uint32_t> xp((M + C - 1) / C * C * K / 2, 0u);
  for (int64_t m = 0; m < M; ++m) {
    uint32_t* group = xp.data() + m / C * C * K / 2;
    for (int64_t j = 0; j < K / 2; ++j) group[j * C + m % C] = x32[m * (K / 2) + j];
  }
  return xp;
}
#endif

// -> the fewest rows of x from which bf16 linears use AMX tiles; 0 where they do not (no AMX in this build, the
// process may not use it, or LLMBENCH_AMX_MIN_ROWS=0).
int64_t amx_rows_from() {
#if defined(LLMBENCH_AMX)
  return amx_min_rows();
#else
  return 0;
#endif
}

// -> the most rows of x bf16 linears take on AMX tiles (0 where they do not use them).
int64_t amx_max_rows() {
#if defined(LLMBENCH_AMX)
  return amx_min_rows() ? kAmxMaxRows : 0;
#else
  return 0;
#endif
}
