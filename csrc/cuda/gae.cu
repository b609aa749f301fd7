// gae on CUDA: GAE, its adjoint and the fused PPO advantage pass, one block per row.
//
// The row is walked in chunks of kChunk tokens (right to left forward, left to right backward).
// Per chunk, each thread owns kItems consecutive tokens: it loads them, composes their affine
// maps (gae.h), a block scan of the 256 composed maps (warp shuffles, then the 8 warp totals in
// shared memory) gives each thread the state at its first token, and the thread then runs the
// host's loop (gae_forward_step / gae_backward_step) over its tokens. The chunk's total map
// carries the state to the next chunk. T = 32768 is 16 sequential chunk steps; one __syncthreads
// per step (the warp totals alternate between two buffers).
//
// The fused PPO pass computes each token's reward as it loads it (kl_rewards.h, after a search
// for the row's last valid token), stores it, scans, and with whitening folds the advantages into
// per-thread Welford moments, merged over the block at the end of the row into a [B, 3] triple;
// whiten.cu's apply kernel then whitens in a second launch (no host synchronisation).
// Bytes per token: gae_forward reads 9 and writes 8; gae_backward reads 9 and writes 8; the fused
// pass reads 13 and writes 12 (+ 5 read and 4 written by the whitening launch).
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>

#include "common.cuh"
#include "rlhf_fast/gae.h"
#include "rlhf_fast/kl_rewards.h"
#include "rlhf_fast/whiten.h"

namespace rlhf_fast {
namespace {

using cuda_common::check;
using cuda_common::kFullMask;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 8;                                // consecutive tokens per thread per chunk
constexpr int64_t kChunk = int64_t(kThreads) * kItems;  // tokens per block step
// The kernels are latency-bound (one block per row, a scan per chunk): __launch_bounds__(kThreads, 1)
// lets ptxas take the 60-86 registers they need; with no minimum it aims at more resident blocks
// and spills a few bytes on sm_80.

// The forward kernel's view of GaeForwardParams or PpoAdvantagesParams.
struct GaeForwardArgs {
  const float* rewards;   // [B, T] read (not kFromKl)
  const float* logp;      // [B, T] (kFromKl)
  const float* ref_logp;  // [B, T] (kFromKl)
  const float* scores;    // [B] (kFromKl)
  const float* values;    // [B, T]
  const uint8_t* mask;    // [B, T]
  float* rewards_out;     // [B, T] out (kFromKl)
  float* advantages;      // [B, T] out
  float* returns;         // [B, T] out
  float* moments;         // [B, 3] out (kMoments): count, mean, M2 of the row's advantages
  int64_t tokens;         // T
  float gamma;            // discount
  float gamma_lam;        // fl(gamma * lam)
  float neg_beta;         // fl(-beta) (kFromKl)
  float kl_clamp;         // fl(kl_clamp), +inf for none (kFromKl)
};

__device__ __forceinline__ AffineMap shfl_up(const AffineMap& m, int delta) {
  return AffineMap{__shfl_up_sync(kFullMask, m.a, delta), __shfl_up_sync(kFullMask, m.b, delta),
                   __shfl_up_sync(kFullMask, m.d, delta), __shfl_up_sync(kFullMask, m.u, delta),
                   __shfl_up_sync(kFullMask, m.v, delta)};
}

// Exclusive scan of the threads' maps in thread order: returns the composition of the maps of the
// threads before this one (the identity for thread 0) and sets `total` to that of all threads.
// warp_totals: kWarps entries of shared memory; consecutive calls must alternate between two
// buffers (a thread may write the next call's totals while a slower one still reads these).
__device__ __forceinline__ AffineMap block_exclusive_scan(const AffineMap& local, AffineMap* warp_totals,
                                                          AffineMap& total) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  AffineMap inclusive = local;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const AffineMap earlier = shfl_up(inclusive, offset);
    if (lane >= offset) inclusive = affine_combine(earlier, inclusive);
  }
  AffineMap exclusive = shfl_up(inclusive, 1);
  if (lane == 0) exclusive = identity_map();
  if (lane == 31) warp_totals[warp] = inclusive;
  __syncthreads();
  AffineMap before = identity_map();
  total = identity_map();
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    if (w == warp) before = total;
    total = affine_combine(total, warp_totals[w]);
  }
  return affine_combine(before, exclusive);
}

template <bool kFromKl, int kEstimator, bool kMoments>
__global__ void __launch_bounds__(kThreads, 1) gae_forward_kernel(const GaeForwardArgs p) {
  __shared__ AffineMap warp_totals[2][kWarps];
  __shared__ long long last_scratch[kWarps];
  __shared__ Moments<float> moments_scratch[kWarps];
  const int64_t row = blockIdx.x;
  const int64_t tokens = p.tokens;
  const int64_t base = row * tokens;  // int64: B * T may exceed 2^31
  const uint8_t* mask = p.mask + base;
  const float* values = p.values + base;
  int64_t last = -1;
  float score = 0.0f;
  if (kFromKl) {
    last = cuda_common::last_valid_token<kThreads, kItems>(mask, tokens, last_scratch);
    score = last >= 0 ? p.scores[row] : 0.0f;
  }
  ScanState carry{0.0f, 0.0f};  // (V_next, A_next) right of the chunk: 0 after the row
  Moments<float> moments{0.0f, 0.0f, 0.0f};
  int buffer = 0;
  for (int64_t end = tokens; end > 0; end -= kChunk) {
    // This thread's tokens, right to left: first, first - 1, ..., first - kItems + 1.
    const int64_t first = end - 1 - int64_t(threadIdx.x) * kItems;
    bool valid[kItems];
    float reward[kItems], value[kItems];
    AffineMap local = identity_map();
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t t = first - j;
      valid[j] = t >= 0 && mask[t] != 0;
      // Masked positions are not read: NaN or inf there cannot reach a result.
      value[j] = valid[j] ? values[t] : 0.0f;
      if (kFromKl) {
        reward[j] = token_reward<kEstimator>(valid[j], valid[j] ? p.logp[base + t] : 0.0f,
                                             valid[j] ? p.ref_logp[base + t] : 0.0f, p.neg_beta, p.kl_clamp,
                                             t == last, score);
        if (t >= 0) p.rewards_out[base + t] = reward[j];
      } else {
        reward[j] = valid[j] ? p.rewards[base + t] : 0.0f;
      }
      local = affine_combine(local, gae_forward_map(valid[j], reward[j], value[j], p.gamma, p.gamma_lam));
    }
    AffineMap total;
    const AffineMap before = block_exclusive_scan(local, warp_totals[buffer], total);
    buffer ^= 1;
    ScanState state = affine_apply(before, carry);
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t t = first - j;
      GaeForwardOut out;
      state = gae_forward_step(state, valid[j], reward[j], value[j], p.gamma, p.gamma_lam, out);
      if (t >= 0) {
        p.advantages[base + t] = out.advantage;
        p.returns[base + t] = out.ret;
      }
      if (kMoments && valid[j]) moments_add(moments, out.advantage);
    }
    carry = affine_apply(total, carry);
  }
  if (kMoments) {
    moments = cuda_common::block_reduce<kThreads>(moments, cuda_common::MergeMoments{}, moments_scratch);
    if (threadIdx.x == 0) {
      p.moments[3 * row] = moments.n;
      p.moments[3 * row + 1] = moments.mean;
      p.moments[3 * row + 2] = moments.m2;
    }
  }
}

__global__ void __launch_bounds__(kThreads, 1) gae_backward_kernel(const GaeBackwardParams p, float gamma,
                                                                 float gamma_lam) {
  __shared__ AffineMap warp_totals[2][kWarps];
  const int64_t row = blockIdx.x;
  const int64_t tokens = p.tokens;
  const int64_t base = row * tokens;
  const uint8_t* mask = p.mask + base;
  ScanState carry{0.0f, 0.0f};  // (G, G_prev) left of the chunk: 0 before the row
  int buffer = 0;
  for (int64_t start = 0; start < tokens; start += kChunk) {
    // This thread's tokens, left to right: first, first + 1, ..., first + kItems - 1.
    const int64_t first = start + int64_t(threadIdx.x) * kItems;
    bool valid[kItems];
    float grad_advantage[kItems], grad_return[kItems];
    AffineMap local = identity_map();
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t t = first + j;
      valid[j] = t < tokens && mask[t] != 0;
      grad_advantage[j] = valid[j] ? p.grad_advantages[base + t] : 0.0f;
      grad_return[j] = valid[j] ? p.grad_returns[base + t] : 0.0f;
      local = affine_combine(local, gae_backward_map(valid[j], grad_advantage[j] + grad_return[j], gamma_lam));
    }
    AffineMap total;
    const AffineMap before = block_exclusive_scan(local, warp_totals[buffer], total);
    buffer ^= 1;
    ScanState state = affine_apply(before, carry);
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t t = first + j;
      GaeBackwardOut out;
      state = gae_backward_step(state, valid[j], grad_advantage[j], grad_return[j], gamma, gamma_lam, out);
      if (t < tokens) {
        p.grad_rewards[base + t] = out.grad_reward;
        p.grad_values[base + t] = out.grad_value;
      }
    }
    carry = affine_apply(total, carry);
  }
}

// fl(gamma lam) of the double product, as the host kernels and the Triton launch take it.
float gamma_lam_of(double gamma, double lam) { return static_cast<float>(gamma * lam); }

}  // namespace

void gae_forward_cuda(const GaeForwardParams& p, void* stream) {
  if (p.rows == 0 || p.tokens == 0) return;
  GaeForwardArgs args{};
  args.rewards = p.rewards;
  args.values = p.values;
  args.mask = p.mask;
  args.advantages = p.advantages;
  args.returns = p.returns;
  args.tokens = p.tokens;
  args.gamma = static_cast<float>(p.gamma);
  args.gamma_lam = gamma_lam_of(p.gamma, p.lam);
  gae_forward_kernel<false, kKlK1, false><<<cuda_common::row_grid(p.rows, "gae_forward"), kThreads, 0,
                                            static_cast<cudaStream_t>(stream)>>>(args);
  check(cudaGetLastError(), "gae_forward");
}

void gae_backward_cuda(const GaeBackwardParams& p, void* stream) {
  if (p.rows == 0 || p.tokens == 0) return;
  gae_backward_kernel<<<cuda_common::row_grid(p.rows, "gae_backward"), kThreads, 0,
                        static_cast<cudaStream_t>(stream)>>>(p, static_cast<float>(p.gamma),
                                                             gamma_lam_of(p.gamma, p.lam));
  check(cudaGetLastError(), "gae_backward");
}

void ppo_advantages_forward_cuda(const PpoAdvantagesParams& p, void* stream) {
  if (p.rows == 0 || p.tokens == 0) return;
  if (p.whiten && p.moments == nullptr) {
    throw std::invalid_argument("ppo_advantages_forward_cuda: whitening needs the [B, 3] moments workspace");
  }
  GaeForwardArgs args{};
  args.logp = p.logp;
  args.ref_logp = p.ref_logp;
  args.scores = p.scores;
  args.values = p.values;
  args.mask = p.mask;
  args.rewards_out = p.rewards;
  args.advantages = p.advantages;
  args.returns = p.returns;
  args.moments = p.moments;
  args.tokens = p.tokens;
  args.gamma = static_cast<float>(p.gamma);
  args.gamma_lam = gamma_lam_of(p.gamma, p.lam);
  args.neg_beta = static_cast<float>(-p.beta);
  args.kl_clamp = static_cast<float>(p.kl_clamp);
  const unsigned grid = cuda_common::row_grid(p.rows, "ppo_advantages_forward");
  RLHF_FAST_KL_SWITCH(p.estimator, kEstimator, [&] {
    RLHF_FAST_BOOL_SWITCH(p.whiten, kMoments, [&] {
      gae_forward_kernel<true, kEstimator, kMoments>
          <<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(args);
    });
  });
  check(cudaGetLastError(), "ppo_advantages_forward");
  if (p.whiten) {
    const WhitenParams w{p.advantages, p.mask, p.advantages, p.moments, p.rows, p.tokens,
                         /*shift_mean=*/true, p.whiten_unbiased, p.whiten_eps};
    whiten_apply_cuda(w, stream);
  }
}

}  // namespace rlhf_fast
