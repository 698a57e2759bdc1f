// Storage types and their conversions to the math type.
//
// The core is torch-free, so bf16/fp16 are plain 16-bit wrappers here; the torch glue
// reinterprets at::BFloat16 / at::Half storage as these. Host conversions are bit-exact
// round-to-nearest-even (they must agree with torch's own casts, which the tests check);
// device code uses the hardware conversions.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define SAMA_HD __host__ __device__ __forceinline__
#else
#define SAMA_HD inline __attribute__((always_inline))
#endif

namespace sama {

struct bf16 { uint16_t bits; };
struct fp16 { uint16_t bits; };

enum class DType : int { f32 = 0, f64 = 1, bf16 = 2, f16 = 3 };

// fp32 math for every 16/32-bit storage type; fp64 storage keeps fp64 math.
template <typename T> struct MathOf { using type = float; };
template <> struct MathOf<double> { using type = double; };
template <typename T> using math_t = typename MathOf<T>::type;

SAMA_HD float bits_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

SAMA_HD uint32_t float_as_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// bf16 is the top half of a float.
SAMA_HD float bf16_to_float(uint16_t h) { return bits_as_float(uint32_t(h) << 16); }

// Branch-free (a select, not an early return), so that loops using it vectorise.
SAMA_HD uint16_t float_to_bf16(float f) {
  const uint32_t u = float_as_bits(f);
  const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // round half to even
  const uint32_t nan = 0u - uint32_t((u & 0x7fffffffu) > 0x7f800000u);  // all ones for NaN
  return uint16_t((r & ~nan) | (0x7fc0u & nan));  // NaN: canonical, as torch
}

SAMA_HD float fp16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24 is exact in fp32
    const float mag = float(mant) * 5.9604644775390625e-8f;
    return bits_as_float(float_as_bits(mag) | sign);
  }
  if (exp == 31) return bits_as_float(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  return bits_as_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

// All three cases computed, one selected (branch-free, so that loops using it vectorise).
SAMA_HD uint16_t float_to_fp16(float f) {
  uint32_t u = float_as_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  // |f| >= 65536, inf or NaN
  const uint32_t big = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  // below the smallest normal half: let fp32 addition round for us (aligns the half subnormal
  // LSB with fp32's)
  const uint32_t sub = float_as_bits(bits_as_float(u) + 0.5f) - 0x3f000000u;
  // normal: rebias the exponent, then round half to even on the 13 dropped bits. A carry out
  // of the mantissa correctly bumps the exponent (and overflows 65520.. to inf).
  const uint32_t normal = (u + 0xc8000fffu + ((u >> 13) & 1u)) >> 13;
  return uint16_t(sign | (u >= 0x47800000u ? big : u < 0x38800000u ? sub : normal));
}

// Load as math type / store from math type. Device code uses the hardware conversions.
SAMA_HD float to_math(float x) { return x; }
SAMA_HD double to_math(double x) { return x; }
SAMA_HD float to_math(bf16 x) {
#if defined(__CUDA_ARCH__)
  return __bfloat162float(__ushort_as_bfloat16(x.bits));
#else
  return bf16_to_float(x.bits);
#endif
}
SAMA_HD float to_math(fp16 x) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(x.bits));
#else
  return fp16_to_float(x.bits);
#endif
}

template <typename T> struct Store;
template <> struct Store<float> {
  template <typename A> SAMA_HD static float from(A x) { return float(x); }
};
template <> struct Store<double> {
  template <typename A> SAMA_HD static double from(A x) { return double(x); }
};
template <> struct Store<bf16> {
  template <typename A> SAMA_HD static bf16 from(A x) {
#if defined(__CUDA_ARCH__)
    return bf16{__bfloat16_as_ushort(__float2bfloat16_rn(float(x)))};
#else
    return bf16{float_to_bf16(float(x))};
#endif
  }
};
template <> struct Store<fp16> {
  template <typename A> SAMA_HD static fp16 from(A x) {
#if defined(__CUDA_ARCH__)
    return fp16{__half_as_ushort(__float2half_rn(float(x)))};
#else
    return fp16{float_to_fp16(float(x))};
#endif
  }
};

template <typename T, typename A> SAMA_HD T from_math(A x) { return Store<T>::from(x); }

inline int dtype_size(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::f64: return 8;
    default: return 2;
  }
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "float32";
    case DType::f64: return "float64";
    case DType::bf16: return "bfloat16";
    default: return "float16";
  }
}

}  // namespace sama
