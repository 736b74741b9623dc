// Multi-tensor weight updates in place (lerp, copy, bema) over lists of CPU tensors: lerp
// t = t + w*(s - t), copy t = s. pyalign.ema_ arrives as lerp with w = 1 - decay, computed in
// double by the op layer (accurate at decay 0.999999, see multi_tensor.h).
// bema (pyalign.bema_, docs/algorithms.md "BEMA"), over four lists in one pass: ema = lerp(ema,
// param, beta), stored; target = ema + alpha * (param - init).
// fp32 math, one rounding into each written tensor's dtype; the tensors may differ in dtype
// (fp32/bf16/fp16; bema's ema and init share one).
// Memory traffic: reads target and source once, writes target once (copy: no target read);
// bema reads ema, param and init once and writes ema and target once.
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

// ------------------------------------------------------------------------------ bema

struct BemaTensors {
  void* target;
  void* ema;
  const void* param;
  const void* init;
};

using BemaChunkFn = void (*)(const BemaTensors& tensors, ChunkRange range, bool aligned, float alpha,
                             float beta);

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) with T the C++ type of a supported dtype.
template <typename Fn>
BemaChunkFn with_float_type(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(TypeTag<float>{});
    case at::kBFloat16: return fn(TypeTag<c10::BFloat16>{});
    default: return fn(TypeTag<c10::Half>{});
  }
}

template <typename target_t, typename state_t, typename param_t>
inline void bema_element(target_t* target, state_t* ema, const param_t* param, const state_t* init,
                         int64_t i, float alpha, float beta) {
  const float theta = to_float(param[i]);
  const state_t stored = from_float<state_t>(weight_update<WeightOp::kLerp>(to_float(ema[i]), theta, beta));
  ema[i] = stored;
  target[i] = from_float<target_t>(bema_target(to_float(stored), theta, to_float(init[i]), alpha));
}

template <typename target_t, typename state_t, typename param_t>
void bema_chunk(const BemaTensors& tensors, ChunkRange range, bool aligned, float alpha, float beta) {
  target_t* target = static_cast<target_t*>(tensors.target);
  state_t* ema = static_cast<state_t*>(tensors.ema);
  const param_t* param = static_cast<const param_t*>(tensors.param);
  const state_t* init = static_cast<const state_t*>(tensors.init);
  const int64_t vec = vector_elements3(sizeof(target_t), sizeof(state_t), sizeof(param_t));
  const int64_t vector_end = vector_split(range, vec, aligned).tail_begin;
#pragma omp simd
  for (int64_t i = range.begin; i < vector_end; ++i) {
    bema_element(target, ema, param, init, i, alpha, beta);
  }
  for (int64_t i = vector_end; i < range.end; ++i) {
    bema_element(target, ema, param, init, i, alpha, beta);
  }
}

BemaChunkFn pick_bema(at::ScalarType target, at::ScalarType state, at::ScalarType param) {
  return with_float_type(target, [&](auto target_tag) {
    return with_float_type(state, [&](auto state_tag) {
      return with_float_type(param, [&](auto param_tag) -> BemaChunkFn {
        return &bema_chunk<typename decltype(target_tag)::type, typename decltype(state_tag)::type,
                           typename decltype(param_tag)::type>;
      });
    });
  });
}

bool bema_aligned(const at::Tensor& target, const at::Tensor& ema, const at::Tensor& param,
                  const at::Tensor& init) {
  const int64_t vec = vector_elements3(target.element_size(), ema.element_size(), param.element_size());
  auto address = [](const at::Tensor& t) { return reinterpret_cast<uint64_t>(t.data_ptr()); };
  return pair_is_vector_aligned(address(target), target.element_size(), address(ema), ema.element_size(), vec) &&
         pair_is_vector_aligned(address(param), param.element_size(), address(init), init.element_size(), vec);
}

void check_bema_lists(at::TensorList targets, at::TensorList emas, at::TensorList params,
                      at::TensorList inits, const c10::Device& device) {
  TORCH_CHECK(emas.size() == targets.size() && params.size() == targets.size() &&
                  inits.size() == targets.size(),
              "pyalign_C: bema takes lists of one length, got ", targets.size(), " targets, ",
              emas.size(), " emas, ", params.size(), " params, ", inits.size(), " inits");
  for (size_t i = 0; i < targets.size(); ++i) {
    const at::Tensor* group[4] = {&targets[i], &emas[i], &params[i], &inits[i]};
    for (const at::Tensor* tensor : group) {
      TORCH_CHECK(tensor->device() == device, "pyalign_C: bema tensor group ", i, " is not all on ", device);
      TORCH_CHECK(tensor->numel() == targets[i].numel(), "pyalign_C: bema tensor group ", i,
                  " mixes sizes (", tensor->numel(), " vs ", targets[i].numel(), " elements)");
      TORCH_CHECK(tensor->is_contiguous(), "pyalign_C: bema tensor group ", i, " is not contiguous");
      TORCH_CHECK(supported(tensor->scalar_type()), "pyalign_C: bema tensor group ", i,
                  " has an unsupported dtype ", tensor->scalar_type());
    }
    TORCH_CHECK(emas[i].scalar_type() == inits[i].scalar_type(), "pyalign_C: bema tensor group ", i,
                ": ema and init must share a dtype, got ", emas[i].scalar_type(), " and ",
                inits[i].scalar_type());
  }
}

void multi_tensor_bema_(at::TensorList targets, at::TensorList emas, at::TensorList params,
                        at::TensorList inits, double alpha, double beta, int64_t chunk_size) {
  check_bema_lists(targets, emas, params, inits, c10::Device(c10::kCPU));
  if (chunk_size <= 0) chunk_size = kCpuChunkElements;
  TORCH_CHECK(chunk_size % 8 == 0, "pyalign_C: chunk_size must be a multiple of 8");
  const int64_t count = static_cast<int64_t>(targets.size());
  std::vector<BemaChunkFn> kernels(count);
  std::vector<BemaTensors> tensors(count);
  std::vector<int64_t> chunk_prefix(count + 1, 0);
  std::vector<bool> aligned(count);
  for (int64_t i = 0; i < count; ++i) {
    kernels[i] = pick_bema(targets[i].scalar_type(), emas[i].scalar_type(), params[i].scalar_type());
    tensors[i] = BemaTensors{targets[i].data_ptr(), emas[i].data_ptr(), params[i].data_ptr(), inits[i].data_ptr()};
    aligned[i] = bema_aligned(targets[i], emas[i], params[i], inits[i]);
    chunk_prefix[i + 1] = chunk_prefix[i] + num_chunks(targets[i].numel(), chunk_size);
  }
  const float alpha_f = static_cast<float>(alpha), beta_f = static_cast<float>(beta);
  at::parallel_for(0, chunk_prefix[count], 1, [&](int64_t begin, int64_t end) {
    for (int64_t global_chunk = begin; global_chunk < end; ++global_chunk) {
      const int64_t tensor = owning_tensor(chunk_prefix.data(), count, global_chunk);
      const ChunkRange range = chunk_range(targets[tensor].numel(), chunk_size,
                                           global_chunk - chunk_prefix[tensor]);
      kernels[tensor](tensors[tensor], range, aligned[tensor], alpha_f, beta_f);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pyalign_C, CPU, m) {
  m.impl("multi_tensor_apply_", &multi_tensor_apply_);
  m.impl("multi_tensor_bema_", &multi_tensor_bema_);
}

}  // namespace pyalign
