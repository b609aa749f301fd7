// whiten: masked whitening over all valid tokens of a [B, T] batch. POD params and the math shared
// by host and CUDA.
//
// Spec: rlhf_fast.reference.whiten; contract: rlhf_fast.backends.base.Provider.whiten_forward.
//     out = (x - mean) / sqrt(var + eps)  (+ mean when not shift_mean)  on valid tokens, 0 elsewhere,
// with the mean and the variance of the n valid x: M2 / (n - 1) (unbiased) or M2 / n (biased), the
// divisor floored at 1. Two steps, no host synchronisation:
// 1. per row, Moments (count, mean, M2 = sum (x - mean)^2) of its valid x;
// 2. the batch moments from the B triples (mean = sum n_b mean_b / n, then
//    M2 = sum M2_b + n_b (mean_b - mean)^2: no E[x^2] - mean^2 cancellation), in double, and the
//    elementwise map. The fused PPO pass (gae.h) produces step 1's triples for its advantages.
#pragma once

#include <cmath>
#include <cstdint>

#include "rlhf_fast/dtype.h"

namespace rlhf_fast {

struct WhitenParams {
  const float* x;         // [B, T] float32, contiguous
  const uint8_t* mask;    // [B, T] a bool tensor's bytes
  float* out;             // [B, T] float32 out; may be x (each element is read before it is written)
  float* moments;         // CUDA: [B, 3] float32 workspace (count, mean, M2 per row); host: unused
  int64_t rows;           // B >= 1
  int64_t tokens;         // T >= 1
  bool shift_mean;        // false adds the mean back
  bool unbiased;          // variance M2 / (n - 1), else M2 / n
  double eps;             // added to the variance (reference.WHITEN_EPS)
};

// Count, mean and M2 of a set of values.
template <typename Acc>
struct Moments {
  Acc n, mean, m2;
};

// Welford: one value joins the set.
template <typename Acc>
RLHF_FAST_HD void moments_add(Moments<Acc>& m, Acc x) {
  m.n += Acc(1);
  const Acc delta = x - m.mean;
  m.mean += delta / m.n;
  m.m2 += delta * (x - m.mean);
}

// Chan et al.: the moments of the union of two disjoint sets (either may be empty).
template <typename Acc>
RLHF_FAST_HD Moments<Acc> moments_merge(const Moments<Acc>& a, const Moments<Acc>& b) {
  const Acc n = a.n + b.n;
  const Acc delta = b.mean - a.mean;
  const Acc share = b.n / (n > Acc(1) ? n : Acc(1));
  return Moments<Acc>{n, a.mean + delta * share, a.m2 + b.m2 + delta * delta * a.n * share};
}

// Step 2, batch mean: sum_b n_b mean_b / n (0 when no token is valid).
RLHF_FAST_HD double batch_mean(double n, double weighted_sum) { return weighted_sum / (n > 1.0 ? n : 1.0); }

// Step 2, row b's share of the batch M2 about the batch mean.
RLHF_FAST_HD double batch_spread(double n_b, double mean_b, double m2_b, double mean) {
  const double d = mean_b - mean;
  return m2_b + n_b * d * d;
}

struct WhitenStats {
  float mean, std;
};

RLHF_FAST_HD WhitenStats whiten_stats(double n, double mean, double m2, bool unbiased, double eps) {
  const double k = unbiased ? n - 1.0 : n;
  const double dof = k > 1.0 ? k : 1.0;
  return WhitenStats{static_cast<float>(mean), static_cast<float>(sqrt(m2 / dof + eps))};
}

// Step 2, one token. x at a masked position may be NaN or inf: it is selected away.
template <bool kShiftMean>
RLHF_FAST_HD float whiten_element(float x, bool valid, const WhitenStats& s) {
  float y = ((valid ? x : s.mean) - s.mean) / s.std;
  if (!kShiftMean) y += s.mean;
  return valid ? y : 0.0f;
}

// Kernel entry points.
void whiten_forward_host(const WhitenParams& p, int num_threads);
// Step 1 of one host row, in double (two passes over the row, which stays in cache).
Moments<double> row_moments_host(const float* x, const uint8_t* mask, int64_t tokens);
// Step 2 on the host from per-row moments [B] (also the end of the fused PPO pass).
void whiten_apply_host(const WhitenParams& p, const Moments<double>* row_moments, int num_threads);
// stream is a cudaStream_t; kernels run on the current device. p.moments is required.
void whiten_forward_cuda(const WhitenParams& p, void* stream);
// Step 2 on CUDA from p.moments (already written by an earlier kernel on the same stream).
void whiten_apply_cuda(const WhitenParams& p, void* stream);

}  // namespace rlhf_fast
