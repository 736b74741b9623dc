// Policy-gradient losses (the registry's policy terms, pyalign/losses.py) fused with the per-token
// KL and entropy terms and the masked row reductions, CPU backend. Same math as kernels/policy.py:
// per row, pass 1 gives the token count n, the log-ratio sum (the ratio level's) and vespo's
// clamped sum; the forward's pass 2 writes the row's 12 reduction pieces (POLICY_ROW_STATS); the
// backward adds, for sequence-level ratios, the row sum R_b = Σ m·(em·dP/dw + β·[bias]·kl) and
// writes d loss/d logp per token. Inputs arrive as contiguous fp32 (the adapter converts), math
// in fp32 per token with double row sums. Masked positions are selected away; clamps and minima
// are selects, so NaN in kept data propagates. Threads: at::parallel_for over rows; the policy
// term (the entry's kernel id) is a template parameter, so the inner loops have no switch.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common/kl_math.h"

namespace pyalign {
namespace {

constexpr int kNumStats = 12;  // len(pyalign.losses.POLICY_ROW_STATS), in that order
constexpr float kVespoClamp = 20.0f;
constexpr float kVespoMinLogWeight = -18.420680743952367f;  // log(1e-8)

struct Params {
  float eps_low, eps_high, delta, tau_pos, tau_neg, k_pos, lam_pos, k_neg, lam_neg;
};

struct Term {
  float value, d_ratio, direct;
  bool low, high;
};

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// The policy term of branch kTerm (kernel ids of pyalign/losses.py): value P, dP/dw, D = dP/dlogp
// at fixed w, and the clip flags as TRL counts them.
template <int kTerm>
inline Term policy_term(float w, float adv, float logp, float vespo_log_w, const Params& p) {
  Term t{0.0f, 0.0f, 0.0f, false, false};
  if constexpr (kTerm == 0) {  // PPO clip
    const float lo = 1.0f - p.eps_low, hi = 1.0f + p.eps_high;
    const float c1 = w > p.delta ? p.delta : w;
    const float c2 = w < lo ? lo : (w > hi ? hi : w);
    const float a = c1 * adv, b = c2 * adv;
    t.value = -(a < b ? a : b);
    const float slope1 = w <= p.delta ? 1.0f : 0.0f;
    const float slope2 = (w >= lo && w <= hi) ? 1.0f : 0.0f;
    // torch.minimum splits the gradient at a tie (w inside the clip range)
    const float slope = a < b ? slope1 : (a > b ? slope2 : 0.5f * (slope1 + slope2));
    t.d_ratio = -adv * slope;
    t.low = c1 < lo && adv < 0.0f;
    t.high = c1 > hi && adv > 0.0f;
  } else if constexpr (kTerm == 1) {  // cispo
    const float capped = w > p.eps_high ? p.eps_high : w;
    t.direct = -capped * adv;
    t.value = t.direct * logp;
    t.high = w > p.eps_high && adv > 0.0f;
  } else if constexpr (kTerm == 2) {  // sapo
    const float tau = adv > 0.0f ? p.tau_pos : p.tau_neg;
    const float x = tau * (w - 1.0f);
    const float gate = sigmoid(x);
    t.value = -gate * (4.0f / tau) * adv;
    t.d_ratio = -4.0f * gate * sigmoid(-x) * adv;
  } else {  // vespo
    const bool nonneg = adv >= 0.0f;
    const float k = nonneg ? p.k_pos : p.k_neg;
    const float lam = std::fmax(nonneg ? p.lam_pos : p.lam_neg, 1e-4f);
    float phi = std::exp(lam + k * vespo_log_w - lam * std::exp(vespo_log_w));
    if (!std::isfinite(phi)) phi = 0.0f;  // nan_to_num, as TRL
    t.direct = -phi * adv;
    t.value = t.direct * logp;
  }
  return t;
}

// (kl, d kl / d logp) at the sampled token, d = ref_logp - logp.
inline void kl_and_slope(float logp, float ref, int estimator, float& kl, float& slope) {
  const float diff = ref - logp;
  if (estimator == 1) {
    kl = -diff;
    slope = 1.0f;
  } else if (estimator == 2) {
    kl = 0.5f * diff * diff;
    slope = -diff;
  } else {
    kl = k3_value(diff);
    slope = -expm1_value(diff);
  }
}

struct Inputs {
  const float *logprobs, *old, *adv, *ref, *entropy;
  const bool *mask, *emask;
  int64_t length, adv_token_stride;
  int level;  // 0 token, 1 sequence (mean), 2 sequence_sum
  int estimator;
  bool bias;
  Params params;
};

struct RowRatio {
  double count, log_ratio, clamped;
  float ratio, vespo_log_w;
};

RowRatio row_ratio(const Inputs& in, int64_t row) {
  const int64_t start = row * in.length;
  double count = 0.0, total = 0.0, clamped = 0.0;
  for (int64_t t = 0; t < in.length; ++t) {
    if (!in.mask[start + t]) continue;
    const float l = in.logprobs[start + t] - in.old[start + t];
    count += 1.0;
    total += l;
    clamped += l < -kVespoClamp ? -kVespoClamp : (l > kVespoClamp ? kVespoClamp : l);
  }
  RowRatio r{count, total, clamped, 1.0f, 0.0f};
  if (in.level == 1) r.log_ratio = total / (count > 1.0 ? count : 1.0);
  r.ratio = std::exp(static_cast<float>(r.log_ratio));
  const float c = static_cast<float>(clamped);
  r.vespo_log_w = c < kVespoMinLogWeight ? kVespoMinLogWeight : (c > kVespoClamp ? kVespoClamp : c);
  return r;
}

inline float advantage_at(const Inputs& in, int64_t row, int64_t t) {
  return in.adv[in.adv_token_stride ? row * in.length + t : row];
}

template <int kTerm>
void forward_row(const Inputs& in, int64_t row, float* out) {
  const RowRatio r = row_ratio(in, row);
  const int64_t start = row * in.length;
  double policy = 0, kl_sum = 0, low = 0, high = 0, region = 0, ratio = 0, entropy = 0,
         entropy_kept = 0, kept_count = 0;
  for (int64_t t = 0; t < in.length; ++t) {
    const int64_t i = start + t;
    if (!in.mask[i]) continue;
    const bool kept = in.emask == nullptr || in.emask[i];
    const float logp = in.logprobs[i];
    const float w = in.level == 0 ? std::exp(logp - in.old[i]) : r.ratio;
    const float adv = advantage_at(in, row, t);
    const Term term = policy_term<kTerm>(w, adv, logp, r.vespo_log_w, in.params);
    if (kept) {
      policy += term.value;
      kept_count += 1.0;
    }
    low += term.low;
    high += term.high;
    region += term.low || term.high;
    ratio += w;
    if (in.ref != nullptr) {
      float kl, slope;
      kl_and_slope(logp, in.ref[i], in.estimator, kl, slope);
      kl_sum += in.bias ? kl * w : kl;
    }
    if (in.entropy != nullptr) {
      entropy += in.entropy[i];
      if (kept) entropy_kept += in.entropy[i];
    }
  }
  const double stats[kNumStats] = {r.count, r.log_ratio, r.clamped, policy, kl_sum, low, high,
                                   region, ratio, entropy, entropy_kept, kept_count};
  for (int j = 0; j < kNumStats; ++j) out[j] = static_cast<float>(stats[j]);
}

template <int kTerm>
void backward_row(const Inputs& in, int64_t row, float row_weight, float beta, bool has_kl,
                  const float* entropy_weights, float* grad, float* grad_entropy) {
  const RowRatio r = row_ratio(in, row);
  const int64_t start = row * in.length;
  float through_row = 0.0f;
  if (in.level != 0) {  // R_b, then dw_b/dlogp_t = w_b (/ n_b)
    double row_sum = 0.0;
    for (int64_t t = 0; t < in.length; ++t) {
      const int64_t i = start + t;
      if (!in.mask[i]) continue;
      const bool kept = in.emask == nullptr || in.emask[i];
      const float logp = in.logprobs[i];
      const Term term = policy_term<kTerm>(r.ratio, advantage_at(in, row, t), logp,
                                           r.vespo_log_w, in.params);
      if (kept) row_sum += term.d_ratio;
      if (has_kl && in.bias) {
        float kl, slope;
        kl_and_slope(logp, in.ref[i], in.estimator, kl, slope);
        row_sum += beta * kl;
      }
    }
    through_row = static_cast<float>(row_sum) * r.ratio;
    if (in.level == 1) through_row /= static_cast<float>(r.count > 1.0 ? r.count : 1.0);
  }
  for (int64_t t = 0; t < in.length; ++t) {
    const int64_t i = start + t;
    if (!in.mask[i]) {
      grad[i] = 0.0f;
      if (grad_entropy != nullptr) grad_entropy[i] = 0.0f;
      continue;
    }
    const bool kept = in.emask == nullptr || in.emask[i];
    const float logp = in.logprobs[i];
    const float w = in.level == 0 ? std::exp(logp - in.old[i]) : r.ratio;
    const Term term = policy_term<kTerm>(w, advantage_at(in, row, t), logp, r.vespo_log_w,
                                         in.params);
    float d_ratio = kept ? term.d_ratio : 0.0f;
    float g = kept ? term.direct : 0.0f;
    if (has_kl) {
      float kl, slope;
      kl_and_slope(logp, in.ref[i], in.estimator, kl, slope);
      g += beta * slope * (in.bias ? w : 1.0f);
      if (in.bias) d_ratio += beta * kl;
    }
    g += in.level == 0 ? d_ratio * w : through_row;
    grad[i] = g * row_weight;
    if (grad_entropy != nullptr) grad_entropy[i] = kept ? entropy_weights[row] : 0.0f;
  }
}

// Calls body(std::integral_constant<int, id>) for the runtime policy-term id.
template <typename Body>
void with_term(int64_t term_id, Body body) {
  switch (term_id) {
    case 0: body(std::integral_constant<int, 0>{}); break;
    case 1: body(std::integral_constant<int, 1>{}); break;
    case 2: body(std::integral_constant<int, 2>{}); break;
    case 3: body(std::integral_constant<int, 3>{}); break;
    default: TORCH_CHECK(false, "pyalign_C: policy term id must be 0..3, got ", term_id);
  }
}

const float* float_data(const at::Tensor& tensor, const at::Tensor& like, const char* name) {
  TORCH_CHECK(tensor.device().is_cpu() && tensor.scalar_type() == at::kFloat &&
                  tensor.is_contiguous() && tensor.sizes() == like.sizes(),
              "pyalign_C: ", name, " must be a contiguous float32 CPU tensor of shape ",
              like.sizes());
  return tensor.data_ptr<float>();
}

const float* optional_float(const c10::optional<at::Tensor>& tensor, const at::Tensor& like,
                            const char* name) {
  return tensor.has_value() && tensor->defined() ? float_data(*tensor, like, name) : nullptr;
}

const bool* bool_data(const at::Tensor& tensor, const at::Tensor& like, const char* name) {
  TORCH_CHECK(tensor.device().is_cpu() && tensor.scalar_type() == at::kBool &&
                  tensor.is_contiguous() && tensor.sizes() == like.sizes(),
              "pyalign_C: ", name, " must be a contiguous bool CPU tensor of shape ", like.sizes());
  return tensor.data_ptr<bool>();
}

Inputs make_inputs(const at::Tensor& logprobs, const at::Tensor& old, const at::Tensor& adv,
                   const at::Tensor& mask, const c10::optional<at::Tensor>& emask,
                   const c10::optional<at::Tensor>& ref, const c10::optional<at::Tensor>& entropy,
                   const std::string& level, const std::vector<double>& params,
                   int64_t estimator, bool bias) {
  TORCH_CHECK(logprobs.dim() == 2, "pyalign_C: logprobs must be [B, T]");
  TORCH_CHECK(params.size() == 9, "pyalign_C: policy params must hold 9 floats");
  TORCH_CHECK(level == "token" || level == "sequence" || level == "sequence_sum",
              "pyalign_C: level must be token, sequence or sequence_sum, got ", level);
  TORCH_CHECK(estimator >= 1 && estimator <= 3, "pyalign_C: estimator id must be 1..3");
  Inputs in{};
  in.logprobs = float_data(logprobs, logprobs, "logprobs");
  in.old = float_data(old, logprobs, "old_logprobs");
  const bool per_token = adv.dim() == 2;
  in.adv = per_token ? float_data(adv, logprobs, "advantages")
                     : float_data(adv, logprobs.select(1, 0), "advantages");
  in.mask = bool_data(mask, logprobs, "mask");
  in.emask = emask.has_value() && emask->defined() ? bool_data(*emask, logprobs, "entropy_mask")
                                                   : nullptr;
  in.ref = optional_float(ref, logprobs, "ref_logprobs");
  in.entropy = optional_float(entropy, logprobs, "entropy");
  in.length = logprobs.size(1);
  in.adv_token_stride = per_token ? 1 : 0;
  in.level = level == "token" ? 0 : (level == "sequence" ? 1 : 2);
  in.estimator = static_cast<int>(estimator);
  in.bias = bias;
  in.params = Params{static_cast<float>(params[0]), static_cast<float>(params[1]),
                     static_cast<float>(params[2]), static_cast<float>(params[3]),
                     static_cast<float>(params[4]), static_cast<float>(params[5]),
                     static_cast<float>(params[6]), static_cast<float>(params[7]),
                     static_cast<float>(params[8])};
  return in;
}

constexpr int64_t kRowGrain = 4;

void policy_forward_out(const at::Tensor& logprobs, const at::Tensor& old, const at::Tensor& adv,
                        const at::Tensor& mask, const c10::optional<at::Tensor>& emask,
                        const c10::optional<at::Tensor>& ref,
                        const c10::optional<at::Tensor>& entropy, int64_t term_id,
                        const std::string& level, std::vector<double> params, int64_t estimator,
                        bool bias, at::Tensor& stats) {
  const Inputs in = make_inputs(logprobs, old, adv, mask, emask, ref, entropy, level, params,
                                estimator, bias);
  const int64_t rows = logprobs.size(0);
  TORCH_CHECK(stats.device().is_cpu() && stats.scalar_type() == at::kFloat &&
                  stats.is_contiguous() && stats.dim() == 2 && stats.size(0) == rows &&
                  stats.size(1) == kNumStats,
              "pyalign_C: stats must be a contiguous float32 CPU tensor of shape [B, 12]");
  float* out = stats.data_ptr<float>();
  with_term(term_id, [&](auto term_tag) {
    constexpr int kTerm = decltype(term_tag)::value;
    at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) forward_row<kTerm>(in, row, out + row * kNumStats);
    });
  });
}

at::Tensor policy_forward(const at::Tensor& logprobs, const at::Tensor& old, const at::Tensor& adv,
                          const at::Tensor& mask, const c10::optional<at::Tensor>& emask,
                          const c10::optional<at::Tensor>& ref,
                          const c10::optional<at::Tensor>& entropy, int64_t term_id,
                          const std::string& level, std::vector<double> params, int64_t estimator,
                          bool bias) {
  at::Tensor stats = at::empty({logprobs.size(0), kNumStats}, logprobs.options().dtype(at::kFloat));
  policy_forward_out(logprobs, old, adv, mask, emask, ref, entropy, term_id, level, params,
                     estimator, bias, stats);
  return stats;
}

void policy_backward_out(const at::Tensor& row_weights, const c10::optional<at::Tensor>& entropy_weights,
                         const at::Tensor& logprobs, const at::Tensor& old, const at::Tensor& adv,
                         const at::Tensor& mask, const c10::optional<at::Tensor>& emask,
                         const c10::optional<at::Tensor>& ref, int64_t term_id,
                         const std::string& level, std::vector<double> params, double beta,
                         int64_t estimator, bool bias, at::Tensor& grad,
                         at::Tensor& grad_entropy) {
  const Inputs in = make_inputs(logprobs, old, adv, mask, emask, ref, c10::nullopt, level, params,
                                estimator, bias);
  const int64_t rows = logprobs.size(0);
  const float* weights = float_data(row_weights, logprobs.select(1, 0), "row_weights");
  const float* entropy_w = entropy_weights.has_value() && entropy_weights->defined()
                               ? float_data(*entropy_weights, logprobs.select(1, 0), "entropy_weights")
                               : nullptr;
  float* grad_out = const_cast<float*>(float_data(grad, logprobs, "grad_logprobs"));
  float* grad_entropy_out = nullptr;
  if (entropy_w != nullptr) {
    grad_entropy_out = const_cast<float*>(float_data(grad_entropy, logprobs, "grad_entropy"));
  }
  const bool has_kl = in.ref != nullptr && beta != 0.0;
  const float beta_f = static_cast<float>(beta);
  with_term(term_id, [&](auto term_tag) {
    constexpr int kTerm = decltype(term_tag)::value;
    at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        backward_row<kTerm>(in, row, weights[row], beta_f, has_kl, entropy_w, grad_out,
                            grad_entropy_out);
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> policy_backward(
    const at::Tensor& row_weights, const c10::optional<at::Tensor>& entropy_weights,
    const at::Tensor& logprobs, const at::Tensor& old, const at::Tensor& adv,
    const at::Tensor& mask, const c10::optional<at::Tensor>& emask,
    const c10::optional<at::Tensor>& ref, int64_t term_id, const std::string& level,
    std::vector<double> params, double beta, int64_t estimator, bool bias) {
  at::Tensor grad = at::empty(logprobs.sizes(), logprobs.options().dtype(at::kFloat));
  const bool with_entropy = entropy_weights.has_value() && entropy_weights->defined();
  at::Tensor grad_entropy = with_entropy ? at::empty(logprobs.sizes(), grad.options())
                                         : at::empty({0}, grad.options());
  policy_backward_out(row_weights, entropy_weights, logprobs, old, adv, mask, emask, ref, term_id,
                      level, params, beta, estimator, bias, grad, grad_entropy);
  return std::make_tuple(grad, grad_entropy);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyalign_C, CPU, m) {
  m.impl("policy_forward", &policy_forward);
  m.impl("policy_forward_out", &policy_forward_out);
  m.impl("policy_backward", &policy_backward);
  m.impl("policy_backward_out", &policy_backward_out);
}

}  // namespace pyalign
