// Store element types and their conversion to fp32, scalar and 8 or 16 lanes at a time.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__GNUC__)
#define HA_INLINE inline __attribute__((always_inline))
#define HA_HAS_VECTORS 1  // GCC/clang vector extensions: explicit SIMD the compiler lowers for each target
#else
#define HA_INLINE inline
#define HA_HAS_VECTORS 0
#endif

// Hot loops compiled for several x86-64 levels, the best the CPU runs picked at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(HYBRIDATTN_NO_MULTIVERSION)
#define HA_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HA_MULTIVERSION
#endif

namespace hybridattn {

enum class StoreType { f32, f16, bf16 };

HA_INLINE float bf16_to_float(uint16_t x) {
  uint32_t bits = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Nearest even, as a bf16 product rounds its fp32 sums; a NaN stays a (quiet) NaN.
HA_INLINE uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t(bits >> 16);
}

// Exact for normal, subnormal, infinite and NaN halves, and branch-free so it vectorises: the
// exponent is rebased by an integer add (an all-ones one for infinities/NaNs), and a subnormal
// half m * 2^-24 is built as (1 + m / 1024) * 2^-14 - 2^-14 from normal floats only, so that a
// thread that flushes denormals (torch.set_flush_denormal) reads it as every other thread does.
constexpr uint32_t kF16Exponent = 0x7c00u << 13, kF16Rebase = 112u << 23;

HA_INLINE float f16_to_float(uint16_t h) {
  const uint32_t magnitude = uint32_t(h & 0x7fffu) << 13, exponent = magnitude & kF16Exponent;
  const uint32_t normal = magnitude + kF16Rebase + (exponent == kF16Exponent ? kF16Rebase : 0u);
  uint32_t subnormal = magnitude + kF16Rebase + (1u << 23);
  float f;
  std::memcpy(&f, &subnormal, 4);
  f -= 0x1p-14f;
  std::memcpy(&subnormal, &f, 4);
  const uint32_t bits = (exponent == 0 ? subnormal : normal) | uint32_t(h & 0x8000u) << 16;
  std::memcpy(&f, &bits, 4);
  return f;
}

// One row of `dim` store elements starting at element `offset`, as fp32.
template <StoreType T>
HA_INLINE void load_row(const void* base, int64_t offset, int64_t dim, float* dst) {
  if constexpr (T == StoreType::f32) {
    std::memcpy(dst, static_cast<const float*>(base) + offset, size_t(dim) * 4);
  } else {
    const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
    for (int64_t d = 0; d < dim; ++d)
      dst[d] = (T == StoreType::bf16) ? bf16_to_float(src[d]) : f16_to_float(src[d]);
  }
}

#if HA_HAS_VECTORS
typedef float vf16 __attribute__((vector_size(64)));
typedef uint32_t vu16 __attribute__((vector_size(64)));  // 16 x uint32
typedef uint16_t vh16 __attribute__((vector_size(32)));  // 16 x uint16

HA_INLINE vf16 load16(const float* p) {
  vf16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
HA_INLINE void store16(float* p, vf16 v) { std::memcpy(p, &v, sizeof v); }

// 8 lanes, one AVX register: where a loop keeps many accumulators, 16-lane ones spill on AVX2.
typedef float vf8 __attribute__((vector_size(32)));
typedef uint32_t vu8 __attribute__((vector_size(32)));  // 8 x uint32
typedef uint16_t vh8 __attribute__((vector_size(16)));  // 8 x uint16

HA_INLINE vf8 load8(const float* p) {
  vf8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
HA_INLINE void store8(float* p, vf8 v) { std::memcpy(p, &v, sizeof v); }

// As many store elements at p as VF has lanes, as fp32 lanes; VU and VH are vectors of as many
// uint32 and uint16 (the conversions of bf16_to_float and f16_to_float, lane by lane).
template <StoreType T, typename VF, typename VU, typename VH>
HA_INLINE VF lanes_as_float(const void* p) {
  VF v;
  if constexpr (T == StoreType::f32) {
    std::memcpy(&v, p, sizeof v);
  } else {
    VH h;
    std::memcpy(&h, p, sizeof h);
    VU w = __builtin_convertvector(h, VU);
    if constexpr (T == StoreType::bf16) {
      v = (VF)(w << 16);
    } else {
      const VU magnitude = (w & 0x7fffu) << 13, exponent = magnitude & kF16Exponent;
      const VU normal = magnitude + kF16Rebase + ((VU)(exponent == kF16Exponent) & kF16Rebase);
      const VU subnormal = (VU)((VF)(magnitude + kF16Rebase + (1u << 23)) - 0x1p-14f);
      const VU is_subnormal = (VU)(exponent == 0u);
      v = (VF)((is_subnormal & subnormal) | (~is_subnormal & normal) | ((w & 0x8000u) << 16));
    }
  }
  return v;
}

template <StoreType T>
HA_INLINE vf16 load16_as_float(const void* p) {
  return lanes_as_float<T, vf16, vu16, vh16>(p);
}
template <StoreType T>
HA_INLINE vf8 load8_as_float(const void* p) {
  return lanes_as_float<T, vf8, vu8, vh8>(p);
}
#endif

}  // namespace hybridattn
