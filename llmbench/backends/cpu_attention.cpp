// Decode attention on CPUs, the second source of the kernels cpu_gemv.cpp starts (llmbench/backends/cpu_kernels.py
// builds both into one library): torch op llmbench_cpu::decode_attention.
//
// One query position of each row (batch x beams) against the whole static KV cache, in one call per layer: inductor
// turns the same computation written as tensor ops (generated_kernels.generated_attention) into a reduction per score
// with a horizontal sum over the head dimension, a softmax and a second reduction, which took ~90 us a layer for 8
// rows of the default model on a 2-core AMX Xeon. Here each task takes a cached head of a row with its grouped query
// heads (or, where rows x cached heads are fewer than twice the threads, a part of its positions, the parts merged
// after as in flash-decoding): the queries widened to float32 once, each cached key widened once and dotted with
// every query of its group (on AVX-512 16 positions at a time, their sums by one sum16), masked positions skipped, a
// softmax in float32 (a vectorized exp) and the values summed with the weights (each value widened once for several
// query heads), all within the head's few KB of cache; a task of whole heads writes its outputs itself (a serial
// merge after the join was a third of an 8-row call); small calls run on the calling thread alone. The vector
// path (AVX-512, or AVX2 with FMA and F16C) keeps a head of 16-128 values in registers; other CPUs and head sizes get
// portable loops (generated_kernels.attention_kernel decides whether the op or inductor's generated form runs).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

// The kernels' call trace (cpu_gemv.cpp; notes nothing unless built with -DLLMBENCH_CALL_TRACE=1)
__attribute__((visibility("hidden"))) int64_t llmbench_trace_now();
__attribute__((visibility("hidden"))) void llmbench_note_call(int64_t entry, int64_t rows);

namespace {

template <typename T>
inline void widen(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t bits = static_cast<uint32_t>(s[i]) << 16;
      float f;
      std::memcpy(&f, &bits, 4);
      dst[i] = f;
    }
  } else if constexpr (std::is_same_v<T, at::Half>) {
    const _Float16* s = reinterpret_cast<const _Float16*>(src);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(s[i]);
  } else {
    std::memcpy(dst, src, n * sizeof(float));
  }
}

// dst[i] = num[i] / den as T, rounded as at::BFloat16 and at::Half round, in a loop the compiler vectorizes
template <typename T>
inline void narrow_quotients(const float* num, float den, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    uint16_t* d = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float f = num[i] / den;
      uint32_t bits;
      std::memcpy(&bits, &f, 4);
      d[i] = f != f ? uint16_t{0x7FC0} : static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
    }
  } else if constexpr (std::is_same_v<T, at::Half>) {
    _Float16* d = reinterpret_cast<_Float16*>(dst);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) d[i] = static_cast<_Float16>(num[i] / den);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = num[i] / den;
  }
}

// Whether position j of a row may be attended, and what to add to its score: a bool mask (true: attend) or an
// additive float one (-inf: never).
struct MaskRow {
  const bool* keep = nullptr;
  const float* add = nullptr;
  int64_t stride = 1;
  bool masked(int64_t j) const { return keep ? !keep[j * stride] : std::isinf(add[j * stride]) && add[j * stride] < 0; }
  float bias(int64_t j) const { return add ? add[j * stride] : 0.f; }
};

#include "cpu_gemv_vec.h"  // Vec (the vector path's registers) and vexp

constexpr int64_t kMinPart = 32;       // positions at least in a part of a row's (see attend_heads)
constexpr int64_t kMaxParts = 64;      // parts of a row at most
constexpr int64_t kSerialWork = 1024;  // see serial_work()
constexpr int64_t kMaxGroup = 64;      // query heads a cached head serves at most (decode_attention checks)

// A cached row of D values into L1 (a value row while its key is scored: the values' pass comes next)
template <typename T>
inline void prefetch_row(const T* p, int64_t D) {
  for (int64_t line = 0; line < D * static_cast<int64_t>(sizeof(T)); line += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(p) + line, 0, 3);
}

#include "cpu_attention_group.h"  // attend_group: one cached head of a row for its query heads

// Query-head-positions (rows x heads x kept positions) below which a call runs on the calling thread alone: a
// parallel region and the hand-over of its results cost more than they save there (LLMBENCH_ATTENTION_SERIAL_WORK).
inline int64_t serial_work() {
  static const int64_t work = [] {
    const char* set = std::getenv("LLMBENCH_ATTENTION_SERIAL_WORK");
    return set ? std::atoll(set) : int64_t{kSerialWork};
  }();
  return work;
}

template <typename T, int CH>
void attend_heads(const at::Tensor& q, const at::Tensor& key, const at::Tensor& value, const at::Tensor& mask,
                  double scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), KVH = key.size(1), L = key.size(2);
  const int64_t group = H / KVH;
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs3 = q.stride(3);
  const int64_t ks0 = key.stride(0), ks1 = key.stride(1), ks2 = key.stride(2);
  const int64_t vs0 = value.stride(0), vs1 = value.stride(1), vs2 = value.stride(2);
  const T* qp = q.data_ptr<T>() + (q.size(2) - 1) * q.stride(2);
  const T* kp = key.data_ptr<T>();
  const T* vp = value.data_ptr<T>();
  T* op = out.data_ptr<T>();  // (B, 1, H, D) contiguous
  const bool is_bool = mask.scalar_type() == at::kBool;
  const int64_t mask_row = mask.size(0) == 1 ? 0 : mask.stride(0) * mask.element_size(), ms3 = mask.stride(3);
  const int64_t mask_head = mask.size(1) == 1 ? 0 : mask.stride(1) * mask.element_size();  // a per-head bias: ALiBi
  const char* mp = static_cast<const char*>(mask.data_ptr()) + (mask.size(2) - 1) * mask.stride(2) *
                                                                    mask.element_size();
  auto row_of = [=](int64_t b, int64_t h) {  // row b's mask for cached head h (whose query heads share it)
    MaskRow row;
    row.stride = ms3;
    if (is_bool) row.keep = reinterpret_cast<const bool*>(mp + b * mask_row + h * mask_head);
    else row.add = reinterpret_cast<const float*>(mp + b * mask_row + h * mask_head);
    return row;
  };
  // how many positions cached head h of row b attends, and (kept not null) which, into kept
  auto kept_of = [=](int64_t b, int64_t h, int64_t* kept) {
    const MaskRow row = row_of(b, h);
    int64_t n = 0;
    for (int64_t j = 0; j < L; ++j)
      if (!row.masked(j)) {
        if (kept) kept[n] = j;
        ++n;
      }
    return n;
  };
  int64_t fewest = L, total = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = kept_of(b, 0, nullptr);  // (head 0's: each task finds its own positions)
    fewest = std::min(fewest, n), total += n;
  }
  // One task per cached head of a row with its query heads (each key read and widened once for them); with fewer
  // such tasks than twice the threads, each takes a part of the row's positions (kMinPart at least), and the parts'
  // results are merged after: one row's few cached heads still keep every thread busy.
  const int64_t threads = at::get_num_threads(), heads = B * KVH;
  const bool serial = total * H < serial_work() || threads == 1;
  const int64_t parts = serial || heads >= 2 * threads ? 1
      : std::max<int64_t>(1, std::min({(2 * threads + heads - 1) / heads, fewest / kMinPart, kMaxParts}));
  const int64_t tasks = heads * parts, stride = group * (D + 2);
  thread_local std::vector<float> partials;  // the parts' results, for the merge after the join
  partials.resize(parts > 1 ? tasks * stride : 0);
  float* const partial = partials.data();
  // A task, and all it reads, captured by value: the other thread reads each line this one wrote just before from
  // this CPU's cache, one after another where a pointer leads to the next (as in cpu_gemv_run.h's run); each row's
  // positions found by the task itself from the mask.
  auto task = [=](int64_t t) {
    thread_local std::vector<float> qf, scores, own;
    thread_local std::vector<int64_t> kept;
    qf.resize(group * D), kept.resize(L);
    const int64_t b = t / (KVH * parts), kvh = t / parts % KVH, p = t % parts;
    const int64_t n = kept_of(b, kvh, kept.data()), i0 = n * p / parts, i1 = n * (p + 1) / parts;
    for (int64_t g = 0; g < group; ++g) {
      const T* qg = qp + b * qs0 + (kvh * group + g) * qs1;
      float* to = qf.data() + g * D;
      if (qs3 == 1) widen(qg, to, D);
      else for (int64_t d = 0; d < D; ++d) to[d] = static_cast<float>(qg[d * qs3]);
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) to[d] *= static_cast<float>(scale);
    }
    scores.resize(group * std::max<int64_t>(i1 - i0, 1));
    if (parts == 1) own.resize(stride);
    float* part = parts == 1 ? own.data() : partial + t * stride;
    attend_group<T, CH>(qf.data(), group, kp + b * ks0 + kvh * ks1, vp + b * vs0 + kvh * vs1, ks2, vs2,
                        kept.data() + i0, i1 - i0, D, row_of(b, kvh), scores.data(), part);
    if (parts == 1)  // the task's heads are done: their outputs here, in parallel, not in a serial merge after
      for (int64_t g = 0; g < group; ++g)
        narrow_quotients(part + g * (D + 2) + 2, part[g * (D + 2) + 1], op + (t * group + g) * D, D);
  };
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (!serial && !omp_in_parallel())
#endif
  {
#ifdef _OPENMP
    const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
#else
    const int64_t t = 0, n = 1;
#endif
    for (int64_t k = t * tasks / n; k < (t + 1) * tasks / n; ++k) task(k);
  }
  if (parts == 1) return;  // each task wrote its heads' outputs; else per query head the parts' sums, merged:
  thread_local std::vector<float> merged;  // rescaled to the row's largest score
  merged.resize(D);
  for (int64_t bh = 0; bh < heads; ++bh) {
    const float* parts_of = partial + bh * parts * stride;
    for (int64_t g = 0; g < group; ++g) {
      float top = -INFINITY, sum = 0.f;
      for (int64_t p = 0; p < parts; ++p) top = std::max(top, parts_of[p * stride + g * (D + 2)]);
      float w[kMaxParts];
      for (int64_t p = 0; p < parts; ++p) {
        const float* o = parts_of + p * stride + g * (D + 2);
        w[p] = std::exp(o[0] - top);
        sum += w[p] * o[1];
      }
      std::fill(merged.begin(), merged.end(), 0.f);  // the parts added in their order
      for (int64_t p = 0; p < parts; ++p)
        for (int64_t d = 0; d < D; ++d) merged[d] += w[p] * parts_of[p * stride + g * (D + 2) + 2 + d];
      narrow_quotients(merged.data(), sum, op + (bh * group + g) * D, D);  // (b, kvh) -> heads b * H + kvh * group + g
    }
  }
}

template <typename T>
void attend(const at::Tensor& q, const at::Tensor& key, const at::Tensor& value, const at::Tensor& mask,
            double scale, at::Tensor& out) {
  constexpr int W = Vec::W > 0 ? Vec::W : 16;  // head sizes the vector path holds in registers, W floats a register
  switch (Vec::W > 0 ? q.size(3) : 0) {
    case 64: attend_heads<T, 64 / W>(q, key, value, mask, scale, out); break;
    case 128: attend_heads<T, 128 / W>(q, key, value, mask, scale, out); break;
    case 96: attend_heads<T, 96 / W>(q, key, value, mask, scale, out); break;
    case 32: attend_heads<T, 32 / W>(q, key, value, mask, scale, out); break;
    case 16: attend_heads<T, 16 / W>(q, key, value, mask, scale, out); break;
    default: attend_heads<T, 0>(q, key, value, mask, scale, out); break;
  }
}

// query (B, H, Q, D), any strides (its last position attends); key/value (B, KVH, L, D) with unit stride in D, H a
// multiple of KVH (grouped-query heads share a cached head); mask (B or 1, 1, Q, >= L) bool or float32, or per
// head (B or 1, H, Q, >= L) where H == KVH (a bias such as ALiBi's added to each head's scores);
// -> (B, 1, H, D) in the query's dtype, as transformers' attention functions return it.
at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const at::Tensor& mask, double scale) {
  const int64_t entry = llmbench_trace_now();
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.sizes() == key.sizes() && mask.dim() == 4,
              "decode_attention: query, key, value and mask must be 4-D, key and value of one shape");
  TORCH_CHECK(key.scalar_type() == query.scalar_type() && value.scalar_type() == query.scalar_type(),
              "decode_attention: query, key and value must share a dtype");
  TORCH_CHECK(key.size(0) == query.size(0) && key.size(3) == query.size(3) && query.size(1) % key.size(1) == 0,
              "decode_attention: key/value heads must divide the query's, with the same rows and head size");
  TORCH_CHECK(query.size(1) / key.size(1) <= kMaxGroup, "decode_attention: at most ", kMaxGroup,
              " query heads a key/value head");
  TORCH_CHECK(key.stride(3) == 1 && value.stride(3) == 1, "decode_attention: key and value need unit stride in D");
  TORCH_CHECK((mask.size(0) == 1 || mask.size(0) == query.size(0)) && mask.size(3) >= key.size(2) &&
                  (mask.size(1) == 1 || (mask.size(1) == query.size(1) && key.size(1) == query.size(1))) &&
                  (mask.scalar_type() == at::kBool || mask.scalar_type() == at::kFloat),
              "decode_attention: the mask must be bool or float32, (1 or rows, 1 or heads, Q, >= cache length); ",
              "per head only where every query head has its own cached head");
  at::Tensor out = at::empty({query.size(0), 1, query.size(1), query.size(3)}, query.options());
  switch (query.scalar_type()) {
    case at::kFloat: attend<float>(query, key, value, mask, scale, out); break;
    case at::kBFloat16: attend<at::BFloat16>(query, key, value, mask, scale, out); break;
    case at::kHalf: attend<at::Half>(query, key, value, mask, scale, out); break;
    default: TORCH_CHECK(false, "decode_attention: float32, bfloat16 or float16 only");
  }
  llmbench_note_call(entry, query.size(0));
  return out;
}

}  // namespace

// Whether decode_attention was built with its vector path (AVX-512, or AVX2 with FMA and F16C; head sizes 16, 32, 64,
// 96 and 128 in registers); without it the portable loops run, which were never measured against inductor's form.
bool attention_vectorized() { return Vec::W > 0; }

#ifndef LLMBENCH_OPS  // the ops' namespace, as in cpu_gemv.cpp (benchmarks/kernel_builds.py loads a second build)
#define LLMBENCH_OPS llmbench_cpu
#endif
#define LLMBENCH_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define LLMBENCH_FRAGMENT_IMPL(ns, m) TORCH_LIBRARY_IMPL(ns, CPU, m)
LLMBENCH_FRAGMENT(LLMBENCH_OPS, m) {
  m.def("decode_attention(Tensor query, Tensor key, Tensor value, Tensor mask, float scale) -> Tensor");
  m.def("attention_vectorized() -> bool", &attention_vectorized);
}

#include "cpu_gemv_entries.h"
#ifdef LLMBENCH_ENTRIES
LLMBENCH_ENTRY aoti_torch_cpu_decode_attention(AtenTensorHandle query, AtenTensorHandle key, AtenTensorHandle value,
                                               AtenTensorHandle mask, double scale, AtenTensorHandle* ret0) {
  using llmbench_entries::tensor_of;
  return llmbench_entries::entry("llmbench_cpu::decode_attention", [&] {
    return decode_attention(tensor_of(query), tensor_of(key), tensor_of(value), tensor_of(mask), scale);
  }, ret0);
}
#endif

LLMBENCH_FRAGMENT_IMPL(LLMBENCH_OPS, m) { m.impl("decode_attention", &decode_attention); }
