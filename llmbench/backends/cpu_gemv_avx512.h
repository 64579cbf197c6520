// AVX-512 part of cpu_gemv.cpp (bf16 by vdpbf16ps, fp16 by 512-bit vcvtph2ps, several rows of x per pass over the
// weights), included inside its anonymous namespace.
#pragma once

#if defined(__AVX512F__)
// A weight row's sum in two chains that take turns every S values: step(acc, k) adds values k..k+S-1 into acc. Two
// named registers, not an array indexed by k, which GCC kept in memory (a load and a store around every multiply):
// hot in L2, one row of x against 1024 x 576 bf16 weights took 42.5 us a call on one core of the AVX-512 EPYC so,
// 18.8 us now (weights at 68 GB/s a core, 2.4x the rate).
template <int S, typename Step>
inline __m512 two_chains(int64_t K, Step&& step) {
  __m512 even = _mm512_setzero_ps(), odd = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 2 * S <= K; k += 2 * S) {
    even = step(even, k);
    odd = step(odd, k + S);
  }
  if (k < K) even = step(even, k);
  return _mm512_add_ps(even, odd);
}

// How far ahead the one-row streams (bf16_dot_stream, wide_stream) prefetch: not at all (see bf16_dot_stream).
#ifndef LLMBENCH_WIDE_ONE_ROW_AHEAD
#define LLMBENCH_WIDE_ONE_ROW_AHEAD 0
#endif
constexpr int64_t kWideOneRowAhead = LLMBENCH_WIDE_ONE_ROW_AHEAD;

// x's rows packed for block_rows_of: pass p (rows pC..pC+C-1, those past M repeating row M-1) as K/S steps of C
// vectors of S values side by side, so that the loop over k reads every row of x from one pointer at fixed offsets
// (each row's own pointer left too few general registers: GCC kept them in vector registers, a move back before
// every load). Per thread, 64-byte aligned, its buffer reused from call to call, and its rows within a call: a thread
// that takes several chunks of one call (guided scheduling) packs x once.
template <int C, int S, typename X>
const X* packed_rows(const X* x, int64_t M, int64_t K) {
  static thread_local std::vector<char> buffer;
  static thread_local std::tuple<uint64_t, const X*, int64_t, int64_t> packed{};  // (call, x, M, K) in the buffer
  const int64_t passes = (M + C - 1) / C, bytes = passes * C * K * static_cast<int64_t>(sizeof(X)) + 64;
  if (static_cast<int64_t>(buffer.size()) < bytes) buffer.resize(bytes);
  X* out = reinterpret_cast<X*>((reinterpret_cast<uintptr_t>(buffer.data()) + 63) & ~uintptr_t{63});
  const std::tuple<uint64_t, const X*, int64_t, int64_t> now{run_calls.load(std::memory_order_relaxed), x, M, K};
  if (packed == now) return out;
  packed = now;
  for (int64_t p = 0; p < passes; ++p)
    for (int i = 0; i < C; ++i) {
      const X* row = x + std::min<int64_t>(p * C + i, M - 1) * K;
      X* to = out + p * C * K + i * S;
      for (int64_t k = 0; k < K; k += S, to += C * S) std::memcpy(to, row + k, S * sizeof(X));
    }
  return out;
}

// C rows of x against blocks of R weight rows (each_block), S weights a step: load(p) reads a vector of weights or of
// x, dot(acc, w, x) adds their products into acc. Five to eight rows of x take one pass over the weights, two weight
// rows at a time against all eight (C x H accumulators, 16 at most), not two passes of four: the second pass would
// read nothing from memory to hide its multiplies (measured below, per kernel). x comes packed (packed_rows), the
// loop over k runs without the prefetch's test where a block has none to do, and 16 accumulators end in one sum16.
// On the 2-core AVX-512 EPYC, one core, weights in L2, bf16 at 8 rows multiplied 66-72 GMAC/s before (each row of
// x its own pointer, 16 reductions), 87-101 after (the vdpbf16ps peak: ~115); one step's linears from memory
// (benchmarks/kernel_builds.py, medians of per-round ratios): 8 / 5 rows bf16 0.83 / 0.84x the time with the CPUs
// apart, 1.03 / 0.99x together; fp16 0.77 / 0.78x, float32 0.90 / 0.87x together.
template <int C, int S, typename W, typename X, typename Load, typename Dot>
void block_rows_of(const X* x, int64_t M, int64_t K, const W* w, float* out, int64_t n0, int64_t n1, Load&& load,
                   Dot&& dot) {
  constexpr int64_t H = C > 4 ? 2 : R;  // weight rows per loop over k
  const X* xp = packed_rows<C, S>(x, M, K);
  each_block<C>(w, K, M, n0, n1, out, [&](const W* (&wr)[R], int64_t, int64_t, bool ahead, int64_t m0,
                                          float (&sums)[C][R]) {
      const X* xs = xp + (m0 / C) * C * K;
      for (int64_t h = 0; h < R; h += H) {
        __m512 acc[C][H];
        for (int i = 0; i < C; ++i)
          for (int64_t r = 0; r < H; ++r) acc[i][r] = _mm512_setzero_ps();
        const W* wh[H];
        for (int64_t r = 0; r < H; ++r) wh[r] = wr[h + r];
        auto pass = [&](auto prefetching) {
          const X* xk = xs;
          for (int64_t k = 0; k < K; k += S, xk += C * S) {
            if ((k * static_cast<int64_t>(sizeof(W))) % 64 == 0)  // once per cache line
              for (int64_t r = 0; r < H; ++r) {
                if constexpr (decltype(prefetching)::value) prefetch(wh[r] + D * R * K + k);
                prefetch_next_pass(wh[r] + H * K + k);  // rows H on: the next pass's
              }
            decltype(load(w)) wv[H];
#pragma GCC unroll 4
            for (int64_t r = 0; r < H; ++r) wv[r] = load(wh[r] + k);
#pragma GCC unroll 8
            for (int i = 0; i < C; ++i) {
              const auto xv = load(xk + i * S);
#pragma GCC unroll 4
              for (int64_t r = 0; r < H; ++r) acc[i][r] = dot(acc[i][r], wv[r], xv);
            }
          }
        };
        if (ahead) pass(std::true_type{}); else pass(std::false_type{});
        if constexpr (C * H == 16) {
          __m512 v[16];
#pragma GCC unroll 16
          for (int n = 0; n < 16; ++n) v[n] = acc[n / H][n % H];
          float all[16];
          _mm512_storeu_ps(all, sum16(v));
          for (int n = 0; n < 16; ++n) sums[n / H][h + n % H] = all[4 * (n % 4) + n / 4];
        } else {
          for (int i = 0; i < C; ++i)
            for (int64_t r = 0; r < H; ++r) sums[i][h + r] = _mm512_reduce_add_ps(acc[i][r]);
        }
      }
  });
}
#endif

#if defined(__AVX512BF16__)
#ifndef LLMBENCH_BF16_ROWS_PER_PASS
#define LLMBENCH_BF16_ROWS_PER_PASS 8
#endif
// bf16 weights and bf16 x, K a multiple of 32, on CPUs with AVX512_BF16: one vdpbf16ps multiplies 32 weights by 32
// x values as they are stored (each product exact in float32) and adds the pairs to 16 float32 sums, a quarter of
// the instructions of widening the weights first. Five to eight rows of x in one pass (block_rows_of;
// LLMBENCH_BF16_ROWS_PER_PASS=4: two passes of four): one step's linears at 8 rows 0.91-0.93x the time on the
// AVX-512 EPYC.
template <int C>
void bf16_dot_rows_of(const at::BFloat16* x, int64_t M, int64_t K, const at::BFloat16* w, float* out, int64_t n0,
                      int64_t n1) {
  block_rows_of<C, 32>(x, M, K, w, out, n0, n1, [](const at::BFloat16* p) { return (__m512bh)_mm512_loadu_si512(p); },
                       [](__m512 acc, __m512bh wv, __m512bh xv) { return _mm512_dpbf16_ps(acc, wv, xv); });
}

// One row of x: the weight rows one after another, each thread's share as one stream (pair_stream's form), with no
// software prefetch (kWideOneRowAhead): the hardware prefetchers alone keep up with the two chains. On the 2-core
// AVX-512 EPYC, one step's one-row linears against the previous kernels (an indexed pair of accumulators, prefetch
// 8 KB ahead; benchmarks/kernel_builds.py's builds, rounds tagged by the memory mode of a 1 GiB sum before each,
// medians of the per-round ratios): bf16 0.97 / 0.96x the time (low / high memory mode), fp16 1.00 / 0.89x, float32
// 0.94 / 0.91x. The two chains with the 8 KB prefetch were slower than before in the high mode (bf16 1.14x, float32
// 1.16x the time); 2 KB ahead, or none, took bf16 0.815x and 0.813x the time of 8 KB there. Several rows of x
// (stream_rows_of) keep the prefetch: without it 2 rows of fp16 and 4 rows of every kind took 1.2-1.6x the time.
inline void bf16_dot_stream(const at::BFloat16* x, int64_t K, const at::BFloat16* w, float* out, int64_t n0,
                            int64_t n1) {
  stream_rows<kWideOneRowAhead>(w, K, out, n0, n1, [&](const at::BFloat16* wr, auto&& ahead) {
    return _mm512_reduce_add_ps(two_chains<32>(K, [&](__m512 acc, int64_t k) {
      ahead(wr + k);
      return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(wr + k), (__m512bh)_mm512_loadu_si512(x + k));
    }));
  });
}

template <int C>
void bf16_dot_stream_rows(const at::BFloat16* x, int64_t M, int64_t K, const at::BFloat16* w, float* out, int64_t n0,
                          int64_t n1) {
  stream_rows_of<C, 32, __m512>(x, M, K, w, out, n0, n1, [](__m512(&acc)[C], const at::BFloat16* wp,
                                                    const at::BFloat16* const(&xm)[C], int64_t k) {
    const __m512bh wv = (__m512bh)_mm512_loadu_si512(wp);
#pragma GCC unroll 8
    for (int i = 0; i < C; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], wv, (__m512bh)_mm512_loadu_si512(xm[i] + k));
  });
}

void bf16_dot_rows(const at::BFloat16* x, int64_t M, int64_t K, const at::BFloat16* w, float* out, int64_t n0,
                   int64_t n1) {
  if (kOneRowStreams && M == 1) return bf16_dot_stream(x, K, w, out, n0, n1);
  if (M <= kStreamRows)
    return with_rows_per_pass(M, 4, [&](auto c) { bf16_dot_stream_rows<decltype(c)::value>(x, M, K, w, out, n0, n1); });
  with_rows_per_pass<8>(M, LLMBENCH_BF16_ROWS_PER_PASS, [&](auto c) {
    bf16_dot_rows_of<decltype(c)::value>(x, M, K, w, out, n0, n1);
  });
}
#endif

#if defined(__AVX512F__)
#ifndef LLMBENCH_WIDE_ROWS_PER_PASS
#define LLMBENCH_WIDE_ROWS_PER_PASS 8
#endif
inline __m512 widen16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 widen16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 widen16(const at::BFloat16* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// fp16 and float32 weights, K a multiple of 16, on AVX-512 CPUs: 16 weights per 512-bit register (fp16 by one
// vcvtph2ps; the generic path's 256-bit form takes 8), multiplied against float32 x; C rows of x per pass over the
// weights. One step's float32 linears of the default model on a 2-core AMX Xeon, best ms at 1 / 4 / 8 rows,
// alternating processes, 2 rounds: 256-bit (cpu_gemv_generic.h) 21.74 / 27.43 / 35.14 and 23.39 / 28.69 / 35.86,
// 512-bit 22.05 / 23.82 / 29.23 and 22.15 / 26.33 / 30.38 (one row streams from memory either way). Five to eight
// rows in one pass (block_rows_of; LLMBENCH_WIDE_ROWS_PER_PASS=4: two passes): at 8 rows on the AVX-512 EPYC
// float32 0.89x the time, fp16 0.98x (bound by its multiplies).
template <int C, typename W>
void wide_rows_of(const float* x, int64_t M, int64_t K, const W* w, float* out, int64_t n0, int64_t n1) {
  block_rows_of<C, 16>(x, M, K, w, out, n0, n1, [](const auto* p) { return widen16(p); },
                       [](__m512 acc, __m512 wv, __m512 xv) { return _mm512_fmadd_ps(wv, xv, acc); });
}

// One row of x: the weight rows one after another, each thread's share as one stream (pair_stream's form).
template <typename W>
void wide_stream(const float* x, int64_t K, const W* w, float* out, int64_t n0, int64_t n1) {
  stream_rows<kWideOneRowAhead>(w, K, out, n0, n1, [&](const W* wr, auto&& ahead) {
    return _mm512_reduce_add_ps(two_chains<16>(K, [&](__m512 acc, int64_t k) {
      if ((k * static_cast<int64_t>(sizeof(W))) % 64 == 0) ahead(wr + k);  // once per cache line
      return _mm512_fmadd_ps(widen16(wr + k), _mm512_loadu_ps(x + k), acc);
    }));
  });
}

template <int C, typename W>
void wide_stream_rows(const float* x, int64_t M, int64_t K, const W* w, float* out, int64_t n0, int64_t n1) {
  stream_rows_of<C, 16, __m512>(x, M, K, w, out, n0, n1, [](__m512(&acc)[C], const W* wp, const float* const(&xm)[C],
                                                    int64_t k) {
    const __m512 wv = widen16(wp);
#pragma GCC unroll 8
    for (int i = 0; i < C; ++i) acc[i] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xm[i] + k), acc[i]);
  });
}

template <typename W>
void wide_rows(const float* x, int64_t M, int64_t K, const W* w, float* out, int64_t n0, int64_t n1) {
  if (kOneRowStreams && M == 1) return wide_stream(x, K, w, out, n0, n1);
  if (M <= (std::is_same_v<W, at::Half> ? kHalfStreamRows : kStreamRows))
    return with_rows_per_pass(M, 4, [&](auto c) { wide_stream_rows<decltype(c)::value>(x, M, K, w, out, n0, n1); });
  with_rows_per_pass<8>(M, LLMBENCH_WIDE_ROWS_PER_PASS, [&](auto c) {
    wide_rows_of<decltype(c)::value>(x, M, K, w, out, n0, n1);
  });
}
#endif
