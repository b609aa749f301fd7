// rlhf_fast._C: the one Python module of the C++/CUDA library. Conversion and GIL release only:
// arguments arrive validated (rlhf_fast.ops checks them once). No libtorch: the module imports
// without PyTorch.
//
// A kernel takes its POD params struct (csrc/include/rlhf_fast/<op>.h), bound here as a class of
// the same name built from keywords, one per field; pointers are integers (tensor.data_ptr()), 0
// meaning "not given". The kernels stand under the same names in two submodules:
//     _C.host.<kernel>(params, num_threads)  rlhf_fast::<kernel>_host on host memory
//     _C.cuda.<kernel>(params, stream)       rlhf_fast::<kernel>_cuda on the current CUDA device,
//                                            enqueued on stream (a cudaStream_t as an integer);
//                                            only in a build with CUDA.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "rlhf_fast/gae.h"
#include "rlhf_fast/group_advantages.h"
#include "rlhf_fast/kl_rewards.h"
#include "rlhf_fast/policy_epilogue.h"
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

// A params struct as a Python class, built from keywords that name every field once:
// TokenLogprobsForwardParams(logits=..., ..., ignore_index=-100). A pointer field takes an integer
// address, any other field its number, converted as pybind11 converts arguments; a missing,
// unknown or unconvertible field raises TypeError, as a missing argument did. Fields read back as
// attributes; the class attribute `fields` names them in order, so that a test can compare them
// with the header's struct (tests/test_extension_bindings.py).
template <typename P>
class ParamsClass {
 public:
  ParamsClass(py::module_& m, const char* name, const char* doc)
      : cls_(m, name, doc), setters_(std::make_shared<Setters>()) {
    cls_.def(py::init([setters = setters_](const py::kwargs& fields) { return from_fields(*setters, fields); }));
  }

  template <typename T>
  ParamsClass& field(const char* name, T* P::*member) {
    cls_.def_property_readonly(name, [member](const P& p) { return reinterpret_cast<uintptr_t>(p.*member); });
    return named(name, [member](P& p, py::handle v) { p.*member = reinterpret_cast<T*>(v.cast<uintptr_t>()); });
  }

  template <typename T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
  ParamsClass& field(const char* name, T P::*member) {
    cls_.def_readonly(name, member);
    return named(name, [member](P& p, py::handle v) { p.*member = v.cast<T>(); });
  }

 private:
  // In the struct's order, by name: string literals that live as long as the module. A linear
  // search: a struct has at most a score of fields.
  using Setters = std::vector<std::pair<std::string_view, std::function<void(P&, py::handle)>>>;

  ParamsClass& named(const char* name, std::function<void(P&, py::handle)> setter) {
    setters_->emplace_back(name, std::move(setter));
    names_.append(name);
    cls_.attr("fields") = py::tuple(names_);
    return *this;
  }

  static P from_fields(const Setters& setters, const py::kwargs& fields) {
    P p{};
    for (auto [key, value] : fields) {
      Py_ssize_t size = 0;
      const char* chars = PyUnicode_AsUTF8AndSize(key.ptr(), &size);
      if (chars == nullptr) throw py::error_already_set();
      const std::string_view name(chars, static_cast<size_t>(size));
      auto setter = std::find_if(setters.begin(), setters.end(), [&](const auto& s) { return s.first == name; });
      if (setter == setters.end()) throw py::type_error(py::type_id<P>() + " has no field " + std::string(name));
      try {
        setter->second(p, value);
      } catch (const py::cast_error&) {
        throw py::type_error(py::type_id<P>() + "." + std::string(name) + ": cannot convert " +
                             std::string(py::repr(value)));
      }
    }
    if (fields.size() != setters.size()) {
      std::string missing;
      for (const auto& [name, setter] : setters) {
        if (!fields.contains(py::str(name.data(), name.size()))) missing += " " + std::string(name);
      }
      throw py::type_error(py::type_id<P>() + ": missing fields" + missing);
    }
    return p;
  }

  py::class_<P> cls_;
  std::shared_ptr<Setters> setters_;
  py::list names_;
};

// A field of the struct that the enclosing block calls P, its name written once.
#define RLHF_FAST_FIELD(name) field(#name, &P::name)

void bind_params(py::module_& m) {
  {
    using P = rlhf_fast::TokenLogprobsForwardParams;
    ParamsClass<P>(m, "TokenLogprobsForwardParams", "token_logprobs forward; entropy = 0 skips the entropy; "
                   "vocab_offset: the logits are a vocabulary shard's columns.")
        .RLHF_FAST_FIELD(logits).RLHF_FAST_FIELD(labels).RLHF_FAST_FIELD(logp).RLHF_FAST_FIELD(entropy)
        .RLHF_FAST_FIELD(lse).RLHF_FAST_FIELD(n_rows).RLHF_FAST_FIELD(vocab).RLHF_FAST_FIELD(logits_row_stride)
        .RLHF_FAST_FIELD(dtype).RLHF_FAST_FIELD(labels_dtype).RLHF_FAST_FIELD(temperature)
        .RLHF_FAST_FIELD(ignore_index).RLHF_FAST_FIELD(vocab_offset);
  }
  {
    using P = rlhf_fast::TokenLogprobsBackwardParams;
    ParamsClass<P>(m, "TokenLogprobsBackwardParams", "token_logprobs backward; grad_logits may equal logits (in "
                   "place); entropy and grad_entropy are both 0 or both given; log_mass = 0 outside a "
                   "vocabulary shard.")
        .RLHF_FAST_FIELD(logits).RLHF_FAST_FIELD(labels).RLHF_FAST_FIELD(lse).RLHF_FAST_FIELD(entropy)
        .RLHF_FAST_FIELD(grad_logp).RLHF_FAST_FIELD(grad_entropy).RLHF_FAST_FIELD(grad_logits)
        .RLHF_FAST_FIELD(n_rows).RLHF_FAST_FIELD(vocab).RLHF_FAST_FIELD(logits_row_stride)
        .RLHF_FAST_FIELD(grad_row_stride).RLHF_FAST_FIELD(dtype).RLHF_FAST_FIELD(labels_dtype)
        .RLHF_FAST_FIELD(temperature).RLHF_FAST_FIELD(ignore_index).RLHF_FAST_FIELD(vocab_offset)
        .RLHF_FAST_FIELD(log_mass);
  }
  {
    using P = rlhf_fast::PolicyEpilogueParams;
    ParamsClass<P>(m, "PolicyEpilogueParams", "fused_policy_loss's forward and logits' gradient in one kernel; "
                   "objective from POLICY_OBJECTIVE_CODES, kl_estimator from KL_ESTIMATOR_CODES or -1 (no KL); "
                   "grad_logits may equal logits (in place).")
        .RLHF_FAST_FIELD(logits).RLHF_FAST_FIELD(labels).RLHF_FAST_FIELD(old_logp).RLHF_FAST_FIELD(advantages)
        .RLHF_FAST_FIELD(pg_weight).RLHF_FAST_FIELD(weight).RLHF_FAST_FIELD(ref_logp).RLHF_FAST_FIELD(logp)
        .RLHF_FAST_FIELD(entropy).RLHF_FAST_FIELD(lse).RLHF_FAST_FIELD(grad_logp).RLHF_FAST_FIELD(grad_entropy)
        .RLHF_FAST_FIELD(grad_logits).RLHF_FAST_FIELD(n_rows).RLHF_FAST_FIELD(vocab)
        .RLHF_FAST_FIELD(logits_row_stride).RLHF_FAST_FIELD(grad_row_stride).RLHF_FAST_FIELD(dtype)
        .RLHF_FAST_FIELD(labels_dtype).RLHF_FAST_FIELD(temperature).RLHF_FAST_FIELD(ignore_index)
        .RLHF_FAST_FIELD(objective).RLHF_FAST_FIELD(kl_estimator).RLHF_FAST_FIELD(straight_through)
        .RLHF_FAST_FIELD(clip_low).RLHF_FAST_FIELD(clip_high).RLHF_FAST_FIELD(dual_clip).RLHF_FAST_FIELD(tau_pos)
        .RLHF_FAST_FIELD(tau_neg).RLHF_FAST_FIELD(kl_coef).RLHF_FAST_FIELD(kl_clamp).RLHF_FAST_FIELD(entropy_coef);
  }
  // [B, T] ops: contiguous float32 tensors and a bool mask.
  {
    using P = rlhf_fast::KlRewardsParams;
    ParamsClass<P>(m, "KlRewardsParams", "KL-penalised rewards [B, T]; estimator from KL_ESTIMATOR_CODES.")
        .RLHF_FAST_FIELD(logp).RLHF_FAST_FIELD(ref_logp).RLHF_FAST_FIELD(scores).RLHF_FAST_FIELD(mask)
        .RLHF_FAST_FIELD(rewards).RLHF_FAST_FIELD(rows).RLHF_FAST_FIELD(tokens).RLHF_FAST_FIELD(beta)
        .RLHF_FAST_FIELD(estimator).RLHF_FAST_FIELD(kl_clamp);
  }
  {
    using P = rlhf_fast::GaeForwardParams;
    ParamsClass<P>(m, "GaeForwardParams", "GAE advantages and returns [B, T].")
        .RLHF_FAST_FIELD(rewards).RLHF_FAST_FIELD(values).RLHF_FAST_FIELD(mask).RLHF_FAST_FIELD(advantages)
        .RLHF_FAST_FIELD(returns).RLHF_FAST_FIELD(rows).RLHF_FAST_FIELD(tokens).RLHF_FAST_FIELD(gamma)
        .RLHF_FAST_FIELD(lam);
  }
  {
    using P = rlhf_fast::GaeBackwardParams;
    ParamsClass<P>(m, "GaeBackwardParams", "Gradients of GAE's rewards and values [B, T] given those of "
                   "advantages and returns.")
        .RLHF_FAST_FIELD(grad_advantages).RLHF_FAST_FIELD(grad_returns).RLHF_FAST_FIELD(mask)
        .RLHF_FAST_FIELD(grad_rewards).RLHF_FAST_FIELD(grad_values).RLHF_FAST_FIELD(rows).RLHF_FAST_FIELD(tokens)
        .RLHF_FAST_FIELD(gamma).RLHF_FAST_FIELD(lam);
  }
  {
    using P = rlhf_fast::WhitenParams;
    ParamsClass<P>(m, "WhitenParams", "Masked whitening over the batch [B, T]; out may equal x; moments: a [B, 3] "
                   "float32 workspace on CUDA, 0 on the host.")
        .RLHF_FAST_FIELD(x).RLHF_FAST_FIELD(mask).RLHF_FAST_FIELD(out).RLHF_FAST_FIELD(moments)
        .RLHF_FAST_FIELD(rows).RLHF_FAST_FIELD(tokens).RLHF_FAST_FIELD(shift_mean).RLHF_FAST_FIELD(unbiased)
        .RLHF_FAST_FIELD(eps);
  }
  {
    using P = rlhf_fast::PpoAdvantagesParams;
    ParamsClass<P>(m, "PpoAdvantagesParams", "Fused PPO advantages: KL rewards, GAE, optional whitening of the "
                   "advantages [B, T]; moments: a [B, 3] float32 workspace on CUDA with whiten, else 0.")
        .RLHF_FAST_FIELD(logp).RLHF_FAST_FIELD(ref_logp).RLHF_FAST_FIELD(scores).RLHF_FAST_FIELD(values)
        .RLHF_FAST_FIELD(mask).RLHF_FAST_FIELD(rewards).RLHF_FAST_FIELD(advantages).RLHF_FAST_FIELD(returns)
        .RLHF_FAST_FIELD(moments).RLHF_FAST_FIELD(rows).RLHF_FAST_FIELD(tokens).RLHF_FAST_FIELD(beta)
        .RLHF_FAST_FIELD(estimator).RLHF_FAST_FIELD(kl_clamp).RLHF_FAST_FIELD(gamma).RLHF_FAST_FIELD(lam)
        .RLHF_FAST_FIELD(whiten).RLHF_FAST_FIELD(whiten_unbiased).RLHF_FAST_FIELD(whiten_eps);
  }
  {
    using P = rlhf_fast::GroupAdvantagesParams;
    ParamsClass<P>(m, "GroupAdvantagesParams", "Group-relative advantages [groups * group_size]; mode from "
                   "GROUP_MODE_CODES.")
        .RLHF_FAST_FIELD(scores).RLHF_FAST_FIELD(out).RLHF_FAST_FIELD(groups).RLHF_FAST_FIELD(group_size)
        .RLHF_FAST_FIELD(mode).RLHF_FAST_FIELD(eps);
  }
}

#undef RLHF_FAST_FIELD

// The CUDA entry points take the stream as a void*; Python passes it as an integer.
template <typename P>
P params_of(void (*)(const P&, void*));

template <auto launch>
void on_stream(const decltype(params_of(launch))& p, uintptr_t stream) {
  launch(p, reinterpret_cast<void*>(stream));
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

  py::dict objectives;
  objectives["ppo"] = static_cast<int>(rlhf_fast::kObjectivePpo);
  objectives["cispo"] = static_cast<int>(rlhf_fast::kObjectiveCispo);
  objectives["gpg"] = static_cast<int>(rlhf_fast::kObjectiveGpg);
  objectives["sapo"] = static_cast<int>(rlhf_fast::kObjectiveSapo);
  m.attr("POLICY_OBJECTIVE_CODES") = objectives;

  py::dict modes;
  modes["grpo"] = static_cast<int>(rlhf_fast::kGroupGrpo);
  modes["drgrpo"] = static_cast<int>(rlhf_fast::kGroupDrGrpo);
  modes["rloo"] = static_cast<int>(rlhf_fast::kGroupRloo);
  m.attr("GROUP_MODE_CODES") = modes;

  bind_params(m);

  // Each kernel once: its host entry point, and its CUDA one in a build with CUDA.
  py::module_ host = m.def_submodule("host", "Kernels on host memory: <kernel>(params, num_threads).");
#ifdef RLHF_FAST_WITH_CUDA
  py::module_ cuda = m.def_submodule("cuda", "Kernels on the current CUDA device: <kernel>(params, stream), "
                                             "enqueued on stream (a cudaStream_t as an integer).");
#define RLHF_FAST_CUDA_KERNEL(kernel)                                                                \
  cuda.def(#kernel, &on_stream<rlhf_fast::kernel##_cuda>, py::arg("params"), py::arg("stream"),      \
           py::call_guard<py::gil_scoped_release>())
#else
#define RLHF_FAST_CUDA_KERNEL(kernel)
#endif
#define RLHF_FAST_KERNEL(kernel)                                                                     \
  host.def(#kernel, &rlhf_fast::kernel##_host, py::arg("params"), py::arg("num_threads"),            \
           py::call_guard<py::gil_scoped_release>());                                                \
  RLHF_FAST_CUDA_KERNEL(kernel)

  RLHF_FAST_KERNEL(token_logprobs_forward);
  RLHF_FAST_KERNEL(token_logprobs_backward);
  RLHF_FAST_KERNEL(policy_epilogue_forward);
  RLHF_FAST_KERNEL(kl_rewards_forward);
  RLHF_FAST_KERNEL(gae_forward);
  RLHF_FAST_KERNEL(gae_backward);
  RLHF_FAST_KERNEL(whiten_forward);
  RLHF_FAST_KERNEL(ppo_advantages_forward);
  RLHF_FAST_KERNEL(group_advantages_forward);
#undef RLHF_FAST_KERNEL
#undef RLHF_FAST_CUDA_KERNEL
}
