// Part of cpu_attention.cpp: one task's attention over a cached head (attend_group), included inside its anonymous
// namespace after the helpers it uses (widen, MaskRow, Vec, sum16, vexp, prefetch_row).
#pragma once

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
