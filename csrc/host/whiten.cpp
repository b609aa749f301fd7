// whiten on the host: per-row moments in double (threads over rows), the batch moments from them
// (serial, B values), then the elementwise map (threads over rows).
//
// Bytes per token: the moments read x and the mask twice (the second time from cache), the map
// reads them once more and writes out: 10 B from memory, 4 written.
#include <cstdint>
#include <vector>

#include "rlhf_fast/host_threads.h"
#include "rlhf_fast/whiten.h"

namespace rlhf_fast {

Moments<double> row_moments_host(const float* x, const uint8_t* mask, int64_t tokens) {
  double n = 0.0, sum = 0.0;
#pragma omp simd reduction(+ : n, sum)
  for (int64_t t = 0; t < tokens; ++t) {
    const bool valid = mask[t] != 0;
    n += valid ? 1.0 : 0.0;
    sum += valid ? static_cast<double>(x[t]) : 0.0;
  }
  const double mean = sum / (n > 1.0 ? n : 1.0);
  double m2 = 0.0;
#pragma omp simd reduction(+ : m2)
  for (int64_t t = 0; t < tokens; ++t) {
    const double d = mask[t] != 0 ? static_cast<double>(x[t]) - mean : 0.0;
    m2 += d * d;
  }
  return Moments<double>{n, mean, m2};
}

void whiten_apply_host(const WhitenParams& p, const Moments<double>* row_moments, int num_threads) {
  double n = 0.0, weighted = 0.0;
  for (int64_t b = 0; b < p.rows; ++b) {
    n += row_moments[b].n;
    weighted += row_moments[b].n * row_moments[b].mean;
  }
  const double mean = batch_mean(n, weighted);
  double m2 = 0.0;
  for (int64_t b = 0; b < p.rows; ++b) {
    m2 += batch_spread(row_moments[b].n, row_moments[b].mean, row_moments[b].m2, mean);
  }
  const WhitenStats stats = whiten_stats(n, mean, m2, p.unbiased, p.eps);

  RLHF_FAST_BOOL_SWITCH(p.shift_mean, kShiftMean, [&] {
    parallel_rows(p.rows, p.tokens, num_threads, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t base = row * p.tokens;
        const float* x = p.x + base;
        const uint8_t* mask = p.mask + base;
        float* out = p.out + base;
        for (int64_t t = 0; t < p.tokens; ++t) out[t] = whiten_element<kShiftMean>(x[t], mask[t] != 0, stats);
      }
    });
  });
}

void whiten_forward_host(const WhitenParams& p, int num_threads) {
  std::vector<Moments<double>> row_moments(static_cast<size_t>(p.rows));
  parallel_rows(p.rows, p.tokens, num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      row_moments[row] = row_moments_host(p.x + row * p.tokens, p.mask + row * p.tokens, p.tokens);
    }
  });
  whiten_apply_host(p, row_moments.data(), num_threads);
}

}  // namespace rlhf_fast
