// Element loads/stores in fp32 for the CPU kernels: loads are bit manipulations that vectorize;
// stores go through c10 (round to nearest even; the fp16 store stays scalar).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include "softmax_math.h"

namespace pyalign {

inline float to_float(float value) { return value; }
inline float to_float(c10::BFloat16 value) {
  return bits_to_float(static_cast<uint32_t>(value.x) << 16);
}
// fp16 -> fp32 with integer ops and selects only (vectorizes, unlike the F16C scalar intrinsic
// c10::Half uses): move exponent+mantissa into place, rebias, fix up inf/NaN and subnormals.
inline float to_float(c10::Half value) {
  const uint32_t half_bits = value.x;
  const uint32_t shifted = (half_bits & 0x7fffu) << 13;
  const uint32_t exponent = shifted & (0x7c00u << 13);
  uint32_t bits = shifted + ((127u - 15u) << 23);
  if (exponent == (0x7c00u << 13)) bits += (128u - 16u) << 23;  // inf / NaN
  float magnitude = bits_to_float(bits);
  if (exponent == 0) magnitude = bits_to_float(shifted + (113u << 23)) - bits_to_float(113u << 23);  // zero / subnormal
  return bits_to_float(float_to_bits(magnitude) | ((half_bits & 0x8000u) << 16));
}

template <typename scalar_t>
inline scalar_t from_float(float value) { return static_cast<scalar_t>(value); }
template <>
inline float from_float<float>(float value) { return value; }

}  // namespace pyalign
