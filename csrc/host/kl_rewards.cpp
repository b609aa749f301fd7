// kl_rewards on the host: per-token KL-penalised rewards, the score at each row's last valid token.
//
// Bytes per token: logp, ref_logp, the mask byte read (9), the reward written (4). Threads over rows.
#include <cstdint>

#include "rlhf_fast/host_threads.h"
#include "rlhf_fast/kl_rewards.h"

namespace rlhf_fast {
namespace {

template <int kEstimator>
void kl_rewards_rows(const KlRewardsParams& p, int64_t begin, int64_t end) {
  const int64_t tokens = p.tokens;
  const float neg_beta = static_cast<float>(-p.beta);
  const float kl_clamp = static_cast<float>(p.kl_clamp);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t base = row * tokens;
    const float* logp = p.logp + base;
    const float* ref_logp = p.ref_logp + base;
    const uint8_t* mask = p.mask + base;
    float* rewards = p.rewards + base;
    const int64_t last = last_valid_token(mask, tokens);
    const float score = last >= 0 ? p.scores[row] : 0.0f;
    for (int64_t t = 0; t < tokens; ++t) {
      rewards[t] = token_reward<kEstimator>(mask[t] != 0, logp[t], ref_logp[t], neg_beta, kl_clamp, t == last, score);
    }
  }
}

}  // namespace

void kl_rewards_forward_host(const KlRewardsParams& p, int num_threads) {
  RLHF_FAST_KL_SWITCH(p.estimator, kEstimator, [&] {
    parallel_rows(p.rows, p.tokens, num_threads,
                  [&](int64_t begin, int64_t end) { kl_rewards_rows<kEstimator>(p, begin, end); });
  });
}

}  // namespace rlhf_fast
