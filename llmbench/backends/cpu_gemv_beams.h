// Beam search's part of cpu_gemv.cpp, included inside its anonymous namespace.
#pragma once

// Beam search's cache reorder in place: row i (dim 0) of every tensor becomes its row source[i]. One call for all
// of a cache's tensors (two aten ops per tensor cost more than the copying on a small model), shared out among
// threads by tensor; rows that keep their place are not copied.
void reorder_rows(at::TensorList tensors, const at::Tensor& source) {
  TORCH_CHECK(source.dim() == 1 && source.scalar_type() == at::kLong && source.is_contiguous(),
              "reorder_rows: source must be a contiguous int64 vector");
  const int64_t rows = source.numel();
  const int64_t* src = source.data_ptr<int64_t>();
  std::vector<int64_t> moved;
  for (int64_t i = 0; i < rows; ++i) {
    TORCH_CHECK(src[i] >= 0 && src[i] < rows, "reorder_rows: source row ", src[i], " out of ", rows);
    if (src[i] != i) moved.push_back(i);
  }
  for (const at::Tensor& t : tensors)
    TORCH_CHECK(t.is_contiguous() && t.dim() >= 1 && t.size(0) == rows && t.device().is_cpu(),
                "reorder_rows: every tensor must be contiguous on cpu with ", rows, " rows");
  if (moved.empty()) return;
  at::parallel_for(0, static_cast<int64_t>(tensors.size()), 1, [&](int64_t t0, int64_t t1) {
    std::vector<char> held;
    for (int64_t t = t0; t < t1; ++t) {
      char* base = static_cast<char*>(tensors[t].data_ptr());
      const int64_t row = tensors[t].nbytes() / rows;
      held.resize(moved.size() * row);
      for (size_t j = 0; j < moved.size(); ++j) std::memcpy(&held[j * row], base + src[moved[j]] * row, row);
      for (size_t j = 0; j < moved.size(); ++j) std::memcpy(base + moved[j] * row, &held[j * row], row);
    }
  });
}
