// Element loads/stores in fp32 for the CPU kernels: bf16 widens by a shift (vectorizes), fp16
// goes through c10::Half (F16C where the build enables it), stores round to nearest even.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include "softmax_math.h"

namespace pyalign {

inline float to_float(float value) { return value; }
inline float to_float(c10::BFloat16 value) {
  return bits_to_float(static_cast<uint32_t>(value.x) << 16);
}
inline float to_float(c10::Half value) { return static_cast<float>(value); }

template <typename scalar_t>
inline scalar_t from_float(float value) { return static_cast<scalar_t>(value); }
template <>
inline float from_float<float>(float value) { return value; }

}  // namespace pyalign
