// Generic part of cpu_gemv.cpp (GCC vector extensions: AVX2 code on AVX2 CPUs, 8 floats a register), included inside
// its anonymous namespace: float32, fp16 and bf16 weights widened to float32, and int8 where no integer path fits.
//
// C rows of x per pass over a block of weight rows: each weight vector is loaded and widened once for all C of them,
// and C x R chains of FMAs are in flight. One decode step's linears of the default model, AMX Xeon built as AVX2
// code (LLMBENCH_CPU_KERNEL_FLAGS="-mno-avx512f -mno-avxvnni"), best ms at 4 / 8 rows, one and then two rounds:
// bf16 1 row per pass 20.7 / 33.4 and 20.3 / 32.2, 2 rows 18.8 / 28.9, 4 rows 18.6 / 27.4; fp16 (F16C) 1 row
// 24.5 / 38.5, 2 rows 25.0 / 41.2, 4 rows 20.7 / 34.2; fp32 1 row 30.4 / 41.7, 2 rows 27.8 / 35.8, 4 rows 28.1 / 38.1
// (one-row steps unchanged). So 4 rows per pass where weights are widened, 2 for float32 (free to widen; 2 x 4
// chains and their loads). LLMBENCH_GENERIC_ROWS_PER_PASS (1, 2 or 4) sets both, for such measurements.
#pragma once

#ifdef LLMBENCH_GENERIC_ROWS_PER_PASS
template <typename W>
constexpr int kGenericRows = LLMBENCH_GENERIC_ROWS_PER_PASS;
#else
template <typename W>
constexpr int kGenericRows = std::is_same_v<W, float> ? 2 : 4;
#endif

// Dense weights (float32, fp16, bf16 rows whose size is not a multiple of 16) against C rows of x; int8 ones with
// `groups` float scales per row (scale != nullptr; group size a multiple of 8), one row of x per pass.
template <int C, typename W>
void dense_rows_of(const float* x, int64_t M, int64_t K, const W* w, const float* scale, int64_t groups,
                   float* out, int64_t n0, int64_t n1) {
  const int64_t gs = K / groups;
  each_block<C>(w, K, M, n0, n1, out, [&](const W* (&wr)[R], int64_t n, int64_t rows, bool ahead, int64_t m0,
                                          float (&sums)[C][R]) {
      const float* xm[C];
      for (int i = 0; i < C; ++i) xm[i] = x + std::min<int64_t>(m0 + i, M - 1) * K;
      v8f a[C][R] = {};
      for (int64_t g = 0; g < groups; ++g) {
        v8f t[C][R] = {};
        for (int64_t k = g * gs; k < (g + 1) * gs; k += 8) {
          if (ahead && (k * static_cast<int64_t>(sizeof(W))) % 64 == 0) {  // once per cache line
            for (int64_t r = 0; r < R; ++r) prefetch(wr[r] + D * R * K + k);
          }
#pragma GCC unroll 4
          for (int64_t r = 0; r < R; ++r) {
            const v8f wv = widen(wr[r] + k);
#pragma GCC unroll 4
            for (int i = 0; i < C; ++i) t[i][r] += load_f32(xm[i] + k) * wv;
          }
        }
        for (int i = 0; i < C; ++i)
          for (int64_t r = 0; r < R; ++r) {
            if (scale) a[i][r] += t[i][r] * scale[(n + std::min<int64_t>(r, rows - 1)) * groups + g];
            else a[i][r] += t[i][r];
          }
      }
      for (int i = 0; i < C; ++i)
        for (int64_t r = 0; r < R; ++r) sums[i][r] = hsum(a[i][r]);
  });
}

template <typename W>
void dense_rows(const float* x, int64_t M, int64_t K, const W* w, const float* scale, int64_t groups,
                float* out, int64_t n0, int64_t n1) {
  with_rows_per_pass(M, scale ? 1 : kGenericRows<W>, [&](auto c) {
    dense_rows_of<decltype(c)::value>(x, M, K, w, scale, groups, out, n0, n1);
  });
}

// 16 weights from one 32-byte load, widened to two vectors of eight: bf16 as eight 32-bit lanes, each holding an
// even-indexed weight in its low half and the next (odd) one in its high half (a shift and a mask widen both; x comes
// deinterleaved per 16: the 8 even-indexed, then the 8 odd-indexed values); fp16 as its two halves (F16C), x in order.
// fp16 through this path rather than 8 a step (dense_rows), one step's linears of the default model, AVX2 code on a
// 2-core AVX-512 EPYC, alternating processes, GB/s streamed: 1 row 27.0 / 28.2 / 28.6 against 23.7 / 23.3 / 23.8
// (bf16's rate), 4 rows 19.8 / 20.1 against 17.2 / 16.2.
inline void widen_pair(const at::BFloat16* p, v8f& first, v8f& second) {
  const v8u high = {0xFFFF0000u, 0xFFFF0000u, 0xFFFF0000u, 0xFFFF0000u,
                    0xFFFF0000u, 0xFFFF0000u, 0xFFFF0000u, 0xFFFF0000u};
  const v8u l = load_u32(p);
  first = (v8f)(l << 16);
  second = (v8f)(l & high);
}
inline void widen_pair(const at::Half* p, v8f& first, v8f& second) {
  first = widen(p);
  second = widen(p + 8);
}

// bf16 and fp16 weights, K a multiple of 16, 16 per step of the loop (widen_pair) against C rows of x.
template <int C, typename W>
void pair_rows_of(const float* x, int64_t M, int64_t K, const W* w, float* out, int64_t n0, int64_t n1) {
  each_block<C>(w, K, M, n0, n1, out, [&](const W* (&wr)[R], int64_t, int64_t, bool ahead, int64_t m0,
                                          float (&sums)[C][R]) {
      const float* xm[C];
      for (int i = 0; i < C; ++i) xm[i] = x + std::min<int64_t>(m0 + i, M - 1) * K;
      constexpr int S = C == 1 ? 2 : 1;  // chains per sum: one row keeps the two halves apart (8 chains, not 4)
      v8f a[C][R][S] = {};
      for (int64_t k = 0; k < K; k += 16) {
        if (ahead && k % 32 == 0) {
          for (int64_t r = 0; r < R; ++r) prefetch(wr[r] + D * R * K + k);
        }
#pragma GCC unroll 4
        for (int64_t r = 0; r < R; ++r) {
          v8f first, second;
          widen_pair(wr[r] + k, first, second);
#pragma GCC unroll 4
          for (int i = 0; i < C; ++i) {
            a[i][r][0] += load_f32(xm[i] + k) * first;
            a[i][r][S - 1] += load_f32(xm[i] + k + 8) * second;
          }
        }
      }
      for (int i = 0; i < C; ++i)
        for (int64_t r = 0; r < R; ++r) sums[i][r] = hsum(S == 1 ? a[i][r][0] : a[i][r][0] + a[i][r][S - 1]);
  });
}

// One row of x against bf16 or fp16 weights (K a multiple of 16) where kOneRowStreams (AMD CPUs, whose builds also
// give each thread one even share of a call): the weight rows one after another, so that each thread reads its
// share as one stream (the hardware prefetchers follow it; four rows read side by side stream only with software
// prefetch), prefetching kStreamAhead bytes on in it. Against four rows side by side in guided chunks
// (pair_rows_of), AVX2 code on a 2-core AVX-512 EPYC, bf16 (2026-12-06): one step's linears 98-105% of a 1 GiB
// sum's rate in the same process against 87-91% (o_proj's 576 x 576 call 24-25 against 31-32 us); whole compiled
// greedy runs, alternating processes, bf16 0.78-1.02x the next-token time (4 pairs), fp16 0.89-1.00x. Without the
// prefetch the runs were slower (1.05-1.15x), and with guided chunks no faster (1.0-1.05x).
// 8 KB ahead in 512-bit builds (whose one-row kernels now prefetch nothing: cpu_gemv_avx512.h's kWideOneRowAhead),
// 4 KB in others. On that EPYC, 8 KB against 4 KB: one step's bf16 linears
// (vdpbf16ps) in one process (benchmarks/kernel_builds.py, median of 21-31 rounds' ratios) 0.871 / 0.867 / 0.862 the
// time (6 KB 0.85 / 0.95, 12 KB 1.01 / 1.00, 16 KB 0.89, 2 KB 1.25); whole compiled greedy bf16 steps, the distance
// switched between generations of one process (16 rounds), 0.887 (6 KB against 8 KB 0.993, 16 KB 1.028). AVX2 code
// (pair_stream): linears 1.02, whole steps 0.944 / 1.029, so it keeps 4 KB. (cpu_kernels.py --step, two models in one
// process, saw no change: docs/measured.md.)
#ifndef LLMBENCH_STREAM_AHEAD
#ifdef __AVX512F__
#define LLMBENCH_STREAM_AHEAD 8192
#else
#define LLMBENCH_STREAM_AHEAD 4096
#endif
#endif
constexpr int64_t kStreamAhead = LLMBENCH_STREAM_AHEAD;

// out[n - n0] = row(wr, ahead) for weight rows n0..n1, one after another; ahead(p) prefetches Ahead bytes past p
// while that stays inside the rows being read (none where Ahead is 0).
template <int64_t Ahead = kStreamAhead, typename W, typename Row>
inline void stream_rows(const W* w, int64_t K, float* out, int64_t n0, int64_t n1, Row&& row) {
  const char* end = reinterpret_cast<const char*>(w + n1 * K);
  auto ahead = [end](const W* p) {
    const char* q = reinterpret_cast<const char*>(p) + Ahead;
    if (Ahead > 0 && q < end) prefetch(q);
  };
  for (int64_t n = n0; n < n1; ++n) out[n - n0] = row(w + n * K, ahead);
}

struct PairSums {  // two chains per row of x: 16 weights a step in 8-wide vectors
  v8f first, second;
};
inline float total(const PairSums& s) { return hsum(s.first + s.second); }
#if defined(__AVX512F__)
inline float total(__m512 v) { return _mm512_reduce_add_ps(v); }
#endif

// C rows of x (M of them real) against the weight rows read one after another, each thread's share one stream as
// for one row: each weight vector of S values loaded once and multiplied into every row's sums (A: one accumulator
// per row of x, total() its sum) by step(acc, wr + k, xm, k). Against four weight rows side by side (each_block), on
// the 2-core AVX-512 EPYC, one step's linears in 512-bit code (benchmarks/kernel_builds.py, medians of 11 rounds'
// ratios) took 0.93-0.94x the time at 2 rows (bf16, fp16; float32 0.99x), 0.92-0.95x at 3-4 (float32 0.98x), but
// 1.02 / 1.06 / 1.10x at 8 (bf16 / fp16 / float32: a weight vector's loads of x outnumber its multiplies there):
// kStreamRows rows at most (fp16: kHalfStreamRows, 2 from AMD family 26, where 3-4 rows as streams took 1.36-1.40x
// the time of blocks: cpu_kernels.half_stream_rows).
template <int C, int S, typename A, typename W, typename X, typename Step>
void stream_rows_of(const X* x, int64_t M, int64_t K, const W* w, float* out, int64_t n0, int64_t n1, Step&& step) {
  const X* xm[C];
  for (int i = 0; i < C; ++i) xm[i] = x + std::min<int64_t>(i, M - 1) * K;
  const int64_t width = n1 - n0, real = std::min<int64_t>(C, M);
  stream_rows(w, K, out, n0, n1, [&](const W* wr, auto&& ahead) {
    A acc[C] = {};
    for (int64_t k = 0; k < K; k += S) {
      if ((k * static_cast<int64_t>(sizeof(W))) % 64 == 0) ahead(wr + k);  // once per cache line
      step(acc, wr + k, xm, k);
    }
    const int64_t at = (wr - w) / K - n0;
    for (int64_t i = 1; i < real; ++i) out[i * width + at] = total(acc[i]);
    return total(acc[0]);
  });
}

// 2-4 rows of x against bf16 or fp16 weights (K a multiple of 16) as streams (stream_rows_of), 16 weights a step.
template <int C, typename W>
void pair_stream_rows(const float* x, int64_t M, int64_t K, const W* w, float* out, int64_t n0, int64_t n1) {
  stream_rows_of<C, 16, PairSums>(x, M, K, w, out, n0, n1, [](PairSums (&acc)[C], const W* wp,
                                                              const float* const (&xm)[C], int64_t k) {
    v8f first, second;
    widen_pair(wp, first, second);
#pragma GCC unroll 4
    for (int i = 0; i < C; ++i) {
      acc[i].first += load_f32(xm[i] + k) * first;
      acc[i].second += load_f32(xm[i] + k + 8) * second;
    }
  });
}

template <typename W>
void pair_stream(const float* x, int64_t K, const W* w, float* out, int64_t n0, int64_t n1) {
  stream_rows(w, K, out, n0, n1, [&](const W* wr, auto&& ahead) {
    v8f a[4] = {};  // two 16-weight steps a line: four chains
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      ahead(wr + k);
      v8f f[4];
      widen_pair(wr + k, f[0], f[1]);
      widen_pair(wr + k + 16, f[2], f[3]);
      for (int j = 0; j < 4; ++j) a[j] += load_f32(x + k + 8 * j) * f[j];
    }
    if (k < K) {  // K = 16 mod 32
      v8f f[2];
      widen_pair(wr + k, f[0], f[1]);
      for (int j = 0; j < 2; ++j) a[j] += load_f32(x + k + 8 * j) * f[j];
    }
    return hsum((a[0] + a[1]) + (a[2] + a[3]));
  });
}

template <typename W>
void pair_rows(const float* x, int64_t M, int64_t K, const W* w, float* out, int64_t n0, int64_t n1) {
  if (kOneRowStreams && M == 1) return pair_stream(x, K, w, out, n0, n1);
  if (M <= kStreamRows)
    return with_rows_per_pass(M, 4, [&](auto c) { pair_stream_rows<decltype(c)::value>(x, M, K, w, out, n0, n1); });
  with_rows_per_pass(M, kGenericRows<W>, [&](auto c) {
    pair_rows_of<decltype(c)::value>(x, M, K, w, out, n0, n1);
  });
}
