// group_advantages on CUDA: one warp per group (lanes stride over its members, butterfly sums),
// 8 groups per block. The same three sweeps as the host: sum of s - s0, sum of squared deviations
// (grpo), outputs. 8 bytes per score; the scores of a group are re-read from L1.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "rlhf_fast/group_advantages.h"

namespace rlhf_fast {
namespace {

using cuda_common::check;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <int kMode>
__global__ void __launch_bounds__(kThreads) group_advantages_kernel(const GroupAdvantagesParams p, float count,
                                                                     float rloo_scale) {
  const int64_t group = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (group >= p.groups) return;  // a whole warp leaves together: the shuffles below stay full-warp
  const int lane = threadIdx.x % 32;
  const int64_t size = p.group_size;
  const float* s = p.scores + group * size;
  float* out = p.out + group * size;
  const float eps = static_cast<float>(p.eps);
  const float s0 = s[0];
  float sum = 0.0f;
  for (int64_t i = lane; i < size; i += 32) sum += s[i] - s0;
  sum = cuda_common::warp_reduce(sum, cuda_common::Sum{});
  const float offset = sum / count;
  float std = 0.0f;
  if (kMode == kGroupGrpo) {
    float squares = 0.0f;
    for (int64_t i = lane; i < size; i += 32) {
      const float dev = (s[i] - s0) - offset;
      squares += dev * dev;
    }
    squares = cuda_common::warp_reduce(squares, cuda_common::Sum{});
    std = sqrtf(squares / static_cast<float>(size - 1));
  }
  for (int64_t i = lane; i < size; i += 32) out[i] = group_advantage<kMode>((s[i] - s0) - offset, std, eps, rloo_scale);
}

}  // namespace

void group_advantages_forward_cuda(const GroupAdvantagesParams& p, void* stream) {
  if (p.groups == 0) return;
  const int64_t blocks = (p.groups + kWarps - 1) / kWarps;
  const float count = static_cast<float>(p.group_size);
  const float rloo_scale = p.group_size > 1 ? static_cast<float>(static_cast<double>(p.group_size) /
                                                                 static_cast<double>(p.group_size - 1))
                                            : 0.0f;
  RLHF_FAST_GROUP_MODE_SWITCH(p.mode, kMode, [&] {
    group_advantages_kernel<kMode><<<cuda_common::row_grid(blocks, "group_advantages_forward"), kThreads, 0,
                                     static_cast<cudaStream_t>(stream)>>>(p, count, rloo_scale);
  });
  check(cudaGetLastError(), "group_advantages_forward");
}

}  // namespace rlhf_fast
