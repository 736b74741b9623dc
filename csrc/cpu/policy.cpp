// Policy-gradient losses (the registry's policy terms, pyalign/losses/policy.py) fused with the
// per-token KL and entropy terms and the masked row reductions, CPU backend. Same math as
// pyalign/kernels/policy.py: per row, pass 1 gives the token count n, the log-ratio sum (the ratio
// level's) and vespo's clamped sum (plus its sampler log-weight); the forward's next passes (policy
// term times the rollout weight ω, KL, entropy) write the row's 12 reduction pieces
// (POLICY_ROW_STATS); the backward adds, for sequence-level ratios, the row sum R_b =
// Σ m·(em·ω·dP/dw + β·[bias]·kl) and writes d loss/d logp per token.
// Two arithmetics (template flag kSafe): the plain one, products as written; the safe one, where
// every product with the ratio or ω is `times` (0*inf = 0: a zero slope, advantage or weight
// contributes exactly 0 however far the ratio overflows fp32) and ω is read. A row runs the safe
// loops when it has a rollout weight, or when the plain loops gave it a NaN (a 0*inf; NaN data
// gives NaN in both): the plain loops are then exactly what they were before ω existed, so the
// numbers of every row without overflow keep their bits (fused multiply-adds and reduction
// orders are the compiler's choice for each loop body). Inputs arrive as contiguous
// fp32 with per-token advantages (the adapter converts and expands); math and row sums in fp32
// (lane-wise under simd, like the Triton kernel's block sums). A row (a few KiB) stays in L1/L2
// across its passes. Every loop is branch-free (selects, the shared vectorizable exp, 0/1 float
// flags, byte masks: g++ leaves a loop scalar for a bool load or member, or a float/double mixed
// reduction) under `omp simd`. Masked positions are selected away; clamps and minima are selects,
// so NaN in kept data propagates. Threads: at::parallel_for over rows; the policy term (the
// entry's kernel id) and the ratio level are template parameters. simdlen(8): the byte masks would
// make g++ pick 32 lanes (4 ymm per float value), which spills; 8 fp32 lanes do not.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common/kl_math.h"
#include "../common/policy_stats.h"

namespace pyalign {
namespace {

constexpr int kNumStats = kPolicyNumStats;
constexpr float kVespoClamp = 20.0f;
constexpr float kVespoMinLogWeight = -18.420680743952367f;  // log(1e-8)

struct Params {
  float eps_low, eps_high, delta, tau_pos, tau_neg, k_pos, lam_pos, k_neg, lam_neg;
};

// The clip flags as 0/1 floats: a bool member keeps g++ from vectorizing the loops.
struct Term {
  float value, d_ratio, direct, low, high;
};

PYALIGN_HD float sigmoid(float x) { return 1.0f / (1.0f + exp_any(-x)); }

// a*b with 0*inf = 0 either way round (pyalign.losses.times); NaN still propagates.
PYALIGN_HD float times(float a, float b) {
  const float product = a * b;
  const bool zero_times_inf = (a == 0.0f && std::fabs(b) == INFINITY) ||
                              (b == 0.0f && std::fabs(a) == INFINITY);
  return zero_times_inf ? 0.0f : product;
}

// a*b, with 0*inf = 0 in the safe arithmetic.
template <bool kSafe>
PYALIGN_HD float mul(float a, float b) {
  if constexpr (kSafe) {
    return times(a, b);
  } else {
    return a * b;
  }
}

// The policy term of branch kTerm (kernel ids of pyalign/losses/policy.py): value P, dP/dw,
// D = dP/dlogp at fixed w, and the clip flags as TRL counts them. Selects only (no branches, no
// libm), so the row loops below vectorize.
template <int kTerm, bool kSafe>
PYALIGN_HD Term policy_term(float w, float adv, float logp, float vespo_log_w, const Params& p) {
  Term t{0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  if constexpr (kTerm == 0) {  // PPO clip
    const float lo = 1.0f - p.eps_low, hi = 1.0f + p.eps_high;
    const float c1 = w > p.delta ? p.delta : w;
    const float c2 = w < lo ? lo : (w > hi ? hi : w);
    const float a = mul<kSafe>(c1, adv), b = c2 * adv;  // c2 is finite
    t.value = -(a < b ? a : b);
    const float slope1 = w <= p.delta ? 1.0f : 0.0f;
    const float slope2 = (w >= lo && w <= hi) ? 1.0f : 0.0f;
    // torch.minimum splits the gradient at a tie (w inside the clip range)
    const float slope = a < b ? slope1 : (a > b ? slope2 : 0.5f * (slope1 + slope2));
    t.d_ratio = -adv * slope;
    t.low = (c1 < lo && adv < 0.0f) ? 1.0f : 0.0f;
    t.high = (c1 > hi && adv > 0.0f) ? 1.0f : 0.0f;
  } else if constexpr (kTerm == 1) {  // cispo
    const float capped = w > p.eps_high ? p.eps_high : w;
    t.direct = -capped * adv;
    t.value = t.direct * logp;
    t.high = (w > p.eps_high && adv > 0.0f) ? 1.0f : 0.0f;
  } else if constexpr (kTerm == 2) {  // sapo
    const float tau = adv > 0.0f ? p.tau_pos : p.tau_neg;
    const float x = tau * (w - 1.0f);
    const float gate = sigmoid(x);
    t.value = -gate * (4.0f / tau) * adv;
    t.d_ratio = -4.0f * gate * sigmoid(-x) * adv;
  } else {  // vespo
    const bool nonneg = adv >= 0.0f;
    const float k = nonneg ? p.k_pos : p.k_neg;
    const float lam_raw = nonneg ? p.lam_pos : p.lam_neg;
    const float lam = lam_raw < 1e-4f ? 1e-4f : lam_raw;
    const float phi_raw = exp_any(lam + k * vespo_log_w - lam * exp_any(vespo_log_w));
    const float phi = (phi_raw == phi_raw && phi_raw < INFINITY) ? phi_raw : 0.0f;  // nan_to_num
    t.direct = -phi * adv;
    t.value = t.direct * logp;
  }
  return t;
}

// kl at the sampled token and its slope d kl / d logp, d = ref_logp - logp.
PYALIGN_HD float kl_value(float logp, float ref, int estimator) {
  const float diff = ref - logp;
  return estimator == 1 ? -diff : (estimator == 2 ? 0.5f * diff * diff : k3_value(diff));
}

PYALIGN_HD float kl_slope(float logp, float ref, int estimator) {
  const float diff = ref - logp;
  return estimator == 1 ? 1.0f : (estimator == 2 ? -diff : -expm1_value(diff));
}

struct Inputs {
  const float *logprobs, *old, *adv, *ref, *entropy;  // adv: per token, [B, T]
  // the rollout weight ω [B, T] and vespo's sampler log-weight per row (nullptr: none)
  const float *weights, *log_weights;
  // the bool masks read as bytes: g++ keeps loops that store after a bool load scalar
  const uint8_t *mask, *emask;  // emask: the mask itself when there is no entropy mask
  int64_t length;
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
  const uint8_t* mask = in.mask + start;
  const float* lp = in.logprobs + start;
  const float* old = in.old + start;
  // fp32 sums (a float/double mixed reduction keeps g++ from vectorizing)
  float count = 0.0f, total = 0.0f, clamped = 0.0f;
#pragma omp simd simdlen(8) reduction(+ : count, total, clamped)
  for (int64_t t = 0; t < in.length; ++t) {
    const bool keep = mask[t] != 0;
    const float logp = lp[t], previous = old[t];  // loaded unconditionally: selects, not branches
    const float l = keep ? logp - previous : 0.0f;
    count += keep ? 1.0f : 0.0f;
    total += l;
    clamped += l < -kVespoClamp ? -kVespoClamp : (l > kVespoClamp ? kVespoClamp : l);
  }
  RowRatio r{count, total, clamped, 1.0f, 0.0f};
  if (in.level == 1) r.log_ratio = total / (count > 1.0 ? count : 1.0);
  r.ratio = exp_any(static_cast<float>(r.log_ratio));
  const float c = in.log_weights != nullptr ? clamped + in.log_weights[row] : clamped;
  r.vespo_log_w = c < kVespoMinLogWeight ? kVespoMinLogWeight : (c > kVespoClamp ? kVespoClamp : c);
  return r;
}

// The ratio at one token: exp(l) per token, or the row's.
template <bool kTokenLevel>
PYALIGN_HD float ratio_at(bool keep, float logp, float old, float row_ratio) {
  if constexpr (kTokenLevel) {
    return exp_any(keep ? logp - old : 0.0f);
  } else {
    return row_ratio;
  }
}

// One token as both row loops see it: the masks, the ratio and the policy term (times ω in the
// safe arithmetic; the log-prob is 0 where masked, by a select, so a NaN there stays out).
struct TokenTerm {
  bool keep, kept;
  float w;
  Term term;
};

template <int kTerm, bool kTokenLevel, bool kSafe>
PYALIGN_HD TokenTerm token_term(const uint8_t* mask, const uint8_t* emask,
                                           const float* lp, const float* old, const float* adv,
                                           const float* weights, int64_t t, const RowRatio& r,
                                           const Params& params) {
  const bool keep = mask[t] != 0, kept = keep & (emask[t] != 0);
  const float logp_raw = lp[t], old_raw = old[t], adv_raw = adv[t];
  const float logp = keep ? logp_raw : 0.0f;
  const float w = ratio_at<kTokenLevel>(keep, logp, old_raw, r.ratio);
  Term term = policy_term<kTerm, kSafe>(w, keep ? adv_raw : 0.0f, logp, r.vespo_log_w, params);
  if constexpr (kSafe) {
    const float omega = weights[t];
    term.value = times(omega, term.value);
    term.d_ratio = times(omega, term.d_ratio);
    term.direct = times(omega, term.direct);
  }
  return {keep, kept, w, term};
}

// A row's ω for the safe loops: its rollout weights, or ``ones`` (at least T of them).
const float* row_weights_of(const Inputs& in, int64_t row, const std::vector<float>& ones) {
  return in.weights != nullptr ? in.weights + row * in.length : ones.data();
}

template <int kTerm, bool kTokenLevel, bool kSafe>
void forward_row(const Inputs& in, int64_t row, const float* weights, float* out) {
  const RowRatio r = row_ratio(in, row);
  const int64_t start = row * in.length;
  const uint8_t *mask = in.mask + start, *emask = in.emask + start;
  const float *lp = in.logprobs + start, *old = in.old + start, *adv = in.adv + start;
  constexpr bool token_level = kTokenLevel;
  const Params params = in.params;
  float policy = 0, low = 0, high = 0, region = 0, ratio = 0, kept_count = 0;
#pragma omp simd simdlen(8) reduction(+ : policy, low, high, region, ratio, kept_count)
  for (int64_t t = 0; t < in.length; ++t) {
    const TokenTerm at = token_term<kTerm, kTokenLevel, kSafe>(mask, emask, lp, old, adv, weights,
                                                               t, r, params);
    const bool keep = at.keep, kept = at.kept;
    const float w = at.w;
    const Term term = at.term;
    policy += kept ? term.value : 0.0f;
    kept_count += kept ? 1.0f : 0.0f;
    low += keep ? term.low : 0.0f;
    high += keep ? term.high : 0.0f;
    region += keep ? (term.low + term.high > 0.0f ? 1.0f : 0.0f) : 0.0f;
    ratio += keep ? w : 0.0f;
  }
  float kl_sum = 0;
  if (in.ref != nullptr) {
    const float* ref = in.ref + start;
    const int estimator = in.estimator;
    const bool bias = in.bias;
#pragma omp simd simdlen(8) reduction(+ : kl_sum)
    for (int64_t t = 0; t < in.length; ++t) {
      const bool keep = mask[t] != 0;
      const float logp_raw = lp[t], old_raw = old[t], ref_raw = ref[t];
      const float logp = keep ? logp_raw : 0.0f;
      const float kl = kl_value(logp, keep ? ref_raw : 0.0f, estimator);
      const float w = ratio_at<kTokenLevel>(keep, logp, old_raw, r.ratio);
      kl_sum += keep ? (bias ? mul<kSafe>(kl, w) : kl) : 0.0f;
    }
  }
  float entropy = 0, entropy_kept = 0;
  if (in.entropy != nullptr) {
    const float* ent = in.entropy + start;
#pragma omp simd simdlen(8) reduction(+ : entropy, entropy_kept)
    for (int64_t t = 0; t < in.length; ++t) {
      const float value = ent[t];
      entropy += mask[t] != 0 ? value : 0.0f;
      entropy_kept += (mask[t] & emask[t]) != 0 ? value : 0.0f;
    }
  }
  const double stats[kNumStats] = {r.count, r.log_ratio, r.clamped, policy, kl_sum, low, high,
                                   region, ratio, entropy, entropy_kept, kept_count};
  for (int j = 0; j < kNumStats; ++j) out[j] = static_cast<float>(stats[j]);
}

template <int kTerm, bool kTokenLevel, bool kSafe>
void backward_row(const Inputs& in, int64_t row, const float* weights, float row_weight,
                  float beta, bool has_kl, const float* entropy_weights, float* grad_rows,
                  float* grad_entropy_rows) {
  const RowRatio r = row_ratio(in, row);
  const int64_t start = row * in.length;
  const uint8_t *mask = in.mask + start, *emask = in.emask + start;
  const float *lp = in.logprobs + start, *old = in.old + start, *adv = in.adv + start;
  const float* ref = has_kl ? in.ref + start : nullptr;
  constexpr bool token_level = kTokenLevel;
  const bool bias = in.bias;
  const int estimator = in.estimator;
  const Params params = in.params;
  float* grad = grad_rows + start;
  float through_row = 0.0f;
  if (!token_level) {  // R_b = Σ m·(em·dP/dw + β·[bias]·kl), then dw_b/dlogp_t = w_b (/ n_b)
    float row_sum = 0.0f;
#pragma omp simd simdlen(8) reduction(+ : row_sum)
    for (int64_t t = 0; t < in.length; ++t) {
      const bool keep = mask[t] != 0, kept = keep & (emask[t] != 0);
      const float logp_raw = lp[t], adv_raw = adv[t];
      const float logp = keep ? logp_raw : 0.0f;
      const Term term = policy_term<kTerm, kSafe>(r.ratio, keep ? adv_raw : 0.0f, logp,
                                                  r.vespo_log_w, params);
      if constexpr (kSafe) {
        row_sum += kept ? times(weights[t], term.d_ratio) : 0.0f;
      } else {
        row_sum += kept ? term.d_ratio : 0.0f;
      }
    }
    if (has_kl && bias) {
#pragma omp simd simdlen(8) reduction(+ : row_sum)
      for (int64_t t = 0; t < in.length; ++t) {
        const bool keep = mask[t] != 0;
        const float logp_raw = lp[t], ref_raw = ref[t];
        const float logp = keep ? logp_raw : 0.0f;
        row_sum += keep ? beta * kl_value(logp, keep ? ref_raw : 0.0f, estimator) : 0.0f;
      }
    }
    through_row = mul<kSafe>(static_cast<float>(row_sum), r.ratio);
    if (in.level == 1) through_row /= static_cast<float>(r.count > 1.0 ? r.count : 1.0);
  }
#pragma omp simd simdlen(8)
  for (int64_t t = 0; t < in.length; ++t) {
    const TokenTerm at = token_term<kTerm, kTokenLevel, kSafe>(mask, emask, lp, old, adv, weights,
                                                               t, r, params);
    const bool keep = at.keep, kept = at.kept;
    const float w = at.w;
    const Term term = at.term;
    const float d_ratio = kept ? term.d_ratio : 0.0f;
    const float g = (kept ? term.direct : 0.0f) +
                    (token_level ? mul<kSafe>(d_ratio, w) : through_row);
    grad[t] = keep ? g * row_weight : 0.0f;
  }
  if (has_kl) {
#pragma omp simd simdlen(8)
    for (int64_t t = 0; t < in.length; ++t) {
      const bool keep = mask[t] != 0;
      const float logp_raw = lp[t], old_raw = old[t], ref_raw = ref[t], grad_raw = grad[t];
      const float logp = keep ? logp_raw : 0.0f;
      const float reference = keep ? ref_raw : 0.0f;
      const float w = ratio_at<kTokenLevel>(keep, logp, old_raw, r.ratio);
      float g = mul<kSafe>(beta * kl_slope(logp, reference, estimator), bias ? w : 1.0f);
      g += token_level && bias ? mul<kSafe>(beta * kl_value(logp, reference, estimator), w) : 0.0f;
      grad[t] = grad_raw + (keep ? g * row_weight : 0.0f);
    }
  }
  if (grad_entropy_rows != nullptr) {
    float* grad_entropy = grad_entropy_rows + start;
    const float weight = entropy_weights[row];
#pragma omp simd simdlen(8)
    for (int64_t t = 0; t < in.length; ++t) grad_entropy[t] = (mask[t] & emask[t]) != 0 ? weight : 0.0f;
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

constexpr int64_t kRowGrain = 4;  // rows per parallel_for task
constexpr int kPolicyStat = 3, kKlStat = 4;  // POLICY_ROW_STATS' "policy" and "kl"

// Whether one of the n values is NaN: a row the plain loops must give to the safe ones.
bool has_nan(const float* values, int64_t n) {
  float nan_count = 0.0f;
#pragma omp simd simdlen(8) reduction(+ : nan_count)
  for (int64_t t = 0; t < n; ++t) nan_count += values[t] != values[t] ? 1.0f : 0.0f;
  return nan_count > 0.0f;
}

// Calls row_body(term_tag, level_tag, row) for every row, in parallel: the runtime term id and
// level become compile-time tags (std::integral_constant), so each row loop is specialised.
template <typename RowBody>
void for_each_row(int64_t term_id, bool token_level, int64_t rows, RowBody row_body) {
  with_term(term_id, [&](auto term_tag) {
    const auto over_rows = [&](auto level_tag) {
      at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) row_body(term_tag, level_tag, row);
      });
    };
    if (token_level) over_rows(std::integral_constant<bool, true>{});
    else over_rows(std::integral_constant<bool, false>{});
  });
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

const uint8_t* bool_data(const at::Tensor& tensor, const at::Tensor& like, const char* name) {
  TORCH_CHECK(tensor.device().is_cpu() && tensor.scalar_type() == at::kBool &&
                  tensor.is_contiguous() && tensor.sizes() == like.sizes(),
              "pyalign_C: ", name, " must be a contiguous bool CPU tensor of shape ", like.sizes());
  return reinterpret_cast<const uint8_t*>(tensor.data_ptr<bool>());
}

Inputs make_inputs(const at::Tensor& logprobs, const at::Tensor& old, const at::Tensor& adv,
                   const at::Tensor& mask, const c10::optional<at::Tensor>& emask,
                   const c10::optional<at::Tensor>& ref, const c10::optional<at::Tensor>& entropy,
                   const c10::optional<at::Tensor>& weights,
                   const c10::optional<at::Tensor>& log_weights, const std::string& level,
                   const std::vector<double>& params, int64_t estimator, bool bias) {
  TORCH_CHECK(logprobs.dim() == 2, "pyalign_C: logprobs must be [B, T]");
  TORCH_CHECK(params.size() == 9, "pyalign_C: policy params must hold 9 floats");
  TORCH_CHECK(level == "token" || level == "sequence" || level == "sequence_sum",
              "pyalign_C: level must be token, sequence or sequence_sum, got ", level);
  TORCH_CHECK(estimator >= 1 && estimator <= 3, "pyalign_C: estimator id must be 1..3");
  Inputs in{};
  in.logprobs = float_data(logprobs, logprobs, "logprobs");
  in.old = float_data(old, logprobs, "old_logprobs");
  in.adv = float_data(adv, logprobs, "advantages (per token: the adapter expands a [B] one)");
  in.mask = bool_data(mask, logprobs, "mask");
  in.emask = emask.has_value() && emask->defined() ? bool_data(*emask, logprobs, "entropy_mask")
                                                   : in.mask;
  in.ref = optional_float(ref, logprobs, "ref_logprobs");
  in.entropy = optional_float(entropy, logprobs, "entropy");
  in.weights = optional_float(weights, logprobs, "policy_weights");
  in.log_weights = optional_float(log_weights, logprobs.select(1, 0), "sampler_log_weights");
  in.length = logprobs.size(1);
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

void policy_forward_out(const at::Tensor& logprobs, const at::Tensor& old, const at::Tensor& adv,
                        const at::Tensor& mask, const c10::optional<at::Tensor>& emask,
                        const c10::optional<at::Tensor>& ref,
                        const c10::optional<at::Tensor>& entropy,
                        const c10::optional<at::Tensor>& weights,
                        const c10::optional<at::Tensor>& log_weights, int64_t term_id,
                        const std::string& level, std::vector<double> params, int64_t estimator,
                        bool bias, at::Tensor& stats) {
  const Inputs in = make_inputs(logprobs, old, adv, mask, emask, ref, entropy, weights,
                                log_weights, level, params, estimator, bias);
  const int64_t rows = logprobs.size(0);
  TORCH_CHECK(stats.device().is_cpu() && stats.scalar_type() == at::kFloat &&
                  stats.is_contiguous() && stats.dim() == 2 && stats.size(0) == rows &&
                  stats.size(1) == kNumStats,
              "pyalign_C: stats must be a contiguous float32 CPU tensor of shape [B, ", kNumStats,
              "]");
  float* out = stats.data_ptr<float>();
  const std::vector<float> ones(static_cast<size_t>(in.length), 1.0f);
  for_each_row(term_id, in.level == 0, rows, [&](auto term_tag, auto level_tag, int64_t row) {
    constexpr int kTerm = decltype(term_tag)::value;
    constexpr bool kTokenLevel = decltype(level_tag)::value;
    float* row_out = out + row * kNumStats;
    if (in.weights == nullptr) {
      forward_row<kTerm, kTokenLevel, false>(in, row, nullptr, row_out);
      if (!std::isnan(row_out[kPolicyStat]) && !std::isnan(row_out[kKlStat])) return;
    }
    forward_row<kTerm, kTokenLevel, true>(in, row, row_weights_of(in, row, ones), row_out);
  });
}

at::Tensor policy_forward(const at::Tensor& logprobs, const at::Tensor& old, const at::Tensor& adv,
                          const at::Tensor& mask, const c10::optional<at::Tensor>& emask,
                          const c10::optional<at::Tensor>& ref,
                          const c10::optional<at::Tensor>& entropy,
                          const c10::optional<at::Tensor>& weights,
                          const c10::optional<at::Tensor>& log_weights, int64_t term_id,
                          const std::string& level, std::vector<double> params, int64_t estimator,
                          bool bias) {
  at::Tensor stats = at::empty({logprobs.size(0), kNumStats}, logprobs.options().dtype(at::kFloat));
  policy_forward_out(logprobs, old, adv, mask, emask, ref, entropy, weights, log_weights, term_id,
                     level, params, estimator, bias, stats);
  return stats;
}

void policy_backward_out(const at::Tensor& row_weights, const c10::optional<at::Tensor>& entropy_weights,
                         const at::Tensor& logprobs, const at::Tensor& old, const at::Tensor& adv,
                         const at::Tensor& mask, const c10::optional<at::Tensor>& emask,
                         const c10::optional<at::Tensor>& ref,
                         const c10::optional<at::Tensor>& policy_weights,
                         const c10::optional<at::Tensor>& log_weights, int64_t term_id,
                         const std::string& level, std::vector<double> params, double beta,
                         int64_t estimator, bool bias, at::Tensor& grad,
                         at::Tensor& grad_entropy) {
  const Inputs in = make_inputs(logprobs, old, adv, mask, emask, ref, c10::nullopt, policy_weights,
                                log_weights, level, params, estimator, bias);
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
  const std::vector<float> ones(static_cast<size_t>(in.length), 1.0f);
  for_each_row(term_id, in.level == 0, rows, [&](auto term_tag, auto level_tag, int64_t row) {
    constexpr int kTerm = decltype(term_tag)::value;
    constexpr bool kTokenLevel = decltype(level_tag)::value;
    if (in.weights == nullptr) {
      backward_row<kTerm, kTokenLevel, false>(in, row, nullptr, weights[row], beta_f, has_kl,
                                              entropy_w, grad_out, grad_entropy_out);
      if (!has_nan(grad_out + row * in.length, in.length)) return;
    }
    backward_row<kTerm, kTokenLevel, true>(in, row, row_weights_of(in, row, ones), weights[row],
                                           beta_f, has_kl, entropy_w, grad_out, grad_entropy_out);
  });
}

std::tuple<at::Tensor, at::Tensor> policy_backward(
    const at::Tensor& row_weights, const c10::optional<at::Tensor>& entropy_weights,
    const at::Tensor& logprobs, const at::Tensor& old, const at::Tensor& adv,
    const at::Tensor& mask, const c10::optional<at::Tensor>& emask,
    const c10::optional<at::Tensor>& ref, const c10::optional<at::Tensor>& policy_weights,
    const c10::optional<at::Tensor>& log_weights, int64_t term_id, const std::string& level,
    std::vector<double> params, double beta, int64_t estimator, bool bias) {
  at::Tensor grad = at::empty(logprobs.sizes(), logprobs.options().dtype(at::kFloat));
  const bool with_entropy = entropy_weights.has_value() && entropy_weights->defined();
  at::Tensor grad_entropy = with_entropy ? at::empty(logprobs.sizes(), grad.options())
                                         : at::empty({0}, grad.options());
  policy_backward_out(row_weights, entropy_weights, logprobs, old, adv, mask, emask, ref,
                      policy_weights, log_weights, term_id, level, params, beta, estimator, bias,
                      grad, grad_entropy);
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
