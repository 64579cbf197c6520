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

// One cached head (b, kvh) for its `group` query heads (qf: group x D, scaled, float32) over the kept positions
// kept[0..n) (a part of a row's, or all of them): each key widened once for the whole group. Into part, group x
// (D + 2) floats: per query head its largest score, the sum of exp(score - largest) and the values summed with those
// weights (not yet divided by the sum), which merge() combines over a row's parts. scores: group x n scratch.
template <typename T, int CH>
void attend_group(const float* qf, int64_t group, const T* kh, const T* vh, int64_t ks, int64_t vs,
                  const int64_t* kept, int64_t n, int64_t D, const MaskRow& row, float* scores, float* part) {
#if defined(LLMBENCH_VEC)
  if constexpr (CH > 0) {
    constexpr int W = Vec::W;
    int64_t i = 0;
#if defined(__AVX512F__)
    // 16 positions at a time: their keys widened once into kf, then per query head 16 dot products whose sums
    // sum16 takes together (one horizontal sum per score was a third of a call's time)
    thread_local std::vector<float> kf;
    kf.resize(16 * D);
    for (; i + 16 <= n; i += 16) {
      alignas(64) float add[16];
      for (int p = 0; p < 16; ++p) {
        const int64_t j = kept[i + p];
        prefetch_row(vh + j * vs, D);
        for (int c = 0; c < CH; ++c) Vec::store(kf.data() + p * D + W * c, Vec::widen(kh + j * ks + W * c));
        add[p] = row.bias(j);
      }
      for (int64_t g = 0; g < group; ++g) {
        Vec::R q[CH], acc[16];
        for (int c = 0; c < CH; ++c) q[c] = Vec::load(qf + g * D + W * c);
        for (int p = 0; p < 16; ++p) {  // acc in sum16's order, so that its sums come out in the positions' order
          const float* k = kf.data() + (4 * (p % 4) + p / 4) * D;
          acc[p] = Vec::mul(q[0], Vec::load(k));
          for (int c = 1; c < CH; ++c) acc[p] = Vec::fmadd(q[c], Vec::load(k + W * c), acc[p]);
        }
        Vec::store(scores + g * n + i, Vec::add(sum16(acc), Vec::load(add)));
      }
    }
#endif
    for (; i < n; ++i) {
      const int64_t j = kept[i];
      prefetch_row(vh + j * vs, D);
      Vec::R k[CH];
      for (int c = 0; c < CH; ++c) k[c] = Vec::widen(kh + j * ks + W * c);
      const float add = row.bias(j);
      for (int64_t g = 0; g < group; ++g) {
        Vec::R acc = Vec::mul(Vec::load(qf + g * D), k[0]);
        for (int c = 1; c < CH; ++c) acc = Vec::fmadd(Vec::load(qf + g * D + W * c), k[c], acc);
        scores[g * n + i] = Vec::sum(acc) + add;
      }
    }
    float tops[kMaxGroup], totals[kMaxGroup];
    for (int64_t g = 0; g < group; ++g) {
      float* s = scores + g * n;
      Vec::R top = Vec::set1(-INFINITY);
      int64_t i2 = 0;
      for (; i2 + W <= n; i2 += W) top = Vec::max(top, Vec::load(s + i2));
      alignas(64) float lanes[W];
      Vec::store(lanes, top);
      float t = *std::max_element(lanes, lanes + W);
      for (; i2 < n; ++i2) t = std::max(t, s[i2]);
      Vec::R sum = Vec::zero();
      for (i2 = 0; i2 + W <= n; i2 += W) {
        const Vec::R e = vexp(Vec::sub(Vec::load(s + i2), Vec::set1(t)));
        Vec::store(s + i2, e);
        sum = Vec::add(sum, e);
      }
      float total = Vec::sum(sum);
      for (; i2 < n; ++i2) total += s[i2] = std::exp(s[i2] - t);
      tops[g] = t, totals[g] = total;
    }
    // the values summed with the weights, each value widened once for up to G query heads (24 registers of sums;
    // AVX2's 16 registers spill some at head size 64, which still took 0.91-0.95x the time of G = 1 there)
    constexpr int G = CH > 8 ? 1 : 24 / CH;
    for (int64_t g0 = 0; g0 < group; g0 += G) {
      const int64_t gn = std::min<int64_t>(G, group - g0);
      Vec::R acc[G][CH];
      for (int g = 0; g < G; ++g)
        for (int c = 0; c < CH; ++c) acc[g][c] = Vec::zero();
      for (int64_t i2 = 0; i2 < n; ++i2) {
        const T* v = vh + kept[i2] * vs;
        Vec::R vv[CH];
        for (int c = 0; c < CH; ++c) vv[c] = Vec::widen(v + W * c);
#pragma GCC unroll 24
        for (int g = 0; g < G; ++g) {
          if (g >= gn) break;
          const Vec::R p = Vec::set1(scores[(g0 + g) * n + i2]);
          for (int c = 0; c < CH; ++c) acc[g][c] = Vec::fmadd(p, vv[c], acc[g][c]);
        }
      }
      for (int64_t g = 0; g < gn; ++g) {
        float* o = part + (g0 + g) * (D + 2);
        o[0] = tops[g0 + g], o[1] = totals[g0 + g];
        for (int c = 0; c < CH; ++c) Vec::store(o + 2 + W * c, acc[g][c]);
      }
    }
    return;
  }
#endif
  std::vector<float> kf(D);
  for (int64_t i = 0; i < n; ++i) {
    widen(kh + kept[i] * ks, kf.data(), D);
    for (int64_t g = 0; g < group; ++g) {
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += qf[g * D + d] * kf[d];
      scores[g * n + i] = dot + row.bias(kept[i]);
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores + g * n;
    float* o = part + g * (D + 2);
    const float top = n ? *std::max_element(s, s + n) : -INFINITY;
    float total = 0.f;
    std::fill(o + 2, o + 2 + D, 0.f);
    for (int64_t i = 0; i < n; ++i) {
      const float p = std::exp(s[i] - top);
      total += p;
      widen(vh + kept[i] * vs, kf.data(), D);
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[2 + d] += p * kf[d];
    }
    o[0] = top, o[1] = total;
  }
}

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
  const int64_t qs[4] = {q.stride(0), q.stride(1), q.stride(2), q.stride(3)};
  const int64_t ks[3] = {key.stride(0), key.stride(1), key.stride(2)};
  const int64_t vs[3] = {value.stride(0), value.stride(1), value.stride(2)};
  const int64_t ms[4] = {mask.stride(0), mask.stride(1), mask.stride(2), mask.stride(3)};
  const T* qp = q.data_ptr<T>() + (q.size(2) - 1) * qs[2];
  const T* kp = key.data_ptr<T>();
  const T* vp = value.data_ptr<T>();
  T* op = out.data_ptr<T>();  // (B, 1, H, D) contiguous
  const bool is_bool = mask.scalar_type() == at::kBool;
  const char* mp = static_cast<const char*>(mask.data_ptr()) + (mask.size(2) - 1) * ms[2] * mask.element_size();
  auto row_of = [&](int64_t b) {
    MaskRow row;
    const char* at = mp + (mask.size(0) == 1 ? 0 : b) * ms[0] * mask.element_size();
    row.stride = ms[3];
    if (is_bool) row.keep = reinterpret_cast<const bool*>(at);
    else row.add = reinterpret_cast<const float*>(at);
    return row;
  };
  // Scratch kept between calls (a decode step calls once per layer; this thread's, so the parallel work below reads
  // it through pointers): each row's attended positions, found once, and the tasks' results.
  thread_local std::vector<int64_t> kept_rows, counts;
  thread_local std::vector<float> partials;
  kept_rows.resize(B * L), counts.resize(B);
  int64_t* kept = kept_rows.data();
  int64_t* count = counts.data();
  int64_t fewest = L, total = 0;
  for (int64_t b = 0; b < B; ++b) {
    const MaskRow row = row_of(b);
    int64_t n = 0;
    for (int64_t j = 0; j < L; ++j)
      if (!row.masked(j)) kept[b * L + n++] = j;
    count[b] = n, fewest = std::min(fewest, n), total += n;
  }
  // One task per cached head of a row with its query heads (each key read and widened once for them); with fewer
  // such tasks than twice the threads, each takes a part of the row's positions (kMinPart at least), and the parts'
  // results are merged after: one row's few cached heads still keep every thread busy.
  const int64_t threads = at::get_num_threads(), heads = B * KVH;
  const bool serial = total * H < serial_work() || threads == 1;
  const int64_t parts = serial || heads >= 2 * threads ? 1
      : std::max<int64_t>(1, std::min({(2 * threads + heads - 1) / heads, fewest / kMinPart, kMaxParts}));
  const int64_t tasks = heads * parts, stride = group * (D + 2);
  partials.resize(tasks * stride);
  float* partial = partials.data();
  at::parallel_for(0, tasks, serial ? tasks : 1, [&](int64_t t0, int64_t t1) {
    thread_local std::vector<float> qf, scores;
    qf.resize(group * D);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / (KVH * parts), kvh = t / parts % KVH, p = t % parts;
      const int64_t i0 = count[b] * p / parts, i1 = count[b] * (p + 1) / parts;
      for (int64_t g = 0; g < group; ++g) {
        const T* qg = qp + b * qs[0] + (kvh * group + g) * qs[1];
        float* to = qf.data() + g * D;
        if (qs[3] == 1) widen(qg, to, D);
        else for (int64_t d = 0; d < D; ++d) to[d] = static_cast<float>(qg[d * qs[3]]);
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) to[d] *= static_cast<float>(scale);
      }
      scores.resize(group * std::max<int64_t>(i1 - i0, 1));
      float* part = partial + t * stride;
      attend_group<T, CH>(qf.data(), group, kp + b * ks[0] + kvh * ks[1], vp + b * vs[0] + kvh * vs[1], ks[2],
                          vs[2], kept + b * L + i0, i1 - i0, D, row_of(b), scores.data(), part);
      if (parts == 1)  // the task's heads are done: their outputs here, in parallel, not in a serial merge after
        for (int64_t g = 0; g < group; ++g)
          narrow_quotients(part + g * (D + 2) + 2, part[g * (D + 2) + 1], op + (t * group + g) * D, D);
    }
  });
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
// multiple of KVH (grouped-query heads share a cached head); mask (B or 1, 1, Q, >= L) bool or float32;
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
                  (mask.scalar_type() == at::kBool || mask.scalar_type() == at::kFloat),
              "decode_attention: the mask must be bool or float32, (1 or rows, 1, Q, >= cache length)");
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
