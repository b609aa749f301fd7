// rlhf_fast._C: the one Python module of the C++/CUDA library. Conversion and GIL release only:
// arguments arrive validated (rlhf_fast.ops checks them once), pointers as integers
// (tensor.data_ptr()), 0 meaning "not given". No libtorch: the module imports without PyTorch.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "rlhf_fast/token_logprobs.h"

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
#endif
}
