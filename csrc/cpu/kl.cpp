// Per-token KL estimators between policy and reference log-probs, CPU backend.
// With d = ref_logp - logp: k1 = -d, k2 = d^2/2, k3 = expm1(d) - d. The math runs in fp32;
// k3, which cancels catastrophically as expm1(d) - d for small |d|, uses its Taylor series
// there. The op is elementwise and memory-bound: reads 2 (+1 mask) values, writes 1 (forward)
// or 2 (backward) per token. Threads: at::parallel_for over elements; the estimator is a
// template parameter so the inner loop has no per-element switch.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstddef>
#include <string>
#include <tuple>
#include <type_traits>

#include "../common/dtype_convert.h"
#include "../common/kl_math.h"

namespace pyalign {
namespace {

enum class Estimator { kK1, kK2, kK3 };

Estimator parse_estimator(const std::string& name) {
  if (name == "k1") return Estimator::kK1;
  if (name == "k2") return Estimator::kK2;
  TORCH_CHECK(name == "k3", "pyalign_C: estimator must be k1, k2 or k3, got ", name);
  return Estimator::kK3;
}

// Forced inline (PYALIGN_HD), like the math they call: a plain `inline` left them as one call per
// element, which kept the loops below scalar.
template <Estimator kEstimator>
PYALIGN_HD float kl_value(float diff) {
  if constexpr (kEstimator == Estimator::kK1) return -diff;
  else if constexpr (kEstimator == Estimator::kK2) return 0.5f * diff * diff;
  else return k3_value(diff);
}

// d kl / d d, the derivative with respect to d = ref_logp - logp.
template <Estimator kEstimator>
PYALIGN_HD float kl_slope(float diff) {
  if constexpr (kEstimator == Estimator::kK1) return -1.0f;
  else if constexpr (kEstimator == Estimator::kK2) return diff;
  else return expm1_value(diff);
}

// Calls body(std::integral_constant<Estimator, E>) for the runtime estimator.
template <typename Body>
void with_estimator(Estimator estimator, Body body) {
  switch (estimator) {
    case Estimator::kK1: body(std::integral_constant<Estimator, Estimator::kK1>{}); break;
    case Estimator::kK2: body(std::integral_constant<Estimator, Estimator::kK2>{}); break;
    default: body(std::integral_constant<Estimator, Estimator::kK3>{});
  }
}

constexpr int64_t kGrain = 16384;

at::Tensor checked(const at::Tensor& tensor, const at::Tensor& like, const char* name) {
  TORCH_CHECK(tensor.device().is_cpu(), "pyalign_C: ", name, " must be a CPU tensor");
  TORCH_CHECK(tensor.sizes() == like.sizes(), "pyalign_C: ", name, " has shape ", tensor.sizes(),
              ", expected ", like.sizes());
  return tensor.contiguous();
}

void check_float(const at::Tensor& tensor, const char* name) {
  const auto dtype = tensor.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "pyalign_C: ", name, " must be float32, bfloat16 or float16, got ", dtype);
}

// Calls body(a, b) with typed pointers for the (logprobs, ref_logprobs) dtype pair.
template <typename Body>
void dispatch_pair(const at::Tensor& a, const at::Tensor& b, Body body) {
  auto inner = [&](auto* a_ptr) {
    switch (b.scalar_type()) {
      case at::kFloat: body(a_ptr, b.data_ptr<float>()); break;
      case at::kBFloat16: body(a_ptr, b.data_ptr<c10::BFloat16>()); break;
      default: body(a_ptr, b.data_ptr<c10::Half>());
    }
  };
  switch (a.scalar_type()) {
    case at::kFloat: inner(a.data_ptr<float>()); break;
    case at::kBFloat16: inner(a.data_ptr<c10::BFloat16>()); break;
    default: inner(a.data_ptr<c10::Half>());
  }
}

const bool* mask_data(const c10::optional<at::Tensor>& mask, const at::Tensor& like, at::Tensor& keep) {
  if (!mask.has_value() || !mask->defined()) return nullptr;
  TORCH_CHECK(mask->scalar_type() == at::kBool, "pyalign_C: mask must be bool");
  keep = checked(*mask, like, "mask");
  return keep.data_ptr<bool>();
}

void check_out(const at::Tensor& out, const at::Tensor& like, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous() && out.sizes() == like.sizes() &&
                  out.scalar_type() == dtype,
              "pyalign_C: ", name, " must be a contiguous CPU tensor of shape ", like.sizes(),
              " and dtype ", dtype);
}

void kl_forward_out(const at::Tensor& logprobs_in, const at::Tensor& ref_in,
                    const c10::optional<at::Tensor>& mask_in, const std::string& estimator_name,
                    at::Tensor& kl) {
  const Estimator estimator = parse_estimator(estimator_name);
  check_float(logprobs_in, "logprobs");
  check_float(ref_in, "ref_logprobs");
  const at::Tensor logprobs = checked(logprobs_in, logprobs_in, "logprobs");
  const at::Tensor ref = checked(ref_in, logprobs_in, "ref_logprobs");
  at::Tensor mask_keep;
  const bool* mask = mask_data(mask_in, logprobs_in, mask_keep);
  check_out(kl, logprobs_in, at::kFloat, "kl");
  float* out = kl.data_ptr<float>();
  with_estimator(estimator, [&](auto estimator_tag) {
    constexpr Estimator kEstimator = decltype(estimator_tag)::value;
    dispatch_pair(logprobs, ref, [&](const auto* lp, const auto* rf) {
      at::parallel_for(0, logprobs.numel(), kGrain, [&](int64_t begin, int64_t end) {
        if (mask == nullptr) {  // separate loops: a maybe-null mask load blocks vectorization
#pragma omp simd
          for (int64_t i = begin; i < end; ++i) {
            out[i] = kl_value<kEstimator>(to_float(rf[i]) - to_float(lp[i]));
          }
        } else {
#pragma omp simd
          for (int64_t i = begin; i < end; ++i) {
            const float value = kl_value<kEstimator>(to_float(rf[i]) - to_float(lp[i]));
            out[i] = mask[i] ? value : 0.0f;
          }
        }
      });
    });
  });
}

at::Tensor kl_forward(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                      const c10::optional<at::Tensor>& mask, const std::string& estimator) {
  at::Tensor kl = at::empty(logprobs.sizes(), logprobs.options().dtype(at::kFloat));
  kl_forward_out(logprobs, ref_logprobs, mask, estimator, kl);
  return kl;
}

void kl_backward_out(const at::Tensor& grad_kl_in, const at::Tensor& logprobs_in,
                     const at::Tensor& ref_in, const c10::optional<at::Tensor>& mask_in,
                     const std::string& estimator_name, at::Tensor& grad_logprobs,
                     at::Tensor& grad_ref) {
  const Estimator estimator = parse_estimator(estimator_name);
  check_float(logprobs_in, "logprobs");
  check_float(ref_in, "ref_logprobs");
  const at::Tensor logprobs = checked(logprobs_in, logprobs_in, "logprobs");
  const at::Tensor ref = checked(ref_in, logprobs_in, "ref_logprobs");
  const at::Tensor grad_kl = checked(grad_kl_in, logprobs_in, "grad_kl").to(at::kFloat);
  at::Tensor mask_keep;
  const bool* mask = mask_data(mask_in, logprobs_in, mask_keep);
  check_out(grad_logprobs, logprobs_in, logprobs_in.scalar_type(), "grad_logprobs");
  check_out(grad_ref, logprobs_in, ref_in.scalar_type(), "grad_ref_logprobs");
  const float* grad = grad_kl.data_ptr<float>();
  with_estimator(estimator, [&](auto estimator_tag) {
    constexpr Estimator kEstimator = decltype(estimator_tag)::value;
    dispatch_pair(logprobs, ref, [&](const auto* lp, const auto* rf) {
      using logprob_t = std::remove_const_t<std::remove_pointer_t<decltype(lp)>>;
      using ref_t = std::remove_const_t<std::remove_pointer_t<decltype(rf)>>;
      logprob_t* grad_lp = grad_logprobs.data_ptr<logprob_t>();
      ref_t* grad_rf = grad_ref.data_ptr<ref_t>();
      at::parallel_for(0, logprobs.numel(), kGrain, [&](int64_t begin, int64_t end) {
        if (mask == nullptr) {
#pragma omp simd
          for (int64_t i = begin; i < end; ++i) {
            const float grad_diff = grad[i] * kl_slope<kEstimator>(to_float(rf[i]) - to_float(lp[i]));
            grad_lp[i] = from_float<logprob_t>(-grad_diff);
            grad_rf[i] = from_float<ref_t>(grad_diff);
          }
        } else {
#pragma omp simd
          for (int64_t i = begin; i < end; ++i) {
            const float slope = kl_slope<kEstimator>(to_float(rf[i]) - to_float(lp[i]));
            const float grad_diff = mask[i] ? grad[i] * slope : 0.0f;
            grad_lp[i] = from_float<logprob_t>(-grad_diff);
            grad_rf[i] = from_float<ref_t>(grad_diff);
          }
        }
      });
    });
  });
}

std::tuple<at::Tensor, at::Tensor> kl_backward(const at::Tensor& grad_kl, const at::Tensor& logprobs,
                                               const at::Tensor& ref_logprobs,
                                               const c10::optional<at::Tensor>& mask,
                                               const std::string& estimator) {
  at::Tensor grad_logprobs = at::empty(logprobs.sizes(), logprobs.options());
  at::Tensor grad_ref = at::empty(ref_logprobs.sizes(), ref_logprobs.options());
  kl_backward_out(grad_kl, logprobs, ref_logprobs, mask, estimator, grad_logprobs, grad_ref);
  return std::make_tuple(grad_logprobs, grad_ref);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyalign_C, CPU, m) {
  m.impl("kl_forward", &kl_forward);
  m.impl("kl_backward", &kl_backward);
  m.impl("kl_forward_out", &kl_forward_out);
  m.impl("kl_backward_out", &kl_backward_out);
}

}  // namespace pyalign
