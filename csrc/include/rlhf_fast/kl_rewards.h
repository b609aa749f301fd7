// kl_rewards: what the kernels see (POD params) and the per-token math shared by host and CUDA.
//
// Spec: rlhf_fast.reference.kl_penalized_rewards (k3 as rlhf_fast.ops.kl.k3_of, the float32-
// accurate form); contract: rlhf_fast.backends.base.Provider.kl_rewards_forward. Letters: B rows,
// T tokens. With d = logp - ref_logp:
//     rewards[b, t] = valid ? -beta clamp(kl(d), -kl_clamp, kl_clamp) : 0,
//                     plus scores[b] at the row's last valid token.
// Masked inputs are replaced by 0 before any arithmetic (selects, never products with 0), so a
// NaN or inf there cannot reach a result. The fused PPO pass (gae.h) uses the same token_reward.
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "rlhf_fast/dtype.h"

namespace rlhf_fast {

// Estimator codes shared with Python (exported as _C.KL_ESTIMATOR_CODES).
enum KlEstimator : int {
  kKlK1 = 0,   // d
  kKlK2 = 1,   // d^2 / 2
  kKlK3 = 2,   // e^-d + d - 1
  kKlAbs = 3,  // |d|
};

struct KlRewardsParams {
  const float* logp;      // [B, T] float32, contiguous
  const float* ref_logp;  // [B, T] float32, contiguous
  const float* scores;    // [B] float32; read only for rows with a valid token
  const uint8_t* mask;    // [B, T] a bool tensor's bytes: nonzero on the tokens that count
  float* rewards;         // [B, T] float32 out, every element written
  int64_t rows;           // B >= 1
  int64_t tokens;         // T >= 1
  double beta;            // KL coefficient >= 0
  int estimator;          // KlEstimator
  double kl_clamp;        // the KL is clamped to [-kl_clamp, kl_clamp]; +inf: no clamp (clamp_kl)
};

// k3(x) = e^x - 1 - x >= 0, x = ref_logp - logp. As written, float32 loses every digit once |x| <
// 1e-4 (the result drowns in the rounding of e^x ~ 1): below |x| = 0.5 the Taylor series to x^8
// (relative error < 4e-8, next term x^9 / 9!), above it expm1(x) - x, clamped at 0 (a compare-
// select: NaN stays NaN). The coefficients are float32 roundings of the doubles 1 / k!, as in
// ops/kl.py and kernels/rewards.py.
RLHF_FAST_HD float k3_of(float x) {
  const bool small = fabsf(x) < 0.5f;
  const float xs = small ? x : 0.0f;  // keeps the unused branch finite
  float poly = static_cast<float>(1.0 / 40320.0);
  poly = poly * xs + static_cast<float>(1.0 / 5040.0);
  poly = poly * xs + static_cast<float>(1.0 / 720.0);
  poly = poly * xs + static_cast<float>(1.0 / 120.0);
  poly = poly * xs + static_cast<float>(1.0 / 24.0);
  poly = poly * xs + static_cast<float>(1.0 / 6.0);
  poly = poly * xs + 0.5f;
  const float series = xs * xs * poly;
  const float xl = small ? 1.0f : x;
  const float direct = expm1f(xl) - xl;
  return small ? series : (direct < 0.0f ? 0.0f : direct);
}

// kl_penalty(logp, ref_logp) of one token, estimator fixed at compile time.
template <int kEstimator>
RLHF_FAST_HD float kl_value(float logp, float ref_logp) {
  const float d = logp - ref_logp;
  if (kEstimator == kKlK1) return d;
  if (kEstimator == kKlK2) return 0.5f * d * d;
  if (kEstimator == kKlK3) return k3_of(-d);
  return fabsf(d);
}

// kl clamped to [-limit, limit] (verl's low_var_kl and OpenRLHF clamp at 10). Compare-selects, not
// fminf/fmaxf, which would turn a NaN into the bound: NaN stays NaN, as in torch.clamp; limit =
// +inf changes nothing.
RLHF_FAST_HD float clamp_kl(float kl, float limit) {
  kl = kl > limit ? limit : kl;
  return kl < -limit ? -limit : kl;
}

// One token's reward: -beta clamp(kl) on a valid token (0 elsewhere), plus the row's score at its
// last valid token. neg_beta = fl(-beta), as PyTorch rounds the scalar of `-beta * kl`; kl_clamp =
// fl(params.kl_clamp), +inf for none.
template <int kEstimator>
RLHF_FAST_HD float token_reward(bool valid, float logp, float ref_logp, float neg_beta, float kl_clamp, bool at_last,
                                float score) {
  const float kl = clamp_kl(kl_value<kEstimator>(valid ? logp : 0.0f, valid ? ref_logp : 0.0f), kl_clamp);
  const float reward = valid ? neg_beta * kl : 0.0f;
  return valid && at_last ? reward + score : reward;
}

// The row's last valid token, -1 when it has none (the host's search; CUDA searches as a block).
inline int64_t last_valid_token(const uint8_t* mask, int64_t tokens) {
  int64_t t = tokens - 1;
  while (t >= 0 && !mask[t]) --t;
  return t;
}

[[noreturn]] inline void unsupported_estimator(int code) {
  throw std::invalid_argument("kl_rewards: unknown KL estimator code " + std::to_string(code) +
                              " (expected 0 k1, 1 k2, 2 k3, 3 abs)");
}

// Kernel entry points (throw std::invalid_argument / std::runtime_error with a message).
void kl_rewards_forward_host(const KlRewardsParams& p, int num_threads);
// stream is a cudaStream_t (0: the legacy default stream); kernels run on the current device.
void kl_rewards_forward_cuda(const KlRewardsParams& p, void* stream);

}  // namespace rlhf_fast

// Runtime estimator code -> compile-time constant, at the boundary (habit 4).
// Usage: RLHF_FAST_KL_SWITCH(p.estimator, kEstimator, [&] { run<kEstimator>(); });
#define RLHF_FAST_KL_SWITCH(CODE, NAME, ...)                 \
  switch (CODE) {                                            \
    case ::rlhf_fast::kKlK1: {                               \
      constexpr int NAME = ::rlhf_fast::kKlK1;               \
      __VA_ARGS__();                                         \
    } break;                                                 \
    case ::rlhf_fast::kKlK2: {                               \
      constexpr int NAME = ::rlhf_fast::kKlK2;               \
      __VA_ARGS__();                                         \
    } break;                                                 \
    case ::rlhf_fast::kKlK3: {                               \
      constexpr int NAME = ::rlhf_fast::kKlK3;               \
      __VA_ARGS__();                                         \
    } break;                                                 \
    case ::rlhf_fast::kKlAbs: {                              \
      constexpr int NAME = ::rlhf_fast::kKlAbs;              \
      __VA_ARGS__();                                         \
    } break;                                                 \
    default: ::rlhf_fast::unsupported_estimator(CODE);       \
  }
