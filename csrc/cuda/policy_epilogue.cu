// policy_epilogue on CUDA: fused_policy_loss's gradient in one kernel, one block per row.
//
// Per row (grid-stride over rows): pass 1 reads the row (16-byte vectors, two in flight per thread,
// the online base-2 state of token_logprobs.h, merged by warp shuffles and then by warp 0, in
// csrc/cuda/token_logprobs.cu's block-row order); thread 0 finishes the row (logp, entropy, lse),
// runs the epilogue of policy_epilogue.h and shares the backward's coefficients through shared
// memory; pass 2 reads the row again and writes the gradient, with log p = (x - m) / T - ln s from
// pass 1's own max and sum (exact at any |lse|: no recompute, unlike the backward kernel, which
// only has the saved lse).
// Bytes: N*V*e read by pass 1, read again by pass 2 and N*V*e written, + ~52 N for the row tensors.
// Pass 2 reads what its block has just read, meant to hit L2, so that memory sees [N, V] read once
// and written once; the three-step path moves 3 N*V*e. On an H200 (2026-12-04, bf16 [16384 x
// 128256]) this kernel took about as long as the forward and backward kernels together: with
// 256-thread blocks, 4 per multiprocessor, ~528 rows of 250 KB are in flight, far more than the
// 50 MB of L2, so pass 2 reads memory again. RLHF_FAST_CUDA_EPILOGUE=l2 launches the other shape,
// one 1024-thread block per multiprocessor (132 rows, 33 MB in flight), so that pass 2 may hit L2;
// which is faster is for a GPU to measure (bench_policy_loss.py times both).
// Exponentials: ex2.approx.ftz.f32 in the passes, as token_logprobs.cu; the epilogue's own are
// accurate expf. No --use_fast_math.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "common.cuh"
#include "rlhf_fast/policy_epilogue.h"

namespace rlhf_fast {
namespace {

constexpr float kInf = __builtin_huge_valf();
// The default shape, as token_logprobs.cu: at least 4 blocks per multiprocessor caps registers at 64.
constexpr int kBlockThreads = 256;
constexpr int kMinBlocksPerSm = 4;
// The L2-resident shape: one block per multiprocessor, the same 64-register cap.
constexpr int kL2BlockThreads = 1024;

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// A row's elements [0, head) before its first 16-byte boundary, then n_vec vectors, then the tail;
// head = V (all scalar) for a pointer that is not even element-aligned.
struct RowSplit {
  int64_t head, n_vec;
};

template <typename T>
__device__ __forceinline__ RowSplit split_row(const void* row, int64_t vocab) {
  constexpr int kVec = 16 / sizeof(T);
  const uintptr_t addr = reinterpret_cast<uintptr_t>(row);
  if (addr % sizeof(T) != 0) return {vocab, 0};
  const int64_t to_boundary = static_cast<int64_t>(((16 - (addr & 15)) & 15) / sizeof(T));
  const int64_t head = to_boundary < vocab ? to_boundary : vocab;
  return {head, (vocab - head) / kVec};
}

template <typename T>
__device__ __forceinline__ void unpack(const uint4& raw, float* out) {
  constexpr int kVec = 16 / sizeof(T);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec; ++i) out[i] = load(e[i]);
}

template <typename T>
__device__ __forceinline__ uint4 pack(const float* in) {
  constexpr int kVec = 16 / sizeof(T);
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec; ++i) e[i] = store<T>(in[i]);
  return raw;
}

// Online state of a set of elements, base 2 (token_logprobs.h): m = max (-inf: none yet, shift 0),
// s = sum 2^d, t = sum 2^d d, d = (x - shift) scale.
struct OnlineLse {
  float m, s, t;
};

__device__ __forceinline__ float shift_of(float m) { return m == -kInf ? 0.0f : m; }

__device__ __forceinline__ void rescale(OnlineLse& st, float m_new, float scale) {
  const float delta = shift_delta(st.m, m_new, scale);
  const float f = ex2(delta);
  st.t = f * (st.t + delta * st.s);
  st.s *= f;
}

template <int kN>
__device__ __forceinline__ void absorb(OnlineLse& st, const float* v, float scale) {
  float vmax = v[0];
#pragma unroll
  for (int i = 1; i < kN; ++i) vmax = fmaxf(vmax, v[i]);
  if (vmax > st.m) {
    if (st.m != -kInf) rescale(st, vmax, scale);
    st.m = vmax;
  }
  const float shift = shift_of(st.m);
#pragma unroll
  for (int i = 0; i < kN; ++i) {
    const float d = exponent2(v[i], shift, scale);
    const float e = ex2(d);
    st.s += e;
    st.t += e * floor_exponent(d);
  }
}

__device__ __forceinline__ OnlineLse merge(const OnlineLse& a, const OnlineLse& b, float scale) {
  const bool b_larger = b.m > a.m;
  OnlineLse hi = b_larger ? b : a;
  OnlineLse lo = b_larger ? a : b;
  if (lo.m != -kInf) {
    rescale(lo, hi.m, scale);
    hi.s += lo.s;
    hi.t += lo.t;
  }
  return hi;
}

__device__ __forceinline__ OnlineLse warp_reduce(OnlineLse st, float scale) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    OnlineLse other;
    other.m = __shfl_xor_sync(0xffffffffu, st.m, offset);
    other.s = __shfl_xor_sync(0xffffffffu, st.s, offset);
    other.t = __shfl_xor_sync(0xffffffffu, st.t, offset);
    st = merge(st, other, scale);
  }
  return st;
}

// Pass 1: the row's state, in warp 0 (thread 0 is what the epilogue reads). The leading sync
// makes the previous row's readers of the shared memory finish before it is written again.
template <typename T, int kThreads>
__device__ __forceinline__ OnlineLse row_state(const T* x, int64_t vocab, float scale, OnlineLse* warp_states) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x;
  const RowSplit split = split_row<T>(x, vocab);
  OnlineLse st{-kInf, 0.0f, 0.0f};
  for (int64_t k = lane; k < split.head; k += kThreads) {
    const float v = load(x[k]);
    absorb<1>(st, &v, scale);
  }
  const uint4* xv = reinterpret_cast<const uint4*>(x + split.head);
  int64_t i = lane;
  for (; i + kThreads < split.n_vec; i += 2 * kThreads) {
    const uint4 a = xv[i];  // cached: pass 2 reads the row again
    const uint4 b = xv[i + kThreads];
    float v[2 * kVec];
    unpack<T>(a, v);
    unpack<T>(b, v + kVec);
    absorb<2 * kVec>(st, v, scale);
  }
  if (i < split.n_vec) {
    float v[kVec];
    unpack<T>(xv[i], v);
    absorb<kVec>(st, v, scale);
  }
  for (int64_t k = split.head + split.n_vec * kVec + lane; k < vocab; k += kThreads) {
    const float v = load(x[k]);
    absorb<1>(st, &v, scale);
  }
  st = warp_reduce(st, scale);
  const int warp = threadIdx.x / 32;
  __syncthreads();
  if (threadIdx.x % 32 == 0) warp_states[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = threadIdx.x < kWarps ? warp_states[threadIdx.x] : OnlineLse{-kInf, 0.0f, 0.0f};
    st = warp_reduce(st, scale);
  }
  return st;
}

template <bool kEntropy>
__device__ __forceinline__ float grad_element(float x, const RowGradCoefficients<float>& k) {
  const float log_p = log_prob(x, k);
  const float prob = ex2(log_p * static_cast<float>(kLog2e));
  return kEntropy ? grad_from_p(prob, log_p, k) : -prob * k.base;  // slope is 0 without entropy
}

__device__ __forceinline__ float row_input(const void* base, int64_t row) {
  return static_cast<const float*>(base)[row];
}

// kEntropy: entropy_coef != 0, the entropy term of pass 2 (the Triton kernel's ENTROPY_GRAD).
// kThreads: kBlockThreads or kL2BlockThreads (see the top of the file).
template <typename T, bool kEntropy, int kThreads>
__global__ void __launch_bounds__(kThreads, kThreads == kBlockThreads ? kMinBlocksPerSm : 1)
    policy_epilogue_kernel(const PolicyEpilogueParams p, const EpilogueOptions<float> o) {
  constexpr int kVec = 16 / sizeof(T);
  __shared__ OnlineLse warp_states[kThreads / 32];
  __shared__ RowGradCoefficients<float> shared_coef;
  const int lane = threadIdx.x;
  const float scale = static_cast<float>(kLog2e / p.temperature);
  const float temperature = static_cast<float>(p.temperature);
  const float inv_temperature = inverse(temperature);
  const int64_t vocab = p.vocab;
  for (int64_t row = blockIdx.x; row < p.n_rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
    T* g = static_cast<T*>(p.grad_logits) + row * p.grad_row_stride;
    const int64_t label = load_label(p.labels, p.labels_dtype, row);
    const RowSplit split = split_row<T>(g, vocab);
    uint4* gv = reinterpret_cast<uint4*>(g + split.head);

    if (label == p.ignore_index) {  // zeros, logits not read; the whole block takes this branch
      if (lane == 0) {
        static_cast<float*>(p.logp)[row] = 0.0f;
        static_cast<float*>(p.entropy)[row] = 0.0f;
        static_cast<float*>(p.lse)[row] = 0.0f;
        static_cast<float*>(p.grad_logp)[row] = 0.0f;
        static_cast<float*>(p.grad_entropy)[row] = 0.0f;
      }
      const T zero = store<T>(0.0f);
      for (int64_t k = lane; k < split.head; k += kThreads) g[k] = zero;
      for (int64_t i = lane; i < split.n_vec; i += kThreads) gv[i] = make_uint4(0u, 0u, 0u, 0u);
      for (int64_t k = split.head + split.n_vec * kVec + lane; k < vocab; k += kThreads) g[k] = zero;
      continue;
    }

    const OnlineLse st = row_state<T, kThreads>(x, vocab, scale, warp_states);
    if (lane == 0) {  // finish the row, the epilogue, the backward's coefficients
      const float d_label = exponent2(load(x[label]), shift_of(st.m), scale);
      const RowOutputs<float> out = finish_row(st.s, st.t, d_label, tempered(st.m, temperature, inv_temperature));
      const float ref_logp = o.kl_estimator != kNoKl ? row_input(p.ref_logp, row) : 0.0f;
      const TokenGrads<float> tg = token_grads(o, out.logp, row_input(p.old_logp, row),
                                               row_input(p.advantages, row), row_input(p.pg_weight, row),
                                               row_input(p.weight, row), ref_logp);
      static_cast<float*>(p.logp)[row] = out.logp;
      static_cast<float*>(p.entropy)[row] = out.entropy;
      static_cast<float*>(p.lse)[row] = out.lse;
      static_cast<float*>(p.grad_logp)[row] = tg.logp;
      static_cast<float*>(p.grad_entropy)[row] = tg.entropy;
      RowGradCoefficients<float> k = row_grad_coefficients<float>(
          p.temperature, out.lse, 0.0, tg.logp, kEntropy ? tg.entropy : 0.0f, kEntropy ? out.entropy : 0.0f);
      use_recomputed_sums(k, st.m, st.s, 0.0);
      shared_coef = k;
    }
    __syncthreads();  // also: every read of pass 1 (and of the label's logit) before any write of pass 2
    const RowGradCoefficients<float> coef = shared_coef;

    // Pass 2, as token_logprobs.cu's backward: vectors need x and g at the same offset from a
    // 16-byte boundary, otherwise the row is scalar; every element is loaded before it is stored.
    const bool vectors = (reinterpret_cast<uintptr_t>(x) & 15) == (reinterpret_cast<uintptr_t>(g) & 15);
    const int64_t head = vectors ? split.head : vocab;
    const int64_t n_vec = vectors ? split.n_vec : 0;
    for (int64_t k = lane; k < head; k += kThreads) {
      g[k] = store<T>(grad_element<kEntropy>(load(x[k]), coef) + (k == label ? coef.label_term : 0.0f));
    }
    const uint4* xv = reinterpret_cast<const uint4*>(x + head);
    auto one_vector = [&](const uint4& raw, int64_t i) {
      float v[kVec];
      unpack<T>(raw, v);
#pragma unroll
      for (int j = 0; j < kVec; ++j) v[j] = grad_element<kEntropy>(v[j], coef);
      const int64_t first = head + i * kVec;
      if (static_cast<uint64_t>(label - first) < static_cast<uint64_t>(kVec)) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) v[j] += first + j == label ? coef.label_term : 0.0f;
      }
      __stcs(gv + i, pack<T>(v));  // streamed: the gradient should not evict rows pass 2 is yet to read
    };
    int64_t i = lane;
    for (; i + kThreads < n_vec; i += 2 * kThreads) {
      const uint4 a = __ldcs(xv + i);  // the row's last read
      const uint4 b = __ldcs(xv + i + kThreads);
      one_vector(a, i);
      one_vector(b, i + kThreads);
    }
    if (i < n_vec) one_vector(__ldcs(xv + i), i);
    for (int64_t k = head + n_vec * kVec + lane; k < vocab; k += kThreads) {
      g[k] = store<T>(grad_element<kEntropy>(load(x[k]), coef) + (k == label ? coef.label_term : 0.0f));
    }
  }
}

// RLHF_FAST_CUDA_EPILOGUE=l2: the L2-resident launch shape. Read at every call, so that a benchmark
// can time both shapes in one process.
bool l2_resident_rows() {
  const char* shape = std::getenv("RLHF_FAST_CUDA_EPILOGUE");
  return shape != nullptr && std::strcmp(shape, "l2") == 0;
}

}  // namespace

void policy_epilogue_forward_cuda(const PolicyEpilogueParams& p, void* stream) {
  RLHF_FAST_FLOAT_SWITCH_NO_F64(p.dtype, "policy_epilogue_forward_cuda logits", T, [&] {
    const EpilogueOptions<float> o = epilogue_options<float>(p);
    RLHF_FAST_BOOL_SWITCH(o.entropy_grad, kEntropy, [&] {
      if (p.n_rows == 0) return;
      const char* what = "policy_epilogue_forward";
      const int64_t sms = cuda_common::multiprocessor_count(what);
      const auto grid_of = [&](int64_t cap) {
        return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(p.n_rows, cap)));
      };
      const auto cuda_stream = static_cast<cudaStream_t>(stream);
      if (l2_resident_rows()) {
        policy_epilogue_kernel<T, kEntropy, kL2BlockThreads><<<grid_of(sms), kL2BlockThreads, 0, cuda_stream>>>(p, o);
      } else {
        policy_epilogue_kernel<T, kEntropy, kBlockThreads><<<grid_of(sms * 64), kBlockThreads, 0, cuda_stream>>>(p, o);
      }
      cuda_common::check(cudaGetLastError(), what);
    });
  });
}

}  // namespace rlhf_fast
