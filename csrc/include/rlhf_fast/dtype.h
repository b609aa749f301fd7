// Element types seen by the kernels: dtype codes, 16-bit float storage, conversions, dtype switch.
//
// The kernels never see a framework tensor: a dtype travels as one of the integer codes below and
// 16-bit values as raw bits. Conversions are written with integer and float arithmetic only (no
// F16C, no libgcc helpers) so that the host compiler vectorises them in the same loop as the math,
// and so that the same functions compile for the device (where the hardware conversions are used).
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define RLHF_FAST_HD __host__ __device__ __forceinline__
#else
#define RLHF_FAST_HD inline __attribute__((always_inline))
#endif

namespace rlhf_fast {

// Dtype codes shared with Python (exported as _C.DTYPE_CODES; the providers map torch dtypes to them).
enum DType : int {
  kFloat32 = 0,
  kBFloat16 = 1,
  kFloat16 = 2,
  kFloat64 = 3,
  kInt32 = 4,
  kInt64 = 5,
};

// Storage of one 16-bit float: the bits, nothing else (same size and alignment as the tensor's element).
struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

RLHF_FAST_HD float float_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

RLHF_FAST_HD uint32_t bits_from_float(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// bfloat16 is the top half of a float32: widening is exact.
RLHF_FAST_HD float bf16_bits_to_float(uint32_t h) { return float_from_bits(h << 16); }

// float -> bfloat16, round to nearest even; NaN stays a (quiet) NaN, overflow rounds to inf.
RLHF_FAST_HD uint16_t float_to_bf16_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  const uint32_t u = bits_from_float(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const bool is_nan = (u & 0x7fffffffu) > 0x7f800000u;
  return static_cast<uint16_t>(is_nan ? ((u >> 16) | 0x40u) : rounded);
#endif
}

// float16 -> float, exact for every input (normals, subnormals, inf, NaN).
//   normal:    shift the 15 magnitude bits into place and rebias the exponent 15 -> 127 (+112 << 23);
//              exponent 31 (inf/NaN) must land on 255, so it gets +224 << 23 instead.
//   subnormal: m * 2^-24 = float(0.5 + m * 2^-24) - 0.5, where the first float is 0.5's bits | m.
RLHF_FAST_HD float f16_bits_to_float(uint32_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(static_cast<unsigned short>(h)));
#else
  const uint32_t a = h & 0x7fffu;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t normal = (a << 13) + (a >= 0x7c00u ? 0x70000000u : 0x38000000u);
  const uint32_t subnormal = bits_from_float(float_from_bits(0x3f000000u | a) - 0.5f);
  return float_from_bits(sign | (a < 0x0400u ? subnormal : normal));
#endif
}

// float -> float16, round to nearest even (normals, subnormals, overflow to inf, NaN).
//   normal:    rebias the exponent 127 -> 15 (-112 << 23, written mod 2^32) and round away 13 bits.
//   subnormal: |f| < 2^-14; adding 0.5 (whose ulp is 2^-24, the float16 subnormal step) makes the
//              float unit round |f| / 2^-24 to nearest even, and the low bits are the result.
//   |f| >= 65520 rounds to inf (65520 is the tie between 65504 and 2^16).
RLHF_FAST_HD uint16_t float_to_f16_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  const uint32_t u = bits_from_float(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  const uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;
  const uint32_t subnormal = bits_from_float(float_from_bits(a) + 0.5f) - 0x3f000000u;
  uint32_t r = a < 0x38800000u ? subnormal : normal;
  r = a >= 0x477ff000u ? 0x7c00u : r;
  r = a > 0x7f800000u ? 0x7e00u : r;
  return static_cast<uint16_t>(sign | r);
#endif
}

// Accumulation type: float32 for every element type but float64.
template <typename T>
struct acc_type {
  using type = float;
};
template <>
struct acc_type<double> {
  using type = double;
};
template <typename T>
using acc_t = typename acc_type<T>::type;

// load: element -> accumulation type; store<T>: accumulation type -> element (round to nearest even).
RLHF_FAST_HD float load(float x) { return x; }
RLHF_FAST_HD double load(double x) { return x; }
RLHF_FAST_HD float load(bf16_t x) { return bf16_bits_to_float(x.bits); }
RLHF_FAST_HD float load(f16_t x) { return f16_bits_to_float(x.bits); }

template <typename T>
RLHF_FAST_HD T store(acc_t<T> x);
template <>
RLHF_FAST_HD float store<float>(float x) { return x; }
template <>
RLHF_FAST_HD double store<double>(double x) { return x; }
template <>
RLHF_FAST_HD bf16_t store<bf16_t>(float x) { return bf16_t{float_to_bf16_bits(x)}; }
template <>
RLHF_FAST_HD f16_t store<f16_t>(float x) { return f16_t{float_to_f16_bits(x)}; }

inline const char* dtype_name(int code) {
  switch (code) {
    case kFloat32: return "float32";
    case kBFloat16: return "bfloat16";
    case kFloat16: return "float16";
    case kFloat64: return "float64";
    case kInt32: return "int32";
    case kInt64: return "int64";
    default: return "unknown";
  }
}

[[noreturn]] inline void unsupported_dtype(const char* what, int code) {
  throw std::invalid_argument(std::string(what) + ": unsupported dtype code " + std::to_string(code) + " (" +
                              dtype_name(code) + ")");
}

}  // namespace rlhf_fast

// Runtime dtype code -> compile-time element type, at the one boundary between the bindings and the
// kernels (habit 4). Usage: RLHF_FAST_FLOAT_SWITCH(code, "logits", T, [&] { run<T>(); });
#define RLHF_FAST_DTYPE_CASE(CODE, TYPE, T, ...) \
  case ::rlhf_fast::CODE: {                      \
    using T = TYPE;                              \
    __VA_ARGS__();                               \
  } break;

// float32, bfloat16 and float16: what the CUDA kernels serve.
#define RLHF_FAST_HALF_AND_FLOAT_CASES(T, ...)                        \
  RLHF_FAST_DTYPE_CASE(kFloat32, float, T, __VA_ARGS__)               \
  RLHF_FAST_DTYPE_CASE(kBFloat16, ::rlhf_fast::bf16_t, T, __VA_ARGS__) \
  RLHF_FAST_DTYPE_CASE(kFloat16, ::rlhf_fast::f16_t, T, __VA_ARGS__)

#define RLHF_FAST_FLOAT_SWITCH(CODE, WHAT, T, ...)          \
  switch (CODE) {                                           \
    RLHF_FAST_HALF_AND_FLOAT_CASES(T, __VA_ARGS__)          \
    RLHF_FAST_DTYPE_CASE(kFloat64, double, T, __VA_ARGS__)  \
    default: ::rlhf_fast::unsupported_dtype(WHAT, CODE);    \
  }

// The same without float64 (the CUDA kernels serve float32, bfloat16 and float16 only).
#define RLHF_FAST_FLOAT_SWITCH_NO_F64(CODE, WHAT, T, ...) \
  switch (CODE) {                                         \
    RLHF_FAST_HALF_AND_FLOAT_CASES(T, __VA_ARGS__)        \
    default: ::rlhf_fast::unsupported_dtype(WHAT, CODE);  \
  }

#define RLHF_FAST_BOOL_SWITCH(COND, NAME, ...) \
  if (COND) {                                  \
    constexpr bool NAME = true;                \
    __VA_ARGS__();                             \
  } else {                                     \
    constexpr bool NAME = false;               \
    __VA_ARGS__();                             \
  }
