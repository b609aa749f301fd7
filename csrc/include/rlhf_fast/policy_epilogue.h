// policy_epilogue: fused_policy_loss's gradient in one kernel: what the kernels see (POD params) and
// the per-token math shared by the host and CUDA kernels.
//
// Spec: the composed path of rlhf_fast/ops/fused_policy_loss.py (token_logprobs, the objective of
// rlhf_fast/objectives.py and the KL of rlhf_fast/kl_estimators.py under autograd, token_logprobs'
// backward); contract: rlhf_fast.backends.base.Provider.policy_epilogue_forward; the Triton twin is
// kernels/policy_epilogue.py (its _objective_grad and _kl_grad are the functions below).
// Letters: N rows (tokens), V vocabulary. Per row:
//   1. token_logprobs' forward (token_logprobs.h's numerics): logp, entropy H, lse;
//   2. the epilogue, from the token's own inputs:
//        g_logp = pg_weight d objective / d logp + weight kl_coef d kl / d logp,  g_H = -entropy_coef weight
//      (0 on ignored rows);
//   3. token_logprobs' backward with (g_logp, g_H) into grad_logits (which may be logits: read before write).
// The epilogue is O(1) a row against O(V) for the passes, so its options (objective, estimator,
// straight-through, clamp) are runtime values read once a row, not template switches: six kernel
// instantiations a side instead of hundreds.
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "rlhf_fast/dtype.h"
#include "rlhf_fast/kl_rewards.h"
#include "rlhf_fast/token_logprobs.h"

namespace rlhf_fast {

// Objective codes shared with Python (exported as _C.POLICY_OBJECTIVE_CODES; kernels/policy_epilogue.py's
// OBJECTIVE_CODE has the same values).
enum PolicyObjective : int {
  kObjectivePpo = 0,    // -A r, clipped (low/high), dual clip; REINFORCE with infinite bounds
  kObjectiveCispo = 1,  // -sg(clamp(r, low, high)) A logp
  kObjectiveGpg = 2,    // -A logp
  kObjectiveSapo = 3,   // -A (4 / tau) sigmoid(tau (r - 1))
};
constexpr int kNoKl = -1;  // kl_estimator when the loss has no KL term

struct PolicyEpilogueParams {
  const void* logits;         // [N, V] dtype; row i at logits + i * logits_row_stride, unit column stride
  const void* labels;         // [N] labels_dtype (int64 or int32), contiguous
  const void* old_logp;       // [N] row dtype (float32; float64 for float64 logits); read on kept rows only
  const void* advantages;     // [N] row dtype; read on kept rows only
  const void* pg_weight;      // [N] row dtype: d loss / d objective_t (aggregation weight x rollout weight)
  const void* weight;         // [N] row dtype: d loss / d (per-token term), the aggregation's weight
  const void* ref_logp;       // [N] row dtype; read only when kl_estimator != kNoKl
  void* logp;                 // [N] row dtype out; 0 on ignored rows
  void* entropy;              // [N] row dtype out; 0 on ignored rows
  void* lse;                  // [N] row dtype out: logsumexp(logits / T)
  void* grad_logp;            // [N] row dtype out: d loss / d logp_t
  void* grad_entropy;         // [N] row dtype out: d loss / d H_t
  void* grad_logits;          // [N, V] dtype out, row stride grad_row_stride; may be logits itself
  int64_t n_rows;             // N
  int64_t vocab;              // V >= 1
  int64_t logits_row_stride;  // elements between rows, >= V
  int64_t grad_row_stride;    // elements
  int dtype;                  // DType of logits and grad_logits
  int labels_dtype;           // kInt64 or kInt32
  double temperature;         // T > 0
  int64_t ignore_index;       // rows whose label equals it get zeros
  int objective;              // PolicyObjective
  int kl_estimator;           // KlEstimator of the KL term, or kNoKl
  bool straight_through;      // the estimator ends in "+": k2's gradient whatever the value
  double clip_low;            // ppo / cispo: lower bound of the ratio (-inf: none)
  double clip_high;           // ppo / cispo: upper bound of the ratio (+inf: none)
  double dual_clip;           // ppo: dual-clip constant (+inf: none)
  double tau_pos;             // sapo: gate temperature where A > 0, a float32 value (see objective_grad)
  double tau_neg;             // sapo: gate temperature where A <= 0, a float32 value
  double kl_coef;             // weight of the KL term
  double kl_clamp;            // |kl| bound of the value (+inf: none); its gradient is 0 where the clamp bites
  double entropy_coef;        // weight of the entropy bonus (subtracted)
};

// The options of one call in the row dtype Acc (fl(x) of each double, as the Triton kernel's
// float32 scalars), with the codes checked once at the entry points.
template <typename Acc>
struct EpilogueOptions {
  int objective, kl_estimator;
  bool straight_through, clamped, entropy_grad;
  Acc low, high, dual_clip, tau_pos, tau_neg, kl_coef, kl_clamp, entropy_coef;
};

template <typename Acc>
inline EpilogueOptions<Acc> epilogue_options(const PolicyEpilogueParams& p) {
  if (p.objective < kObjectivePpo || p.objective > kObjectiveSapo) {
    throw std::invalid_argument("policy_epilogue: unknown objective code " + std::to_string(p.objective) +
                                " (expected 0 ppo, 1 cispo, 2 gpg, 3 sapo)");
  }
  if (p.kl_estimator != kNoKl && (p.kl_estimator < kKlK1 || p.kl_estimator > kKlAbs)) {
    unsupported_estimator(p.kl_estimator);
  }
  EpilogueOptions<Acc> o;
  o.objective = p.objective;
  o.kl_estimator = p.kl_estimator;
  o.straight_through = p.kl_estimator != kNoKl && p.straight_through;
  o.clamped = p.kl_estimator != kNoKl && !std::isinf(p.kl_clamp);
  o.entropy_grad = p.entropy_coef != 0.0;
  o.low = static_cast<Acc>(p.clip_low);
  o.high = static_cast<Acc>(p.clip_high);
  o.dual_clip = static_cast<Acc>(p.dual_clip);
  o.tau_pos = static_cast<Acc>(p.tau_pos);
  o.tau_neg = static_cast<Acc>(p.tau_neg);
  o.kl_coef = static_cast<Acc>(p.kl_coef);
  o.kl_clamp = static_cast<Acc>(p.kl_clamp);
  o.entropy_coef = static_cast<Acc>(p.entropy_coef);
  return o;
}

// e^x in the row dtype: IEEE libm on the host, CUDA's accurate expf / exp on the device (no fast math).
RLHF_FAST_HD float exp_of(float x) { return expf(x); }
RLHF_FAST_HD double exp_of(double x) { return exp(x); }

// d loss_t / d logp_t of the objective's per-token loss, as its autograd computes it (Triton's
// _objective_grad). Infinite bounds stand for the absent ones. Every select is a compare-select,
// so that a NaN ratio or advantage stays NaN where torch's would.
template <typename Acc>
RLHF_FAST_HD Acc objective_grad(const EpilogueOptions<Acc>& o, Acc logp, Acc old_logp, Acc adv) {
  const Acc log_ratio = logp - old_logp;
  if (o.objective == kObjectivePpo) {
    // -A r, constant where the clip or the dual clip bites or A = 0 (frozen).
    const Acc ratio = exp_of(log_ratio);
    const bool clipped = (adv > Acc(0) && ratio > o.high) || (adv < Acc(0) && ratio < o.low);
    const bool dual = adv < Acc(0) && ratio > o.dual_clip;
    return clipped || dual || adv == Acc(0) ? Acc(0) : -adv * ratio;
  }
  if (o.objective == kObjectiveCispo) {  // torch.clamp's compare-selects: a NaN ratio stays NaN
    Acc w = exp_of(log_ratio);
    w = w < o.low ? o.low : w;
    w = w > o.high ? o.high : w;
    return -w * adv;
  }
  if (o.objective == kObjectiveGpg) return -adv;
  // sapo: r = exp(clamp(log r, -20, 20)); the clamp passes the gradient on [-20, 20] only (a NaN
  // log-ratio gets none either, as in torch).
  const bool inside = log_ratio >= Acc(-20) && log_ratio <= Acc(20);
  const Acc clamped = log_ratio < Acc(-20) ? Acc(-20) : (log_ratio > Acc(20) ? Acc(20) : log_ratio);
  const Acc ratio = exp_of(clamped);
  const Acc tau = adv > Acc(0) ? o.tau_pos : o.tau_neg;
  const Acc gate = Acc(1) / (Acc(1) + exp_of(-(tau * (ratio - Acc(1)))));
  // tau is float32 in every precision: the spec's torch.where(A > 0, tau_pos, tau_neg) of two
  // Python floats is a float32 tensor whatever the dtype of A, and so is its 4 / tau.
  const Acc four_over_tau = static_cast<Acc>(4.0f / static_cast<float>(tau));
  return inside ? -adv * four_over_tau * gate * (Acc(1) - gate) * tau * ratio : Acc(0);
}

// The KL value of kl_estimators.kl_values, for the clamp's mask: kl_rewards.h's float32 functions,
// and the same formulas in double for float64 rows.
RLHF_FAST_HD float kl_of(int estimator, float logp, float ref_logp) {
  switch (estimator) {
    case kKlK1: return kl_value<kKlK1>(logp, ref_logp);
    case kKlK2: return kl_value<kKlK2>(logp, ref_logp);
    case kKlK3: return kl_value<kKlK3>(logp, ref_logp);
    default: return kl_value<kKlAbs>(logp, ref_logp);
  }
}
RLHF_FAST_HD double kl_of(int estimator, double logp, double ref_logp) {
  const double d = logp - ref_logp;
  if (estimator == kKlK1) return d;
  if (estimator == kKlK2) return 0.5 * d * d;
  if (estimator == kKlAbs) return fabs(d);
  const double x = -d;  // k3 = e^x - 1 - x: kl_estimators.k3_of (Taylor below |x| = 0.5) in double
  const bool small = fabs(x) < 0.5;
  const double xs = small ? x : 0.0;
  double poly = 1.0 / 40320.0;
  poly = poly * xs + 1.0 / 5040.0;
  poly = poly * xs + 1.0 / 720.0;
  poly = poly * xs + 1.0 / 120.0;
  poly = poly * xs + 1.0 / 24.0;
  poly = poly * xs + 1.0 / 6.0;
  poly = poly * xs + 0.5;
  const double xl = small ? 1.0 : x;
  const double direct = expm1(xl) - xl;
  return small ? xs * xs * poly : (direct < 0.0 ? 0.0 : direct);
}

// d k3 / dx = e^x - 1 (k3 = e^x - 1 - x, x = ref_logp - logp). float32: the derivative of
// kl_estimators.k3_of's two branches, e^x - 1 above |x| = 0.5 and below it the derivative of its
// Taylor polynomial, sum_{n=1..7} x^n / n! (Triton's, to the bit of its float32 arithmetic).
// float64: expm1, exact to the last bits (the float32 polynomial would be off by up to 1e-7).
RLHF_FAST_HD float k3_slope(float x) {
  const bool small = fabsf(x) < 0.5f;
  const float xs = small ? x : 0.0f;
  float poly = static_cast<float>(1.0 / 5040.0);
  poly = poly * xs + static_cast<float>(1.0 / 720.0);
  poly = poly * xs + static_cast<float>(1.0 / 120.0);
  poly = poly * xs + static_cast<float>(1.0 / 24.0);
  poly = poly * xs + static_cast<float>(1.0 / 6.0);
  poly = poly * xs + 0.5f;
  poly = poly * xs + 1.0f;
  return small ? xs * poly : expf(small ? 0.0f : x) - 1.0f;
}
RLHF_FAST_HD double k3_slope(double x) { return expm1(x); }

// d kl_t / d logp_t of kl_estimators.kl_loss_values, as its autograd computes it (Triton's _kl_grad).
template <typename Acc>
RLHF_FAST_HD Acc kl_grad(const EpilogueOptions<Acc>& o, Acc logp, Acc ref_logp) {
  const Acc d = logp - ref_logp;
  if (o.straight_through) return d;  // "k1+", "k3+", "abs+": k2's gradient, whatever the value and its clamp
  Acc grad;
  if (o.kl_estimator == kKlK1) {
    grad = Acc(1);
  } else if (o.kl_estimator == kKlK2) {
    grad = d;
  } else if (o.kl_estimator == kKlK3) {
    grad = -k3_slope(-d);
  } else {
    grad = d > Acc(0) ? Acc(1) : (d < Acc(0) ? Acc(-1) : d * Acc(0));  // sign(d); NaN stays NaN
  }
  if (o.clamped) {  // torch.clamp passes the gradient where the value lies in [-c, c]
    const Acc kl = kl_of(o.kl_estimator, logp, ref_logp);
    grad = kl >= -o.kl_clamp && kl <= o.kl_clamp ? grad : Acc(0);
  }
  return grad;
}

template <typename Acc>
struct TokenGrads {
  Acc logp, entropy;  // d loss / d logp_t, d loss / d H_t
};

// The epilogue of one kept row (ignored rows get zeros without reading any input), as the composed
// path's autograd chains it: the objective's term times pg_weight, the KL's times weight kl_coef.
template <typename Acc>
RLHF_FAST_HD TokenGrads<Acc> token_grads(const EpilogueOptions<Acc>& o, Acc logp, Acc old_logp, Acc adv,
                                         Acc pg_weight, Acc weight, Acc ref_logp) {
  Acc g = pg_weight * objective_grad(o, logp, old_logp, adv);
  if (o.kl_estimator != kNoKl) g += (weight * o.kl_coef) * kl_grad(o, logp, ref_logp);
  return {g, weight * -o.entropy_coef};
}

// Kernel entry points. They throw std::invalid_argument / std::runtime_error with a message.
void policy_epilogue_forward_host(const PolicyEpilogueParams& p, int num_threads);
// stream is a cudaStream_t (0: the legacy default stream); kernels run on the current device.
void policy_epilogue_forward_cuda(const PolicyEpilogueParams& p, void* stream);

}  // namespace rlhf_fast
