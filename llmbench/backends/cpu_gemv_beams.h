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
