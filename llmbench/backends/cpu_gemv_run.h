// Part of cpu_gemv.cpp: how a call's weight rows are shared between the threads (run) and its outputs written.
// Every linear kernel runs through run(); with the linears' work switched off (set_linear_work(False), for
// benchmarks/step_split.py) run() returns zeros without reading the weights, so that a compiled decode step's time
// splits into its weights' reads and everything else.
std::atomic<bool> linear_work{true};

bool set_linear_work(bool on) { return linear_work.exchange(on); }

// One output row: float32 values in the output's dtype (bf16 16 at a time where the CPU converts them).
template <typename T>
void store_row(const float* src, int64_t n, T* out) {
  int64_t j = 0;
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    for (; j + 16 <= n; j += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + j)));
  }
#endif
  for (; j < n; ++j) out[j] = static_cast<T>(src[j]);
}

// Rows of src (M, n1 - n0), the bias (float32, columns n0..n1-1, or nullptr) added in place, into out (M, N)'s
// columns n0..n1-1.
template <typename T>
void write_out(float* src, int64_t M, int64_t N, int64_t n0, int64_t n1, const float* bias, T* out) {
  const int64_t n = n1 - n0;
  for (int64_t m = 0; m < M; ++m) {
    float* row = src + m * n;
    if (bias)
      for (int64_t j = 0; j < n; ++j) row[j] += bias[j];
    store_row(row, n, out + m * N + n0);
  }
}

template <typename T>
void bias_part(const T* b, int64_t n0, int64_t n1, std::vector<float>& part) {
  part.resize(n1 - n0);
  for (int64_t n = n0; n < n1; ++n) part[n - n0] = static_cast<float>(b[n]);
}

// Runs body(out_chunk, n0, n1) over the weight rows in parallel, in chunks of whole blocks of `unit` rows, and
// writes y (x's dtype and leading shape, N outputs) with the bias added. Calls of up to kEvenSplitRows rows of x:
// one chunk per thread, an even share (cpu_kernels.schedule).
template <typename F>
at::Tensor run(const at::Tensor& x, int64_t M, int64_t N, const c10::optional<at::Tensor>& bias, F body,
               int64_t unit = R) {
  auto shape = x.sizes().vec();
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options());
  if (!linear_work.load(std::memory_order_relaxed)) return y.zero_();
  const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  TORCH_CHECK(!b.defined() || (b.numel() == N && b.is_contiguous() &&
                                   (b.scalar_type() == at::kFloat || b.scalar_type() == at::kBFloat16 ||
                                    b.scalar_type() == at::kHalf)),
              "bias must be a contiguous float32, bfloat16 or float16 vector of the output size");
  const int64_t blocks = (N + unit - 1) / unit;
  // What the threads read, resolved here and captured by value: another thread reads each line this one wrote just
  // before from this CPU's cache, one after another where a pointer leads to the next (tensors' metadata, references
  // to references), and on a 2-vCPU EPYC guest with its CPUs apart (llmbench.placement) each took ~0.3 us.
  void* const out = y.data_ptr();
  const at::ScalarType out_type = y.scalar_type(), bias_type = b.defined() ? b.scalar_type() : at::kFloat;
  const void* const bias_data = b.defined() ? b.data_ptr() : nullptr;
  auto chunk = [=](int64_t b0, int64_t b1, std::vector<float>& part, std::vector<float>& bf) {
    const int64_t n0 = b0 * unit, n1 = std::min(N, b1 * unit);
    part.resize(M * (n1 - n0));
    body(part.data(), n0, n1);
    const float* bp = nullptr;
    if (bias_data) {
      switch (bias_type) {
        case at::kFloat: bp = static_cast<const float*>(bias_data) + n0; break;
        case at::kBFloat16: bias_part(static_cast<const at::BFloat16*>(bias_data), n0, n1, bf); bp = bf.data(); break;
        default: bias_part(static_cast<const at::Half*>(bias_data), n0, n1, bf); bp = bf.data(); break;
      }
    }
    switch (out_type) {
      case at::kFloat: write_out(part.data(), M, N, n0, n1, bp, static_cast<float*>(out)); break;
      case at::kBFloat16: write_out(part.data(), M, N, n0, n1, bp, static_cast<at::BFloat16*>(out)); break;
      default: write_out(part.data(), M, N, n0, n1, bp, static_cast<at::Half*>(out)); break;
    }
  };
  const int64_t threads = at::get_num_threads();
  if (M <= kEvenSplitRows) {  // one OpenMP region, no at::parallel_for wrappers for the threads to read through
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1 && !omp_in_parallel())
#endif
    {
      std::vector<float> part, bf;
#ifdef _OPENMP
      const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
#else
      const int64_t t = 0, n = 1;
#endif
      chunk(t * blocks / n, (t + 1) * blocks / n, part, bf);
    }
    return y;
  }
  // Guided scheduling: threads claim chunks of half their share of what is left (at least 32 rows), so a thread
  // whose core runs slower (a busy hyperthread sibling on a shared host) takes less. Against an even split fixed in
  // advance, alternating processes on a 2-vCPU AMX Xeon guest took 0.94x the step time, INT4 and bf16 alike.
  const int64_t least = 32 / unit;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    std::vector<float> part, bf;
    int64_t b0 = next.load();
    while (b0 < blocks) {
      const int64_t size = threads == 1 ? blocks : std::max<int64_t>(least, (blocks - b0) / (2 * threads));
      if (!next.compare_exchange_weak(b0, b0 + size)) continue;  // b0 now holds what another thread left
      chunk(b0, std::min(blocks, b0 + size), part, bf);
      b0 = next.load();
    }
  });
  return y;
}
