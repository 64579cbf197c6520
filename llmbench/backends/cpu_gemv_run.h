// Part of cpu_gemv.cpp: how a call's weight rows are shared between the threads (run) and its outputs written.
// Every linear kernel runs through run(); with the linears' work switched off (set_linear_work(False), for
// benchmarks/step_split.py) run() returns zeros without reading the weights, so that a compiled decode step's time
// splits into its weights' reads and everything else.
std::atomic<bool> linear_work{true};

bool set_linear_work(bool on) { return linear_work.exchange(on); }

// Built with -DLLMBENCH_CALL_TRACE=1 (benchmarks/call_timeline.py), run() notes for each one-pass call when it was
// entered, its region started, the first two threads began and finished their shares, and it returned (steady clock,
// ns), and decode attention's calls (cpu_attention.cpp, N = -1); call_trace() hands the notes over and starts
// again. Other builds note nothing.
#ifndef LLMBENCH_CALL_TRACE
#define LLMBENCH_CALL_TRACE 0
#endif
constexpr int64_t kTraceCalls = 16384, kTraceFields = 9;  // entry, region, 2 x (start, end), exit, N, M
static int64_t traced[kTraceCalls][kTraceFields];
static int64_t traced_shares[2][kTraceCalls][2];  // each thread writes its own lines
static std::atomic<int64_t> traced_calls{0};

inline int64_t trace_now() {
  if constexpr (!LLMBENCH_CALL_TRACE) return 0;
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

struct CallTrace {
  int64_t slot = -1;
  CallTrace(int64_t entry, int64_t N, int64_t M) {
    if constexpr (!LLMBENCH_CALL_TRACE) return;
    slot = traced_calls.fetch_add(1) % kTraceCalls;
    int64_t* const row = traced[slot];
    row[0] = entry, row[7] = N, row[8] = M, row[1] = trace_now();
  }
  void share(int64_t t, int64_t start) const {
    if (LLMBENCH_CALL_TRACE && t < 2) traced_shares[t][slot][0] = start, traced_shares[t][slot][1] = trace_now();
  }
  void done() const {
    if (LLMBENCH_CALL_TRACE) traced[slot][6] = trace_now();
  }
};

// Another op's call (decode attention's, N = -1), one thread's span from its entry to its return.
void note_call(int64_t entry, int64_t rows) {
  if constexpr (!LLMBENCH_CALL_TRACE) return;
  const CallTrace trace(entry, -1, rows);
  const int64_t leave = trace_now();
  traced[trace.slot][1] = entry, traced_shares[0][trace.slot][0] = entry, traced_shares[0][trace.slot][1] = leave;
  traced_shares[1][trace.slot][0] = traced_shares[1][trace.slot][1] = leave;
  traced[trace.slot][6] = leave;
}

at::Tensor call_trace() {
  TORCH_CHECK(LLMBENCH_CALL_TRACE, "call_trace: these kernels were built without -DLLMBENCH_CALL_TRACE=1");
  const int64_t calls = traced_calls.exchange(0), n = std::min(calls, kTraceCalls);
  at::Tensor out = at::empty({n, kTraceFields}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t k = 0; k < n; ++k, o += kTraceFields) {  // oldest first: the last kTraceCalls calls
    const int64_t i = (calls - n + k) % kTraceCalls;
    std::copy(traced[i], traced[i] + kTraceFields, o);
    std::copy(traced_shares[0][i], traced_shares[0][i] + 2, o + 2);
    std::copy(traced_shares[1][i], traced_shares[1][i] + 2, o + 4);
  }
  return out;
}

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

// Rows of src (M, n1 - n0) with the bias (float32, columns n0..n1-1, or nullptr) added in place.
inline void add_bias(float* src, int64_t M, int64_t n, const float* bias) {
  if (bias)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < n; ++j) src[m * n + j] += bias[j];
}

// p's count floats rounded to T's precision (as the separate kernels' outputs in memory would be).
template <typename T>
void round_to(float* p, int64_t count) {
  if constexpr (std::is_same_v<T, float>) return;
  int64_t j = 0;
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, at::BFloat16>)
    for (; j + 16 <= count; j += 16) {
      const __m256i h = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(p + j));
      _mm512_storeu_ps(p + j, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
    }
#endif
#if defined(__F16C__)
  if constexpr (std::is_same_v<T, at::Half>)
    for (; j + 8 <= count; j += 8)
      _mm256_storeu_ps(p + j, _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(p + j), _MM_FROUND_TO_NEAREST_INT)));
#endif
  for (; j < count; ++j) p[j] = static_cast<float>(static_cast<T>(p[j]));
}

// silu(g) * u in place of g, count values, rounded as inductor's own kernel after the linear would round them: g and
// u (the linear's outputs in memory) to T, silu(g) = g / (1 + e^-g) and the product in float32, rounded by the
// caller's store; e^-g clamped below float's overflow.
template <typename T>
void silu_mul(float* g, float* u, int64_t count) {
  round_to<T>(g, count);
  round_to<T>(u, count);
  int64_t j = 0;
#if defined(LLMBENCH_VEC)
  const Vec::R one = Vec::set1(1.f), zero = Vec::zero(), low = Vec::set1(-88.f);
  for (; j + Vec::W <= count; j += Vec::W) {
    const Vec::R v = Vec::load(g + j);
    const Vec::R silu = Vec::div(v, Vec::add(one, vexp(Vec::sub(zero, Vec::max(v, low)))));
    Vec::store(g + j, Vec::mul(silu, Vec::load(u + j)));
  }
#endif
  for (; j < count; ++j) g[j] = g[j] / (1.f + std::exp(-std::max(g[j], -88.f))) * u[j];
}

// Rows of src (M, n1 - n0) into out (M, N)'s columns n0..n1-1.
template <typename T>
void write_out(const float* src, int64_t M, int64_t N, int64_t n0, int64_t n1, T* out) {
  const int64_t n = n1 - n0;
  for (int64_t m = 0; m < M; ++m) store_row(src + m * n, n, out + m * N + n0);
}

template <typename T>
void bias_part(const T* b, int64_t n0, int64_t n1, std::vector<float>& part) {
  part.resize(n1 - n0);
  for (int64_t n = n0; n < n1; ++n) part[n - n0] = static_cast<float>(b[n]);
}

// Runs body(out_chunk, n0, n1) over the weight rows in parallel, in chunks of whole blocks of `unit` rows, and
// writes y (x's dtype and leading shape) with the bias added. act 0: y is the N outputs. act 1 (a gated unit's
// gate and up projections in one weight, gate rows first): y is silu(gate) * up, N / 2 outputs, each chunk's gate
// rows read with their up rows and multiplied in the thread that read them (llmbench.backends.glu_epilogue puts
// such calls in place of a compiled graph's linear, SiLU and multiply). Calls of up to kEvenSplitRows rows of x:
// one chunk per thread, an even share (cpu_kernels.schedule).
template <typename F>
at::Tensor run(const at::Tensor& x, int64_t M, int64_t N, const c10::optional<at::Tensor>& bias, int64_t act, F body,
               int64_t unit = R) {
  const int64_t entry = trace_now();
  run_calls.fetch_add(1, std::memory_order_relaxed);
  TORCH_CHECK(act == 0 || act == 1, "act must be 0 (the outputs) or 1 (SiLU of the first half times the second)");
  const int64_t half = N / 2, cols = act ? half : N;
  TORCH_CHECK(!act || (N % 2 == 0 && half % unit == 0), "act 1 needs the gate's and the up projection's rows in ",
              "blocks of ", unit, ", got ", N, " rows");
  auto shape = x.sizes().vec();
  shape.back() = cols;
  at::Tensor y = at::empty(shape, x.options());
  if (!linear_work.load(std::memory_order_relaxed)) return y.zero_();
  const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  TORCH_CHECK(!b.defined() || (b.numel() == N && b.is_contiguous() &&
                                   (b.scalar_type() == at::kFloat || b.scalar_type() == at::kBFloat16 ||
                                    b.scalar_type() == at::kHalf)),
              "bias must be a contiguous float32, bfloat16 or float16 vector of the weight's rows");
  const int64_t blocks = (cols + unit - 1) / unit;
  // What the threads read, resolved here and captured by value: another thread reads each line this one wrote just
  // before from this CPU's cache, one after another where a pointer leads to the next (tensors' metadata, references
  // to references), and on a 2-vCPU EPYC guest with its CPUs apart (llmbench.placement) each took ~0.3 us.
  void* const out = y.data_ptr();
  const at::ScalarType out_type = y.scalar_type(), bias_type = b.defined() ? b.scalar_type() : at::kFloat;
  const void* const bias_data = b.defined() ? b.data_ptr() : nullptr;
  // weight rows n0..n1-1 into part (M, n1 - n0), their bias added
  auto rows = [=](int64_t n0, int64_t n1, std::vector<float>& part, std::vector<float>& bf) {
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
    add_bias(part.data(), M, n1 - n0, bp);
  };
  auto chunk = [=](int64_t b0, int64_t b1, std::vector<float>& part, std::vector<float>& up, std::vector<float>& bf) {
    const int64_t n0 = b0 * unit, n1 = std::min(cols, b1 * unit);
    rows(n0, n1, part, bf);
    if (act) rows(half + n0, half + n1, up, bf);  // the matching up rows
    auto write = [&](auto* o) {
      if (act) silu_mul<std::remove_pointer_t<decltype(o)>>(part.data(), up.data(), M * (n1 - n0));
      write_out(part.data(), M, cols, n0, n1, o);
    };
    switch (out_type) {
      case at::kFloat: write(static_cast<float*>(out)); break;
      case at::kBFloat16: write(static_cast<at::BFloat16*>(out)); break;
      default: write(static_cast<at::Half*>(out)); break;
    }
  };
  const int64_t threads = at::get_num_threads();
  if (M <= kEvenSplitRows) {  // one OpenMP region, no at::parallel_for wrappers for the threads to read through
    const CallTrace trace(entry, N, M);
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1 && !omp_in_parallel())
#endif
    {
      std::vector<float> part, up, bf;
#ifdef _OPENMP
      const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
#else
      const int64_t t = 0, n = 1;
#endif
      const int64_t start = trace_now();
      chunk(t * blocks / n, (t + 1) * blocks / n, part, up, bf);
      trace.share(t, start);
    }
    trace.done();
    return y;
  }
  // Guided scheduling (calls of more rows, and every call of builds without LLMBENCH_EVEN_SPLIT_ROWS): threads claim
  // chunks of half their share of what is left (at least 32 rows), so a thread whose core runs slower takes less.
  const int64_t least = 32 / unit;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    std::vector<float> part, up, bf;
    int64_t b0 = next.load();
    while (b0 < blocks) {
      const int64_t size = threads == 1 ? blocks : std::max<int64_t>(least, (blocks - b0) / (2 * threads));
      if (!next.compare_exchange_weak(b0, b0 + size)) continue;  // b0 now holds what another thread left
      chunk(b0, std::min(blocks, b0 + size), part, up, bf);
      b0 = next.load();
    }
  });
  return y;
}
