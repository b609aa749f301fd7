// gae on the host: the reference loop per row (right to left over the valid tokens), its adjoint
// (left to right), and the fused PPO advantage pass. Threads over rows.
//
// A row's recurrence is sequential: one dependent multiply-add chain per token, a few ns each.
// The fused PPO pass keeps a row in cache across its steps: rewards (one vectorised sweep), GAE
// (the loop, reading them back from L1/L2), the row's whitening moments (two sweeps), then the
// batch whitening sweep. Bytes per token: gae_forward reads 9 and writes 8; ppo_advantages reads
// 13, writes 12, and whitening reads 5 and rewrites 4.
#include <cstdint>
#include <vector>

#include "rlhf_fast/gae.h"
#include "rlhf_fast/host_threads.h"
#include "rlhf_fast/kl_rewards.h"
#include "rlhf_fast/whiten.h"

namespace rlhf_fast {
namespace {

// One row of GAE: rewards and values at masked positions are never used (selected to 0).
void gae_row(const float* rewards, const float* values, const uint8_t* mask, float* advantages, float* returns,
             int64_t tokens, float gamma, float gamma_lam) {
  ScanState state{0.0f, 0.0f};  // (V_next, A_next) after the row
  for (int64_t t = tokens - 1; t >= 0; --t) {
    const bool valid = mask[t] != 0;
    GaeForwardOut out;
    state = gae_forward_step(state, valid, valid ? rewards[t] : 0.0f, valid ? values[t] : 0.0f, gamma, gamma_lam,
                             out);
    advantages[t] = out.advantage;
    returns[t] = out.ret;
  }
}

void gae_backward_row(const float* grad_advantages, const float* grad_returns, const uint8_t* mask,
                      float* grad_rewards, float* grad_values, int64_t tokens, float gamma, float gamma_lam) {
  ScanState state{0.0f, 0.0f};  // (G, G_prev) before the row
  for (int64_t t = 0; t < tokens; ++t) {
    const bool valid = mask[t] != 0;
    GaeBackwardOut out;
    state = gae_backward_step(state, valid, valid ? grad_advantages[t] : 0.0f, valid ? grad_returns[t] : 0.0f,
                              gamma, gamma_lam, out);
    grad_rewards[t] = out.grad_reward;
    grad_values[t] = out.grad_value;
  }
}

// fl(gamma lam) of the double product, as the Python side passes it to the Triton kernels.
float gamma_lam_of(double gamma, double lam) { return static_cast<float>(gamma * lam); }

template <int kEstimator>
void ppo_rows(const PpoAdvantagesParams& p, Moments<double>* row_moments, int64_t begin, int64_t end) {
  const int64_t tokens = p.tokens;
  const float neg_beta = static_cast<float>(-p.beta);
  const float kl_clamp = static_cast<float>(p.kl_clamp);
  const float gamma = static_cast<float>(p.gamma);
  const float gamma_lam = gamma_lam_of(p.gamma, p.lam);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t base = row * tokens;
    const uint8_t* mask = p.mask + base;
    const float* logp = p.logp + base;
    const float* ref_logp = p.ref_logp + base;
    float* rewards = p.rewards + base;
    const int64_t last = last_valid_token(mask, tokens);
    const float score = last >= 0 ? p.scores[row] : 0.0f;
    for (int64_t t = 0; t < tokens; ++t) {
      rewards[t] = token_reward<kEstimator>(mask[t] != 0, logp[t], ref_logp[t], neg_beta, kl_clamp, t == last, score);
    }
    gae_row(rewards, p.values + base, mask, p.advantages + base, p.returns + base, tokens, gamma, gamma_lam);
    if (p.whiten) row_moments[row] = row_moments_host(p.advantages + base, mask, tokens);
  }
}

}  // namespace

void gae_forward_host(const GaeForwardParams& p, int num_threads) {
  const float gamma = static_cast<float>(p.gamma);
  const float gamma_lam = gamma_lam_of(p.gamma, p.lam);
  parallel_rows(p.rows, p.tokens, num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t base = row * p.tokens;
      gae_row(p.rewards + base, p.values + base, p.mask + base, p.advantages + base, p.returns + base, p.tokens,
              gamma, gamma_lam);
    }
  });
}

void gae_backward_host(const GaeBackwardParams& p, int num_threads) {
  const float gamma = static_cast<float>(p.gamma);
  const float gamma_lam = gamma_lam_of(p.gamma, p.lam);
  parallel_rows(p.rows, p.tokens, num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t base = row * p.tokens;
      gae_backward_row(p.grad_advantages + base, p.grad_returns + base, p.mask + base, p.grad_rewards + base,
                       p.grad_values + base, p.tokens, gamma, gamma_lam);
    }
  });
}

void ppo_advantages_forward_host(const PpoAdvantagesParams& p, int num_threads) {
  std::vector<Moments<double>> row_moments(p.whiten ? static_cast<size_t>(p.rows) : 0);
  RLHF_FAST_KL_SWITCH(p.estimator, kEstimator, [&] {
    parallel_rows(p.rows, p.tokens, num_threads, [&](int64_t begin, int64_t end) {
      ppo_rows<kEstimator>(p, row_moments.data(), begin, end);
    });
  });
  if (p.whiten) {
    const WhitenParams w{p.advantages, p.mask, p.advantages, nullptr, p.rows, p.tokens,
                         /*shift_mean=*/true, p.whiten_unbiased, p.whiten_eps};
    whiten_apply_host(w, row_moments.data(), num_threads);
  }
}

}  // namespace rlhf_fast
