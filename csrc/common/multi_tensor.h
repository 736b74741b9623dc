// Index arithmetic of the multi-tensor weight ops (ema_/lerp_/copy_, bema_), shared verbatim by the
// CUDA kernels (csrc/cuda/weights.cu) and the CPU kernels (csrc/cpu/weights.cpp), so the CPU
// tests exercise the exact arithmetic the GPU runs.
//
// Model: every tensor is cut into chunks of `chunk_size` elements (the last one shorter). A
// chunk is one unit of work (one CUDA block, one CPU task). Inside a chunk, elements go by
// vectors of `vec` elements when both pointers are 16-byte aligned, then a scalar tail.
// On CUDA, the chunks are packed into launches: each launch carries a small table of at most
// kMaxTensorsPerLaunch tensors and kMaxBlocksPerLaunch (tensor slot, chunk) entries.
#pragma once

#include <cstdint>
#include <vector>

#include "macros.h"

namespace pyalign {

constexpr int kMaxTensorsPerLaunch = 48;
constexpr int kMaxBlocksPerLaunch = 320;
constexpr int64_t kVectorBytes = 16;

PYALIGN_HD int64_t ceil_div(int64_t numerator, int64_t denominator) {
  return (numerator + denominator - 1) / denominator;
}

// Number of chunks of a tensor with `numel` elements (0 for an empty tensor).
PYALIGN_HD int64_t num_chunks(int64_t numel, int64_t chunk_size) {
  return ceil_div(numel, chunk_size);
}

// [begin, end) element range of chunk `chunk_index` of a tensor with `numel` elements.
struct ChunkRange {
  int64_t begin;
  int64_t end;
};

PYALIGN_HD ChunkRange chunk_range(int64_t numel, int64_t chunk_size, int64_t chunk_index) {
  int64_t begin = chunk_index * chunk_size;
  int64_t end = begin + chunk_size;
  if (begin > numel) begin = numel;
  if (end > numel) end = numel;
  return ChunkRange{begin, end};
}

// Elements per 16-byte vector for the wider of the two element types: both the target and
// the source load/store whole vectors of that many elements.
PYALIGN_HD int64_t vector_elements(int64_t target_elem_bytes, int64_t source_elem_bytes) {
  int64_t widest = target_elem_bytes > source_elem_bytes ? target_elem_bytes : source_elem_bytes;
  return kVectorBytes / widest;
}

// Whether a tensor pair can use vector accesses everywhere: both base addresses aligned to the
// byte size of one vector of their element type. Chunk sizes are multiples of the vector
// length, so every chunk of an aligned pair starts aligned.
PYALIGN_HD bool pair_is_vector_aligned(uint64_t target_addr, int64_t target_elem_bytes,
                                       uint64_t source_addr, int64_t source_elem_bytes,
                                       int64_t vec) {
  uint64_t target_vec_bytes = static_cast<uint64_t>(vec * target_elem_bytes);
  uint64_t source_vec_bytes = static_cast<uint64_t>(vec * source_elem_bytes);
  return target_addr % target_vec_bytes == 0 && source_addr % source_vec_bytes == 0;
}

// Split a chunk into whole vectors and a scalar tail: vectors cover
// [begin, begin + num_vectors * vec), the tail covers [tail_begin, end).
struct VectorSplit {
  int64_t num_vectors;
  int64_t tail_begin;
};

PYALIGN_HD VectorSplit vector_split(ChunkRange range, int64_t vec, bool aligned) {
  int64_t length = range.end - range.begin;
  int64_t vectors = aligned ? length / vec : 0;
  return VectorSplit{vectors, range.begin + vectors * vec};
}

// The tensor owning global chunk `global_chunk`, given `chunk_prefix[i]` = number of chunks of
// tensors [0, i) (length num_tensors + 1). Binary search: upper_bound - 1.
PYALIGN_HD int64_t owning_tensor(const int64_t* chunk_prefix, int64_t num_tensors,
                                 int64_t global_chunk) {
  int64_t lo = 0, hi = num_tensors;  // invariant: chunk_prefix[lo] <= global_chunk < chunk_prefix[hi]
  while (hi - lo > 1) {
    int64_t mid = lo + (hi - lo) / 2;
    if (chunk_prefix[mid] <= global_chunk) lo = mid; else hi = mid;
  }
  return lo;
}

// The update each weight op applies to one element, in fp32 whatever the storage dtypes.
// There is no separate ema: pyalign.ema_ with decay d runs lerp with weight 1 - d, computed in
// double by the op layer (pyalign/ops/weights.py). The form decay*t + (1-decay)*s would round decay to fp32
// (1 - float(0.999999) is 1.3% off 1e-6) and round decay*t with an error ~u|t| that, against
// the update (1-d)(s-t), grows like 1/(1-d); t + w(s - t) keeps the update accurate to ~u.
enum class WeightOp : int { kLerp = 1, kCopy = 2 };

// Two-sided like torch.lerp: from the nearer end, so weight 1 (ema decay 0) gives exactly s
// and weight 0 exactly t (1 - weight is exact in fp32 for weight in [0.5, 1]).
template <WeightOp op>
PYALIGN_HD float weight_update(float target, float source, float weight) {
  if (op == WeightOp::kLerp) {
    const float span = source - target;
    return weight < 0.5f ? target + weight * span : source - span * (1.0f - weight);
  }
  return source;
}

// BEMA's second half (pyalign.bema_, docs/algorithms.md "BEMA"): after the EMA moved by
// weight_update<kLerp>(ema, param, beta) and was stored in its own dtype, the reference weight is
// that stored EMA plus the bias correction alpha * (param - init), in fp32.
PYALIGN_HD float bema_target(float stored_ema, float param, float init, float alpha) {
  return stored_ema + alpha * (param - init);
}

// Elements per 16-byte vector when a kernel touches tensors of three element sizes at once.
PYALIGN_HD int64_t vector_elements3(int64_t a_bytes, int64_t b_bytes, int64_t c_bytes) {
  return vector_elements(a_bytes > b_bytes ? a_bytes : b_bytes, c_bytes);
}

// Host-side launch planning (CUDA launcher; exposed to Python for the CPU tests). Plain host
// functions: nvcc's device pass parses them but never compiles them for the GPU.
struct LaunchBlock {
  int32_t tensor_slot;   // index into the launch's tensor table
  int32_t chunk_index;   // chunk of that tensor
};

struct LaunchPlan {
  std::vector<int64_t> tensor_indices;  // global tensor index of each slot
  std::vector<LaunchBlock> blocks;
};

// Pack the chunks of tensors with `numels` into launches: a launch closes when its tensor table
// or its block table is full. A tensor whose chunks straddle launches occupies a slot in each.
// Empty tensors get no slot. Chunk indices fit int32 because chunk_size >= 1024 and numel < 2^62
// would need > 2^31 chunks only past 2^41 elements; callers check.
inline std::vector<LaunchPlan> plan_launches(const std::vector<int64_t>& numels,
                                             int64_t chunk_size,
                                             int max_tensors = kMaxTensorsPerLaunch,
                                             int max_blocks = kMaxBlocksPerLaunch) {
  std::vector<LaunchPlan> launches;
  LaunchPlan current;
  for (int64_t tensor = 0; tensor < static_cast<int64_t>(numels.size()); ++tensor) {
    int64_t chunks = num_chunks(numels[tensor], chunk_size);
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      if (current.tensor_indices.empty() || current.tensor_indices.back() != tensor) {
        if (static_cast<int>(current.tensor_indices.size()) == max_tensors) {
          launches.push_back(std::move(current));
          current = LaunchPlan();
        }
        current.tensor_indices.push_back(tensor);
      }
      current.blocks.push_back(LaunchBlock{
          static_cast<int32_t>(current.tensor_indices.size() - 1), static_cast<int32_t>(chunk)});
      if (static_cast<int>(current.blocks.size()) == max_blocks) {
        launches.push_back(std::move(current));
        current = LaunchPlan();
      }
    }
  }
  if (!current.blocks.empty()) launches.push_back(std::move(current));
  return launches;
}

}  // namespace pyalign
