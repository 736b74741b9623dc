// Declares the pyalign_C operator library (schemas only). The *_out variants write into
// given buffers (the tests NaN-poison them); the plain ones allocate and call them. Kernels register per dispatch key:
// CPU in csrc/cpu/*.cpp, CUDA in csrc/cuda/*.cu. Python calls torch.ops.pyalign_C.<name>.
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "common/multi_tensor.h"
#include "common/policy_stats.h"

namespace pyalign {
namespace {

// Flattened launch plan of the CUDA multi-tensor kernels, for tests on machines without a GPU:
// per launch [num_tensors, tensor indices..., num_blocks, (slot, chunk) pairs...].
std::vector<int64_t> multi_tensor_plan(std::vector<int64_t> numels, int64_t chunk_size,
                                       int64_t max_tensors, int64_t max_blocks) {
  TORCH_CHECK(chunk_size > 0 && max_tensors > 0 && max_blocks > 0,
              "pyalign_C: multi_tensor_plan needs positive sizes");
  std::vector<int64_t> flat;
  for (const LaunchPlan& launch : plan_launches(numels, chunk_size, static_cast<int>(max_tensors),
                                                static_cast<int>(max_blocks))) {
    flat.push_back(static_cast<int64_t>(launch.tensor_indices.size()));
    flat.insert(flat.end(), launch.tensor_indices.begin(), launch.tensor_indices.end());
    flat.push_back(static_cast<int64_t>(launch.blocks.size()));
    for (const LaunchBlock& block : launch.blocks) {
      flat.push_back(block.tensor_slot);
      flat.push_back(block.chunk_index);
    }
  }
  return flat;
}

// How many row stats the policy kernels write (checked against Python at load).
int64_t policy_num_stats() { return kPolicyNumStats; }

}  // namespace

TORCH_LIBRARY(pyalign_C, m) {
  m.def("logprobs_forward(Tensor logits, Tensor labels, int ignore_index, float temperature, "
        "bool with_entropy) -> (Tensor logprobs, Tensor entropy, Tensor stats)");
  m.def("logprobs_forward_out(Tensor logits, Tensor labels, int ignore_index, float temperature, "
        "bool with_entropy, Tensor(a!) logprobs, Tensor(b!) entropy, Tensor(c!) stats) -> ()");
  m.def("logprobs_backward_out(Tensor grad_logprobs, Tensor? grad_entropy, Tensor logits, "
        "Tensor labels, Tensor stats, Tensor? entropy, int ignore_index, float temperature, "
        "Tensor(a!) grad_logits) -> ()");
  m.def("logprobs_backward(Tensor grad_logprobs, Tensor? grad_entropy, Tensor logits, "
        "Tensor labels, Tensor stats, Tensor? entropy, int ignore_index, float temperature) -> Tensor");
  m.def("logprobs_backward_(Tensor grad_logprobs, Tensor? grad_entropy, Tensor(a!) logits, "
        "Tensor labels, Tensor stats, Tensor? entropy, int ignore_index, float temperature) -> ()");
  m.def("logprobs_backward_columns_(Tensor grad_logprobs, Tensor? grad_entropy, Tensor(a!) logits, "
        "Tensor labels, Tensor stats, Tensor? entropy, int ignore_index, float temperature, "
        "int column_start) -> ()");
  m.def("kl_forward(Tensor logprobs, Tensor ref_logprobs, Tensor? mask, str estimator) -> Tensor");
  m.def("kl_forward_out(Tensor logprobs, Tensor ref_logprobs, Tensor? mask, str estimator, "
        "Tensor(a!) kl) -> ()");
  m.def("kl_backward_out(Tensor grad_kl, Tensor logprobs, Tensor ref_logprobs, Tensor? mask, "
        "str estimator, Tensor(a!) grad_logprobs, Tensor(b!) grad_ref_logprobs) -> ()");
  m.def("kl_backward(Tensor grad_kl, Tensor logprobs, Tensor ref_logprobs, Tensor? mask, "
        "str estimator) -> (Tensor, Tensor)");
  m.def("policy_forward(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, "
        "Tensor? entropy_mask, Tensor? ref_logprobs, Tensor? entropy, Tensor? policy_weights, "
        "Tensor? sampler_log_weights, int term_id, str level, float[] params, int estimator, "
        "bool bias_correction) -> Tensor");
  m.def("policy_forward_out(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, "
        "Tensor? entropy_mask, Tensor? ref_logprobs, Tensor? entropy, Tensor? policy_weights, "
        "Tensor? sampler_log_weights, int term_id, str level, float[] params, int estimator, "
        "bool bias_correction, Tensor(a!) stats) -> ()");
  m.def("policy_backward(Tensor row_weights, Tensor? entropy_weights, Tensor logprobs, "
        "Tensor old_logprobs, Tensor advantages, Tensor mask, Tensor? entropy_mask, "
        "Tensor? ref_logprobs, Tensor? policy_weights, Tensor? sampler_log_weights, int term_id, "
        "str level, float[] params, float beta, int estimator, bool bias_correction) "
        "-> (Tensor, Tensor)");
  m.def("policy_backward_out(Tensor row_weights, Tensor? entropy_weights, Tensor logprobs, "
        "Tensor old_logprobs, Tensor advantages, Tensor mask, Tensor? entropy_mask, "
        "Tensor? ref_logprobs, Tensor? policy_weights, Tensor? sampler_log_weights, int term_id, "
        "str level, float[] params, float beta, int estimator, bool bias_correction, "
        "Tensor(a!) grad_logprobs, Tensor(b!) grad_entropy) -> ()");
  m.def("multi_tensor_apply_(str kind, Tensor(a!)[] targets, Tensor[] sources, float scalar, "
        "int chunk_size=0) -> ()");
  m.def("multi_tensor_bema_(Tensor(a!)[] targets, Tensor(b!)[] emas, Tensor[] params, "
        "Tensor[] inits, float alpha, float beta, int chunk_size=0) -> ()");
  m.def("exp_nonpositive(Tensor x) -> Tensor");
  m.def("policy_num_stats() -> int", &policy_num_stats);
  m.def("multi_tensor_plan(int[] numels, int chunk_size, int max_tensors, int max_blocks) -> int[]",
        &multi_tensor_plan);
}

}  // namespace pyalign
