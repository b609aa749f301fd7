// whiten on CUDA: masked whitening over all valid tokens of a [B, T] batch, two launches, no host
// synchronisation.
// 1. whiten_moments_kernel, one block per row: per-thread Welford moments of the valid x
//    (block-strided, coalesced), merged over the block (Chan) into the row's [3] triple.
// 2. whiten_apply_kernel: every block merges the B triples in double (whiten.h: the batch mean,
//    then M2 = sum M2_b + n_b (mean_b - mean)^2) and whitens its rows (grid-stride over rows).
//    The grid is capped at 4 blocks per multiprocessor, so the B triples (12 B each) are re-read
//    from L2 at most that many times per multiprocessor; the same 4 in __launch_bounds__ gives
//    each thread up to 64 registers (with no minimum, ptxas aims at 32 and spills on sm_80).
// Bytes per token: 5 read in step 1, 5 read + 4 written in step 2.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>

#include "common.cuh"
#include "rlhf_fast/whiten.h"

namespace rlhf_fast {
namespace {

using cuda_common::check;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kApplyBlocksPerSm = 4;

__global__ void __launch_bounds__(kThreads) whiten_moments_kernel(const WhitenParams p) {
  __shared__ Moments<float> scratch[kWarps];
  const int64_t row = blockIdx.x;
  const int64_t base = row * p.tokens;  // int64: B * T may exceed 2^31
  const float* x = p.x + base;
  const uint8_t* mask = p.mask + base;
  Moments<float> m{0.0f, 0.0f, 0.0f};
  for (int64_t t = threadIdx.x; t < p.tokens; t += kThreads) {
    if (mask[t] != 0) moments_add(m, x[t]);  // masked x is not read
  }
  m = cuda_common::block_reduce<kThreads>(m, cuda_common::MergeMoments{}, scratch);
  if (threadIdx.x == 0) {
    p.moments[3 * row] = m.n;
    p.moments[3 * row + 1] = m.mean;
    p.moments[3 * row + 2] = m.m2;
  }
}

template <bool kShiftMean>
__global__ void __launch_bounds__(kThreads, kApplyBlocksPerSm) whiten_apply_kernel(const WhitenParams p) {
  __shared__ double scratch[kWarps];
  const float* moments = p.moments;
  double n = 0.0, weighted = 0.0;
  for (int64_t b = threadIdx.x; b < p.rows; b += kThreads) {
    const double n_b = moments[3 * b];
    n += n_b;
    weighted += n_b * static_cast<double>(moments[3 * b + 1]);
  }
  n = cuda_common::block_reduce<kThreads>(n, cuda_common::Sum{}, scratch);
  weighted = cuda_common::block_reduce<kThreads>(weighted, cuda_common::Sum{}, scratch);
  const double mean = batch_mean(n, weighted);
  double m2 = 0.0;
  for (int64_t b = threadIdx.x; b < p.rows; b += kThreads) {
    m2 += batch_spread(moments[3 * b], moments[3 * b + 1], moments[3 * b + 2], mean);
  }
  m2 = cuda_common::block_reduce<kThreads>(m2, cuda_common::Sum{}, scratch);
  const WhitenStats stats = whiten_stats(n, mean, m2, p.unbiased, p.eps);

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const int64_t base = row * p.tokens;
    const float* x = p.x + base;
    const uint8_t* mask = p.mask + base;
    float* out = p.out + base;  // may be x: each element is read, then written, by one thread
    for (int64_t t = threadIdx.x; t < p.tokens; t += kThreads) {
      const bool valid = mask[t] != 0;
      out[t] = whiten_element<kShiftMean>(valid ? x[t] : 0.0f, valid, stats);
    }
  }
}

}  // namespace

void whiten_apply_cuda(const WhitenParams& p, void* stream) {
  if (p.rows == 0 || p.tokens == 0) return;
  if (p.moments == nullptr) throw std::invalid_argument("whiten_apply_cuda: the [B, 3] moments workspace is missing");
  const int64_t cap = int64_t(cuda_common::multiprocessor_count("whiten_apply")) * kApplyBlocksPerSm;
  const unsigned grid = static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(p.rows, cap)));
  RLHF_FAST_BOOL_SWITCH(p.shift_mean, kShiftMean, [&] {
    whiten_apply_kernel<kShiftMean><<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  });
  check(cudaGetLastError(), "whiten_apply");
}

void whiten_forward_cuda(const WhitenParams& p, void* stream) {
  if (p.rows == 0 || p.tokens == 0) return;
  if (p.moments == nullptr) throw std::invalid_argument("whiten_forward_cuda: the [B, 3] moments workspace is missing");
  whiten_moments_kernel<<<cuda_common::row_grid(p.rows, "whiten_forward"), kThreads, 0,
                          static_cast<cudaStream_t>(stream)>>>(p);
  check(cudaGetLastError(), "whiten_forward");
  whiten_apply_cuda(p, stream);
}

}  // namespace rlhf_fast
