// The greedy pick of a decode step (torch op llmbench_cpu::argmax_rows), included inside cpu_gemv.cpp's anonymous
// namespace: for each row of the head's logits (M x V, in their own dtype) the index of the largest float32 value of
// logit + bias (float32, V values, -inf for the tokens forbidden; or none), as torch.argmax picks it: the first of
// equal values, the first NaN where there is one. Inductor's argmax over the widened logits took ~150 us of every
// step for the default model's 49152 tokens (one thread, one value at a time); here a row is split between the
// threads, each finding the largest value of its part 8 at a time, then the first index holding it.
#pragma once

#include <limits>

struct Pick {
  float value;
  int64_t index;
  bool nan;
};

// a from an earlier part of the row than b: the one the row keeps
inline Pick later_if_better(const Pick& a, const Pick& b) {
  if (a.nan) return a;
  if (b.nan) return b;
  return b.value > a.value ? b : a;
}

template <typename T>
inline v8f scores_at(const T* x, const float* bias, int64_t j) {
  const v8f v = widen(x + j);
  return bias ? v + load_f32(bias + j) : v;
}

template <typename T>
inline float score_at(const T* x, const float* bias, int64_t j) {
  return bias ? static_cast<float>(x[j]) + bias[j] : static_cast<float>(x[j]);
}

inline bool any_lane(v8i v) {
  int32_t any = 0;
  for (int i = 0; i < 8; ++i) any |= v[i];
  return any != 0;
}

// The pick among values j0..j1-1 (j0 < j1): a pass for the largest value (and whether any is NaN), a second for the
// first index holding it (or the first NaN).
template <typename T>
Pick pick_in(const T* x, const float* bias, int64_t j0, int64_t j1) {
  const float lowest = -std::numeric_limits<float>::infinity();
  v8f m = {lowest, lowest, lowest, lowest, lowest, lowest, lowest, lowest};
  v8i nan = {};
  int64_t j = j0;
  for (; j + 8 <= j1; j += 8) {
    const v8f v = scores_at(x, bias, j);
    nan |= v != v;
    m = v > m ? v : m;
  }
  float best = lowest;
  bool any_nan = any_lane(nan);
  for (int i = 0; i < 8; ++i) best = std::max(best, m[i]);
  for (; j < j1; ++j) {
    const float v = score_at(x, bias, j);
    any_nan |= v != v;
    best = v > best ? v : best;
  }
  for (j = j0; j + 8 <= j1; j += 8) {
    const v8f v = scores_at(x, bias, j);
    const v8i hit = any_nan ? v != v : v == best;
    if (any_lane(hit))
      for (int i = 0; i < 8; ++i)
        if (hit[i]) return {v[i], j + i, any_nan};
  }
  for (; j < j1; ++j) {
    const float v = score_at(x, bias, j);
    if (any_nan ? v != v : v == best) return {v, j, any_nan};
  }
  return {best, j0, any_nan};
}

constexpr int64_t kPickPart = 16384;  // the fewest values a thread takes of a row

// How many parts a row of V values splits into between the threads (each at least kPickPart values).
inline int64_t row_parts(int64_t V) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), V / kPickPart));
}

// f(t, m, j0, j1) for part t = m * parts + p of every row m of M (values j0..j1-1 of V), the parts in parallel.
template <typename F>
void each_row_part(int64_t M, int64_t V, int64_t parts, F&& f) {
  at::parallel_for(0, M * parts, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m = t / parts, p = t % parts;
      f(t, m, V * p / parts, V * (p + 1) / parts);
    }
  });
}

at::Tensor argmax_rows(const at::Tensor& scores, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(scores.dim() >= 2 && scores.size(-1) > 0, "argmax_rows: scores must be (rows, vocabulary), got ",
              scores.sizes());
  // Leading dimensions count as rows: torch 2.8's C++ wrapper hands over the (1, 1, V) buffer of an in-place
  // all-reduce (tensor parallelism over gloo) instead of its (1, V) view.
  const at::Tensor rows = scores.dim() == 2 ? scores : scores.reshape({-1, scores.size(-1)});
  const at::Tensor s = rows.stride(1) == 1 ? rows : rows.contiguous();  // rows may be apart (a prefill's last)
  const int64_t M = s.size(0), V = s.size(1), stride = s.stride(0);
  TORCH_CHECK(s.scalar_type() == at::kFloat || s.scalar_type() == at::kBFloat16 || s.scalar_type() == at::kHalf,
              "argmax_rows: scores must be float32, bfloat16 or float16, got ", s.scalar_type());
  const float* b = nullptr;
  at::Tensor bc;
  if (bias.has_value()) {
    bc = bias->contiguous();
    TORCH_CHECK(bc.scalar_type() == at::kFloat && bc.numel() == V, "argmax_rows: bias must be float32 with one value "
                "per column (", V, "), got ", bc.scalar_type(), " with ", bc.numel());
    b = bc.data_ptr<float>();
  }
  const int64_t parts = row_parts(V);
  std::vector<Pick> picks(M * parts);
  each_row_part(M, V, parts, [&](int64_t t, int64_t m, int64_t j0, int64_t j1) {
    switch (s.scalar_type()) {
      case at::kFloat: picks[t] = pick_in(s.data_ptr<float>() + m * stride, b, j0, j1); break;
      case at::kBFloat16: picks[t] = pick_in(s.data_ptr<at::BFloat16>() + m * stride, b, j0, j1); break;
      case at::kHalf: picks[t] = pick_in(s.data_ptr<at::Half>() + m * stride, b, j0, j1); break;
      default: break;  // refused above
    }
  });
  at::Tensor out = at::empty({M, 1}, s.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m) {
    Pick row = picks[m * parts];
    for (int64_t p = 1; p < parts; ++p) row = later_if_better(row, picks[m * parts + p]);
    o[m] = row.index;
  }
  return out;
}
