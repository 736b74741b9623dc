// Per-token log-probs (and entropy) of the label under softmax(logits / T), CPU backend.
//
// forward: one streaming pass per row. The row goes by blocks of kBlock elements that stay in
// L1: a max pass over the block, then an exp-sum pass relative to the running max m of the raw
// logits (online logsumexp, rescaled only when a block raises the max). Everything is computed
// from s = (z - m) / T <= 0: log p_y = s_y - log sum exp(s) keeps fp32 accuracy at any common
// offset of the logits (z/T - logsumexp(z/T) with both ~1e4 would lose 4 digits), never overflows where
// z / T would, and is <= 0 (the clamp below only removes rounding). Saves the row stats
// (m, log sum exp(s)) [N, 2]. Reads logits once from memory: N*V*sizeof(dtype) bytes, writes
// 3-4 floats per row. Ignored rows are not read: outputs 0.
// backward: one pass per row, log p = (z - m) / T - log sum exp recomputed from the saved
// stats; reads the logits once and writes the gradient once (into the logits buffer itself
// when in place). Ignored rows are not read: gradient exactly +0.
// backward over a column slice (logprobs_backward_columns_, in place): the same per-element
// gradient for logits[:, c0:c0+W] of a wider vocabulary, the row stats being those of the whole
// row; the label term lands only where the label falls in the slice. The chunked head
// (pyalign/_chunked_head.py) walks the vocabulary with it, so its weight-gradient
// matmuls run over all tokens at once.
// Threads: rows split over at::parallel_for (OpenMP); each row is one thread's serial work, so
// results do not depend on the thread count. Inner loops are `omp simd` (fp32 accumulation).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>

#include "../common/dtype_convert.h"
#include "../common/softmax_math.h"

namespace pyalign {
namespace {

constexpr int64_t kBlock = 2048;  // 8 KiB of fp32: two passes over it stay in L1

struct RowStats {
  float max;      // m = max_v z_v of the raw logits (-inf for a row of -inf)
  float log_sum;  // log sum_v exp((z_v - m) / T) >= 0
  float entropy;
};

template <typename scalar_t, bool kEntropy>
RowStats row_logsumexp(const scalar_t* row, int64_t vocab, float inv_temperature) {
  float running_max = -INFINITY;  // of the raw logits z
  float sum = 0.0f;       // sum of exp(s), s = (z - running_max) / T <= 0
  float weighted = 0.0f;  // sum of exp(s) * s <= 0, for the entropy
  bool saw_nan = false;
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t length = std::min(kBlock, vocab - start);
    const scalar_t* block = row + start;
    float block_max = -INFINITY;
#pragma omp simd reduction(max : block_max)
    for (int64_t i = 0; i < length; ++i) block_max = std::max(block_max, to_float(block[i]));
    if (block_max > running_max) {
      const float step = (running_max - block_max) * inv_temperature;  // < 0, may be -inf
      const float alpha = exp_nonpositive(step);
      if (alpha == 0.0f) {
        // The old terms vanish next to the new max (or there were none); 0 * inf must not
        // turn them into NaN, but a NaN already in them must survive.
        saw_nan |= std::isnan(sum) || std::isnan(weighted);
        sum = 0.0f;
        weighted = 0.0f;
      } else {
        if (kEntropy) weighted = alpha * (weighted + step * sum);
        sum *= alpha;
      }
      running_max = block_max;
    }
    if (running_max == -INFINITY) {
      // Everything so far is -inf (or NaN, which max skips): e^-inf = 0 adds nothing, but a
      // NaN must still reach the result.
      for (int64_t i = 0; i < length; ++i) saw_nan |= std::isnan(to_float(block[i]));
      continue;
    }
    const float shift = running_max;
    float block_sum = 0.0f, block_weighted = 0.0f;
#pragma omp simd reduction(+ : block_sum, block_weighted)
    for (int64_t i = 0; i < length; ++i) {
      const float shifted = (to_float(block[i]) - shift) * inv_temperature;
      const float e = exp_nonpositive(shifted);
      block_sum += e;
      if (kEntropy) block_weighted += e == 0.0f ? 0.0f : e * shifted;  // 0 * -inf = 0 here
    }
    sum += block_sum;
    weighted += block_weighted;
  }
  if (saw_nan) sum = NAN;
  const float log_sum = std::log(sum);
  // H = log S - sum e s / S: two terms >= 0 (s <= 0); `x < 0 ? 0 : x` keeps NaN.
  const float entropy = kEntropy ? log_sum - weighted / sum : 0.0f;
  return RowStats{running_max, log_sum, entropy < 0.0f ? 0.0f : entropy};
}

// d logp / dz_v = (1[v=y] - p_v) / T;  d H / dz_v = -p_v (log p_v + H) / T, with
// log p_v = (z_v - m) / T - log_sum from the saved row stats.
template <typename scalar_t, bool kEntropy>
void row_backward(const scalar_t* row, scalar_t* grad_row, int64_t vocab, int64_t label,
                  float grad_logprob, float grad_entropy, float row_max, float log_sum,
                  float entropy, float inv_temperature) {
  // The label's own gradient first: in place, its logit is overwritten by the loop. label < 0:
  // the label is outside this (column slice of the) row.
  float label_grad = 0.0f;
  if (label >= 0) {
    const float label_shifted = (to_float(row[label]) - row_max) * inv_temperature - log_sum;
    const float label_prob = exp_nonpositive(label_shifted);
    label_grad = -label_prob * grad_logprob;
    if (kEntropy && label_prob != 0.0f) label_grad -= label_prob * grad_entropy * (label_shifted + entropy);
    label_grad = (label_grad + grad_logprob) * inv_temperature;
  }

  const float scale_logprob = -grad_logprob * inv_temperature;
  const float scale_entropy = -grad_entropy * inv_temperature;
#pragma omp simd
  for (int64_t v = 0; v < vocab; ++v) {
    const float shifted = (to_float(row[v]) - row_max) * inv_temperature - log_sum;
    const float prob = exp_nonpositive(shifted);
    float grad = prob * scale_logprob;
    if (kEntropy) grad += prob == 0.0f ? 0.0f : prob * scale_entropy * (shifted + entropy);
    grad_row[v] = from_float<scalar_t>(grad);
  }
  if (label >= 0) grad_row[label] = from_float<scalar_t>(label_grad);
}

void check_logits_labels(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index,
                         bool check_range = true) {
  TORCH_CHECK(logits.dim() == 2, "pyalign_C: logits must be 2-D [N, V], got ", logits.sizes());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0),
              "pyalign_C: labels must be [N] with N = logits.size(0)");
  TORCH_CHECK(labels.scalar_type() == at::kLong, "pyalign_C: labels must be int64");
  TORCH_CHECK(logits.device().is_cpu() && labels.device().is_cpu(), "pyalign_C: CPU tensors only");
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "pyalign_C: logits must be float32, bfloat16 or float16, got ", dtype);
  const int64_t vocab = logits.size(1);
  TORCH_CHECK(vocab > 0, "pyalign_C: empty vocabulary");
  if (!check_range) return;  // a column slice: labels index the whole vocabulary
  const at::Tensor labels_c = labels.contiguous();
  const int64_t* label_data = labels_c.data_ptr<int64_t>();
  for (int64_t n = 0; n < labels_c.numel(); ++n) {
    const int64_t label = label_data[n];
    TORCH_CHECK(label == ignore_index || (label >= 0 && label < vocab),
                "pyalign_C: label ", label, " at row ", n, " is outside [0, ", vocab,
                ") and is not ignore_index=", ignore_index);
  }
}

// Rows of at least this many elements in total go to one task.
int64_t row_grain(int64_t vocab) { return std::max<int64_t>(1, 32768 / vocab); }

template <typename scalar_t>
void forward_impl(const at::Tensor& logits, const int64_t* labels, int64_t ignore_index,
                  float inv_temperature, bool with_entropy, float* logprobs, float* entropy,
                  float* stats) {
  const int64_t rows = logits.size(0), vocab = logits.size(1), row_stride = logits.stride(0);
  const scalar_t* data = logits.data_ptr<scalar_t>();
  at::parallel_for(0, rows, row_grain(vocab), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* row = data + n * row_stride;
      const int64_t label = labels[n];
      if (label == ignore_index) {  // not read: NaN/inf in a padded row cannot reach anything
        logprobs[n] = 0.0f;
        stats[2 * n] = 0.0f;
        stats[2 * n + 1] = 0.0f;
        if (with_entropy) entropy[n] = 0.0f;
        continue;
      }
      const RowStats row_stats = with_entropy ? row_logsumexp<scalar_t, true>(row, vocab, inv_temperature)
                                              : row_logsumexp<scalar_t, false>(row, vocab, inv_temperature);
      stats[2 * n] = row_stats.max;
      stats[2 * n + 1] = row_stats.log_sum;
      // s_y <= 0 <= log_sum: the clamp removes rounding above 0 only (`x > 0 ? 0 : x` keeps NaN)
      const float logprob = (to_float(row[label]) - row_stats.max) * inv_temperature - row_stats.log_sum;
      logprobs[n] = logprob > 0.0f ? 0.0f : logprob;
      if (with_entropy) entropy[n] = row_stats.entropy;
    }
  });
}

void check_output(const at::Tensor& out, int64_t rows, const char* name) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.dim() == 1 && out.size(0) == rows &&
                  out.is_contiguous() && out.device().is_cpu(),
              "pyalign_C: ", name, " must be a contiguous float32 CPU tensor of shape [", rows, "]");
}

// The row stats (m, log sum exp((z - m) / T)) travel as one [N, 2] float32 tensor.
void check_stats_output(const at::Tensor& out, int64_t rows) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.dim() == 2 && out.size(0) == rows &&
                  out.size(1) == 2 && out.is_contiguous() && out.device().is_cpu(),
              "pyalign_C: stats (the row stats) must be a contiguous float32 CPU tensor of shape [",
              rows, ", 2]");
}

void logprobs_forward_out(const at::Tensor& logits_in, const at::Tensor& labels_in,
                          int64_t ignore_index, double temperature, bool with_entropy,
                          at::Tensor& logprobs, at::Tensor& entropy, at::Tensor& stats) {
  check_logits_labels(logits_in, labels_in, ignore_index);
  TORCH_CHECK(temperature > 0, "pyalign_C: temperature must be > 0");
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const int64_t rows = logits.size(0);
  check_output(logprobs, rows, "logprobs");
  check_output(entropy, with_entropy ? rows : 0, "entropy");
  check_stats_output(stats, rows);
  const float inv_temperature = static_cast<float>(1.0 / temperature);
  const int64_t* label_data = labels.data_ptr<int64_t>();
  float* entropy_data = with_entropy ? entropy.data_ptr<float>() : nullptr;
#define PYALIGN_FORWARD(scalar_t)                                                              \
  forward_impl<scalar_t>(logits, label_data, ignore_index, inv_temperature, with_entropy,      \
                         logprobs.data_ptr<float>(), entropy_data, stats.data_ptr<float>())
  switch (logits.scalar_type()) {
    case at::kFloat: PYALIGN_FORWARD(float); break;
    case at::kBFloat16: PYALIGN_FORWARD(c10::BFloat16); break;
    default: PYALIGN_FORWARD(c10::Half);
  }
#undef PYALIGN_FORWARD
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_forward(
    const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index,
    double temperature, bool with_entropy) {
  const int64_t rows = logits.dim() == 2 ? logits.size(0) : 0;
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor logprobs = at::empty({rows}, f32);
  at::Tensor entropy = at::empty({with_entropy ? rows : 0}, f32);
  at::Tensor stats = at::empty({rows, 2}, f32);
  logprobs_forward_out(logits, labels, ignore_index, temperature, with_entropy, logprobs, entropy, stats);
  return std::make_tuple(logprobs, entropy, stats);
}

at::Tensor float_rows(const at::Tensor& tensor, int64_t rows, const char* name) {
  TORCH_CHECK(tensor.dim() == 1 && tensor.size(0) == rows, "pyalign_C: ", name, " must be [N]");
  TORCH_CHECK(tensor.device().is_cpu(), "pyalign_C: ", name, " must be a CPU tensor");
  return tensor.to(at::kFloat).contiguous();
}

template <typename scalar_t>
void backward_impl(const at::Tensor& logits, at::Tensor& grad_logits, const int64_t* labels,
                   int64_t ignore_index, float inv_temperature, const float* grad_logprobs,
                   const float* grad_entropy, const float* stats, const float* entropy,
                   int64_t column_start) {
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  const int64_t row_stride = logits.stride(0), grad_row_stride = grad_logits.stride(0);
  const scalar_t* data = logits.data_ptr<scalar_t>();
  scalar_t* grad_data = grad_logits.data_ptr<scalar_t>();
  at::parallel_for(0, rows, row_grain(vocab), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* row = data + n * row_stride;
      scalar_t* grad_row = grad_data + n * grad_row_stride;
      if (labels[n] == ignore_index) {
        std::memset(static_cast<void*>(grad_row), 0, sizeof(scalar_t) * vocab);  // +0.0 in every dtype
        continue;
      }
      const int64_t local = labels[n] - column_start;
      const int64_t label = local >= 0 && local < vocab ? local : -1;
      if (grad_entropy != nullptr) {
        row_backward<scalar_t, true>(row, grad_row, vocab, label, grad_logprobs[n],
                                     grad_entropy[n], stats[2 * n], stats[2 * n + 1], entropy[n],
                                     inv_temperature);
      } else {
        row_backward<scalar_t, false>(row, grad_row, vocab, label, grad_logprobs[n], 0.0f,
                                      stats[2 * n], stats[2 * n + 1], 0.0f, inv_temperature);
      }
    }
  });
}

void backward_into(const at::Tensor& grad_logprobs_in, const c10::optional<at::Tensor>& grad_entropy_in,
                   const at::Tensor& logits, at::Tensor& grad_logits, const at::Tensor& labels_in,
                   const at::Tensor& stats_in, const c10::optional<at::Tensor>& entropy_in,
                   int64_t ignore_index, double temperature, int64_t column_start = 0,
                   bool column_slice = false) {
  check_logits_labels(logits, labels_in, ignore_index, !column_slice);
  TORCH_CHECK(temperature > 0, "pyalign_C: temperature must be > 0");
  TORCH_CHECK(logits.stride(1) == 1 && grad_logits.stride(1) == 1,
              "pyalign_C: logits rows must be contiguous");
  TORCH_CHECK(grad_logits.sizes() == logits.sizes() && grad_logits.scalar_type() == logits.scalar_type() &&
                  grad_logits.device().is_cpu(),
              "pyalign_C: grad_logits must match logits in shape and dtype");
  const int64_t rows = logits.size(0);
  const bool with_entropy = grad_entropy_in.has_value() && grad_entropy_in->defined();
  TORCH_CHECK(!with_entropy || (entropy_in.has_value() && entropy_in->defined()),
              "pyalign_C: grad_entropy needs the saved entropy");
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor grad_logprobs = float_rows(grad_logprobs_in, rows, "grad_logprobs");
  TORCH_CHECK(stats_in.dim() == 2 && stats_in.size(0) == rows && stats_in.size(1) == 2 && stats_in.device().is_cpu(),
              "pyalign_C: stats (the row stats) must be a [N, 2] CPU tensor");
  const at::Tensor stats = stats_in.to(at::kFloat).contiguous();
  at::Tensor grad_entropy, entropy;
  if (with_entropy) {
    grad_entropy = float_rows(*grad_entropy_in, rows, "grad_entropy");
    entropy = float_rows(*entropy_in, rows, "entropy");
  }
  const float inv_temperature = static_cast<float>(1.0 / temperature);
  const float* grad_entropy_data = with_entropy ? grad_entropy.data_ptr<float>() : nullptr;
  const float* entropy_data = with_entropy ? entropy.data_ptr<float>() : nullptr;
#define PYALIGN_BACKWARD(scalar_t)                                                              \
  backward_impl<scalar_t>(logits, grad_logits, labels.data_ptr<int64_t>(), ignore_index,        \
                          inv_temperature, grad_logprobs.data_ptr<float>(), grad_entropy_data,  \
                          stats.data_ptr<float>(), entropy_data, column_start)
  switch (logits.scalar_type()) {
    case at::kFloat: PYALIGN_BACKWARD(float); break;
    case at::kBFloat16: PYALIGN_BACKWARD(c10::BFloat16); break;
    default: PYALIGN_BACKWARD(c10::Half);
  }
#undef PYALIGN_BACKWARD
}

at::Tensor logprobs_backward(const at::Tensor& grad_logprobs, const c10::optional<at::Tensor>& grad_entropy,
                             const at::Tensor& logits_in, const at::Tensor& labels,
                             const at::Tensor& stats, const c10::optional<at::Tensor>& entropy,
                             int64_t ignore_index, double temperature) {
  const at::Tensor logits = logits_in.stride(-1) == 1 ? logits_in : logits_in.contiguous();
  at::Tensor grad_logits = at::empty(logits.sizes(), logits.options());
  backward_into(grad_logprobs, grad_entropy, logits, grad_logits, labels, stats, entropy,
                ignore_index, temperature);
  return grad_logits;
}

void logprobs_backward_(const at::Tensor& grad_logprobs, const c10::optional<at::Tensor>& grad_entropy,
                        at::Tensor& logits, const at::Tensor& labels, const at::Tensor& stats,
                        const c10::optional<at::Tensor>& entropy, int64_t ignore_index,
                        double temperature) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(-1) == 1,
              "pyalign_C: in-place backward needs logits with contiguous rows");
  backward_into(grad_logprobs, grad_entropy, logits, logits, labels, stats, entropy, ignore_index,
                temperature);
}

void logprobs_backward_columns_(const at::Tensor& grad_logprobs,
                                const c10::optional<at::Tensor>& grad_entropy, at::Tensor& logits,
                                const at::Tensor& labels, const at::Tensor& stats,
                                const c10::optional<at::Tensor>& entropy, int64_t ignore_index,
                                double temperature, int64_t column_start) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(-1) == 1,
              "pyalign_C: in-place backward needs logits with contiguous rows");
  TORCH_CHECK(column_start >= 0, "pyalign_C: column_start must be >= 0");
  backward_into(grad_logprobs, grad_entropy, logits, logits, labels, stats, entropy, ignore_index,
                temperature, column_start, true);
}

void logprobs_backward_out(const at::Tensor& grad_logprobs, const c10::optional<at::Tensor>& grad_entropy,
                           const at::Tensor& logits_in, const at::Tensor& labels, const at::Tensor& stats,
                           const c10::optional<at::Tensor>& entropy, int64_t ignore_index,
                           double temperature, at::Tensor& grad_logits) {
  const at::Tensor logits = logits_in.stride(-1) == 1 ? logits_in : logits_in.contiguous();
  backward_into(grad_logprobs, grad_entropy, logits, grad_logits, labels, stats, entropy,
                ignore_index, temperature);
}

at::Tensor exp_nonpositive_op(const at::Tensor& input) {
  TORCH_CHECK(input.scalar_type() == at::kFloat && input.device().is_cpu(),
              "pyalign_C: exp_nonpositive takes a CPU float32 tensor");
  const at::Tensor x = input.contiguous();
  at::Tensor out = at::empty_like(x);
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t count = x.numel();
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) dst[i] = exp_nonpositive(src[i]);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyalign_C, CPU, m) {
  m.impl("logprobs_forward", &logprobs_forward);
  m.impl("logprobs_forward_out", &logprobs_forward_out);
  m.impl("logprobs_backward_out", &logprobs_backward_out);
  m.impl("logprobs_backward", &logprobs_backward);
  m.impl("logprobs_backward_", &logprobs_backward_);
  m.impl("logprobs_backward_columns_", &logprobs_backward_columns_);
  m.impl("exp_nonpositive", &exp_nonpositive_op);
}

}  // namespace pyalign
