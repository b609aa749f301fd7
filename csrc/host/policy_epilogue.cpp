// policy_epilogue on the host: fused_policy_loss's gradient in one pass over chunks of rows.
//
// A chunk is as many consecutive rows as fit in kChunkBytes of logits (at least one row). Each
// chunk runs token_logprobs' host forward (csrc/host/token_logprobs.cpp, one thread: the same
// code, so logp, entropy and lse are bitwise those of the three-step path), the epilogue of
// policy_epilogue.h on its rows, then token_logprobs' host backward with the epilogue's token
// gradients, while the chunk's logits are still in this core's L2. Rows are split over threads as
// token_logprobs' host kernels split them; float64 logits run in double end to end.
// Bytes: [N, V] read by the forward and read again by the backward (from L2 for a chunk that fits),
// [N, V] written once, ~13 N row values; the three-step path reads [N, V] twice from memory and
// runs the [B, T] autograd in between. A row whose saved lse is too coarse (token_logprobs.h,
// |lse| >= 64) is read a third time by the backward's recompute, as in the three-step path.
#include <algorithm>
#include <cstdint>

#include "rlhf_fast/host_threads.h"
#include "rlhf_fast/policy_epilogue.h"
#include "rlhf_fast/token_logprobs.h"

namespace rlhf_fast {
namespace {

// Logits per chunk: half of a 512 KB L2, the smallest of current x86 server cores' (the backward
// reads the chunk again and writes the gradient next to it).
constexpr int64_t kChunkBytes = int64_t(256) << 10;

template <typename Acc>
Acc* row_ptr(void* base, int64_t row) {
  return static_cast<Acc*>(base) + row;
}
template <typename Acc>
const Acc* row_ptr(const void* base, int64_t row) {
  return static_cast<const Acc*>(base) + row;
}

// Rows [begin, end) of the op, by chunks.
template <typename T>
void epilogue_rows(const PolicyEpilogueParams& p, const EpilogueOptions<acc_t<T>>& o, int64_t begin, int64_t end) {
  using Acc = acc_t<T>;
  const int64_t row_bytes = std::max<int64_t>(p.vocab, 1) * static_cast<int64_t>(sizeof(T));
  const int64_t chunk = std::max<int64_t>(1, kChunkBytes / row_bytes);
  const int64_t label_bytes = p.labels_dtype == kInt32 ? 4 : 8;
  for (int64_t c0 = begin; c0 < end; c0 += chunk) {
    const int64_t rows = std::min(end, c0 + chunk) - c0;
    const void* logits = static_cast<const T*>(p.logits) + c0 * p.logits_row_stride;
    const void* labels = static_cast<const char*>(p.labels) + c0 * label_bytes;
    Acc* logp = row_ptr<Acc>(p.logp, c0);
    Acc* entropy = row_ptr<Acc>(p.entropy, c0);
    Acc* lse = row_ptr<Acc>(p.lse, c0);
    TokenLogprobsForwardParams fwd{logits, labels, logp, entropy, lse, rows, p.vocab, p.logits_row_stride,
                                   p.dtype, p.labels_dtype, p.temperature, p.ignore_index, 0};
    token_logprobs_forward_host(fwd, 1);

    Acc* grad_logp = row_ptr<Acc>(p.grad_logp, c0);
    Acc* grad_entropy = row_ptr<Acc>(p.grad_entropy, c0);
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t row = c0 + i;
      if (load_label(p.labels, p.labels_dtype, row) == p.ignore_index) {
        grad_logp[i] = 0;
        grad_entropy[i] = 0;
        continue;
      }
      const Acc ref_logp = o.kl_estimator != kNoKl ? *row_ptr<Acc>(p.ref_logp, row) : Acc(0);
      const TokenGrads<Acc> g = token_grads(o, logp[i], *row_ptr<Acc>(p.old_logp, row),
                                            *row_ptr<Acc>(p.advantages, row), *row_ptr<Acc>(p.pg_weight, row),
                                            *row_ptr<Acc>(p.weight, row), ref_logp);
      grad_logp[i] = g.logp;
      grad_entropy[i] = g.entropy;
    }

    // Without an entropy term the backward drops it (grad_entropy = nullptr), as the Triton
    // kernel's ENTROPY_GRAD switch does: 0 times a -inf log-probability is never formed.
    TokenLogprobsBackwardParams bwd{logits, labels, lse, o.entropy_grad ? entropy : nullptr, grad_logp,
                                    o.entropy_grad ? grad_entropy : nullptr,
                                    static_cast<T*>(p.grad_logits) + c0 * p.grad_row_stride, rows, p.vocab,
                                    p.logits_row_stride, p.grad_row_stride, p.dtype, p.labels_dtype,
                                    p.temperature, p.ignore_index, 0, nullptr};
    token_logprobs_backward_host(bwd, 1);
  }
}

}  // namespace

void policy_epilogue_forward_host(const PolicyEpilogueParams& p, int num_threads) {
  RLHF_FAST_FLOAT_SWITCH(p.dtype, "policy_epilogue_forward_host logits", T, [&] {
    const EpilogueOptions<acc_t<T>> o = epilogue_options<acc_t<T>>(p);
    parallel_rows(p.n_rows, p.vocab, num_threads,
                  [&](int64_t begin, int64_t end) { epilogue_rows<T>(p, o, begin, end); });
  });
}

}  // namespace rlhf_fast
