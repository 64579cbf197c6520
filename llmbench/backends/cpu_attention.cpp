// Decode attention on CPUs, the second source of the kernels cpu_gemv.cpp starts (llmbench/backends/cpu_kernels.py
// builds both into one library): torch op llmbench_cpu::decode_attention.
//
// One query position of each row (batch x beams) against the whole static KV cache, in one call per layer: inductor
// turns the same computation written as tensor ops (generated_kernels.generated_attention) into a reduction per score
// with a horizontal sum over the head dimension, a softmax and a second reduction, which took ~90 us a layer for 8
// rows of the default model on a 2-core AMX Xeon. Here each thread takes whole cached heads of a row with their
// grouped query heads: the queries widened to float32 once, each cached key widened once and dotted with every query
// of its group, masked positions skipped, a softmax in float32 (a vectorized exp) and the values summed with the
// weights, all within the head's few KB of cache. The vector path (AVX-512, or AVX2 with FMA and F16C) keeps a head of
// 16-128 values in registers; other CPUs and head sizes get portable loops (generated_kernels.attention_kernel decides
// whether the op or inductor's generated form runs).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

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

// One cached head (b, kvh) for its `group` query heads (qf: group x D, scaled, float32): scores of the positions the
// mask keeps, softmax, weighted values into out (group x D, float32). scores: group x L scratch.
template <typename T, int CH>
void attend_group(const float* qf, int64_t group, const T* kh, const T* vh, int64_t ks, int64_t vs, int64_t L,
                  int64_t D, const MaskRow& row, float* scores, float* out, std::vector<int64_t>& kept) {
  kept.clear();
  for (int64_t j = 0; j < L; ++j)
    if (!row.masked(j)) kept.push_back(j);
  const int64_t n = static_cast<int64_t>(kept.size());
#if defined(LLMBENCH_VEC)
  if constexpr (CH > 0) {
    constexpr int W = Vec::W;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t j = kept[i];
      for (int64_t line = 0; line < D * static_cast<int64_t>(sizeof(T)); line += 64)  // the values' pass comes next
        _mm_prefetch(reinterpret_cast<const char*>(vh + j * vs) + line, _MM_HINT_T0);
      Vec::R k[CH];
      for (int c = 0; c < CH; ++c) k[c] = Vec::widen(kh + j * ks + W * c);
      const float add = row.bias(j);
      for (int64_t g = 0; g < group; ++g) {
        Vec::R acc = Vec::mul(Vec::load(qf + g * D), k[0]);
        for (int c = 1; c < CH; ++c) acc = Vec::fmadd(Vec::load(qf + g * D + W * c), k[c], acc);
        scores[g * L + i] = Vec::sum(acc) + add;
      }
    }
    for (int64_t g = 0; g < group; ++g) {
      float* s = scores + g * L;
      float top = -INFINITY;
      for (int64_t i = 0; i < n; ++i) top = std::max(top, s[i]);
      Vec::R sum = Vec::zero();
      int64_t i = 0;
      for (; i + W <= n; i += W) {
        const Vec::R e = vexp(Vec::sub(Vec::load(s + i), Vec::set1(top)));
        Vec::store(s + i, e);
        sum = Vec::add(sum, e);
      }
      float total = Vec::sum(sum);
      for (; i < n; ++i) total += s[i] = std::exp(s[i] - top);
      Vec::R acc[CH];
      for (int c = 0; c < CH; ++c) acc[c] = Vec::zero();
      for (int64_t i2 = 0; i2 < n; ++i2) {
        const Vec::R p = Vec::set1(s[i2]);
        const T* v = vh + kept[i2] * vs;
        for (int c = 0; c < CH; ++c) acc[c] = Vec::fmadd(p, Vec::widen(v + W * c), acc[c]);
      }
      const Vec::R inv = Vec::set1(1.f / total);
      for (int c = 0; c < CH; ++c) Vec::store(out + g * D + W * c, Vec::mul(acc[c], inv));
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
      scores[g * L + i] = dot + row.bias(kept[i]);
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores + g * L;
    float* o = out + g * D;
    const float top = *std::max_element(s, s + std::max<int64_t>(n, 1));
    float total = 0.f;
    std::fill(o, o + D, 0.f);
    for (int64_t i = 0; i < n; ++i) {
      const float p = std::exp(s[i] - top);
      total += p;
      widen(vh + kept[i] * vs, kf.data(), D);
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] += p * kf[d];
    }
    for (int64_t d = 0; d < D; ++d) o[d] /= total;
  }
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
  // One task per cached head of a row; with fewer tasks than threads (one row, few cached heads) each query head
  // is a task of its own (its cached head then read once per query head).
  const bool per_query_head = B * KVH < at::get_num_threads() * 2 && group > 1;
  const int64_t tasks = per_query_head ? B * H : B * KVH, heads = per_query_head ? 1 : group;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> qf(heads * D), scores(heads * L), o(heads * D);
    std::vector<int64_t> kept;
    kept.reserve(L);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = per_query_head ? t / H : t / KVH;
      const int64_t h0 = per_query_head ? t % H : t % KVH * group, kvh = h0 / group;
      for (int64_t g = 0; g < heads; ++g)
        for (int64_t d = 0; d < D; ++d)
          qf[g * D + d] = static_cast<float>(qp[b * qs[0] + (h0 + g) * qs[1] + d * qs[3]]) * static_cast<float>(scale);
      MaskRow row;
      const int64_t moff = (mask.size(0) == 1 ? 0 : b) * ms[0] * mask.element_size();
      row.stride = ms[3];
      if (is_bool) row.keep = reinterpret_cast<const bool*>(mp + moff);
      else row.add = reinterpret_cast<const float*>(mp + moff);
      attend_group<T, CH>(qf.data(), heads, kp + b * ks[0] + kvh * ks[1], vp + b * vs[0] + kvh * vs[1], ks[2], vs[2],
                          L, D, row, scores.data(), o.data(), kept);
      T* dst = op + (b * H + h0) * D;
      for (int64_t i = 0; i < heads * D; ++i) dst[i] = static_cast<T>(o[i]);
    }
  });
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
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.sizes() == key.sizes() && mask.dim() == 4,
              "decode_attention: query, key, value and mask must be 4-D, key and value of one shape");
  TORCH_CHECK(key.scalar_type() == query.scalar_type() && value.scalar_type() == query.scalar_type(),
              "decode_attention: query, key and value must share a dtype");
  TORCH_CHECK(key.size(0) == query.size(0) && key.size(3) == query.size(3) && query.size(1) % key.size(1) == 0,
              "decode_attention: key/value heads must divide the query's, with the same rows and head size");
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
  return out;
}

}  // namespace

// Whether decode_attention was built with its vector path (AVX-512, or AVX2 with FMA and F16C; head sizes 16, 32, 64,
// 96 and 128 in registers); without it the portable loops run, which were never measured against inductor's form.
bool attention_vectorized() { return Vec::W > 0; }

TORCH_LIBRARY_FRAGMENT(llmbench_cpu, m) {
  m.def("decode_attention(Tensor query, Tensor key, Tensor value, Tensor mask, float scale) -> Tensor");
  m.def("attention_vectorized() -> bool", &attention_vectorized);
}

TORCH_LIBRARY_IMPL(llmbench_cpu, CPU, m) { m.impl("decode_attention", &decode_attention); }
