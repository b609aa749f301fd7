// group_advantages on the host: one group at a time, threads over groups. 8 bytes per score.
#include <cmath>
#include <cstdint>

#include "rlhf_fast/group_advantages.h"
#include "rlhf_fast/host_threads.h"

namespace rlhf_fast {
namespace {

template <int kMode>
void group_rows(const GroupAdvantagesParams& p, int64_t begin, int64_t end) {
  const int64_t size = p.group_size;
  const float count = static_cast<float>(size);
  const float eps = static_cast<float>(p.eps);
  const float rloo_scale = size > 1 ? static_cast<float>(static_cast<double>(size) / static_cast<double>(size - 1))
                                    : 0.0f;
  for (int64_t group = begin; group < end; ++group) {
    const float* s = p.scores + group * size;
    float* out = p.out + group * size;
    const float s0 = s[0];
    float sum = 0.0f;
    for (int64_t i = 0; i < size; ++i) sum += s[i] - s0;
    const float offset = sum / count;
    float std = 0.0f;
    if (kMode == kGroupGrpo) {
      float squares = 0.0f;
      for (int64_t i = 0; i < size; ++i) {
        const float dev = (s[i] - s0) - offset;
        squares += dev * dev;
      }
      std = sqrtf(squares / static_cast<float>(size - 1));
    }
    for (int64_t i = 0; i < size; ++i) out[i] = group_advantage<kMode>((s[i] - s0) - offset, std, eps, rloo_scale);
  }
}

}  // namespace

void group_advantages_forward_host(const GroupAdvantagesParams& p, int num_threads) {
  RLHF_FAST_GROUP_MODE_SWITCH(p.mode, kMode, [&] {
    parallel_rows(p.groups, p.group_size, num_threads,
                  [&](int64_t begin, int64_t end) { group_rows<kMode>(p, begin, end); });
  });
}

}  // namespace rlhf_fast
