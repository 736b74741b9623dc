// k3 = expm1(d) - d and expm1(d) in fp32 for the CPU kernels (kl.cpp, policy.cpp), d = ref_logp -
// logp, accurate where the direct form cancels. Always inlined (PYALIGN_HD): the loops calling
// them vectorize only then.
#pragma once

#include <cmath>

#include "macros.h"
#include "softmax_math.h"

namespace pyalign {

// expm1 and k3 = expm1(d) - d with plain arithmetic, so the loops vectorize (libm's expm1f
// keeps them scalar). For |d| < 1/2 both use the Taylor series
// (expm1(d) - d cancels catastrophically in fp32 there; truncation < 1e-11 relative); beyond,
// exp(d) - 1 through the shared vectorizable exp. Both sides are computed and one selected.
constexpr float kSeriesLimit = 0.5f;

PYALIGN_HD float exp_any(float diff) {
  // exp_nonpositive is accurate up to 88 and clamps above; past that e^d is inf in fp32.
  return diff > 88.0f ? INFINITY : exp_nonpositive(diff);
}

// (expm1(d) - d) / d^2 = 1/2! + d/3! + ... + d^9/11!
PYALIGN_HD float k3_series_over_square(float d) {
  float sum = 1.0f / 39916800.0f;  // 1/11!
  sum = sum * d + 1.0f / 3628800.0f;
  sum = sum * d + 1.0f / 362880.0f;
  sum = sum * d + 1.0f / 40320.0f;
  sum = sum * d + 1.0f / 5040.0f;
  sum = sum * d + 1.0f / 720.0f;
  sum = sum * d + 1.0f / 120.0f;
  sum = sum * d + 1.0f / 24.0f;
  sum = sum * d + 1.0f / 6.0f;
  return sum * d + 0.5f;
}

PYALIGN_HD float k3_value(float diff) {
  const float series = diff * diff * k3_series_over_square(diff);
  const float direct = (exp_any(diff) - 1.0f) - diff;
  return std::fabs(diff) < kSeriesLimit ? series : direct;
}

PYALIGN_HD float expm1_value(float diff) {
  const float series = diff + diff * diff * k3_series_over_square(diff);
  const float direct = exp_any(diff) - 1.0f;
  return std::fabs(diff) < kSeriesLimit ? series : direct;
}

}  // namespace pyalign
