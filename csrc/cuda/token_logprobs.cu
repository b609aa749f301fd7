// token_logprobs on CUDA: per-row log-probability of the label, entropy, lse, and the backward.
//
// Bytes (the floor; the kernels are built to stream at memory bandwidth):
//   forward   reads [N, V] once + labels; writes 3 N floats.  bf16 [16384, 128256]: 4.2 GB.
//   backward  reads [N, V] once, writes [N, V] once (in place when grad_logits is logits): 8.4 GB.
// Each row is owned by a group of threads (a warp when V is small, a block otherwise); each thread
// reads 16-byte vectors (8 bf16/f16 or 4 f32), two in flight, keeps an online (max, sum) state in
// base-2 units (see token_logprobs.h), and the group merges states with warp shuffles. A row
// whose start is not 16-byte aligned is read scalar up to the first boundary. Rows are handed
// out by a grid-stride loop, so any N fits the 1-D grid.
// Measured on an H100 (bf16 [16384, 128256]): forward 1.43 ms, 98% of a device copy's bandwidth
// (bytes read + written); backward 3.03 ms, 92%; PyTorch's log_softmax + gather: 17.5 ms.
//
// The exponential is ex2.approx.ftz.f32 (relative error about 2^-22, exactly 1 at 0; results below
// 2^-126 flushed to 0, below anything a float32 sum or a bf16 gradient can hold next to the row's
// max); everything else is IEEE float32 with a double-precision per-row finish. No --use_fast_math.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "rlhf_fast/token_logprobs.h"

namespace rlhf_fast {
namespace {

constexpr float kInf = __builtin_huge_valf();
constexpr int kBlockThreads = 256;
// At least 4 blocks (1024 threads, 32 KB of loads in flight) per multiprocessor: caps registers at
// 64. Without a minimum, ptxas aims at more blocks and spills the entropy variants at 48 registers.
constexpr int kMinBlocksPerSm = 4;
// Rows of at most this many elements get one warp each (8 rows per block); longer rows a block.
constexpr int64_t kWarpRowMaxVocab = 4096;

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// One thread's share of a row: elements [0, head) before the first 16-byte boundary, n_vec
// vectors of kVec elements, then the tail. head = V (all scalar) for a pointer that is not even
// element-aligned, which torch never produces but costs nothing to survive.
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

// Online log-sum-exp state of a set of elements, base 2 (see token_logprobs.h): m = max x (-inf:
// none yet, when the shift is 0 instead so that -inf elements give 2^-inf = 0 rather than NaN),
// s = sum 2^d, t = sum 2^d d (entropy only), d = (x - m) scale.
struct OnlineLse {
  float m, s, t;
};

__device__ __forceinline__ float shift_of(float m) { return m == -kInf ? 0.0f : m; }

// Moves (s, t) from shift m to a larger m_new (m finite).
template <bool kEntropy>
__device__ __forceinline__ void rescale(OnlineLse& st, float m_new, float scale) {
  const float delta = shift_delta(st.m, m_new, scale);
  const float f = ex2(delta);
  if (kEntropy) st.t = f * (st.t + delta * st.s);
  st.s *= f;
}

template <bool kEntropy, int kN>
__device__ __forceinline__ void absorb(OnlineLse& st, const float* v, float scale) {
  float vmax = v[0];
#pragma unroll
  for (int i = 1; i < kN; ++i) vmax = fmaxf(vmax, v[i]);
  if (vmax > st.m) {
    if (st.m != -kInf) rescale<kEntropy>(st, vmax, scale);
    st.m = vmax;
  }
  const float shift = shift_of(st.m);
#pragma unroll
  for (int i = 0; i < kN; ++i) {
    const float d = exponent2(v[i], shift, scale);
    const float e = ex2(d);
    st.s += e;
    if (kEntropy) st.t += e * floor_exponent(d);
  }
}

// The state with the smaller max moves to the larger one (nothing to move when it saw only -inf).
template <bool kEntropy>
__device__ __forceinline__ OnlineLse merge(const OnlineLse& a, const OnlineLse& b, float scale) {
  const bool b_larger = b.m > a.m;
  OnlineLse hi = b_larger ? b : a;
  OnlineLse lo = b_larger ? a : b;
  if (lo.m != -kInf) {
    rescale<kEntropy>(lo, hi.m, scale);
    hi.s += lo.s;
    if (kEntropy) hi.t += lo.t;
  }
  return hi;
}

// Merges the states of kGroup consecutive lanes (kGroup <= 32, a power of two).
template <bool kEntropy, int kGroup>
__device__ __forceinline__ OnlineLse group_reduce(OnlineLse st, float scale) {
#pragma unroll
  for (int offset = kGroup / 2; offset > 0; offset /= 2) {
    OnlineLse other;
    other.m = __shfl_xor_sync(0xffffffffu, st.m, offset);
    other.s = __shfl_xor_sync(0xffffffffu, st.s, offset);
    other.t = kEntropy ? __shfl_xor_sync(0xffffffffu, st.t, offset) : 0.0f;
    st = merge<kEntropy>(st, other, scale);
  }
  return st;
}

// A 16-byte vector of the row: streamed (evict first: the forward reads each element once), or
// kept in cache for the backward's gradient pass, which reads the row again right after.
template <bool kStream>
__device__ __forceinline__ uint4 load_vector(const uint4* v) {
  if constexpr (kStream) {
    return __ldcs(v);
  } else {
    return *v;
  }
}

// The online state of row x[0, vocab), read by its kThreadsPerRow threads (thread `lane` reads
// vectors lane, lane + kThreadsPerRow...) and merged: every lane of a warp row holds the row's
// state; in a block row (kThreadsPerRow = kBlockThreads) only warp 0 does, through warp_states
// (kBlockThreads / 32 entries of shared memory, which warp 0 may write again once this returns:
// its lanes read them before their last shuffle; the other warps read none after the last sync).
template <typename T, bool kEntropy, int kThreadsPerRow, bool kStream>
__device__ __forceinline__ OnlineLse row_state(const T* x, int64_t vocab, int lane, float scale,
                                               OnlineLse* warp_states) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kWarps = kBlockThreads / 32;
  const RowSplit split = split_row<T>(x, vocab);

  OnlineLse st{-kInf, 0.0f, 0.0f};
  for (int64_t k = lane; k < split.head; k += kThreadsPerRow) {
    const float v = load(x[k]);
    absorb<kEntropy, 1>(st, &v, scale);
  }
  const uint4* xv = reinterpret_cast<const uint4*>(x + split.head);
  int64_t i = lane;
  for (; i + kThreadsPerRow < split.n_vec; i += 2 * kThreadsPerRow) {
    const uint4 a = load_vector<kStream>(xv + i);
    const uint4 b = load_vector<kStream>(xv + i + kThreadsPerRow);
    float v[2 * kVec];
    unpack<T>(a, v);
    unpack<T>(b, v + kVec);
    absorb<kEntropy, 2 * kVec>(st, v, scale);
  }
  if (i < split.n_vec) {
    float v[kVec];
    unpack<T>(load_vector<kStream>(xv + i), v);
    absorb<kEntropy, kVec>(st, v, scale);
  }
  for (int64_t k = split.head + split.n_vec * kVec + lane; k < vocab; k += kThreadsPerRow) {
    const float v = load(x[k]);
    absorb<kEntropy, 1>(st, &v, scale);
  }

  if constexpr (kThreadsPerRow <= 32) {
    st = group_reduce<kEntropy, kThreadsPerRow>(st, scale);
  } else {
    st = group_reduce<kEntropy, 32>(st, scale);
    const int warp = threadIdx.x / 32;
    __syncthreads();  // the previous row's readers are done with warp_states
    if (threadIdx.x % 32 == 0) warp_states[warp] = st;
    __syncthreads();
    if (warp == 0) {
      st = threadIdx.x < kWarps ? warp_states[threadIdx.x] : OnlineLse{-kInf, 0.0f, 0.0f};
      st = group_reduce<kEntropy, 32>(st, scale);
    }
  }
  return st;
}

// Forward. kThreadsPerRow = 32 (a warp per row, kBlockThreads / 32 rows per block) or
// kBlockThreads (a block per row).
template <typename T, bool kEntropy, int kThreadsPerRow>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm)
    token_logprobs_forward_kernel(const TokenLogprobsForwardParams p) {
  constexpr int kRowsPerBlock = kBlockThreads / kThreadsPerRow;
  __shared__ OnlineLse warp_states[kBlockThreads / 32];

  const int lane = threadIdx.x % kThreadsPerRow;
  const float scale = static_cast<float>(kLog2e / p.temperature);
  const float temperature = static_cast<float>(p.temperature);
  const float inv_temperature = inverse(temperature);
  const int64_t vocab = p.vocab;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreadsPerRow;
       row < p.n_rows; row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const int64_t label = load_label(p.labels, p.labels_dtype, row);
    if (label == p.ignore_index) {  // the whole row group takes this branch together
      if (lane == 0) {
        static_cast<float*>(p.logp)[row] = 0.0f;
        static_cast<float*>(p.lse)[row] = 0.0f;
        if (kEntropy) static_cast<float*>(p.entropy)[row] = 0.0f;
      }
      continue;
    }
    const T* x = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
    const OnlineLse st = row_state<T, kEntropy, kThreadsPerRow, true>(x, vocab, lane, scale, warp_states);
    if (lane == 0) {
      const int64_t column = shard_column(label, p.vocab_offset, vocab);
      const float d_label = column >= 0 ? exponent2(load(x[column]), shift_of(st.m), scale) : 0.0f;
      const RowOutputs<float> out = finish_row(st.s, st.t, d_label, tempered(st.m, temperature, inv_temperature));
      static_cast<float*>(p.logp)[row] = column >= 0 ? out.logp : 0.0f;
      static_cast<float*>(p.lse)[row] = out.lse;
      if (kEntropy) static_cast<float*>(p.entropy)[row] = out.entropy;
    }
  }
}

template <bool kEntropy>
__device__ __forceinline__ float grad_element(float x, const RowGradCoefficients<float>& k) {
  const float log_p = log_prob(x, k);
  const float prob = ex2(log_p * static_cast<float>(kLog2e));
  return kEntropy ? grad_from_p(prob, log_p, k) : -prob * k.base;  // slope is 0 without entropy
}

// Backward: one read and one write per element, thread mapping as in the forward, and one more read
// of a row whose saved lse is too coarse (recomputes_lse: the row's max and sum first, with the
// forward's row_state; the whole row group takes that branch together). grad_logits may be
// logits: every element is loaded before the same thread stores it, and a thread's two vectors
// in flight are loaded before either is stored.
template <typename T, bool kEntropy, int kThreadsPerRow>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSm)
    token_logprobs_backward_kernel(const TokenLogprobsBackwardParams p) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kRowsPerBlock = kBlockThreads / kThreadsPerRow;
  __shared__ OnlineLse warp_states[kBlockThreads / 32];
  const int lane = threadIdx.x % kThreadsPerRow;
  const float scale = static_cast<float>(kLog2e / p.temperature);
  const int64_t vocab = p.vocab;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreadsPerRow;
       row < p.n_rows; row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const T* x = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
    T* g = static_cast<T*>(p.grad_logits) + row * p.grad_row_stride;
    const int64_t whole_label = load_label(p.labels, p.labels_dtype, row);
    const RowSplit split = split_row<T>(g, vocab);
    uint4* gv = reinterpret_cast<uint4*>(g + split.head);

    if (whole_label == p.ignore_index) {  // zeros, logits not read
      const T zero = store<T>(0.0f);
      for (int64_t k = lane; k < split.head; k += kThreadsPerRow) g[k] = zero;
      for (int64_t i = lane; i < split.n_vec; i += kThreadsPerRow) gv[i] = make_uint4(0u, 0u, 0u, 0u);
      for (int64_t k = split.head + split.n_vec * kVec + lane; k < vocab; k += kThreadsPerRow) g[k] = zero;
      continue;
    }
    const float g_entropy = kEntropy ? static_cast<const float*>(p.grad_entropy)[row] : 0.0f;
    const float entropy = kEntropy ? static_cast<const float*>(p.entropy)[row] : 0.0f;
    const float lse = static_cast<const float*>(p.lse)[row];
    const double log_mass = p.log_mass != nullptr ? static_cast<const float*>(p.log_mass)[row] : 0.0;
    RowGradCoefficients<float> coef = row_grad_coefficients<float>(
        p.temperature, lse, log_mass, static_cast<const float*>(p.grad_logp)[row], g_entropy, entropy);
    if (recomputes_lse(lse)) {
      OnlineLse st = row_state<T, false, kThreadsPerRow, false>(x, vocab, lane, scale, warp_states);
      if constexpr (kThreadsPerRow > 32) {  // warp 0 holds the row's state: hand it to every thread
        if (threadIdx.x == 0) warp_states[0] = st;
        __syncthreads();
        st = warp_states[0];  // the next row_state syncs before anyone writes warp_states again
      }
      use_recomputed_sums(coef, st.m, st.s, log_mass);
    }
    // The label's column in this shard, -1 (matching no column) when another shard owns it.
    const int64_t label = shard_column(whole_label, p.vocab_offset, vocab);

    // Vectors need x and g at the same offset from a 16-byte boundary; otherwise the row is scalar.
    const bool vectors = (reinterpret_cast<uintptr_t>(x) & 15) == (reinterpret_cast<uintptr_t>(g) & 15);
    const int64_t head = vectors ? split.head : vocab;
    const int64_t n_vec = vectors ? split.n_vec : 0;
    for (int64_t k = lane; k < head; k += kThreadsPerRow) {
      g[k] = store<T>(grad_element<kEntropy>(load(x[k]), coef) + (k == label ? coef.label_term : 0.0f));
    }
    const uint4* xv = reinterpret_cast<const uint4*>(x + head);
    // Element index of vector i's first element is head + i * kVec; the label gets label_term.
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
      gv[i] = pack<T>(v);
    };
    int64_t i = lane;
    for (; i + kThreadsPerRow < n_vec; i += 2 * kThreadsPerRow) {
      const uint4 a = __ldcs(xv + i);
      const uint4 b = __ldcs(xv + i + kThreadsPerRow);
      one_vector(a, i);
      one_vector(b, i + kThreadsPerRow);
    }
    if (i < n_vec) one_vector(__ldcs(xv + i), i);
    for (int64_t k = head + n_vec * kVec + lane; k < vocab; k += kThreadsPerRow) {
      g[k] = store<T>(grad_element<kEntropy>(load(x[k]), coef) + (k == label ? coef.label_term : 0.0f));
    }
  }
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("rlhf_fast CUDA ") + what + ": " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

// 1-D grid over row groups, capped at 64 blocks per multiprocessor (the kernels loop over the rest).
template <typename Params>
void launch(void (*kernel)(const Params), const Params& p, int rows_per_block, void* stream, const char* what) {
  if (p.n_rows == 0) return;
  int device = 0, sms = 0;
  check(cudaGetDevice(&device), what);
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), what);
  const int64_t wanted = (p.n_rows + rows_per_block - 1) / rows_per_block;
  const unsigned grid = static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(wanted, int64_t(sms) * 64)));
  kernel<<<grid, kBlockThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  check(cudaGetLastError(), what);
}

}  // namespace

void token_logprobs_forward_cuda(const TokenLogprobsForwardParams& p, void* stream) {
  RLHF_FAST_FLOAT_SWITCH_NO_F64(p.dtype, "token_logprobs_forward_cuda logits", T, [&] {
    RLHF_FAST_BOOL_SWITCH(p.entropy != nullptr, kEntropy, [&] {
      if (p.vocab <= kWarpRowMaxVocab) {
        launch(token_logprobs_forward_kernel<T, kEntropy, 32>, p, kBlockThreads / 32, stream,
               "token_logprobs_forward");
      } else {
        launch(token_logprobs_forward_kernel<T, kEntropy, kBlockThreads>, p, 1, stream, "token_logprobs_forward");
      }
    });
  });
}

void token_logprobs_backward_cuda(const TokenLogprobsBackwardParams& p, void* stream) {
  RLHF_FAST_FLOAT_SWITCH_NO_F64(p.dtype, "token_logprobs_backward_cuda logits", T, [&] {
    RLHF_FAST_BOOL_SWITCH(p.grad_entropy != nullptr, kEntropy, [&] {
      if (p.vocab <= kWarpRowMaxVocab) {
        launch(token_logprobs_backward_kernel<T, kEntropy, 32>, p, kBlockThreads / 32, stream,
               "token_logprobs_backward");
      } else {
        launch(token_logprobs_backward_kernel<T, kEntropy, kBlockThreads>, p, 1, stream, "token_logprobs_backward");
      }
    });
  });
}

}  // namespace rlhf_fast
