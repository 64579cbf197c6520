// Weight-streaming linear layers for decode steps on CPUs: y = x @ W.T + b for a few rows of x
// (batch x beams <= 8; INT4 and INT8 any number, for prompts: a few at a time over each weight tile or block while
// it is in cache), reading every weight once from memory. Built at run time for the host's own instruction set
// (-march=native: AVX2, AVX-512, ...) by llmbench/backends/cpu_kernels.py and called from inside the compiled
// decode step as torch ops (llmbench_cpu::*).
//
// Threads take contiguous shares of weight rows (decode steps' calls in even shares, larger ones in guided chunks:
// cpu_gemv_run.h's run) in blocks of four; for every row of x a block keeps one vector accumulator per
// weight row (four independent chains) and prefetches the rows ahead, so the loop is bound by memory (on AMD CPUs
// one row of x reads the rows one after another instead, each thread's share as one stream: cpu_gemv_generic.h's
// pair_stream).
// Weights are widened to float32 in registers without shuffles: fp32 as stored; bf16 two per 32-bit lane (shift
// and mask, against x deinterleaved once per call), or multiplied as stored by vdpbf16ps (AVX512_BF16,
// cpu_gemv_avx512.h), or, for 3 rows of x or more, by AMX tiles (cpu_gemv_amx.h); fp16 by F16C, 16 a step from
// one 32-byte load as bf16; on AVX-512 fp16 and float32 16 at a time. int8 (cpu_gemv_int8.h)
// as stored, integer dot products against x quantized to int8 per 32 values, with a float scale per row or group;
// int4 (cpu_gemv_int4.h) in tiles of eight rows (16 on AVX-512 VNNI) whose lanes are the rows, integer dot products
// against x quantized the same way, with a scale and zero per group of each row ahead of the tile's weights. Every
// kernel takes several rows of x per pass over the weights (cpu_gemv_generic.h: the widening ones). Accumulation is
// in float32; x is read once (into a float32 buffer where the kernel widens) and the output is written in x's dtype,
// with no other tensor operations.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <torch/library.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>
#include <atomic>
#include <chrono>
#include <type_traits>

namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8u16 __attribute__((vector_size(16)));
typedef int8_t v8i8 __attribute__((vector_size(8)));
typedef _Float16 v8h __attribute__((vector_size(16)));

constexpr int64_t R = 4;         // weight rows per block
constexpr int64_t kMaxRows = 8;  // rows of x the dense kernels take in one pass over a block of weight rows
constexpr int64_t kDenseMaxRows = 64;  // rows of a dense call (steps' <= 32, prompts'): passes of kMaxRows
constexpr int64_t kAnyRows = INT64_MAX;  // INT4 and INT8 take any number of rows (prompts: the weights read once)
std::atomic<uint64_t> run_calls{0};  // run()'s calls so far: per-call work a thread may keep for its next chunk
#ifndef LLMBENCH_PREFETCH_BLOCKS
#define LLMBENCH_PREFETCH_BLOCKS 4
#endif
constexpr int64_t D = LLMBENCH_PREFETCH_BLOCKS;  // blocks ahead whose rows are prefetched
// How threads share a call and read one row of x's weights, per CPU vendor (cpu_kernels.schedule): calls of up to
// this many rows of x in even shares, one per thread (else guided chunks, see run); with kOneRowStreams, one row of
// x against 16-bit or 512-bit-widened weights reads the rows one after another (pair_stream), not four side by side.
#ifndef LLMBENCH_EVEN_SPLIT_ROWS
#define LLMBENCH_EVEN_SPLIT_ROWS 0
#endif
#ifndef LLMBENCH_ONE_ROW_STREAMS
#define LLMBENCH_ONE_ROW_STREAMS 0
#endif
constexpr int64_t kEvenSplitRows = LLMBENCH_EVEN_SPLIT_ROWS;
constexpr bool kOneRowStreams = LLMBENCH_ONE_ROW_STREAMS;
#ifndef LLMBENCH_STREAM_ROWS  // up to this many rows of x as streams too (stream_rows_of); 0: none
#define LLMBENCH_STREAM_ROWS (LLMBENCH_ONE_ROW_STREAMS ? 4 : 0)
#endif
constexpr int64_t kStreamRows = LLMBENCH_STREAM_ROWS;
#ifndef LLMBENCH_HALF_STREAM_ROWS  // the same for the 512-bit fp16 kernel (cpu_gemv_avx512.h's wide_rows)
#define LLMBENCH_HALF_STREAM_ROWS LLMBENCH_STREAM_ROWS
#endif
constexpr int64_t kHalfStreamRows = LLMBENCH_HALF_STREAM_ROWS;

inline v8f load_f32(const float* p) { v8f v; std::memcpy(&v, p, sizeof v); return v; }
inline v8u load_u32(const void* p) { v8u v; std::memcpy(&v, p, sizeof v); return v; }
inline float hsum(v8f v) {
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += v[i];
  return s;
}
#ifndef LLMBENCH_PREFETCH_LOCALITY  // weight rows; INT4 tiles have their own hint (cpu_kernels.prefetch_flags)
#define LLMBENCH_PREFETCH_LOCALITY 0
#endif
inline void prefetch(const void* p) { __builtin_prefetch(p, 0, LLMBENCH_PREFETCH_LOCALITY); }
#ifndef LLMBENCH_TILE_PREFETCH_LOCALITY
#define LLMBENCH_TILE_PREFETCH_LOCALITY LLMBENCH_PREFETCH_LOCALITY
#endif
inline void prefetch_tile(const void* p) { __builtin_prefetch(p, 0, LLMBENCH_TILE_PREFETCH_LOCALITY); }
// Whether the 512-bit block kernel (block_rows_of, 5-8 rows of x on AMD builds) also brings the weight rows of its
// next pass into L1 while it reads this pass's, a line for a line (cpu_kernels.prefetch_hint): the far prefetch (D
// blocks ahead, t2 on AMD) fills the outer levels only, and at 8 rows the multiplies no longer hide the wait.
#ifndef LLMBENCH_NEXT_PASS_PREFETCH
#define LLMBENCH_NEXT_PASS_PREFETCH 0
#endif
inline void prefetch_next_pass(const void* p) {
  if constexpr (LLMBENCH_NEXT_PASS_PREFETCH != 0) __builtin_prefetch(p, 0, 3);
}

// 8 weights widened to float32 (generic path: fp32, fp16, int8, and bf16 rows whose size is not a multiple of 16)
inline v8f widen(const float* p) { return load_f32(p); }
inline v8f widen(const at::BFloat16* p) {
#ifdef __AVX2__  // one widening move (the generic conversion compiled to two halves and an insert)
  return (v8f)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
#else
  v8u16 u; std::memcpy(&u, p, sizeof u);
  return (v8f)(__builtin_convertvector(u, v8u) << 16);
#endif
}
inline v8f widen(const at::Half* p) {
#ifdef __F16C__
  return (v8f)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  v8h h; std::memcpy(&h, p, sizeof h); return __builtin_convertvector(h, v8f);
#endif
}
inline v8f widen(const int8_t* p) {
#ifdef __AVX2__
  return (v8f)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  v8i8 b; std::memcpy(&b, p, sizeof b); return __builtin_convertvector(__builtin_convertvector(b, v8i), v8f);
#endif
}

// The weight rows of block n (the last block repeats its last row so that every block has R rows to read).
template <typename W>
inline void block_rows(const W* w, int64_t stride, int64_t n, int64_t rows, const W* (&wr)[R]) {
  for (int64_t r = 0; r < R; ++r) wr[r] = w + (n + std::min(r, rows - 1)) * stride;
}

// Every block of R weight rows in [n0, n1) (rows `stride` elements apart) against every row of x, C rows of x per
// pass: body(wr, n, rows, ahead, m0, sums) puts the block's dot products with rows m0..m0+C-1 of x into sums[C][R]
// (rows past M repeat row M-1; their sums are dropped), which land in out (M, n1 - n0). With C > 1 a body loads each
// weight vector once for C rows of x (beams, batches) instead of once per row. `ahead`: the rows D blocks on exist,
// to be prefetched (first pass only).
template <int C = 1, typename W, typename Body>
inline void each_block(const W* w, int64_t stride, int64_t M, int64_t n0, int64_t n1, float* out, Body&& body) {
  for (int64_t n = n0; n < n1; n += R) {
    const int64_t rows = std::min(R, n1 - n);
    const W* wr[R];
    block_rows(w, stride, n, rows, wr);
    const bool ahead = n + D * R < n1;
    for (int64_t m0 = 0; m0 < M; m0 += C) {
      float sums[C][R];
      body(wr, n, rows, ahead && m0 == 0, m0, sums);
      for (int64_t i = 0; i < std::min<int64_t>(C, M - m0); ++i)
        for (int64_t r = 0; r < rows; ++r) out[(m0 + i) * (n1 - n0) + (n - n0) + r] = sums[i][r];
    }
  }
}

// Calls f(std::integral_constant<int, C>) with C the rows of x per pass for M rows: 1 for one row, else the
// smallest power of two up to `most` (as many accumulators as the registers hold) that covers M; 8 only where the
// kernel is written for it (Most).
template <int Most = 4, typename F>
inline void with_rows_per_pass(int64_t M, int most, F&& f) {
  if (M == 1 || most == 1) return f(std::integral_constant<int, 1>{});
  if (M == 2 || most == 2) return f(std::integral_constant<int, 2>{});
  if constexpr (Most >= 8) {
    if (M > 4 && most >= 8) return f(std::integral_constant<int, 8>{});
  }
  return f(std::integral_constant<int, 4>{});
}

#include "cpu_gemv_vec.h"  // Vec, vexp (run's SiLU; beam search's softmax) and sum16
#include "cpu_gemv_generic.h"
#include "cpu_gemv_avx512.h"
#include "cpu_gemv_int4.h"
#include "cpu_gemv_amx.h"

// x as float32 rows (M, K), read once; with `deinterleave`, each 16 values as their 8 even-, then 8 odd-indexed.
template <typename T>
void read_rows(const T* src, int64_t n, bool deinterleave, float* dst) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t j = deinterleave ? (i / 16) * 16 + (i % 2) * 8 + (i % 16) / 2 : i;
    dst[j] = static_cast<float>(src[i]);
  }
}

struct Rows {
  std::vector<float> x;  // (M, K) float32
  int64_t M;
};

// x contiguous, checked against the weight's input size K; -> its number of rows (at most `most`)
int64_t checked_rows(const at::Tensor& x, int64_t K, const char* op, int64_t most = kMaxRows) {
  TORCH_CHECK(x.size(-1) == K, op, ": input size ", x.size(-1), " != weight input size ", K);
  TORCH_CHECK(K % 8 == 0, op, ": input size must be a multiple of 8, got ", K);
  const int64_t M = x.numel() / K;
  TORCH_CHECK(M <= most, op, ": at most ", most, " rows, got ", M);
  return M;
}

Rows rows_of(const at::Tensor& input, int64_t K, bool deinterleave, const char* op, int64_t most = kMaxRows) {
  const at::Tensor x = input.contiguous();
  const int64_t M = checked_rows(x, K, op, most);
  Rows rows{std::vector<float>(M * K), M};
  switch (x.scalar_type()) {
    case at::kFloat: read_rows(x.data_ptr<float>(), M * K, deinterleave, rows.x.data()); break;
    case at::kBFloat16: read_rows(x.data_ptr<at::BFloat16>(), M * K, deinterleave, rows.x.data()); break;
    case at::kHalf: read_rows(x.data_ptr<at::Half>(), M * K, deinterleave, rows.x.data()); break;
    default: TORCH_CHECK(false, op, ": input must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return rows;
}

#include "cpu_gemv_run.h"

at::Tensor linear_dense(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                        int64_t act) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "linear_dense: weight must be 2-D and contiguous");
  const int64_t N = weight.size(0), K = weight.size(1);
#if defined(__AVX512BF16__)
  if (weight.scalar_type() == at::kBFloat16 && x.scalar_type() == at::kBFloat16 && K % 32 == 0) {
    const at::Tensor xc = x.contiguous();
    const at::BFloat16* w = weight.data_ptr<at::BFloat16>();
#if defined(LLMBENCH_AMX)
    const int64_t amx_from = amx_min_rows(), rows = x.numel() / std::max<int64_t>(K, 1);
    if (amx_from && rows >= amx_from && N % ((act ? 2 : 1) * kAmxRows) == 0) {  // act 1: halves of whole tiles
      const int64_t M = checked_rows(xc, K, "linear_dense", kAmxMaxRows);
      int64_t C = 0;
      const std::vector<uint32_t> xp = amx_pairs(xc.data_ptr<at::BFloat16>(), M, K, C);
      const uint32_t* pairs = xp.data();
      return run(x, M, N, bias, act, [=](float* o, int64_t n0, int64_t n1) { amx_rows(pairs, M, C, K, w, o, n0, n1); },
                 kAmxRows);
    }
#endif
    const int64_t M = checked_rows(xc, K, "linear_dense", kDenseMaxRows);
    const at::BFloat16* xb = xc.data_ptr<at::BFloat16>();
    return run(x, M, N, bias, act, [=](float* o, int64_t n0, int64_t n1) { bf16_dot_rows(xb, M, K, w, o, n0, n1); });
  }
#endif
  const bool sixteen = K % 16 == 0;  // weights 16 a step (wide_rows, pair_rows; bf16's x deinterleaved)
  const Rows rows = rows_of(x, K, sixteen && weight.scalar_type() == at::kBFloat16, "linear_dense", kDenseMaxRows);
  const float* xr = rows.x.data();
  const int64_t M = rows.M;
  auto body = [&](auto* w) {
    return run(x, M, N, bias, act,
               [=](float* o, int64_t n0, int64_t n1) { dense_rows(xr, M, K, w, nullptr, 1, o, n0, n1); });
  };
#if defined(__AVX512F__)
  auto wide = [&](auto* w) {
    return run(x, M, N, bias, act, [=](float* o, int64_t n0, int64_t n1) { wide_rows(xr, M, K, w, o, n0, n1); });
  };
  if (sixteen && weight.scalar_type() == at::kFloat) return wide(weight.data_ptr<float>());
  if (sixteen && weight.scalar_type() == at::kHalf) return wide(weight.data_ptr<at::Half>());
#endif
  auto paired = [&](auto* w) {
    return run(x, M, N, bias, act, [=](float* o, int64_t n0, int64_t n1) { pair_rows(xr, M, K, w, o, n0, n1); });
  };
  auto sixteen_bit = [&](auto* w) { return sixteen ? paired(w) : body(w); };
  switch (weight.scalar_type()) {
    case at::kFloat: return body(weight.data_ptr<float>());
    case at::kHalf: return sixteen_bit(weight.data_ptr<at::Half>());
    case at::kBFloat16: return sixteen_bit(weight.data_ptr<at::BFloat16>());
    default:
      TORCH_CHECK(false, "linear_dense: weights must be float32, bfloat16 or float16, got ", weight.scalar_type());
  }
}

#include "cpu_gemv_int8.h"

at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& packed, int64_t group_size, int64_t value_bytes,
                       const c10::optional<at::Tensor>& bias, int64_t act) {
  TORCH_CHECK(packed.dim() == 2 && packed.is_contiguous() && packed.scalar_type() == at::kByte,
              "linear_int4: packed weight must be contiguous 2-D uint8");
  TORCH_CHECK(group_size >= 32 && (group_size & (group_size - 1)) == 0,
              "linear_int4: group size must be a power of two, at least 32");
  const int64_t N = packed.size(0), stride = packed.size(1), K = x.size(-1), groups = K / group_size;
  TORCH_CHECK(K % group_size == 0, "linear_int4: the input size must be a multiple of the group size");
  TORCH_CHECK(N % kTile == 0, "linear_int4: the output size must be a multiple of ", kTile, ", got ", N);
  TORCH_CHECK(value_bytes == 2 || value_bytes == 4, "linear_int4: scales and zeros are bfloat16 (2 bytes) or ",
              "float32 (4 bytes), not ", value_bytes, " bytes");
  const int64_t meta = (2 * groups * value_bytes + 31) / 32 * 32;  // the row's scales and zeros, padded
  TORCH_CHECK(stride == meta + K / 2, "linear_int4: a packed row of ", stride, " bytes is not ", K / 2,
              " weight bytes after ", meta, " bytes of scales and zeros of ", groups, " groups");
  const Rows rows = rows_of(x, K, false, "linear_int4", kAnyRows);
  const int64_t M = rows.M;
  const int64_t padded = M > kMaxRows ? (M + kMaxRows - 1) / kMaxRows * kMaxRows : 0;  // int4_tiles_of's passes
  const QuantizedRows xq = quantize_rows(rows.x.data(), M, K, group_size, padded);
  const Int4Args args{rows.x.data(), xq.q.data(), xq.d.data(), xq.sum.data(), M, K, packed.data_ptr<uint8_t>(),
                      stride, __builtin_ctzll(group_size)};
  if (value_bytes == 2)
    return run(x, M, N, bias, act, [=](float* o, int64_t n0, int64_t n1) { int4_tiles<at::BFloat16>(args, o, n0, n1); },
               kWideTile);
  return run(x, M, N, bias, act, [=](float* o, int64_t n0, int64_t n1) { int4_tiles<float>(args, o, n0, n1); },
             kWideTile);
}

// Rows per INT4 and INT8 tile in this build's layouts (int4_layout.int4_rows', cpu_kernels.int8_tiles' tile_rows):
// 16 on AVX-512 VNNI, else 8.
int64_t int4_tile_rows() { return kWideTile; }
int64_t int8_tile_rows() { return kInt8Tile; }

bool int8_tiles_built() {
#ifdef __AVX2__
  return true;
#else
  return false;
#endif
}

// Whether float32 and fp16 weights (bf16 too where the CPU has AVX512_BF16) take the 512-bit paths
// (cpu_gemv_avx512.h) rather than the 256-bit ones (cpu_gemv_generic.h).
bool wide_dense_built() {
#ifdef __AVX512F__
  return true;
#else
  return false;
#endif
}

#include "cpu_gemv_argmax.h"
#include "cpu_gemv_beams.h"

}  // namespace

// decode_attention's calls in the trace of a -DLLMBENCH_CALL_TRACE=1 build (cpu_attention.cpp), beside the linears'
__attribute__((visibility("hidden"))) int64_t llmbench_trace_now() { return trace_now(); }
__attribute__((visibility("hidden"))) void llmbench_note_call(int64_t entry, int64_t rows) { note_call(entry, rows); }

// The ops' namespace: llmbench_cpu, another where benchmarks/kernel_builds.py loads a second build beside the host's
// (the indirections expand LLMBENCH_OPS before TORCH_LIBRARY pastes it into names)
#ifndef LLMBENCH_OPS
#define LLMBENCH_OPS llmbench_cpu
#endif
#define LLMBENCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define LLMBENCH_LIBRARY_IMPL(ns, m) TORCH_LIBRARY_IMPL(ns, CPU, m)

#include "cpu_gemv_entries.h"
#ifdef LLMBENCH_ENTRIES
using llmbench_entries::entry;
using llmbench_entries::optional_of;
using llmbench_entries::tensor_of;
LLMBENCH_ENTRY aoti_torch_cpu_linear_dense(AtenTensorHandle x, AtenTensorHandle weight, AtenTensorHandle* bias,
                                           int64_t act, AtenTensorHandle* ret0) {
  return entry("llmbench_cpu::linear_dense",
               [&] { return linear_dense(tensor_of(x), tensor_of(weight), optional_of(bias), act); }, ret0);
}
LLMBENCH_ENTRY aoti_torch_cpu_linear_int8(AtenTensorHandle x, AtenTensorHandle qdata, AtenTensorHandle scale,
                                          AtenTensorHandle* bias, int64_t act, AtenTensorHandle* ret0) {
  return entry("llmbench_cpu::linear_int8", [&] {
    return linear_int8(tensor_of(x), tensor_of(qdata), tensor_of(scale), optional_of(bias), act);
  }, ret0);
}
LLMBENCH_ENTRY aoti_torch_cpu_linear_int8_tiles(AtenTensorHandle x, AtenTensorHandle packed, int64_t groups,
                                                AtenTensorHandle* bias, int64_t act, AtenTensorHandle* ret0) {
  return entry("llmbench_cpu::linear_int8_tiles", [&] {
    return linear_int8_tiles(tensor_of(x), tensor_of(packed), groups, optional_of(bias), act);
  }, ret0);
}
LLMBENCH_ENTRY aoti_torch_cpu_linear_int4(AtenTensorHandle x, AtenTensorHandle packed, int64_t group_size,
                                          int64_t value_bytes, AtenTensorHandle* bias, int64_t act,
                                          AtenTensorHandle* ret0) {
  return entry("llmbench_cpu::linear_int4", [&] {
    return linear_int4(tensor_of(x), tensor_of(packed), group_size, value_bytes, optional_of(bias), act);
  }, ret0);
}
LLMBENCH_ENTRY aoti_torch_cpu_argmax_rows(AtenTensorHandle scores, AtenTensorHandle* bias, AtenTensorHandle* ret0) {
  return entry("llmbench_cpu::argmax_rows", [&] { return argmax_rows(tensor_of(scores), optional_of(bias)); }, ret0);
}
#endif

LLMBENCH_LIBRARY(LLMBENCH_OPS, m) {
  // act=1: silu(the first half of the outputs) * the second half (run)
  m.def("linear_dense(Tensor x, Tensor weight, Tensor? bias, int act=0) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor qdata, Tensor scale, Tensor? bias, int act=0) -> Tensor");
  m.def("linear_int8_tiles(Tensor x, Tensor packed, int groups, Tensor? bias, int act=0) -> Tensor");
  m.def("linear_int4(Tensor x, Tensor packed, int group_size, int value_bytes, Tensor? bias, int act=0) -> Tensor");
  m.def("amx_rows_from() -> int", &amx_rows_from);
  m.def("int4_tile_rows() -> int", &int4_tile_rows);
  m.def("int8_tiles_built() -> bool", &int8_tiles_built);
  m.def("int8_tile_rows() -> int", &int8_tile_rows);
  m.def("wide_dense_built() -> bool", &wide_dense_built);
  m.def("amx_max_rows() -> int", &amx_max_rows);
  m.def("reorder_rows(Tensor(a!)[] tensors, Tensor source, int start=0, int end=-1, Tensor(b!)? writers=None) -> ()");
  m.def("argmax_rows(Tensor scores, Tensor? bias) -> Tensor");
  m.def("topk_rows(Tensor scores, Tensor offset, int k, Tensor? bias=None, bool normalize=False) -> (Tensor, Tensor)");
  m.def("beam_choose(Tensor logits, Tensor(a!) scores, int beams, Tensor? bias, Tensor(b!) sequences, int column) "
        "-> (Tensor, Tensor)");
  m.def("set_linear_work(bool on) -> bool", &set_linear_work);
  m.def("call_trace() -> Tensor", &call_trace);
}

LLMBENCH_LIBRARY_IMPL(LLMBENCH_OPS, m) {
  m.impl("linear_dense", &linear_dense);
  m.impl("linear_int8", &linear_int8);
  m.impl("linear_int8_tiles", &linear_int8_tiles);
  m.impl("linear_int4", &linear_int4);
  m.impl("reorder_rows", &reorder_rows);
  m.impl("argmax_rows", &argmax_rows);
  m.impl("topk_rows", &topk_rows);
  m.impl("beam_choose", &beam_choose);
}
