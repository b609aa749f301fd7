// gae: generalised advantage estimation over the valid tokens of each row, its adjoint, and the
// fused PPO advantage pass (KL rewards + GAE + whitening moments). POD params and the math shared
// by host and CUDA.
//
// Spec: rlhf_fast.reference.gae (the loop), gae_scan and gae_scan_backward (the same affine maps
// as here); contracts: Provider.gae_forward, gae_backward, ppo_advantages_forward.
//
// GAE walks a row right to left over its valid tokens with the state (x, y) = (V_next, A_next),
// (0, 0) after the last valid token; a masked token changes nothing:
//     valid t:  delta = r_t + gamma x - V_t,  A_t = delta + gamma lam y,  R_t = A_t + V_t,
//               (x, y) <- (V_t, A_t).
// The host runs exactly that loop (gae_forward_step). Each step is an affine map of the state,
//     x' = a x + u,  y' = b x + d y + v     (valid: a = 0, b = gamma, d = gamma lam, u = V, v = r - V;
//                                           masked: the identity),
// and maps compose associatively (affine_combine), so the CUDA kernel scans them in parallel:
// each thread composes the maps of its few tokens, a block scan gives every thread the state at
// its first token, and the thread then runs the same loop as the host over its tokens.
// The adjoint walks left to right with (x, y) = (G, G_prev), G the gradient of delta:
//     valid t:  G_t = (gA_t + gR_t) + gamma lam x,   grad r_t = G_t,
//               grad V_t = gR_t - G_t + gamma x,      (x, y) <- (G_t, x)
// (valid: a = gamma lam, b = 1, d = 0, u = gA + gR, v = 0).
#pragma once

#include <cstdint>

#include "rlhf_fast/dtype.h"

namespace rlhf_fast {

struct GaeForwardParams {
  const float* rewards;   // [B, T] float32, contiguous
  const float* values;    // [B, T] float32
  const uint8_t* mask;    // [B, T] a bool tensor's bytes
  float* advantages;      // [B, T] float32 out
  float* returns;         // [B, T] float32 out
  int64_t rows;           // B >= 1
  int64_t tokens;         // T >= 1
  double gamma;           // discount in [0, 1]
  double lam;             // GAE lambda in [0, 1]
};

struct GaeBackwardParams {
  const float* grad_advantages;  // [B, T] float32
  const float* grad_returns;     // [B, T] float32
  const uint8_t* mask;           // [B, T]
  float* grad_rewards;           // [B, T] float32 out
  float* grad_values;            // [B, T] float32 out
  int64_t rows;                  // B >= 1
  int64_t tokens;                // T >= 1
  double gamma;
  double lam;
};

struct PpoAdvantagesParams {
  const float* logp;      // [B, T] float32
  const float* ref_logp;  // [B, T] float32
  const float* scores;    // [B] float32
  const float* values;    // [B, T] float32
  const uint8_t* mask;    // [B, T]
  float* rewards;         // [B, T] float32 out: the KL-penalised rewards (kl_rewards.h)
  float* advantages;      // [B, T] float32 out: GAE advantages, whitened over the batch when whiten
  float* returns;         // [B, T] float32 out: advantages before whitening + values
  float* moments;         // CUDA with whiten: [B, 3] float32 workspace (whiten.h); else unused
  int64_t rows;           // B >= 1
  int64_t tokens;         // T >= 1
  double beta;            // KL coefficient
  int estimator;          // KlEstimator
  double kl_clamp;        // the KL is clamped to [-kl_clamp, kl_clamp]; +inf: no clamp (kl_rewards.h)
  double gamma;
  double lam;
  bool whiten;            // whiten the advantages (shift_mean = true)
  bool whiten_unbiased;   // the whitening's variance: M2 / (n - 1), else M2 / n (whiten.h)
  double whiten_eps;      // reference.WHITEN_EPS
};

// x' = a x + u,  y' = b x + d y + v.
struct AffineMap {
  float a, b, d, u, v;
};

struct ScanState {
  float x, y;
};

RLHF_FAST_HD AffineMap identity_map() { return AffineMap{1.0f, 0.0f, 1.0f, 0.0f, 0.0f}; }

// Apply `first`, then `second` (reference.affine_combine).
RLHF_FAST_HD AffineMap affine_combine(const AffineMap& first, const AffineMap& second) {
  return AffineMap{second.a * first.a, second.b * first.a + second.d * first.b, second.d * first.d,
                   second.a * first.u + second.u, second.b * first.u + second.d * first.v + second.v};
}

RLHF_FAST_HD ScanState affine_apply(const AffineMap& m, const ScanState& s) {
  return ScanState{m.a * s.x + m.u, m.b * s.x + m.d * s.y + m.v};
}

// Forward map of one token; reward and value are already 0 where not valid.
RLHF_FAST_HD AffineMap gae_forward_map(bool valid, float reward, float value, float gamma, float gamma_lam) {
  return valid ? AffineMap{0.0f, gamma, gamma_lam, value, reward - value} : identity_map();
}

struct GaeForwardOut {
  float advantage, ret;  // 0 where not valid
};

// One forward step (the reference loop's body): the state after token t and its outputs.
RLHF_FAST_HD ScanState gae_forward_step(const ScanState& s, bool valid, float reward, float value, float gamma,
                                        float gamma_lam, GaeForwardOut& out) {
  const float delta = reward + gamma * s.x - value;
  const float advantage = delta + gamma_lam * s.y;
  out.advantage = valid ? advantage : 0.0f;
  out.ret = valid ? advantage + value : 0.0f;
  return valid ? ScanState{value, advantage} : s;
}

// Backward map of one token; g = gA + gR, already 0 where not valid.
RLHF_FAST_HD AffineMap gae_backward_map(bool valid, float g, float gamma_lam) {
  return valid ? AffineMap{gamma_lam, 1.0f, 0.0f, g, 0.0f} : identity_map();
}

struct GaeBackwardOut {
  float grad_reward, grad_value;  // 0 where not valid
};

// One backward step, left to right; grad_advantage and grad_return are already 0 where not valid.
RLHF_FAST_HD ScanState gae_backward_step(const ScanState& s, bool valid, float grad_advantage, float grad_return,
                                         float gamma, float gamma_lam, GaeBackwardOut& out) {
  const float g_delta = (grad_advantage + grad_return) + gamma_lam * s.x;
  out.grad_reward = valid ? g_delta : 0.0f;
  out.grad_value = valid ? grad_return - g_delta + gamma * s.x : 0.0f;
  return valid ? ScanState{g_delta, s.x} : s;
}

// Kernel entry points.
void gae_forward_host(const GaeForwardParams& p, int num_threads);
void gae_backward_host(const GaeBackwardParams& p, int num_threads);
void ppo_advantages_forward_host(const PpoAdvantagesParams& p, int num_threads);
// stream is a cudaStream_t; kernels run on the current device.
void gae_forward_cuda(const GaeForwardParams& p, void* stream);
void gae_backward_cuda(const GaeBackwardParams& p, void* stream);
void ppo_advantages_forward_cuda(const PpoAdvantagesParams& p, void* stream);

}  // namespace rlhf_fast
