// Vectorizable scalar math for the softmax-style kernels (CPU loops under `omp simd`; usable
// from CUDA too). Written with plain arithmetic and bit casts only, so that g++ turns a loop of
// calls into SIMD code (libm's expf would keep the loop scalar).
#pragma once

#include <cstdint>
#include <cstring>
#include "macros.h"

namespace pyalign {

PYALIGN_HD float bits_to_float(uint32_t bits) {
  float value;
  memcpy(&value, &bits, sizeof(value));
  return value;
}

PYALIGN_HD uint32_t float_to_bits(float value) {
  uint32_t bits;
  memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// exp(x) for x <= ~88 (softmax arguments are <= 0). Cody-Waite reduction x = n ln2 + r,
// |r| <= ln2/2, degree-6 polynomial for e^r, scale by 2^n through the exponent bits.
// Max relative error ~2 ulp; exactly 0 for x < -87.3 (incl. -inf); NaN in, NaN out.
PYALIGN_HD float exp_nonpositive(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693359375f;
  const float kLn2Lo = -2.12194440e-4f;
  const float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float kLowest = -87.3f;           // below: e^x < 2^-126, flushed to 0
  bool underflow = x < kLowest;
  float clamped = underflow ? kLowest : x;
  clamped = clamped > 88.0f ? 88.0f : clamped;
  float shifted = clamped * kLog2e + kRoundMagic;
  float n = shifted - kRoundMagic;
  float r = clamped - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t exponent = static_cast<int32_t>(float_to_bits(shifted)) - static_cast<int32_t>(float_to_bits(kRoundMagic));
  float scale = bits_to_float(static_cast<uint32_t>(exponent + 127) << 23);
  float result = p * scale;
  return underflow ? 0.0f : result;
}

}  // namespace pyalign
