// kl_rewards on CUDA: per-token KL-penalised rewards, the score at each row's last valid token.
//
// One block per row: the block finds the row's last valid token (a search of the mask from the
// right, usually one step), then maps the row elementwise (coalesced, block-strided), exactly the
// host's loop. Bytes per token: 9 read (logp, ref_logp, mask), 4 written.
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "rlhf_fast/kl_rewards.h"

namespace rlhf_fast {
namespace {

using cuda_common::check;

constexpr int kThreads = 256;
constexpr int kSearchItems = 8;  // mask bytes per thread per step of the last-token search

template <int kEstimator>
__global__ void __launch_bounds__(kThreads) kl_rewards_kernel(const KlRewardsParams p) {
  __shared__ long long scratch[kThreads / 32];
  const int64_t row = blockIdx.x;
  const int64_t tokens = p.tokens;
  const int64_t base = row * tokens;  // int64: B * T may exceed 2^31
  const uint8_t* mask = p.mask + base;
  const float* logp = p.logp + base;
  const float* ref_logp = p.ref_logp + base;
  float* rewards = p.rewards + base;
  const int64_t last = cuda_common::last_valid_token<kThreads, kSearchItems>(mask, tokens, scratch);
  const float score = last >= 0 ? p.scores[row] : 0.0f;
  const float neg_beta = static_cast<float>(-p.beta);
  const float kl_clamp = static_cast<float>(p.kl_clamp);
  for (int64_t t = threadIdx.x; t < tokens; t += kThreads) {
    const bool valid = mask[t] != 0;
    rewards[t] = token_reward<kEstimator>(valid, valid ? logp[t] : 0.0f, valid ? ref_logp[t] : 0.0f, neg_beta,
                                          kl_clamp, t == last, score);
  }
}

}  // namespace

void kl_rewards_forward_cuda(const KlRewardsParams& p, void* stream) {
  if (p.rows == 0 || p.tokens == 0) return;
  RLHF_FAST_KL_SWITCH(p.estimator, kEstimator, [&] {
    kl_rewards_kernel<kEstimator>
        <<<cuda_common::row_grid(p.rows, "kl_rewards_forward"), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  });
  check(cudaGetLastError(), "kl_rewards_forward");
}

}  // namespace rlhf_fast
