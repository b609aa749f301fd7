// token_logprobs: what the kernels see (POD params) and the math shared by the host and CUDA kernels.
//
// Spec: rlhf_fast.reference.token_logprobs; contract: rlhf_fast.backends.base.Provider.
// Letters: N rows (tokens), V vocabulary. z = logits / T, p = softmax(z), lse = logsumexp(z).
//
// Forward, per row, in base-2 units (what both sides' exponential units compute), relative to the
// row max m (a running max in the online form), with scale = log2(e) / T:
//     d_k = (x_k - m) scale             (exactly 0 at the max, so its term is exactly 1)
//     s = sum_k 2^d_k,  t = sum_k 2^d_k d_k
//     lse = tempered(m) + ln2 log2 s,  logp = (d_label - log2 s) ln2,  entropy = (log2 s - t / s) ln2.
// Backward, per element: log p_k = tempered(x_k - shift) - log_norm, where (shift, log_norm) is
//   (0, lse)       when |lse| < kSavedLseBound: as PyTorch evaluates log_softmax's gradient, z_k - lse
//                  with z_k the float z = tempered(x) of the forward's fl(m / T). A row whose max
//                  dominates then gets log p = 0 and p = 1 exactly there, as in PyTorch (V = 1
//                  gives a gradient of exactly 0).
//   (m, ln s)      otherwise, m and s recomputed from the row as the forward computes them.
// The saved lse is a float within half an ulp of the true one, an error every p_k of the row shares:
// 2^-24 |lse| relative (0.03 at logits sharing an offset of 1e6). Below the bound that is no more
// than the rounding of z = x / T itself (2^-24 |z|, which PyTorch's float32 log_softmax(x / T)
// carries too); at and above it, the row's max and sum are recomputed, which costs those rows one
// more read and gives the forward's accuracy (x - m is exact for logits sharing an offset). Saving
// m in the forward would cost 8 bytes a row instead, but a second saved per-row tensor is not in
// the op's contract (lse alone is); typical LM logits (|lse| ~ 10-50) never pay the read.
//
// A vocabulary shard (ops/vocab_parallel.py) holds the columns [vocab_offset, vocab_offset + V) of
// the labels' vocabulary. Its forward is the above on its own columns, with logp = 0 on a row whose
// label another shard owns (that logit is never read). Its backward takes log_mass, the log of the
// share of the whole vocabulary's softmax the shard holds (from the all-reduced row statistics), so
// that the whole vocabulary's log p_k = local log p_k + log_mass: log_norm -= log_mass, once a row,
// in double (the Triton kernels do the same). The one-hot term goes to column label - vocab_offset.
#pragma once

#include <cmath>
#include <cstdint>

#include "rlhf_fast/dtype.h"

namespace rlhf_fast {

struct TokenLogprobsForwardParams {
  const void* logits;         // [N, V] dtype; row i at logits + i * logits_row_stride, unit column stride
  const void* labels;         // [N] labels_dtype (int64 or int32), contiguous
  void* logp;                 // [N] float32 (float64 for float64 logits); 0 on ignored rows
  void* entropy;              // [N] like logp, or nullptr: entropy is not computed
  void* lse;                  // [N] like logp: logsumexp(logits / T); 0 on ignored rows (not read)
  int64_t n_rows;             // N
  int64_t vocab;              // V >= 1
  int64_t logits_row_stride;  // elements between rows, >= V
  int dtype;                  // DType of logits
  int labels_dtype;           // kInt64 or kInt32
  double temperature;         // T > 0
  int64_t ignore_index;       // rows whose label equals it are skipped
  int64_t vocab_offset;       // the logits are columns [vocab_offset, vocab_offset + V) of the labels' ids
};

struct TokenLogprobsBackwardParams {
  const void* logits;         // [N, V] dtype, as in the forward
  const void* labels;         // [N] labels_dtype
  const void* lse;            // [N] float32 (float64): the forward's lse
  const void* entropy;        // [N] the forward's entropy, or nullptr (then grad_entropy is nullptr too)
  const void* grad_logp;      // [N] float32 (float64)
  const void* grad_entropy;   // [N] float32 (float64), or nullptr
  void* grad_logits;          // [N, V] dtype, row stride grad_row_stride; may be logits itself
  int64_t n_rows;             // N
  int64_t vocab;              // V
  int64_t logits_row_stride;  // elements
  int64_t grad_row_stride;    // elements
  int dtype;                  // DType of logits and grad_logits
  int labels_dtype;           // kInt64 or kInt32
  double temperature;         // T > 0
  int64_t ignore_index;
  int64_t vocab_offset;       // as in the forward
  const void* log_mass;       // [N] like lse: log of the shard's share of the whole softmax (<= 0), or nullptr (0)
};

constexpr double kLn2 = 0.693147180559945309417232121458176568;
constexpr double kLog2e = 1.442695040888963407359924681001892137;

// A floor for exponents (base 2 or e) that multiply an exponential: far below where the
// exponential is 0 in the accumulation type, so a -inf logit contributes 0 * floor = 0 rather than
// 0 * -inf = NaN. Written as a compare-select, not fmax, so that a NaN logit stays NaN.
template <typename Acc>
RLHF_FAST_HD Acc floor_exponent(Acc d) {
  const Acc lo = sizeof(Acc) == 4 ? Acc(-1000) : Acc(-4000);
  return d < lo ? lo : d;
}

// The column of a whole-vocabulary label in a shard of `vocab` columns from vocab_offset, or -1 when
// another shard owns it (-1 matches no column: a shard never reads or writes another's label).
// Unsigned arithmetic: no overflow whatever the label.
RLHF_FAST_HD int64_t shard_column(int64_t label, int64_t vocab_offset, int64_t vocab) {
  const uint64_t column = static_cast<uint64_t>(label) - static_cast<uint64_t>(vocab_offset);
  return column < static_cast<uint64_t>(vocab) ? static_cast<int64_t>(column) : -1;
}

RLHF_FAST_HD int64_t load_label(const void* labels, int labels_dtype, int64_t row) {
  return labels_dtype == kInt32 ? static_cast<int64_t>(static_cast<const int32_t*>(labels)[row])
                                : static_cast<const int64_t*>(labels)[row];
}

// Forward, one element: its base-2 exponent below the shift m (m = 0 stands for "no max yet", so
// that -inf logits give -inf, not NaN).
template <typename Acc>
RLHF_FAST_HD Acc exponent2(Acc x, Acc m, Acc scale) {
  return (x - m) * scale;
}

// Forward, online form: (s, t) move from shift m to a larger shift m_new. Each term's exponent
// drops by -delta, delta = (m - m_new) scale <= 0, so s' = 2^delta s and t' = 2^delta (t + delta s).
template <typename Acc>
RLHF_FAST_HD Acc shift_delta(Acc m, Acc m_new, Acc scale) {
  return (m - m_new) * scale;
}

// z = x / T as each side computes it, the same in forward and backward. The host divides (IEEE,
// vectorised); the device multiplies by fl(1/T) as PyTorch's CUDA division by a scalar does, with
// __fmul_rn so that the multiply is never fused into the subtraction that follows it.
RLHF_FAST_HD float tempered(float x, float temperature, float inv_temperature) {
#if defined(__CUDA_ARCH__)
  (void)temperature;
  return __fmul_rn(x, inv_temperature);
#else
  (void)inv_temperature;
  return x / temperature;
#endif
}
RLHF_FAST_HD double tempered(double x, double temperature, double inv_temperature) {
#if defined(__CUDA_ARCH__)
  (void)temperature;
  return __dmul_rn(x, inv_temperature);
#else
  (void)inv_temperature;
  return x / temperature;
#endif
}

// fl(1 / T) in the accumulation type, through a double division: correctly rounded for float too
// (double has more than 2 * 24 + 2 bits), and no float-division slow path in device code.
template <typename Acc>
RLHF_FAST_HD Acc inverse(Acc temperature) {
  return static_cast<Acc>(1.0 / static_cast<double>(temperature));
}

template <typename Acc>
struct RowOutputs {
  Acc logp, lse, entropy;
};

// Forward, end of a row: outputs from (s, t), the label's exponent d_label and z_max = tempered(m),
// in double. Rounding in s can push a one-hot row's logp a few 1e-8 above 0 and its entropy below
// 0: both are clamped to their true range (compare-selects, so NaN passes through).
template <typename Acc>
RLHF_FAST_HD RowOutputs<Acc> finish_row(Acc s, Acc t, Acc d_label, Acc z_max) {
  const double log2s = log2(static_cast<double>(s));
  const double logp = (static_cast<double>(d_label) - log2s) * kLn2;
  const double entropy = (log2s - static_cast<double>(t) / static_cast<double>(s)) * kLn2;
  RowOutputs<Acc> out;
  out.lse = static_cast<Acc>(static_cast<double>(z_max) + log2s * kLn2);
  out.logp = static_cast<Acc>(logp > 0.0 ? 0.0 : logp);
  out.entropy = static_cast<Acc>(entropy < 0.0 ? 0.0 : entropy);
  return out;
}

// Backward, per row. With log p_k = tempered(x_k - shift) - log_norm (see the top of this file):
//   d/dz_k = g (1[k = label] - p_k) - gH p_k (log p_k + H),  d/dx_k = d/dz_k / T
//          = 1[k = label] label_term - p_k (base + slope log p_k)
// with label_term = g / T, base = (g + gH H) / T, slope = gH / T.
template <typename Acc>
struct RowGradCoefficients {
  Acc temperature, inv_temperature, shift, log_norm, label_term, base, slope;
};

// |lse| from which the backward recomputes the row's max and sum instead of using the saved lse
// (the Triton kernels use the same bound). A NaN lse recomputes too (and stays NaN).
constexpr double kSavedLseBound = 64.0;

RLHF_FAST_HD bool recomputes_lse(double lse) { return !(lse > -kSavedLseBound && lse < kSavedLseBound); }

// log_norm of a row from the shard's own one: minus log_mass (0 outside a shard, when it is
// unchanged). A shard that holds none of the mass (log_mass = -inf, so its lse is -inf too when all
// its logits are) has p_k = 0 on every column: +inf, where the difference would be -inf + inf = NaN.
RLHF_FAST_HD double shard_log_norm(double log_norm, double log_mass) {
  return log_mass == -static_cast<double>(INFINITY) ? static_cast<double>(INFINITY) : log_norm - log_mass;
}

// Coefficients that use the saved lse: shift 0 (x - 0 is x exactly, NaN and -0 included), and
// log_norm = lse - log_mass (shard_log_norm).
template <typename Acc>
RLHF_FAST_HD RowGradCoefficients<Acc> row_grad_coefficients(double temperature, Acc lse, double log_mass, double g,
                                                            double g_entropy, double entropy) {
  RowGradCoefficients<Acc> k;
  k.temperature = static_cast<Acc>(temperature);
  k.inv_temperature = inverse(k.temperature);
  k.shift = 0;
  k.log_norm = static_cast<Acc>(shard_log_norm(lse, log_mass));
  k.label_term = static_cast<Acc>(g / temperature);
  k.base = static_cast<Acc>((g + g_entropy * entropy) / temperature);
  k.slope = static_cast<Acc>(g_entropy / temperature);
  return k;
}

// Switches k to the row's recomputed max m (-inf: no finite logit, shift 0 as in the forward) and
// s = sum_k 2^((x_k - m) log2(e) / T) = sum_k e^((x_k - m) / T): log_norm = ln s - log_mass.
template <typename Acc>
RLHF_FAST_HD void use_recomputed_sums(RowGradCoefficients<Acc>& k, Acc m, Acc s, double log_mass) {
  k.shift = m == -static_cast<Acc>(INFINITY) ? Acc(0) : m;
  k.log_norm = static_cast<Acc>(shard_log_norm(log2(static_cast<double>(s)) * kLn2, log_mass));
}

// Backward, one element: log p (natural units).
template <typename Acc>
RLHF_FAST_HD Acc log_prob(Acc x, const RowGradCoefficients<Acc>& k) {
  return tempered(x - k.shift, k.temperature, k.inv_temperature) - k.log_norm;
}

// Backward, one element given p = exp(log_p) (the exponential is each side's own).
template <typename Acc>
RLHF_FAST_HD Acc grad_from_p(Acc p, Acc log_p, const RowGradCoefficients<Acc>& k) {
  return -p * (k.base + k.slope * floor_exponent(log_p));
}

// Kernel entry points. They throw std::invalid_argument / std::runtime_error with a message.
void token_logprobs_forward_host(const TokenLogprobsForwardParams& p, int num_threads);
void token_logprobs_backward_host(const TokenLogprobsBackwardParams& p, int num_threads);
// stream is a cudaStream_t (0: the legacy default stream); kernels run on the current device.
void token_logprobs_forward_cuda(const TokenLogprobsForwardParams& p, void* stream);
void token_logprobs_backward_cuda(const TokenLogprobsBackwardParams& p, void* stream);

}  // namespace rlhf_fast
