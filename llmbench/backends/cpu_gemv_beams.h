// Beam search's part of cpu_gemv.cpp, included inside its anonymous namespace.
#pragma once

// Beam search's cache reorder in place: row i (dim 0) of every tensor becomes its row source[i]. One call for all
// of a cache's tensors (two aten ops per tensor cost more than the copying on a small model), shared out among
// threads by tensor; rows that keep their place are not copied. With end >= 0, only positions [start, end) of dim 2
// of (rows, heads, positions, head dim) tensors move: the rest is the same in every row (beam search's prompt,
// copied into each of its beams), so a long prompt is not copied at every step.
void reorder_rows(at::TensorList tensors, const at::Tensor& source, int64_t start, int64_t end) {
  TORCH_CHECK(source.dim() == 1 && source.scalar_type() == at::kLong && source.is_contiguous(),
              "reorder_rows: source must be a contiguous int64 vector");
  const int64_t rows = source.numel();
  const int64_t* src = source.data_ptr<int64_t>();
  std::vector<int64_t> moved;
  for (int64_t i = 0; i < rows; ++i) {
    TORCH_CHECK(src[i] >= 0 && src[i] < rows, "reorder_rows: source row ", src[i], " out of ", rows);
    if (src[i] != i) moved.push_back(i);
  }
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(t.is_contiguous() && t.dim() >= 1 && t.size(0) == rows && t.device().is_cpu(),
                "reorder_rows: every tensor must be contiguous on cpu with ", rows, " rows");
    TORCH_CHECK(end < 0 || (t.dim() == 4 && 0 <= start && start <= end && end <= t.size(2)),
                "reorder_rows: positions [", start, ", ", end, ") need 4-D tensors that hold them");
  }
  if (moved.empty() || start == end) return;
  at::parallel_for(0, static_cast<int64_t>(tensors.size()), 1, [&](int64_t t0, int64_t t1) {
    std::vector<char> held;
    for (int64_t t = t0; t < t1; ++t) {
      const at::Tensor& tensor = tensors[t];
      char* base = static_cast<char*>(tensor.data_ptr());
      const int64_t row = tensor.nbytes() / rows;
      // what moves of a row: `count` spans of `size` bytes, `stride` apart, from `offset`
      int64_t count = 1, stride = 0, offset = 0, size = row;
      if (end >= 0) {
        const int64_t position = tensor.size(3) * tensor.element_size();
        count = tensor.size(1), stride = tensor.size(2) * position, offset = start * position;
        size = (end - start) * position;
      }
      held.resize(moved.size() * count * size);
      char* h = held.data();
      for (int64_t m : moved)
        for (int64_t c = 0; c < count; ++c, h += size) std::memcpy(h, base + src[m] * row + c * stride + offset, size);
      h = held.data();
      for (int64_t m : moved)
        for (int64_t c = 0; c < count; ++c, h += size) std::memcpy(base + m * row + c * stride + offset, h, size);
    }
  });
}

// Beam search's first choice (llmbench_cpu::topk_rows): for each row m of scores (M x V, float32) plus offset[m]
// (its beam's score so far), the k largest sums, largest first, and their columns, the lower column first among
// equal sums (the order torch.topk leaves unspecified). A row is split between the threads as argmax_rows' rows
// are, each part scanned 8 values at a time against its k-th best so far. aten's topk over the default model's 4
// rows of 49152 took ~150-180 us of every beam-4 step on 2 cores. A row holding NaN gets at::topk's answer instead.
constexpr int64_t kMaxTop = 64;  // the most sums a row's pick keeps (beam search asks for its number of beams)

struct Top {
  float value;
  int64_t index;
};

// Part j0..j1-1 of a row: its k best sums (fewer where the part is shorter) into top, largest first, equal ones in
// column order; -> how many, or -1 where a sum is NaN.
inline int64_t top_in(const float* x, float offset, int64_t j0, int64_t j1, int64_t k, Top* top) {
  int64_t n = 0;
  float floor = -std::numeric_limits<float>::infinity();  // the k-th best, once there are k
  auto keep = [&](float v, int64_t j) {
    int64_t p = n < k ? n++ : k - 1;
    for (; p > 0 && top[p - 1].value < v; --p) top[p] = top[p - 1];
    top[p] = {v, j};
    if (n == k) floor = top[k - 1].value;
  };
  bool any_nan = false;
  int64_t j = j0;
#ifdef __AVX2__
  const __m256 shift = _mm256_set1_ps(offset);
  __m256 nan = _mm256_setzero_ps();
  for (; j + 8 <= j1; j += 8) {
    const __m256 v = _mm256_add_ps(_mm256_loadu_ps(x + j), shift);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    if (n < k || _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(floor), _CMP_GT_OQ))) {
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, v);
      for (int i = 0; i < 8; ++i)
        if (n < k || lanes[i] > floor) keep(lanes[i], j + i);
    }
  }
  any_nan = _mm256_movemask_ps(nan) != 0;
#endif
  for (; j < j1; ++j) {
    const float v = x[j] + offset;
    any_nan |= v != v;
    if (n < k || v > floor) keep(v, j);
  }
  return any_nan ? -1 : n;
}

std::tuple<at::Tensor, at::Tensor> topk_rows(const at::Tensor& scores, const at::Tensor& offset, int64_t k) {
  TORCH_CHECK(scores.dim() == 2 && scores.scalar_type() == at::kFloat && scores.stride(1) == 1,
              "topk_rows: scores must be float32 (rows, columns) with contiguous rows, got ", scores.scalar_type(),
              " ", scores.sizes());
  const int64_t M = scores.size(0), V = scores.size(1), stride = scores.stride(0);
  TORCH_CHECK(k >= 1 && k <= std::min(V, kMaxTop), "topk_rows: k must be 1 to ", std::min(V, kMaxTop), ", got ", k);
  const at::Tensor off = offset.contiguous();
  TORCH_CHECK(off.scalar_type() == at::kFloat && off.numel() == M, "topk_rows: offset must be float32 with one value "
              "per row (", M, "), got ", off.scalar_type(), " with ", off.numel());
  const float* x = scores.data_ptr<float>();
  const float* o = off.data_ptr<float>();
  const int64_t parts = row_parts(V);
  std::vector<Top> tops(M * parts * k);
  std::vector<int64_t> counts(M * parts);
  each_row_part(M, V, parts, [&](int64_t t, int64_t m, int64_t j0, int64_t j1) {
    counts[t] = top_in(x + m * stride, o[m], j0, j1, k, &tops[t * k]);
  });
  if (std::any_of(counts.begin(), counts.end(), [](int64_t c) { return c < 0; })) {
    auto [values, indices] = at::topk(scores + off.unsqueeze(1), k, 1);
    return {values, indices};
  }
  at::Tensor values = at::empty({M, k}, scores.options());
  at::Tensor indices = at::empty({M, k}, scores.options().dtype(at::kLong));
  float* vo = values.data_ptr<float>();
  int64_t* io = indices.data_ptr<int64_t>();
  std::vector<Top> row;
  for (int64_t m = 0; m < M; ++m) {
    row.clear();  // the parts' picks in column order, then the best k, equal sums keeping that order
    for (int64_t p = 0; p < parts; ++p)
      row.insert(row.end(), &tops[(m * parts + p) * k], &tops[(m * parts + p) * k] + counts[m * parts + p]);
    std::stable_sort(row.begin(), row.end(), [](const Top& a, const Top& b) { return a.value > b.value; });
    for (int64_t i = 0; i < k; ++i) vo[m * k + i] = row[i].value, io[m * k + i] = row[i].index;
  }
  return {values, indices};
}
