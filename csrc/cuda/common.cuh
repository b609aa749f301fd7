// Helpers of the per-row [B, T] CUDA kernels (kl_rewards, gae, whiten, group_advantages): error
// checks, warp and block reductions, the search for a row's last valid token. CUDA only.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "rlhf_fast/whiten.h"

namespace rlhf_fast {
namespace cuda_common {

constexpr unsigned kFullMask = 0xffffffffu;

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("rlhf_fast CUDA ") + what + ": " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

inline int multiprocessor_count(const char* what) {
  int device = 0, sms = 0;
  check(cudaGetDevice(&device), what);
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), what);
  return sms;
}

// A 1-D grid of one block per row.
inline unsigned row_grid(int64_t rows, const char* what) {
  if (rows > 0x7fffffff) {
    throw std::invalid_argument(std::string("rlhf_fast CUDA ") + what + ": " + std::to_string(rows) +
                                " rows exceed the grid's 2^31 - 1 blocks");
  }
  return static_cast<unsigned>(rows);
}

__device__ __forceinline__ float shfl_xor(float v, int m) { return __shfl_xor_sync(kFullMask, v, m); }
__device__ __forceinline__ double shfl_xor(double v, int m) { return __shfl_xor_sync(kFullMask, v, m); }
__device__ __forceinline__ long long shfl_xor(long long v, int m) { return __shfl_xor_sync(kFullMask, v, m); }
__device__ __forceinline__ Moments<float> shfl_xor(const Moments<float>& v, int m) {
  return Moments<float>{shfl_xor(v.n, m), shfl_xor(v.mean, m), shfl_xor(v.m2, m)};
}

struct Sum {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};
struct Max {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a > b ? a : b;
  }
};
struct MergeMoments {
  __device__ __forceinline__ Moments<float> operator()(const Moments<float>& a, const Moments<float>& b) const {
    return moments_merge(a, b);
  }
};

// Butterfly over the 32 lanes of a full warp; every lane gets the total.
template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v = op(v, shfl_xor(v, m));
  return v;
}

// Every thread of the block gets op over all threads' values, combined in the same order in every
// thread. scratch: kThreads / 32 entries of shared memory, free again on return.
template <int kThreads, typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T* scratch) {
  constexpr int kWarps = kThreads / 32;
  v = warp_reduce(v, op);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  T total = scratch[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) total = op(total, scratch[w]);
  __syncthreads();
  return total;
}

// The row's last valid token (-1 when it has none), searched by the whole block from the right in
// steps of kThreads * kItems mask bytes; typically one step (right-padded rows with long padding
// take more). Every thread must call it.
template <int kThreads, int kItems>
__device__ int64_t last_valid_token(const uint8_t* mask, int64_t tokens, long long* scratch) {
  constexpr int64_t kStep = int64_t(kThreads) * kItems;
  for (int64_t end = tokens; end > 0; end -= kStep) {
    long long found = -1;
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t t = end - 1 - (int64_t(j) * kThreads + threadIdx.x);
      if (t >= 0 && mask[t] != 0 && t > found) found = t;
    }
    if (__syncthreads_or(found >= 0)) return block_reduce<kThreads>(found, Max{}, scratch);
  }
  return -1;
}

}  // namespace cuda_common
}  // namespace rlhf_fast
