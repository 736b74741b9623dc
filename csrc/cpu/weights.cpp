// Multi-tensor weight updates in place (lerp, copy) over lists of CPU tensors: lerp
// t = t + w*(s - t), copy t = s. pyalign.ema_ arrives as lerp with w = 1 - decay, computed in
// double by the op layer (accurate at decay 0.999999, see multi_tensor.h).
// fp32 math, one rounding into the target's dtype; targets and sources may differ in dtype
// (fp32/bf16/fp16).
// Memory traffic: reads target and source once, writes target once (copy: no target read).
// Work split: every tensor is cut into chunks (csrc/common/multi_tensor.h, the same arithmetic
// the CUDA kernels use) and at::parallel_for (OpenMP) runs over the flattened list of all
// chunks of all tensors, so small tensors batch together and large ones split over threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <vector>

#include "../common/dtype_convert.h"
#include "../common/multi_tensor.h"

namespace pyalign {
namespace {

constexpr int64_t kCpuChunkElements = 1 << 16;

using ChunkFn = void (*)(void* target, const void* source, ChunkRange range, bool aligned, float scalar);

template <typename target_t, typename source_t, WeightOp op>
void update_chunk(void* target_ptr, const void* source_ptr, ChunkRange range, bool aligned, float scalar) {
  target_t* target = static_cast<target_t*>(target_ptr);
  const source_t* source = static_cast<const source_t*>(source_ptr);
  constexpr int64_t vec = kVectorBytes / (sizeof(target_t) > sizeof(source_t) ? sizeof(target_t) : sizeof(source_t));
  const VectorSplit split = vector_split(range, vec, aligned);
  const int64_t vector_end = split.tail_begin;
#pragma omp simd
  for (int64_t i = range.begin; i < vector_end; ++i) {
    target[i] = from_float<target_t>(weight_update<op>(to_float(target[i]), to_float(source[i]), scalar));
  }
  for (int64_t i = split.tail_begin; i < range.end; ++i) {
    target[i] = from_float<target_t>(weight_update<op>(to_float(target[i]), to_float(source[i]), scalar));
  }
}

template <typename target_t, WeightOp op>
ChunkFn pick_source(at::ScalarType source) {
  switch (source) {
    case at::kFloat: return &update_chunk<target_t, float, op>;
    case at::kBFloat16: return &update_chunk<target_t, c10::BFloat16, op>;
    default: return &update_chunk<target_t, c10::Half, op>;
  }
}

template <WeightOp op>
ChunkFn pick_kernel(at::ScalarType target, at::ScalarType source) {
  switch (target) {
    case at::kFloat: return pick_source<float, op>(source);
    case at::kBFloat16: return pick_source<c10::BFloat16, op>(source);
    default: return pick_source<c10::Half, op>(source);
  }
}

bool supported(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

void multi_tensor_apply_(const std::string& kind, at::TensorList targets, at::TensorList sources,
                         double scalar, int64_t chunk_size) {
  TORCH_CHECK(targets.size() == sources.size(), "pyalign_C: ", targets.size(), " targets but ",
              sources.size(), " sources");
  TORCH_CHECK(kind == "lerp" || kind == "copy",
              "pyalign_C: kind must be lerp or copy (ema runs as lerp), got ", kind);
  if (chunk_size <= 0) chunk_size = kCpuChunkElements;
  TORCH_CHECK(chunk_size % 8 == 0, "pyalign_C: chunk_size must be a multiple of 8");
  const int64_t count = static_cast<int64_t>(targets.size());
  std::vector<ChunkFn> kernels(count);
  std::vector<int64_t> chunk_prefix(count + 1, 0);
  std::vector<bool> aligned(count);
  for (int64_t i = 0; i < count; ++i) {
    const at::Tensor& target = targets[i];
    const at::Tensor& source = sources[i];
    TORCH_CHECK(target.device().is_cpu() && source.device().is_cpu(),
                "pyalign_C: tensor pair ", i, " is not on the CPU");
    TORCH_CHECK(target.numel() == source.numel(), "pyalign_C: tensor pair ", i, " has ",
                target.numel(), " target elements but ", source.numel(), " source elements");
    TORCH_CHECK(target.is_contiguous() && source.is_contiguous(),
                "pyalign_C: tensor pair ", i, " is not contiguous");
    TORCH_CHECK(supported(target.scalar_type()) && supported(source.scalar_type()),
                "pyalign_C: tensor pair ", i, " has unsupported dtypes ", target.scalar_type(),
                " / ", source.scalar_type());
    const auto target_dtype = target.scalar_type(), source_dtype = source.scalar_type();
    kernels[i] = kind == "copy" ? pick_kernel<WeightOp::kCopy>(target_dtype, source_dtype)
                                : pick_kernel<WeightOp::kLerp>(target_dtype, source_dtype);
    const int64_t vec = vector_elements(target.element_size(), source.element_size());
    aligned[i] = pair_is_vector_aligned(reinterpret_cast<uint64_t>(target.data_ptr()), target.element_size(),
                                        reinterpret_cast<uint64_t>(source.data_ptr()), source.element_size(), vec);
    chunk_prefix[i + 1] = chunk_prefix[i] + num_chunks(target.numel(), chunk_size);
  }
  const float scalar_f = static_cast<float>(scalar);
  at::parallel_for(0, chunk_prefix[count], 1, [&](int64_t begin, int64_t end) {
    for (int64_t global_chunk = begin; global_chunk < end; ++global_chunk) {
      const int64_t tensor = owning_tensor(chunk_prefix.data(), count, global_chunk);
      const ChunkRange range = chunk_range(targets[tensor].numel(), chunk_size,
                                           global_chunk - chunk_prefix[tensor]);
      kernels[tensor](targets[tensor].data_ptr(), sources[tensor].data_ptr(), range, aligned[tensor], scalar_f);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pyalign_C, CPU, m) {
  m.impl("multi_tensor_apply_", &multi_tensor_apply_);
}

}  // namespace pyalign
