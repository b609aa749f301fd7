// rlhf_fast._C: the one Python module of the C++/CUDA library. Conversion and GIL release only:
// arguments arrive validated (rlhf_fast.ops checks them once), pointers as integers
// (tensor.data_ptr()), 0 meaning "not given". No libtorch: the module imports without PyTorch.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "rlhf_fast/gae.h"
#include "rlhf_fast/group_advantages.h"
#include "rlhf_fast/kl_rewards.h"
#include "rlhf_fast/token_logprobs.h"
#include "rlhf_fast/whiten.h"

namespace py = pybind11;

#ifndef RLHF_FAST_VERSION
#define RLHF_FAST_VERSION "unknown"
#endif
#ifndef RLHF_FAST_CUDA_ARCHS
#define RLHF_FAST_CUDA_ARCHS ""
#endif
#ifndef RLHF_FAST_CUDA_VERSION
#define RLHF_FAST_CUDA_VERSION ""
#endif
#ifndef RLHF_FAST_NO_CUDA_REASON
#define RLHF_FAST_NO_CUDA_REASON ""
#endif

namespace {

using rlhf_fast::TokenLogprobsBackwardParams;
using rlhf_fast::TokenLogprobsForwardParams;

const void* in_ptr(uintptr_t p) { return reinterpret_cast<const void*>(p); }
void* out_ptr(uintptr_t p) { return reinterpret_cast<void*>(p); }

TokenLogprobsForwardParams forward_params(uintptr_t logits, uintptr_t labels, uintptr_t logp, uintptr_t entropy,
                                          uintptr_t lse, int64_t n_rows, int64_t vocab, int64_t logits_row_stride,
                                          int dtype, int labels_dtype, double temperature, int64_t ignore_index) {
  return TokenLogprobsForwardParams{in_ptr(logits), in_ptr(labels), out_ptr(logp), out_ptr(entropy), out_ptr(lse),
                                    n_rows,         vocab,          logits_row_stride,
                                    dtype,          labels_dtype,   temperature,      ignore_index};
}

TokenLogprobsBackwardParams backward_params(uintptr_t logits, uintptr_t labels, uintptr_t lse, uintptr_t entropy,
                                            uintptr_t grad_logp, uintptr_t grad_entropy, uintptr_t grad_logits,
                                            int64_t n_rows, int64_t vocab, int64_t logits_row_stride,
                                            int64_t grad_row_stride, int dtype, int labels_dtype, double temperature,
                                            int64_t ignore_index) {
  return TokenLogprobsBackwardParams{in_ptr(logits),   in_ptr(labels),       in_ptr(lse),      in_ptr(entropy),
                                     in_ptr(grad_logp), in_ptr(grad_entropy), out_ptr(grad_logits),
                                     n_rows,            vocab,                logits_row_stride, grad_row_stride,
                                     dtype,             labels_dtype,         temperature,      ignore_index};
}

// [B, T] ops: float32 tensors, a bool mask read as bytes.
const float* in_f32(uintptr_t p) { return reinterpret_cast<const float*>(p); }
float* out_f32(uintptr_t p) { return reinterpret_cast<float*>(p); }
const uint8_t* in_mask(uintptr_t p) { return reinterpret_cast<const uint8_t*>(p); }

rlhf_fast::KlRewardsParams kl_rewards_params(uintptr_t logp, uintptr_t ref_logp, uintptr_t scores, uintptr_t mask,
                                             uintptr_t rewards, int64_t rows, int64_t tokens, double beta,
                                             int estimator) {
  return rlhf_fast::KlRewardsParams{in_f32(logp), in_f32(ref_logp), in_f32(scores), in_mask(mask), out_f32(rewards),
                                    rows,         tokens,           beta,           estimator};
}

rlhf_fast::GaeForwardParams gae_forward_params(uintptr_t rewards, uintptr_t values, uintptr_t mask,
                                               uintptr_t advantages, uintptr_t returns, int64_t rows, int64_t tokens,
                                               double gamma, double lam) {
  return rlhf_fast::GaeForwardParams{in_f32(rewards), in_f32(values), in_mask(mask), out_f32(advantages),
                                     out_f32(returns), rows,          tokens,        gamma,
                                     lam};
}

rlhf_fast::GaeBackwardParams gae_backward_params(uintptr_t grad_advantages, uintptr_t grad_returns, uintptr_t mask,
                                                 uintptr_t grad_rewards, uintptr_t grad_values, int64_t rows,
                                                 int64_t tokens, double gamma, double lam) {
  return rlhf_fast::GaeBackwardParams{in_f32(grad_advantages), in_f32(grad_returns), in_mask(mask),
                                      out_f32(grad_rewards),   out_f32(grad_values), rows,
                                      tokens,                  gamma,                lam};
}

rlhf_fast::WhitenParams whiten_params(uintptr_t x, uintptr_t mask, uintptr_t out, uintptr_t moments, int64_t rows,
                                      int64_t tokens, bool shift_mean, double eps) {
  return rlhf_fast::WhitenParams{in_f32(x), in_mask(mask), out_f32(out), out_f32(moments),
                                 rows,      tokens,        shift_mean,   eps};
}

rlhf_fast::PpoAdvantagesParams ppo_params(uintptr_t logp, uintptr_t ref_logp, uintptr_t scores, uintptr_t values,
                                          uintptr_t mask, uintptr_t rewards, uintptr_t advantages, uintptr_t returns,
                                          uintptr_t moments, int64_t rows, int64_t tokens, double beta, int estimator,
                                          double gamma, double lam, bool whiten, double whiten_eps) {
  return rlhf_fast::PpoAdvantagesParams{in_f32(logp),        in_f32(ref_logp), in_f32(scores), in_f32(values),
                                        in_mask(mask),       out_f32(rewards), out_f32(advantages),
                                        out_f32(returns),    out_f32(moments), rows,           tokens,
                                        beta,                estimator,        gamma,          lam,
                                        whiten,              whiten_eps};
}

rlhf_fast::GroupAdvantagesParams group_params(uintptr_t scores, uintptr_t out, int64_t groups, int64_t group_size,
                                              int mode, double eps) {
  return rlhf_fast::GroupAdvantagesParams{in_f32(scores), out_f32(out), groups, group_size, mode, eps};
}

// "sm_80;sm_90;compute_90" -> ["sm_80", "sm_90", "compute_90"]: cubins, then the PTX.
[[maybe_unused]] py::list split_archs(const std::string& joined) {
  py::list archs;
  size_t begin = 0;
  while (begin < joined.size()) {
    size_t end = joined.find(';', begin);
    if (end == std::string::npos) end = joined.size();
    if (end > begin) archs.append(joined.substr(begin, end - begin));
    begin = end + 1;
  }
  return archs;
}

py::dict build_info() {
  py::dict info;
  info["version"] = RLHF_FAST_VERSION;
#ifdef RLHF_FAST_WITH_CUDA
  info["cuda_built"] = true;
  info["cuda_version"] = RLHF_FAST_CUDA_VERSION;
  info["cuda_archs"] = split_archs(RLHF_FAST_CUDA_ARCHS);
  info["reason_no_cuda"] = py::none();
#else
  info["cuda_built"] = false;
  info["cuda_version"] = py::none();
  info["cuda_archs"] = py::list();
  info["reason_no_cuda"] = RLHF_FAST_NO_CUDA_REASON;
#endif
#if defined(__clang__)
  info["host_compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["host_compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["host_compiler"] = "unknown";
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "rlhf_fast kernels on raw pointers: host C++ (and CUDA when built with it). See rlhf_fast.backends.";
  m.def("build_info", &build_info, "How this extension was built: version, cuda_built, cuda_version, cuda_archs, "
                                   "host_compiler, reason_no_cuda.");

  py::dict codes;
  codes["float32"] = static_cast<int>(rlhf_fast::kFloat32);
  codes["bfloat16"] = static_cast<int>(rlhf_fast::kBFloat16);
  codes["float16"] = static_cast<int>(rlhf_fast::kFloat16);
  codes["float64"] = static_cast<int>(rlhf_fast::kFloat64);
  codes["int32"] = static_cast<int>(rlhf_fast::kInt32);
  codes["int64"] = static_cast<int>(rlhf_fast::kInt64);
  m.attr("DTYPE_CODES") = codes;

  py::dict estimators;
  estimators["k1"] = static_cast<int>(rlhf_fast::kKlK1);
  estimators["k2"] = static_cast<int>(rlhf_fast::kKlK2);
  estimators["k3"] = static_cast<int>(rlhf_fast::kKlK3);
  estimators["abs"] = static_cast<int>(rlhf_fast::kKlAbs);
  m.attr("KL_ESTIMATOR_CODES") = estimators;

  py::dict modes;
  modes["grpo"] = static_cast<int>(rlhf_fast::kGroupGrpo);
  modes["drgrpo"] = static_cast<int>(rlhf_fast::kGroupDrGrpo);
  modes["rloo"] = static_cast<int>(rlhf_fast::kGroupRloo);
  m.attr("GROUP_MODE_CODES") = modes;

  m.def(
      "host_token_logprobs_forward",
      [](uintptr_t logits, uintptr_t labels, uintptr_t logp, uintptr_t entropy, uintptr_t lse, int64_t n_rows,
         int64_t vocab, int64_t logits_row_stride, int dtype, int labels_dtype, double temperature,
         int64_t ignore_index, int num_threads) {
        rlhf_fast::token_logprobs_forward_host(forward_params(logits, labels, logp, entropy, lse, n_rows, vocab,
                                                              logits_row_stride, dtype, labels_dtype, temperature,
                                                              ignore_index),
                                               num_threads);
      },
      py::arg("logits"), py::arg("labels"), py::arg("logp"), py::arg("entropy"), py::arg("lse"), py::arg("n_rows"),
      py::arg("vocab"), py::arg("logits_row_stride"), py::arg("dtype"), py::arg("labels_dtype"),
      py::arg("temperature"), py::arg("ignore_index"), py::arg("num_threads"),
      py::call_guard<py::gil_scoped_release>(),
      "token_logprobs forward on host memory; entropy = 0 skips the entropy.");

  m.def(
      "host_token_logprobs_backward",
      [](uintptr_t logits, uintptr_t labels, uintptr_t lse, uintptr_t entropy, uintptr_t grad_logp,
         uintptr_t grad_entropy, uintptr_t grad_logits, int64_t n_rows, int64_t vocab, int64_t logits_row_stride,
         int64_t grad_row_stride, int dtype, int labels_dtype, double temperature, int64_t ignore_index,
         int num_threads) {
        rlhf_fast::token_logprobs_backward_host(
            backward_params(logits, labels, lse, entropy, grad_logp, grad_entropy, grad_logits, n_rows, vocab,
                            logits_row_stride, grad_row_stride, dtype, labels_dtype, temperature, ignore_index),
            num_threads);
      },
      py::arg("logits"), py::arg("labels"), py::arg("lse"), py::arg("entropy"), py::arg("grad_logp"),
      py::arg("grad_entropy"), py::arg("grad_logits"), py::arg("n_rows"), py::arg("vocab"),
      py::arg("logits_row_stride"), py::arg("grad_row_stride"), py::arg("dtype"), py::arg("labels_dtype"),
      py::arg("temperature"), py::arg("ignore_index"), py::arg("num_threads"),
      py::call_guard<py::gil_scoped_release>(),
      "token_logprobs backward on host memory; grad_logits may equal logits (in place). entropy and grad_entropy "
      "are both 0 or both given.");

  // [B, T] ops on host memory (contract: rlhf_fast.backends.base.Provider; pointers of contiguous
  // float32 tensors and of a bool mask).
  m.def(
      "host_kl_rewards_forward",
      [](uintptr_t logp, uintptr_t ref_logp, uintptr_t scores, uintptr_t mask, uintptr_t rewards, int64_t rows,
         int64_t tokens, double beta, int estimator, int num_threads) {
        rlhf_fast::kl_rewards_forward_host(
            kl_rewards_params(logp, ref_logp, scores, mask, rewards, rows, tokens, beta, estimator), num_threads);
      },
      py::arg("logp"), py::arg("ref_logp"), py::arg("scores"), py::arg("mask"), py::arg("rewards"), py::arg("rows"),
      py::arg("tokens"), py::arg("beta"), py::arg("estimator"), py::arg("num_threads"),
      py::call_guard<py::gil_scoped_release>(), "KL-penalised rewards [B, T]; estimator from KL_ESTIMATOR_CODES.");

  m.def(
      "host_gae_forward",
      [](uintptr_t rewards, uintptr_t values, uintptr_t mask, uintptr_t advantages, uintptr_t returns, int64_t rows,
         int64_t tokens, double gamma, double lam, int num_threads) {
        rlhf_fast::gae_forward_host(
            gae_forward_params(rewards, values, mask, advantages, returns, rows, tokens, gamma, lam), num_threads);
      },
      py::arg("rewards"), py::arg("values"), py::arg("mask"), py::arg("advantages"), py::arg("returns"),
      py::arg("rows"), py::arg("tokens"), py::arg("gamma"), py::arg("lam"), py::arg("num_threads"),
      py::call_guard<py::gil_scoped_release>(), "GAE advantages and returns [B, T].");

  m.def(
      "host_gae_backward",
      [](uintptr_t grad_advantages, uintptr_t grad_returns, uintptr_t mask, uintptr_t grad_rewards,
         uintptr_t grad_values, int64_t rows, int64_t tokens, double gamma, double lam, int num_threads) {
        rlhf_fast::gae_backward_host(gae_backward_params(grad_advantages, grad_returns, mask, grad_rewards,
                                                         grad_values, rows, tokens, gamma, lam),
                                     num_threads);
      },
      py::arg("grad_advantages"), py::arg("grad_returns"), py::arg("mask"), py::arg("grad_rewards"),
      py::arg("grad_values"), py::arg("rows"), py::arg("tokens"), py::arg("gamma"), py::arg("lam"),
      py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
      "Gradients of GAE's rewards and values [B, T] given those of advantages and returns.");

  m.def(
      "host_whiten_forward",
      [](uintptr_t x, uintptr_t mask, uintptr_t out, int64_t rows, int64_t tokens, bool shift_mean, double eps,
         int num_threads) {
        rlhf_fast::whiten_forward_host(whiten_params(x, mask, out, 0, rows, tokens, shift_mean, eps), num_threads);
      },
      py::arg("x"), py::arg("mask"), py::arg("out"), py::arg("rows"), py::arg("tokens"), py::arg("shift_mean"),
      py::arg("eps"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
      "Masked whitening over the batch [B, T]; out may equal x.");

  m.def(
      "host_ppo_advantages_forward",
      [](uintptr_t logp, uintptr_t ref_logp, uintptr_t scores, uintptr_t values, uintptr_t mask, uintptr_t rewards,
         uintptr_t advantages, uintptr_t returns, int64_t rows, int64_t tokens, double beta, int estimator,
         double gamma, double lam, bool whiten, double whiten_eps, int num_threads) {
        rlhf_fast::ppo_advantages_forward_host(ppo_params(logp, ref_logp, scores, values, mask, rewards, advantages,
                                                          returns, 0, rows, tokens, beta, estimator, gamma, lam,
                                                          whiten, whiten_eps),
                                               num_threads);
      },
      py::arg("logp"), py::arg("ref_logp"), py::arg("scores"), py::arg("values"), py::arg("mask"),
      py::arg("rewards"), py::arg("advantages"), py::arg("returns"), py::arg("rows"), py::arg("tokens"),
      py::arg("beta"), py::arg("estimator"), py::arg("gamma"), py::arg("lam"), py::arg("whiten"),
      py::arg("whiten_eps"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
      "Fused PPO advantages: KL rewards, GAE, optional whitening of the advantages [B, T].");

  m.def(
      "host_group_advantages_forward",
      [](uintptr_t scores, uintptr_t out, int64_t groups, int64_t group_size, int mode, double eps,
         int num_threads) {
        rlhf_fast::group_advantages_forward_host(group_params(scores, out, groups, group_size, mode, eps),
                                                 num_threads);
      },
      py::arg("scores"), py::arg("out"), py::arg("groups"), py::arg("group_size"), py::arg("mode"), py::arg("eps"),
      py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
      "Group-relative advantages [groups * group_size]; mode from GROUP_MODE_CODES.");

#ifdef RLHF_FAST_WITH_CUDA
  m.def(
      "cuda_token_logprobs_forward",
      [](uintptr_t logits, uintptr_t labels, uintptr_t logp, uintptr_t entropy, uintptr_t lse, int64_t n_rows,
         int64_t vocab, int64_t logits_row_stride, int dtype, int labels_dtype, double temperature,
         int64_t ignore_index, uintptr_t stream) {
        rlhf_fast::token_logprobs_forward_cuda(forward_params(logits, labels, logp, entropy, lse, n_rows, vocab,
                                                              logits_row_stride, dtype, labels_dtype, temperature,
                                                              ignore_index),
                                               reinterpret_cast<void*>(stream));
      },
      py::arg("logits"), py::arg("labels"), py::arg("logp"), py::arg("entropy"), py::arg("lse"), py::arg("n_rows"),
      py::arg("vocab"), py::arg("logits_row_stride"), py::arg("dtype"), py::arg("labels_dtype"),
      py::arg("temperature"), py::arg("ignore_index"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(),
      "token_logprobs forward on the current CUDA device, enqueued on stream (a cudaStream_t as an int).");

  m.def(
      "cuda_token_logprobs_backward",
      [](uintptr_t logits, uintptr_t labels, uintptr_t lse, uintptr_t entropy, uintptr_t grad_logp,
         uintptr_t grad_entropy, uintptr_t grad_logits, int64_t n_rows, int64_t vocab, int64_t logits_row_stride,
         int64_t grad_row_stride, int dtype, int labels_dtype, double temperature, int64_t ignore_index,
         uintptr_t stream) {
        rlhf_fast::token_logprobs_backward_cuda(
            backward_params(logits, labels, lse, entropy, grad_logp, grad_entropy, grad_logits, n_rows, vocab,
                            logits_row_stride, grad_row_stride, dtype, labels_dtype, temperature, ignore_index),
            reinterpret_cast<void*>(stream));
      },
      py::arg("logits"), py::arg("labels"), py::arg("lse"), py::arg("entropy"), py::arg("grad_logp"),
      py::arg("grad_entropy"), py::arg("grad_logits"), py::arg("n_rows"), py::arg("vocab"),
      py::arg("logits_row_stride"), py::arg("grad_row_stride"), py::arg("dtype"), py::arg("labels_dtype"),
      py::arg("temperature"), py::arg("ignore_index"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(),
      "token_logprobs backward on the current CUDA device, enqueued on stream; grad_logits may equal logits.");

  // [B, T] ops on the current CUDA device, enqueued on stream.
  m.def(
      "cuda_kl_rewards_forward",
      [](uintptr_t logp, uintptr_t ref_logp, uintptr_t scores, uintptr_t mask, uintptr_t rewards, int64_t rows,
         int64_t tokens, double beta, int estimator, uintptr_t stream) {
        rlhf_fast::kl_rewards_forward_cuda(
            kl_rewards_params(logp, ref_logp, scores, mask, rewards, rows, tokens, beta, estimator),
            reinterpret_cast<void*>(stream));
      },
      py::arg("logp"), py::arg("ref_logp"), py::arg("scores"), py::arg("mask"), py::arg("rewards"), py::arg("rows"),
      py::arg("tokens"), py::arg("beta"), py::arg("estimator"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(), "KL-penalised rewards [B, T] on CUDA.");

  m.def(
      "cuda_gae_forward",
      [](uintptr_t rewards, uintptr_t values, uintptr_t mask, uintptr_t advantages, uintptr_t returns, int64_t rows,
         int64_t tokens, double gamma, double lam, uintptr_t stream) {
        rlhf_fast::gae_forward_cuda(
            gae_forward_params(rewards, values, mask, advantages, returns, rows, tokens, gamma, lam),
            reinterpret_cast<void*>(stream));
      },
      py::arg("rewards"), py::arg("values"), py::arg("mask"), py::arg("advantages"), py::arg("returns"),
      py::arg("rows"), py::arg("tokens"), py::arg("gamma"), py::arg("lam"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(), "GAE advantages and returns [B, T] on CUDA.");

  m.def(
      "cuda_gae_backward",
      [](uintptr_t grad_advantages, uintptr_t grad_returns, uintptr_t mask, uintptr_t grad_rewards,
         uintptr_t grad_values, int64_t rows, int64_t tokens, double gamma, double lam, uintptr_t stream) {
        rlhf_fast::gae_backward_cuda(gae_backward_params(grad_advantages, grad_returns, mask, grad_rewards,
                                                         grad_values, rows, tokens, gamma, lam),
                                     reinterpret_cast<void*>(stream));
      },
      py::arg("grad_advantages"), py::arg("grad_returns"), py::arg("mask"), py::arg("grad_rewards"),
      py::arg("grad_values"), py::arg("rows"), py::arg("tokens"), py::arg("gamma"), py::arg("lam"),
      py::arg("stream"), py::call_guard<py::gil_scoped_release>(), "GAE backward [B, T] on CUDA.");

  m.def(
      "cuda_whiten_forward",
      [](uintptr_t x, uintptr_t mask, uintptr_t out, uintptr_t moments, int64_t rows, int64_t tokens,
         bool shift_mean, double eps, uintptr_t stream) {
        rlhf_fast::whiten_forward_cuda(whiten_params(x, mask, out, moments, rows, tokens, shift_mean, eps),
                                       reinterpret_cast<void*>(stream));
      },
      py::arg("x"), py::arg("mask"), py::arg("out"), py::arg("moments"), py::arg("rows"), py::arg("tokens"),
      py::arg("shift_mean"), py::arg("eps"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "Masked whitening [B, T] on CUDA; moments is a [B, 3] float32 workspace; out may equal x.");

  m.def(
      "cuda_ppo_advantages_forward",
      [](uintptr_t logp, uintptr_t ref_logp, uintptr_t scores, uintptr_t values, uintptr_t mask, uintptr_t rewards,
         uintptr_t advantages, uintptr_t returns, uintptr_t moments, int64_t rows, int64_t tokens, double beta,
         int estimator, double gamma, double lam, bool whiten, double whiten_eps, uintptr_t stream) {
        rlhf_fast::ppo_advantages_forward_cuda(ppo_params(logp, ref_logp, scores, values, mask, rewards, advantages,
                                                          returns, moments, rows, tokens, beta, estimator, gamma,
                                                          lam, whiten, whiten_eps),
                                               reinterpret_cast<void*>(stream));
      },
      py::arg("logp"), py::arg("ref_logp"), py::arg("scores"), py::arg("values"), py::arg("mask"),
      py::arg("rewards"), py::arg("advantages"), py::arg("returns"), py::arg("moments"), py::arg("rows"),
      py::arg("tokens"), py::arg("beta"), py::arg("estimator"), py::arg("gamma"), py::arg("lam"), py::arg("whiten"),
      py::arg("whiten_eps"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "Fused PPO advantages on CUDA (two launches with whiten); moments: [B, 3] float32 workspace, or 0 "
      "without whiten.");

  m.def(
      "cuda_group_advantages_forward",
      [](uintptr_t scores, uintptr_t out, int64_t groups, int64_t group_size, int mode, double eps,
         uintptr_t stream) {
        rlhf_fast::group_advantages_forward_cuda(group_params(scores, out, groups, group_size, mode, eps),
                                                 reinterpret_cast<void*>(stream));
      },
      py::arg("scores"), py::arg("out"), py::arg("groups"), py::arg("group_size"), py::arg("mode"), py::arg("eps"),
      py::arg("stream"), py::call_guard<py::gil_scoped_release>(), "Group-relative advantages on CUDA.");
#endif
}
