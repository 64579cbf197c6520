// Beam search's part of cpu_gemv.cpp, included inside its anonymous namespace.
#pragma once

// Beam search's cache reorder in place: row i (dim 0) of every tensor becomes its row source[i]. One call for all
// of a cache's tensors (two aten ops per tensor cost more than the copying on a small model), shared out among
// threads by tensor; rows that keep their place are not copied. With end >= 0, only positions [start, end) of dim 2
// of (rows, heads, positions, head dim) tensors move: the rest is the same in every row (beam search's prompt,
// copied into each of its beams), so a long prompt is not copied at every step.
// With `writers` as well (int64, rows x at least end - start: for each row and position from start, the row whose
// step wrote what the row holds there), a row takes only the positions where its source holds another writer's keys
// and values: two rows that hold the same writer's position hold the same values. The step before the call has just
// written position end - 1 of every row, which the call notes first; then each row takes its source's writers. A
// prompt's beams share most of their history, so most positions stay: 19% / 5% of the generated positions that
// would have moved were copied, beam 4 of the default model at 64 / 512 new tokens.
void reorder_rows(at::TensorList tensors, const at::Tensor& source, int64_t start, int64_t end,
                  const std::optional<at::Tensor>& writers) {
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
  if (start == end) return;
  // what moves: positions [first, last) of row `row` from row `from` (whole rows: the one "position" 0)
  struct Span {
    int64_t row, from, first, last;
  };
  std::vector<Span> spans;
  if (writers) {
    const at::Tensor& w = *writers;
    TORCH_CHECK(end >= 0 && w.dim() == 2 && w.scalar_type() == at::kLong && w.is_contiguous() &&
                    w.size(0) == rows && w.size(1) >= end - start,
                "reorder_rows: writers must be a contiguous int64 tensor of ", rows, " rows and at least ",
                end - start, " positions, with positions [start, end) given");
    const int64_t n = end - start, width = w.size(1);
    int64_t* wr = w.data_ptr<int64_t>();
    for (int64_t i = 0; i < rows; ++i) wr[i * width + n - 1] = i;
    std::vector<int64_t> held(moved.size() * n);
    for (size_t k = 0; k < moved.size(); ++k) {
      const int64_t* to = wr + moved[k] * width;
      const int64_t* from = wr + src[moved[k]] * width;
      std::copy(from, from + n, held.data() + k * n);
      for (int64_t p = 0; p < n;) {
        if (to[p] == from[p]) {
          ++p;
          continue;
        }
        const int64_t first = p;
        while (p < n && to[p] != from[p]) ++p;
        spans.push_back({moved[k], src[moved[k]], start + first, start + p});
      }
    }
    for (size_t k = 0; k < moved.size(); ++k) std::copy_n(held.data() + k * n, n, wr + moved[k] * width);
  } else {
    for (int64_t m : moved) spans.push_back({m, src[m], end < 0 ? 0 : start, end < 0 ? 1 : end});
  }
  if (spans.empty()) return;
  int64_t span_positions = 0, bytes = 0;
  for (const Span& s : spans) span_positions += s.last - s.first;
  for (const at::Tensor& t : tensors) bytes += t.nbytes() / rows / (end < 0 ? 1 : t.size(2)) * span_positions;
  // up to 256 KB to copy (most steps with `writers`) stay on the calling thread
  const int64_t grain = bytes < (int64_t{1} << 18) ? std::max<int64_t>(1, tensors.size()) : 1;
  at::parallel_for(0, static_cast<int64_t>(tensors.size()), grain, [&](int64_t t0, int64_t t1) {
    std::vector<char> held;
    for (int64_t t = t0; t < t1; ++t) {
      const at::Tensor& tensor = tensors[t];
      char* base = static_cast<char*>(tensor.data_ptr());
      const int64_t row = tensor.nbytes() / rows;
      // a span's bytes: `count` pieces, `stride` apart, of `position` bytes per position
      int64_t count = 1, stride = 0, position = row;
      if (end >= 0) count = tensor.size(1), position = tensor.size(3) * tensor.element_size(),
                    stride = tensor.size(2) * position;
      held.resize(span_positions * count * position);
      char* h = held.data();
      for (const Span& s : spans)
        for (int64_t c = 0; c < count; ++c, h += (s.last - s.first) * position)
          std::memcpy(h, base + s.from * row + c * stride + s.first * position, (s.last - s.first) * position);
      h = held.data();
      for (const Span& s : spans)
        for (int64_t c = 0; c < count; ++c, h += (s.last - s.first) * position)
          std::memcpy(base + s.row * row + c * stride + s.first * position, h, (s.last - s.first) * position);
    }
  });
}

// Beam search's first choice (llmbench_cpu::topk_rows): for each row m of scores (M x V: float32, bfloat16 or
// float16; with `normalize`, the head's logits, taken to their log-softmax in float32 first), plus bias (float32, V
// values, -inf for the tokens forbidden, or none) and offset[m] (its beam's score so far), the k largest sums,
// largest first, and their columns, the lower column first among equal sums (the order torch.topk leaves
// unspecified). A row is split between the threads as argmax_rows' rows are, each part scanned 8 values at a time
// against its k-th best so far (with `normalize`, after a pass for each part's largest logit and sum of
// exponentials). aten's topk over the default model's 4 rows of 49152 took ~150-180 us of every beam-4 step on 2
// cores, the compiled step's log-softmax over them (float32, read again by the pick) ~180 us. A row whose sums hold
// NaN gets at::topk's answer (over at::log_softmax's) instead.
constexpr int64_t kMaxTop = 64;  // the most sums a row's pick keeps (beam search asks for its number of beams)

struct Top {
  float value;
  int64_t index;
};

// Part j0..j1-1 of a row: its k best sums (fewer where the part is shorter) into top, largest first, equal ones in
// column order; -> how many, or -1 where a sum is NaN. sum(j) gives sum j, sums(j) sums j..j+7 (v8f).
template <typename Sum, typename Sums>
inline int64_t top_in(int64_t j0, int64_t j1, int64_t k, Top* top, Sum&& sum, Sums&& sums) {
  int64_t n = 0;
  float floor = -std::numeric_limits<float>::infinity();  // the k-th best, once there are k
  auto keep = [&](float v, int64_t j) {
    int64_t p = n < k ? n++ : k - 1;
    for (; p > 0 && top[p - 1].value < v; --p) top[p] = top[p - 1];
    top[p] = {v, j};
    if (n == k) floor = top[k - 1].value;
  };
  v8i nan = {};
  int64_t j = j0;
  for (; j + 8 <= j1; j += 8) {
    const v8f v = sums(j);
    nan |= v != v;
    const v8i above = v > floor;
    if (n < k || any_lane(above))
      for (int i = 0; i < 8; ++i)
        if (n < k || v[i] > floor) keep(v[i], j + i);
  }
  bool any_nan = any_lane(nan);
  for (; j < j1; ++j) {
    const float v = sum(j);
    any_nan |= v != v;
    if (n < k || v > floor) keep(v, j);
  }
  return any_nan ? -1 : n;
}

// A row's log-softmax: x - top - log(total) for its largest value top and total = sum of e^(x - top).
struct Softmax {
  float top = -std::numeric_limits<float>::infinity(), total = 0.f;
};

// Part j0..j1-1 of a row: its largest value and the sum of e^(x - that), Vec::W at a time where vectors are built.
template <typename T>
Softmax softmax_part(const T* x, int64_t j0, int64_t j1) {
  Softmax s;
  int64_t j = j0;
#if defined(LLMBENCH_VEC)
  constexpr int W = Vec::W;
  Vec::R top = Vec::set1(s.top);
  for (; j + W <= j1; j += W) top = Vec::max(top, Vec::widen(x + j));
  alignas(64) float lanes[W];
  Vec::store(lanes, top);
  for (int i = 0; i < W; ++i) s.top = std::max(s.top, lanes[i]);
  for (int64_t i = j; i < j1; ++i) s.top = std::max(s.top, static_cast<float>(x[i]));
  if (std::isinf(s.top)) return s;  // all -inf (or +inf: the sums turn NaN, and at::topk answers)
  Vec::R total = Vec::zero();
  int64_t i = j0;
  for (; i + W <= j1; i += W) total = Vec::add(total, vexp(Vec::sub(Vec::widen(x + i), Vec::set1(s.top))));
  s.total = Vec::sum(total);
  j = i;
#else
  for (int64_t i = j0; i < j1; ++i) s.top = std::max(s.top, static_cast<float>(x[i]));
  if (std::isinf(s.top)) return s;
#endif
  for (; j < j1; ++j) s.total += std::exp(static_cast<float>(x[j]) - s.top);
  return s;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> topk_rows_of(const at::Tensor& scores, const at::Tensor& offset, int64_t k,
                                                const float* bias, bool normalize) {
  const int64_t M = scores.size(0), V = scores.size(1), stride = scores.stride(0);
  const T* x = scores.data_ptr<T>();
  const float* o = offset.data_ptr<float>();
  const int64_t parts = row_parts(V);
  std::vector<float> shift(M, 0.f), scale(M, 0.f);  // sum j of row m: ((x - shift) - scale) + bias + offset
  if (normalize) {
    std::vector<Softmax> soft(M * parts);
    each_row_part(M, V, parts, [&](int64_t t, int64_t m, int64_t j0, int64_t j1) {
      soft[t] = softmax_part(x + m * stride, j0, j1);
    });
    for (int64_t m = 0; m < M; ++m) {
      float top = -std::numeric_limits<float>::infinity(), total = 0.f;
      const Softmax* part = &soft[m * parts];
      for (int64_t p = 0; p < parts; ++p) top = std::max(top, part[p].top);
      for (int64_t p = 0; p < parts; ++p)
        if (part[p].total > 0.f) total += part[p].total * std::exp(part[p].top - top);
      shift[m] = top, scale[m] = std::log(total);
    }
  }
  std::vector<Top> tops(M * parts * k);
  std::vector<int64_t> counts(M * parts);
  each_row_part(M, V, parts, [&](int64_t t, int64_t m, int64_t j0, int64_t j1) {
    const T* row = x + m * stride;
    const float off = o[m], sh = shift[m], sc = scale[m];
    auto sum = [&](int64_t j) {
      float v = normalize ? (static_cast<float>(row[j]) - sh) - sc : static_cast<float>(row[j]);
      if (bias) v += bias[j];
      return v + off;
    };
    auto sums = [&](int64_t j) {
      v8f v = widen(row + j);
      if (normalize) v = (v - sh) - sc;
      if (bias) v += load_f32(bias + j);
      return v + off;
    };
    counts[t] = top_in(j0, j1, k, &tops[t * k], sum, sums);
  });
  if (std::any_of(counts.begin(), counts.end(), [](int64_t c) { return c < 0; })) {
    at::Tensor sums = normalize ? at::log_softmax(scores.to(at::kFloat), 1) : scores.to(at::kFloat);
    if (bias) sums = sums + at::from_blob(const_cast<float*>(bias), {V}, scores.options().dtype(at::kFloat));
    auto [values, indices] = at::topk(sums + offset.unsqueeze(1), k, 1);
    return {values, indices};
  }
  at::Tensor values = at::empty({M, k}, scores.options().dtype(at::kFloat));
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

std::tuple<at::Tensor, at::Tensor> topk_rows(const at::Tensor& scores, const at::Tensor& offset, int64_t k,
                                             const c10::optional<at::Tensor>& bias, bool normalize) {
  TORCH_CHECK(scores.dim() == 2 && scores.stride(1) == 1 &&
                  (scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kBFloat16 ||
                   scores.scalar_type() == at::kHalf),
              "topk_rows: scores must be float32, bfloat16 or float16 (rows, columns) with contiguous rows, got ",
              scores.scalar_type(), " ", scores.sizes());
  const int64_t M = scores.size(0), V = scores.size(1);
  TORCH_CHECK(k >= 1 && k <= std::min(V, kMaxTop), "topk_rows: k must be 1 to ", std::min(V, kMaxTop), ", got ", k);
  const at::Tensor off = offset.contiguous();
  TORCH_CHECK(off.scalar_type() == at::kFloat && off.numel() == M, "topk_rows: offset must be float32 with one value "
              "per row (", M, "), got ", off.scalar_type(), " with ", off.numel());
  const bool biased = bias.has_value() && bias->defined();
  TORCH_CHECK(!biased || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == V),
              "topk_rows: bias must be a contiguous float32 vector of one value per column (", V, ")");
  const float* b = biased ? bias->data_ptr<float>() : nullptr;
  switch (scores.scalar_type()) {
    case at::kBFloat16: return topk_rows_of<at::BFloat16>(scores, off, k, b, normalize);
    case at::kHalf: return topk_rows_of<at::Half>(scores, off, k, b, normalize);
    default: return topk_rows_of<float>(scores, off, k, b, normalize);
  }
}

// One step's choice of beam search in one call (llmbench_cpu::beam_choose), where the loop had taken topk_rows and a
// dozen small tensor ops (~180 us of a 4.2 ms beam-4 step of the default model on 2 cores, their code and data cold
// after the step's weights had gone through the caches). Rows are a prompt's beams one after another; scores (one
// float32 per row) hold each beam's sum of log-probabilities so far. Each row's `beams` best (topk_rows, the logits
// taken to their log-softmax, plus bias and the row's score), then per prompt the best `beams` of its beams x beams
// candidates, largest first (equal sums: the lower beam, then its better pick). scores become the chosen sums; row
// r of sequences (int64, rows x more than `column`) takes the first `column` ids of the row it continues and its new
// token at `column`. -> (the rows continued, int64 (rows); the new tokens, int64 (rows, 1)).
std::tuple<at::Tensor, at::Tensor> beam_choose(const at::Tensor& logits, at::Tensor& scores, int64_t beams,
                                               const c10::optional<at::Tensor>& bias, at::Tensor& sequences,
                                               int64_t column) {
  const int64_t rows = logits.dim() == 2 ? logits.size(0) : 0;
  TORCH_CHECK(rows > 0 && beams >= 1 && rows % beams == 0, "beam_choose: logits must be (rows, vocabulary) with ",
              "rows a multiple of beams (", beams, "), got ", logits.sizes());
  TORCH_CHECK(scores.is_contiguous() && scores.scalar_type() == at::kFloat && scores.numel() == rows,
              "beam_choose: scores must be contiguous float32 with one value per row (", rows, ")");
  TORCH_CHECK(sequences.dim() == 2 && sequences.is_contiguous() && sequences.scalar_type() == at::kLong &&
                  sequences.size(0) == rows && 0 <= column && column < sequences.size(1),
              "beam_choose: sequences must be contiguous int64 (", rows, " rows, more than ", column, " columns)");
  const auto [values, indices] = topk_rows(logits, scores, beams, bias, true);
  const float* v = values.data_ptr<float>();
  const int64_t* picked = indices.data_ptr<int64_t>();
  float* s = scores.data_ptr<float>();
  at::Tensor source = at::empty({rows}, indices.options()), tokens = at::empty({rows, 1}, indices.options());
  int64_t* from = source.data_ptr<int64_t>();
  int64_t* token = tokens.data_ptr<int64_t>();
  auto key = [&](int64_t c) { return std::isnan(v[c]) ? -std::numeric_limits<float>::infinity() : v[c]; };
  std::vector<int64_t> order(beams * beams);
  for (int64_t b = 0; b < rows / beams; ++b) {
    const int64_t first = b * beams * beams;  // the prompt's candidates: beams x beams, beam by beam
    for (int64_t c = 0; c < beams * beams; ++c) order[c] = first + c;
    std::partial_sort(order.begin(), order.begin() + beams, order.end(), [&](int64_t x, int64_t y) {
      return key(x) > key(y) || (key(x) == key(y) && x < y);
    });
    for (int64_t j = 0; j < beams; ++j) {
      const int64_t c = order[j], r = b * beams + j;
      from[r] = c / beams, token[r] = picked[c], s[r] = v[c];
    }
  }
  const int64_t width = sequences.size(1);
  int64_t* ids = sequences.data_ptr<int64_t>();
  std::vector<int64_t> held(ids, ids + rows * width);
  for (int64_t r = 0; r < rows; ++r) {
    if (from[r] != r) std::copy_n(held.data() + from[r] * width, column, ids + r * width);
    ids[r * width + column] = token[r];
  }
  return {source, tokens};
}
