// Vector helpers of the vectorised gather-attend: the sums of 16 (or 8) vectors
// at once, and exp. Written with GCC/clang vector extensions, so each target the
// kernel is compiled for (SSE2, AVX2, AVX-512, NEON) gets its own instructions.
#pragma once

#include "hybridattn/convert.h"

#if HA_HAS_VECTORS

namespace hybridattn {

// Bit reversal of a 4-bit lane index: reduce16's lanes come out in this order.
constexpr int bitrev4(int i) { return ((i & 1) << 3) | ((i & 2) << 1) | ((i & 4) >> 1) | ((i & 8) >> 3); }

// Given v[bitrev4(j)] = the partial sums of row j, returns lane j = the total of row j.
// Four halving steps, each adding the two halves of every row's remaining
// partials and packing two vectors into one: 15 shuffle pairs instead of
// 16 separate horizontal reductions.
HA_INLINE vf16 reduce16(const vf16* v) {
  vf16 w[8], u[4], t[2];
  for (int p = 0; p < 8; ++p)
    w[p] = __builtin_shufflevector(v[2 * p], v[2 * p + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(v[2 * p], v[2 * p + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int p = 0; p < 4; ++p)
    u[p] = __builtin_shufflevector(w[2 * p], w[2 * p + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(w[2 * p], w[2 * p + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int p = 0; p < 2; ++p)
    t[p] = __builtin_shufflevector(u[2 * p], u[2 * p + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(u[2 * p], u[2 * p + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  return __builtin_shufflevector(t[0], t[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
         __builtin_shufflevector(t[0], t[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}

// Bit reversal of a 3-bit lane index: reduce8's lanes come out in this order.
constexpr int bitrev3(int i) { return ((i & 1) << 2) | (i & 2) | ((i & 4) >> 2); }

// reduce16 on 8 lanes: given v[bitrev3(j)] = the partial sums of row j, returns lane j = the total of row j.
HA_INLINE vf8 reduce8(const vf8* v) {
  vf8 w[4], u[2];
  for (int p = 0; p < 4; ++p)
    w[p] = __builtin_shufflevector(v[2 * p], v[2 * p + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(v[2 * p], v[2 * p + 1], 4, 5, 6, 7, 12, 13, 14, 15);
  for (int p = 0; p < 2; ++p)
    u[p] = __builtin_shufflevector(w[2 * p], w[2 * p + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
           __builtin_shufflevector(w[2 * p], w[2 * p + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  return __builtin_shufflevector(u[0], u[1], 0, 8, 2, 10, 4, 12, 6, 14) +
         __builtin_shufflevector(u[0], u[1], 1, 9, 3, 11, 5, 13, 7, 15);
}

HA_INLINE float hmax(vf16 v) {
  float m = v[0];
  for (int i = 1; i < 16; ++i) m = m > v[i] ? m : v[i];
  return m;
}

HA_INLINE float hsum(vf16 v) {
  float s = 0.0f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}

// exp(x) for x <= 0 (max-shifted scores), about 1 ulp: x = n ln2 + r with |r| <= ln2/2,
// a degree-6 polynomial for e^r (the Cephes expf coefficients), 2^n put into the exponent.
// Inputs below -86 (and -inf) give 0: far below anything a softmax sum of at least 1 can notice.
HA_INLINE vf16 exp16(vf16 x) {
  const vf16 lo = vf16{} - 86.0f;
  const auto tiny = x < lo;
  x = tiny ? lo : x;
  const vf16 shifter = vf16{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  vf16 t = x * 1.44269504088896341f + shifter;
  vf16 n = t - shifter;
  vf16 r = x - n * 0.693359375f - n * -2.12194440e-4f;
  vf16 p = vf16{} + 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.0f;
  vu16 scaled = (vu16)p + (((vu16)t - 0x4B400000u) << 23);
  return tiny ? vf16{} : (vf16)scaled;
}

}  // namespace hybridattn

#endif
