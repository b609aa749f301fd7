// token_logprobs on the host: per-row log-probability of the label, entropy, lse, and the backward.
//
// Bytes: the forward reads [N, V] once (each 4 KB block stays in L1 between its max pass and its
// exp pass) and writes 3 N floats; the backward reads [N, V] and writes [N, V] once (in place when
// grad is logits). float32 [4096, 32000]: 524 MB read by the forward, 1 GB moved by the backward.
// The exponential is the only costly arithmetic, so it is a polynomial written in plain float
// arithmetic that GCC vectorises inside the loops (libm's expf would keep them scalar).
// Hot loops are compiled for AVX-512, AVX2+FMA and baseline x86-64 and picked at load time
// (target_clones), so the build itself never assumes the build machine's processor.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "rlhf_fast/host_threads.h"
#include "rlhf_fast/token_logprobs.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define RLHF_FAST_HOST_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RLHF_FAST_HOST_CLONES
#endif

namespace rlhf_fast {
namespace {

// 2^x in float32 for x <= 128 (our exponents are <= ~0): 0.9 ulp at most, exactly 1 at x = 0,
// 0 below -126.5 (no subnormal results, like the device's ex2.approx.ftz), NaN stays NaN.
//   n = round(x) by the 1.5 * 2^23 trick (n lands in the low mantissa bits of x + 1.5 * 2^23),
//   r = x - n in [-1/2, 1/2] exactly, 2^r by a degree-6 polynomial (relative error 2e-9, fitted by
//   weighted least squares on [-1/2, 1/2]), 2^n by writing n + 127 into the exponent field. The
//   clamp at -127 makes that field 0 below -126.5, so 2^n and the result are 0 with no select.
RLHF_FAST_HD float exp2_acc(float x) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
  const float xc = x < -127.0f ? -127.0f : x;
  const float shifted = xc + kRound;
  const float n = shifted - kRound;
  const float r = xc - n;
  float poly = 1.534581242594868e-4f;
  poly = poly * r + 1.3399930903688073e-3f;
  poly = poly * r + 9.618489071726799e-3f;
  poly = poly * r + 5.550328642129898e-2f;
  poly = poly * r + 2.4022646248340607e-1f;
  poly = poly * r + 6.931471824645996e-1f;
  poly = poly * r + 1.0f;
  const uint32_t two_n = (bits_from_float(shifted) - 0x4b400000u + 127u) << 23;
  return poly * float_from_bits(two_n);
}

// float64 logits are for checks (gradcheck), not speed: libm.
inline double exp2_acc(double x) { return std::exp2(x); }

// e^x for the backward's natural-log probabilities: 2^(x log2 e); exact 1 at x = 0.
RLHF_FAST_HD float exp_acc(float x) { return exp2_acc(x * static_cast<float>(kLog2e)); }
inline double exp_acc(double x) { return std::exp(x); }

// Rows are streamed in blocks of kBlockBytes, and each block starts by prefetching the block
// kPrefetchBlocks ahead: the hardware prefetcher alone leaves the memory idle while a block is
// being computed on (measured here: 20-30% faster with the software prefetch, 1 or 2 threads).
constexpr int64_t kBlockBytes = 4096;
constexpr int64_t kPrefetchBlocks = 2;

// Prefetches `count` elements from position k of this thread's stream (row, then next_row when
// it is not null) into L1.
template <typename T>
inline void prefetch_stream(const T* row, const T* next_row, int64_t k, int64_t vocab, int64_t count) {
  if (k >= vocab) {
    if (next_row == nullptr) return;
    row = next_row;
    k -= vocab;
    if (k >= vocab) return;
  }
  const char* first = reinterpret_cast<const char*>(row + k);
  const int64_t bytes = std::min(count, vocab - k) * static_cast<int64_t>(sizeof(T));
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(first + b, 0, 3);
}

// Elements [k0, k1) of a row's exp pass, added to s (and t), exponents relative to the shift m.
template <typename T, bool kEntropy>
RLHF_FAST_HD void sum_exp2(const T* x, int64_t k0, int64_t k1, acc_t<T> m, acc_t<T> scale, acc_t<T>& s,
                           acc_t<T>& t) {
  using Acc = acc_t<T>;
  Acc s_block = 0, t_block = 0;
  if (kEntropy) {
#pragma omp simd reduction(+ : s_block, t_block)
    for (int64_t k = k0; k < k1; ++k) {
      const Acc d = exponent2(load(x[k]), m, scale);
      const Acc e = exp2_acc(d);
      s_block += e;
      t_block += e * floor_exponent(d);
    }
  } else {
#pragma omp simd reduction(+ : s_block)
    for (int64_t k = k0; k < k1; ++k) s_block += exp2_acc(exponent2(load(x[k]), m, scale));
  }
  s += s_block;
  t += t_block;
}

// One row's online log-sum-exp, base 2 (see token_logprobs.h): m = max of the logits, -inf while
// every logit seen is -inf, when the shift is 0 instead (so that -inf logits give 2^-inf = 0, not
// NaN); s = sum 2^d, t = sum 2^d d (kEntropy only), d = (x - shift) scale.
template <typename Acc>
struct RowSums {
  Acc m, s, t;
};

// The row x[0, vocab) by blocks. Per block, a max pass reads the block (prefetched; past the row's
// end, from next_row when it is not null) into L1 and an exp pass adds it to (s, t) relative to
// the running max m; when the block raises the max, (s, t) move to the new shift first. Each
// element is read from memory once, and the reads overlap the arithmetic.
template <typename T, bool kEntropy>
RLHF_FAST_HD RowSums<acc_t<T>> row_sums(const T* x, const T* next_row, int64_t vocab, acc_t<T> scale) {
  using Acc = acc_t<T>;
  constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();
  constexpr int64_t kBlock = kBlockBytes / sizeof(T);
  Acc m = kNegInf, s = 0, t = 0;
  for (int64_t k0 = 0; k0 < vocab; k0 += kBlock) {
    const int64_t k1 = std::min(vocab, k0 + kBlock);
    Acc block_max = kNegInf;
#pragma omp simd reduction(max : block_max)
    for (int64_t k = k0; k < k1; ++k) {
      const Acc v = load(x[k]);
      block_max = v > block_max ? v : block_max;
    }
    if (block_max > m) {
      if (m != kNegInf) {
        const Acc delta = shift_delta(m, block_max, scale);
        const Acc f = exp2_acc(delta);
        if (kEntropy) t = f * (t + delta * s);
        s *= f;
      }
      m = block_max;
    }
    prefetch_stream(x, next_row, k1 + kPrefetchBlocks * kBlock, vocab, kBlock);
    sum_exp2<T, kEntropy>(x, k0, k1, m == kNegInf ? Acc(0) : m, scale, s, t);
  }
  return {m, s, t};
}

// Rows [begin, end) of the forward: the online log-sum-exp of the CUDA kernel, by blocks.
template <typename T, bool kEntropy>
RLHF_FAST_HOST_CLONES void forward_rows(const TokenLogprobsForwardParams& p, int64_t begin, int64_t end) {
  using Acc = acc_t<T>;
  constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();
  const Acc scale = static_cast<Acc>(kLog2e / p.temperature);
  const int64_t vocab = p.vocab;
  for (int64_t row = begin; row < end; ++row) {
    Acc* logp = static_cast<Acc*>(p.logp) + row;
    Acc* lse = static_cast<Acc*>(p.lse) + row;
    Acc* entropy = kEntropy ? static_cast<Acc*>(p.entropy) + row : nullptr;
    const int64_t label = load_label(p.labels, p.labels_dtype, row);
    if (label == p.ignore_index) {
      *logp = 0;
      *lse = 0;
      if (kEntropy) *entropy = 0;
      continue;
    }
    const T* x = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
    const T* next = row + 1 < end ? x + p.logits_row_stride : nullptr;
    const RowSums<Acc> sums = row_sums<T, kEntropy>(x, next, vocab, scale);
    const Acc m = sums.m;
    const Acc shift = m == kNegInf ? Acc(0) : m;
    const Acc temperature = static_cast<Acc>(p.temperature);
    const int64_t column = shard_column(label, p.vocab_offset, vocab);
    const Acc d_label = column >= 0 ? exponent2(load(x[column]), shift, scale) : Acc(0);
    const RowOutputs<Acc> out = finish_row(sums.s, sums.t, d_label, tempered(m, temperature, inverse(temperature)));
    *logp = column >= 0 ? out.logp : Acc(0);
    *lse = out.lse;
    if (kEntropy) *entropy = out.entropy;
  }
}

// Rows [begin, end) of the backward: one read and one write per element, and one more read of a
// row whose saved lse is too coarse (recomputes_lse: its max and sum first, as the forward; a row
// of float32 [32000] is 128 KB, typically still in this core's L2 when the gradient pass reads it
// again). grad may be logits itself: the loops read element k before writing element k, and the
// label's logit (when this shard owns the label) is read before the gradient loop because that
// loop overwrites it.
template <typename T, bool kEntropy>
RLHF_FAST_HOST_CLONES void backward_rows(const TokenLogprobsBackwardParams& p, int64_t begin, int64_t end) {
  using Acc = acc_t<T>;
  constexpr int64_t kBlock = kBlockBytes / sizeof(T);
  const Acc scale = static_cast<Acc>(kLog2e / p.temperature);
  const int64_t vocab = p.vocab;
  for (int64_t row = begin; row < end; ++row) {
    const T* x = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
    T* grad = static_cast<T*>(p.grad_logits) + row * p.grad_row_stride;
    const int64_t label = load_label(p.labels, p.labels_dtype, row);
    if (label == p.ignore_index) {
      std::memset(static_cast<void*>(grad), 0, static_cast<size_t>(vocab) * sizeof(T));  // 0.0 is all-zero bits
      continue;
    }
    const double g_entropy = kEntropy ? static_cast<const Acc*>(p.grad_entropy)[row] : 0.0;
    const double entropy = kEntropy ? static_cast<const Acc*>(p.entropy)[row] : 0.0;
    const Acc lse = static_cast<const Acc*>(p.lse)[row];
    const double log_mass = p.log_mass != nullptr ? static_cast<const Acc*>(p.log_mass)[row] : 0.0;
    RowGradCoefficients<Acc> k = row_grad_coefficients<Acc>(
        p.temperature, lse, log_mass, static_cast<const Acc*>(p.grad_logp)[row], g_entropy, entropy);
    if (recomputes_lse(lse)) {
      const RowSums<Acc> sums = row_sums<T, false>(x, nullptr, vocab, scale);
      use_recomputed_sums(k, sums.m, sums.s, log_mass);
    }
    const int64_t column = shard_column(label, p.vocab_offset, vocab);
    const Acc x_label = column >= 0 ? load(x[column]) : Acc(0);
    const T* next = row + 1 < end ? x + p.logits_row_stride : nullptr;
    for (int64_t j0 = 0; j0 < vocab; j0 += kBlock) {
      const int64_t j1 = std::min(vocab, j0 + kBlock);
      prefetch_stream(x, next, j1 + kPrefetchBlocks * kBlock, vocab, kBlock);
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) {
        const Acc log_p = log_prob(load(x[j]), k);
        grad[j] = store<T>(grad_from_p(exp_acc(log_p), log_p, k));
      }
    }
    if (column >= 0) {
      const Acc log_p = log_prob(x_label, k);
      grad[column] = store<T>(k.label_term + grad_from_p(exp_acc(log_p), log_p, k));
    }
  }
}

}  // namespace

void token_logprobs_forward_host(const TokenLogprobsForwardParams& p, int num_threads) {
  RLHF_FAST_FLOAT_SWITCH(p.dtype, "token_logprobs_forward_host logits", T, [&] {
    RLHF_FAST_BOOL_SWITCH(p.entropy != nullptr, kEntropy, [&] {
      parallel_rows(p.n_rows, p.vocab, num_threads,
                    [&](int64_t begin, int64_t end) { forward_rows<T, kEntropy>(p, begin, end); });
    });
  });
}

void token_logprobs_backward_host(const TokenLogprobsBackwardParams& p, int num_threads) {
  RLHF_FAST_FLOAT_SWITCH(p.dtype, "token_logprobs_backward_host logits", T, [&] {
    RLHF_FAST_BOOL_SWITCH(p.grad_entropy != nullptr, kEntropy, [&] {
      parallel_rows(p.n_rows, p.vocab, num_threads,
                    [&](int64_t begin, int64_t end) { backward_rows<T, kEntropy>(p, begin, end); });
    });
  });
}

}  // namespace rlhf_fast
