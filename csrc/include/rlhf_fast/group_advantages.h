// group_advantages: group-relative advantages of sequence scores (GRPO, Dr. GRPO, RLOO). POD
// params and the math shared by host and CUDA.
//
// Spec: rlhf_fast.reference.group_advantages; contract: Provider.group_advantages_forward.
// Scores [B] form contiguous groups of G. Per group, centred on its first member s0 (a group of
// identical scores then gives exactly 0, and a large common offset cancels before the sums):
//     c_i = s_i - s0,  dev_i = c_i - sum(c) / G,
//     grpo: dev / (std + eps), std = sqrt(sum(dev^2) / (G - 1));  drgrpo: dev;  rloo: dev G / (G - 1).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "rlhf_fast/dtype.h"

namespace rlhf_fast {

// Mode codes shared with Python (exported as _C.GROUP_MODE_CODES).
enum GroupMode : int {
  kGroupGrpo = 0,
  kGroupDrGrpo = 1,
  kGroupRloo = 2,
};

struct GroupAdvantagesParams {
  const float* scores;  // [groups * group_size] float32, contiguous
  float* out;           // [groups * group_size] float32 out
  int64_t groups;       // B / G >= 1
  int64_t group_size;   // G: >= 2 for grpo and rloo, >= 1 for drgrpo
  int mode;             // GroupMode
  double eps;           // added to the std (grpo), > 0
};

// One member's advantage from its deviation dev = c - mean(c), the group's std (grpo only) and
// rloo_scale = fl(G / (G - 1)) (rloo only).
template <int kMode>
RLHF_FAST_HD float group_advantage(float dev, float std, float eps, float rloo_scale) {
  if (kMode == kGroupGrpo) return dev / (std + eps);
  if (kMode == kGroupRloo) return dev * rloo_scale;
  return dev;
}

[[noreturn]] inline void unsupported_group_mode(int code) {
  throw std::invalid_argument("group_advantages: unknown mode code " + std::to_string(code) +
                              " (expected 0 grpo, 1 drgrpo, 2 rloo)");
}

// Kernel entry points.
void group_advantages_forward_host(const GroupAdvantagesParams& p, int num_threads);
// stream is a cudaStream_t; kernels run on the current device.
void group_advantages_forward_cuda(const GroupAdvantagesParams& p, void* stream);

}  // namespace rlhf_fast

#define RLHF_FAST_GROUP_MODE_SWITCH(CODE, NAME, ...)          \
  switch (CODE) {                                             \
    case ::rlhf_fast::kGroupGrpo: {                           \
      constexpr int NAME = ::rlhf_fast::kGroupGrpo;           \
      __VA_ARGS__();                                          \
    } break;                                                  \
    case ::rlhf_fast::kGroupDrGrpo: {                         \
      constexpr int NAME = ::rlhf_fast::kGroupDrGrpo;         \
      __VA_ARGS__();                                          \
    } break;                                                  \
    case ::rlhf_fast::kGroupRloo: {                           \
      constexpr int NAME = ::rlhf_fast::kGroupRloo;           \
      __VA_ARGS__();                                          \
    } break;                                                  \
    default: ::rlhf_fast::unsupported_group_mode(CODE);       \
  }
