// Multi-tensor weight updates in place on CUDA: lerp (t = t + w*(s - t); pyalign.ema_ arrives
// as lerp with w = 1 - decay, computed in double by the op layer: accurate at decay 0.999999,
// see multi_tensor.h) and copy (t = s) over lists of tensors, fp32 math,
// mixed dtypes (fp32/bf16/fp16 targets and sources in any pairing); and bema (pyalign.bema_,
// docs/algorithms.md "BEMA") over four lists: ema = lerp(ema, param, beta), stored, then
// target = ema + alpha * (param - init), any fp32/bf16/fp16 target, state (ema and init) and
// param dtypes.
//
// Memory traffic: reads the source once, reads (lerp) and writes the target once; bema reads
// ema, param and init once and writes ema and target once.
// Launch grid: tensors are grouped by their dtypes; each group's chunks
// (kCudaChunkElements elements, csrc/common/multi_tensor.h) are packed into launches of at most
// kMaxBlocksPerLaunch blocks x kThreadsPerBlock threads, each launch carrying a by-value table
// of at most kMaxTensorsPerLaunch (bema: kBemaMaxTensorsPerLaunch) tensor pointers/sizes and one
// (tensor slot, chunk) per block.
// A block strides over its chunk with 16-byte vector loads/stores (when both tensors are
// 16-byte aligned), then a scalar tail.
//
// Built with -DPYALIGN_KERNELS_ONLY the file is the kernels alone (CUDA headers only): the tests
// compile it that way with nvcc for sm_80/sm_90 and check ptxas reports no spills.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../common/multi_tensor.h"

namespace pyalign {

constexpr int kThreadsPerBlock = 512;

struct WeightsLaunchTable {
  void* targets[kMaxTensorsPerLaunch];
  const void* sources[kMaxTensorsPerLaunch];
  int64_t numels[kMaxTensorsPerLaunch];
  bool aligned[kMaxTensorsPerLaunch];
  int32_t block_slot[kMaxBlocksPerLaunch];
  int32_t block_chunk[kMaxBlocksPerLaunch];
};
static_assert(sizeof(WeightsLaunchTable) <= 4096, "kernel parameters are limited to 4 KiB");

__device__ __forceinline__ float load_float(float value) { return value; }
__device__ __forceinline__ float load_float(__nv_bfloat16 value) { return __bfloat162float(value); }
__device__ __forceinline__ float load_float(__half value) { return __half2float(value); }

template <typename T>
__device__ __forceinline__ T store_float(float value);
template <>
__device__ __forceinline__ float store_float<float>(float value) { return value; }
template <>
__device__ __forceinline__ __nv_bfloat16 store_float<__nv_bfloat16>(float value) { return __float2bfloat16_rn(value); }
template <>
__device__ __forceinline__ __half store_float<__half>(float value) { return __float2half_rn(value); }

template <typename T, int kCount>
struct alignas(sizeof(T) * kCount) Pack {
  T values[kCount];
};

template <typename target_t, typename source_t, WeightOp op>
__global__ void __launch_bounds__(kThreadsPerBlock)
multi_tensor_weights_kernel(const WeightsLaunchTable table, int64_t chunk_size, float scalar) {
  constexpr int kVec = static_cast<int>(kVectorBytes / (sizeof(target_t) > sizeof(source_t) ? sizeof(target_t) : sizeof(source_t)));
  using TargetPack = Pack<target_t, kVec>;
  using SourcePack = Pack<source_t, kVec>;
  const int slot = table.block_slot[blockIdx.x];
  target_t* target = static_cast<target_t*>(table.targets[slot]);
  const source_t* source = static_cast<const source_t*>(table.sources[slot]);
  const ChunkRange range = chunk_range(table.numels[slot], chunk_size, table.block_chunk[blockIdx.x]);
  const VectorSplit split = vector_split(range, kVec, table.aligned[slot]);

  for (int64_t v = threadIdx.x; v < split.num_vectors; v += blockDim.x) {
    const int64_t base = range.begin + v * kVec;
    const SourcePack source_pack = *reinterpret_cast<const SourcePack*>(source + base);
    TargetPack target_pack;
    if (op != WeightOp::kCopy) target_pack = *reinterpret_cast<const TargetPack*>(target + base);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const float current = op == WeightOp::kCopy ? 0.0f : load_float(target_pack.values[k]);
      target_pack.values[k] = store_float<target_t>(weight_update<op>(current, load_float(source_pack.values[k]), scalar));
    }
    *reinterpret_cast<TargetPack*>(target + base) = target_pack;
  }
  for (int64_t i = split.tail_begin + threadIdx.x; i < range.end; i += blockDim.x) {
    const float current = op == WeightOp::kCopy ? 0.0f : load_float(target[i]);
    target[i] = store_float<target_t>(weight_update<op>(current, load_float(source[i]), scalar));
  }
}

// Every (target, source, op) combination, so a kernels-only build compiles all 18 (ema runs
// as lerp).
#define PYALIGN_INSTANTIATE_OP(T, S, OP) \
  template __global__ void multi_tensor_weights_kernel<T, S, OP>(const WeightsLaunchTable, int64_t, float);
#define PYALIGN_INSTANTIATE_PAIR(T, S)              \
  PYALIGN_INSTANTIATE_OP(T, S, WeightOp::kLerp)     \
  PYALIGN_INSTANTIATE_OP(T, S, WeightOp::kCopy)
#define PYALIGN_INSTANTIATE_TARGET(T)          \
  PYALIGN_INSTANTIATE_PAIR(T, float)           \
  PYALIGN_INSTANTIATE_PAIR(T, __nv_bfloat16)   \
  PYALIGN_INSTANTIATE_PAIR(T, __half)
PYALIGN_INSTANTIATE_TARGET(float)
PYALIGN_INSTANTIATE_TARGET(__nv_bfloat16)
PYALIGN_INSTANTIATE_TARGET(__half)

// Four pointers per tensor: a smaller table keeps the by-value parameters under 4 KiB.
constexpr int kBemaMaxTensorsPerLaunch = 24;

struct BemaLaunchTable {
  void* targets[kBemaMaxTensorsPerLaunch];
  void* emas[kBemaMaxTensorsPerLaunch];
  const void* params[kBemaMaxTensorsPerLaunch];
  const void* inits[kBemaMaxTensorsPerLaunch];
  int64_t numels[kBemaMaxTensorsPerLaunch];
  bool aligned[kBemaMaxTensorsPerLaunch];
  int32_t block_slot[kMaxBlocksPerLaunch];
  int32_t block_chunk[kMaxBlocksPerLaunch];
};
static_assert(sizeof(BemaLaunchTable) + 16 <= 4096, "kernel parameters are limited to 4 KiB");

template <typename target_t, typename state_t, typename param_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
multi_tensor_bema_kernel(const BemaLaunchTable table, int64_t chunk_size, float alpha, float beta) {
  constexpr int kVec = static_cast<int>(kVectorBytes / (sizeof(target_t) > sizeof(state_t)
      ? (sizeof(target_t) > sizeof(param_t) ? sizeof(target_t) : sizeof(param_t))
      : (sizeof(state_t) > sizeof(param_t) ? sizeof(state_t) : sizeof(param_t))));
  const int slot = table.block_slot[blockIdx.x];
  target_t* target = static_cast<target_t*>(table.targets[slot]);
  state_t* ema = static_cast<state_t*>(table.emas[slot]);
  const param_t* param = static_cast<const param_t*>(table.params[slot]);
  const state_t* init = static_cast<const state_t*>(table.inits[slot]);
  const ChunkRange range = chunk_range(table.numels[slot], chunk_size, table.block_chunk[blockIdx.x]);
  const VectorSplit split = vector_split(range, kVec, table.aligned[slot]);

  for (int64_t v = threadIdx.x; v < split.num_vectors; v += blockDim.x) {
    const int64_t base = range.begin + v * kVec;
    const Pack<param_t, kVec> param_pack = *reinterpret_cast<const Pack<param_t, kVec>*>(param + base);
    const Pack<state_t, kVec> init_pack = *reinterpret_cast<const Pack<state_t, kVec>*>(init + base);
    Pack<state_t, kVec> ema_pack = *reinterpret_cast<const Pack<state_t, kVec>*>(ema + base);
    Pack<target_t, kVec> target_pack;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const float theta = load_float(param_pack.values[k]);
      ema_pack.values[k] = store_float<state_t>(
          weight_update<WeightOp::kLerp>(load_float(ema_pack.values[k]), theta, beta));
      target_pack.values[k] = store_float<target_t>(
          bema_target(load_float(ema_pack.values[k]), theta, load_float(init_pack.values[k]), alpha));
    }
    *reinterpret_cast<Pack<state_t, kVec>*>(ema + base) = ema_pack;
    *reinterpret_cast<Pack<target_t, kVec>*>(target + base) = target_pack;
  }
  for (int64_t i = split.tail_begin + threadIdx.x; i < range.end; i += blockDim.x) {
    const float theta = load_float(param[i]);
    const state_t stored = store_float<state_t>(weight_update<WeightOp::kLerp>(load_float(ema[i]), theta, beta));
    ema[i] = stored;
    target[i] = store_float<target_t>(bema_target(load_float(stored), theta, load_float(init[i]), alpha));
  }
}

// Every (target, state, param) dtype triple: 27 kernels.
#define PYALIGN_INSTANTIATE_BEMA(T, S, P) \
  template __global__ void multi_tensor_bema_kernel<T, S, P>(const BemaLaunchTable, int64_t, float, float);
#define PYALIGN_INSTANTIATE_BEMA_STATE(T, S)        \
  PYALIGN_INSTANTIATE_BEMA(T, S, float)             \
  PYALIGN_INSTANTIATE_BEMA(T, S, __nv_bfloat16)     \
  PYALIGN_INSTANTIATE_BEMA(T, S, __half)
#define PYALIGN_INSTANTIATE_BEMA_TARGET(T)          \
  PYALIGN_INSTANTIATE_BEMA_STATE(T, float)          \
  PYALIGN_INSTANTIATE_BEMA_STATE(T, __nv_bfloat16)  \
  PYALIGN_INSTANTIATE_BEMA_STATE(T, __half)
PYALIGN_INSTANTIATE_BEMA_TARGET(float)
PYALIGN_INSTANTIATE_BEMA_TARGET(__nv_bfloat16)
PYALIGN_INSTANTIATE_BEMA_TARGET(__half)

}  // namespace pyalign

#ifndef PYALIGN_KERNELS_ONLY
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace pyalign {
namespace {

constexpr int64_t kCudaChunkElements = 1 << 16;

bool supported(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

template <typename target_t, typename source_t>
void launch_pair(WeightOp op, const WeightsLaunchTable& table, int blocks, int64_t chunk_size,
                 float scalar, cudaStream_t stream) {
  switch (op) {
    case WeightOp::kLerp:
      multi_tensor_weights_kernel<target_t, source_t, WeightOp::kLerp>
          <<<blocks, kThreadsPerBlock, 0, stream>>>(table, chunk_size, scalar);
      break;
    default:
      multi_tensor_weights_kernel<target_t, source_t, WeightOp::kCopy>
          <<<blocks, kThreadsPerBlock, 0, stream>>>(table, chunk_size, scalar);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename target_t>
void launch_target(at::ScalarType source, WeightOp op, const WeightsLaunchTable& table, int blocks,
                   int64_t chunk_size, float scalar, cudaStream_t stream) {
  switch (source) {
    case at::kFloat: launch_pair<target_t, float>(op, table, blocks, chunk_size, scalar, stream); break;
    case at::kBFloat16: launch_pair<target_t, __nv_bfloat16>(op, table, blocks, chunk_size, scalar, stream); break;
    default: launch_pair<target_t, __half>(op, table, blocks, chunk_size, scalar, stream);
  }
}

void launch(at::ScalarType target, at::ScalarType source, WeightOp op, const WeightsLaunchTable& table,
            int blocks, int64_t chunk_size, float scalar, cudaStream_t stream) {
  switch (target) {
    case at::kFloat: launch_target<float>(source, op, table, blocks, chunk_size, scalar, stream); break;
    case at::kBFloat16: launch_target<__nv_bfloat16>(source, op, table, blocks, chunk_size, scalar, stream); break;
    default: launch_target<__half>(source, op, table, blocks, chunk_size, scalar, stream);
  }
}

void multi_tensor_apply_cuda_(const std::string& kind, at::TensorList targets, at::TensorList sources,
                              double scalar, int64_t chunk_size) {
  TORCH_CHECK(targets.size() == sources.size(), "pyalign_C: ", targets.size(), " targets but ",
              sources.size(), " sources");
  TORCH_CHECK(kind == "lerp" || kind == "copy",
              "pyalign_C: kind must be lerp or copy (ema runs as lerp), got ", kind);
  const WeightOp op = kind == "copy" ? WeightOp::kCopy : WeightOp::kLerp;
  if (chunk_size <= 0) chunk_size = kCudaChunkElements;
  TORCH_CHECK(chunk_size % 8 == 0, "pyalign_C: chunk_size must be a multiple of 8");
  if (targets.empty()) return;
  const at::Device device = targets[0].device();
  std::map<std::pair<int, int>, std::vector<int64_t>> groups;  // (target, source dtype) -> pairs
  for (size_t i = 0; i < targets.size(); ++i) {
    const at::Tensor& target = targets[i];
    const at::Tensor& source = sources[i];
    TORCH_CHECK(target.is_cuda() && target.device() == device && source.device() == device,
                "pyalign_C: tensor pair ", i, " is not on ", device);
    TORCH_CHECK(target.numel() == source.numel(), "pyalign_C: tensor pair ", i, " has ",
                target.numel(), " target elements but ", source.numel(), " source elements");
    TORCH_CHECK(target.is_contiguous() && source.is_contiguous(),
                "pyalign_C: tensor pair ", i, " is not contiguous");
    TORCH_CHECK(supported(target.scalar_type()) && supported(source.scalar_type()),
                "pyalign_C: tensor pair ", i, " has unsupported dtypes ", target.scalar_type(),
                " / ", source.scalar_type());
    TORCH_CHECK(num_chunks(target.numel(), chunk_size) < std::numeric_limits<int32_t>::max(),
                "pyalign_C: tensor pair ", i, " is too large");
    groups[{static_cast<int>(target.scalar_type()), static_cast<int>(source.scalar_type())}]
        .push_back(static_cast<int64_t>(i));
  }
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const float scalar_f = static_cast<float>(scalar);
  for (const auto& [dtypes, members] : groups) {
    const auto target_dtype = static_cast<at::ScalarType>(dtypes.first);
    const auto source_dtype = static_cast<at::ScalarType>(dtypes.second);
    std::vector<int64_t> numels;
    for (int64_t index : members) numels.push_back(targets[index].numel());
    for (const LaunchPlan& plan : plan_launches(numels, chunk_size)) {
      WeightsLaunchTable table{};
      for (size_t slot = 0; slot < plan.tensor_indices.size(); ++slot) {
        const int64_t index = members[plan.tensor_indices[slot]];
        const at::Tensor& target = targets[index];
        const at::Tensor& source = sources[index];
        table.targets[slot] = target.data_ptr();
        table.sources[slot] = source.data_ptr();
        table.numels[slot] = target.numel();
        const int64_t vec = vector_elements(target.element_size(), source.element_size());
        table.aligned[slot] = pair_is_vector_aligned(
            reinterpret_cast<uint64_t>(target.data_ptr()), target.element_size(),
            reinterpret_cast<uint64_t>(source.data_ptr()), source.element_size(), vec);
      }
      for (size_t block = 0; block < plan.blocks.size(); ++block) {
        table.block_slot[block] = plan.blocks[block].tensor_slot;
        table.block_chunk[block] = plan.blocks[block].chunk_index;
      }
      launch(target_dtype, source_dtype, op, table, static_cast<int>(plan.blocks.size()),
             chunk_size, scalar_f, stream);
    }
  }
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) with T the CUDA type of a supported dtype.
template <typename Fn>
void with_cuda_type(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(TypeTag<float>{}); break;
    case at::kBFloat16: fn(TypeTag<__nv_bfloat16>{}); break;
    default: fn(TypeTag<__half>{});
  }
}

void launch_bema(at::ScalarType target, at::ScalarType state, at::ScalarType param,
                 const BemaLaunchTable& table, int blocks, int64_t chunk_size, float alpha, float beta,
                 cudaStream_t stream) {
  with_cuda_type(target, [&](auto target_tag) {
    with_cuda_type(state, [&](auto state_tag) {
      with_cuda_type(param, [&](auto param_tag) {
        multi_tensor_bema_kernel<typename decltype(target_tag)::type, typename decltype(state_tag)::type,
                                 typename decltype(param_tag)::type>
            <<<blocks, kThreadsPerBlock, 0, stream>>>(table, chunk_size, alpha, beta);
      });
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_bema_lists(at::TensorList targets, at::TensorList emas, at::TensorList params,
                      at::TensorList inits, int64_t chunk_size) {
  TORCH_CHECK(emas.size() == targets.size() && params.size() == targets.size() &&
                  inits.size() == targets.size(),
              "pyalign_C: bema takes lists of one length, got ", targets.size(), " targets, ",
              emas.size(), " emas, ", params.size(), " params, ", inits.size(), " inits");
  for (size_t i = 0; i < targets.size(); ++i) {
    const at::Tensor* group[4] = {&targets[i], &emas[i], &params[i], &inits[i]};
    for (const at::Tensor* tensor : group) {
      TORCH_CHECK(tensor->is_cuda() && tensor->device() == targets[0].device(),
                  "pyalign_C: bema tensor group ", i, " is not all on ", targets[0].device());
      TORCH_CHECK(tensor->numel() == targets[i].numel(), "pyalign_C: bema tensor group ", i,
                  " mixes sizes (", tensor->numel(), " vs ", targets[i].numel(), " elements)");
      TORCH_CHECK(tensor->is_contiguous(), "pyalign_C: bema tensor group ", i, " is not contiguous");
      TORCH_CHECK(supported(tensor->scalar_type()), "pyalign_C: bema tensor group ", i,
                  " has an unsupported dtype ", tensor->scalar_type());
    }
    TORCH_CHECK(emas[i].scalar_type() == inits[i].scalar_type(), "pyalign_C: bema tensor group ", i,
                ": ema and init must share a dtype, got ", emas[i].scalar_type(), " and ",
                inits[i].scalar_type());
    TORCH_CHECK(num_chunks(targets[i].numel(), chunk_size) < std::numeric_limits<int32_t>::max(),
                "pyalign_C: bema tensor group ", i, " is too large");
  }
}

void multi_tensor_bema_cuda_(at::TensorList targets, at::TensorList emas, at::TensorList params,
                             at::TensorList inits, double alpha, double beta, int64_t chunk_size) {
  if (chunk_size <= 0) chunk_size = kCudaChunkElements;
  TORCH_CHECK(chunk_size % 8 == 0, "pyalign_C: chunk_size must be a multiple of 8");
  check_bema_lists(targets, emas, params, inits, chunk_size);
  if (targets.empty()) return;
  const at::Device device = targets[0].device();
  std::map<std::tuple<int, int, int>, std::vector<int64_t>> groups;  // dtypes -> tensor groups
  for (size_t i = 0; i < targets.size(); ++i) {
    groups[{static_cast<int>(targets[i].scalar_type()), static_cast<int>(emas[i].scalar_type()),
            static_cast<int>(params[i].scalar_type())}].push_back(static_cast<int64_t>(i));
  }
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  for (const auto& [dtypes, members] : groups) {
    std::vector<int64_t> numels;
    for (int64_t index : members) numels.push_back(targets[index].numel());
    for (const LaunchPlan& plan : plan_launches(numels, chunk_size, kBemaMaxTensorsPerLaunch)) {
      BemaLaunchTable table{};
      for (size_t slot = 0; slot < plan.tensor_indices.size(); ++slot) {
        const int64_t index = members[plan.tensor_indices[slot]];
        const at::Tensor& target = targets[index];
        const at::Tensor& ema = emas[index];
        const at::Tensor& param = params[index];
        const at::Tensor& init = inits[index];
        table.targets[slot] = target.data_ptr();
        table.emas[slot] = ema.data_ptr();
        table.params[slot] = param.data_ptr();
        table.inits[slot] = init.data_ptr();
        table.numels[slot] = target.numel();
        const int64_t vec = vector_elements3(target.element_size(), ema.element_size(), param.element_size());
        auto address = [](const at::Tensor& t) { return reinterpret_cast<uint64_t>(t.data_ptr()); };
        table.aligned[slot] =
            pair_is_vector_aligned(address(target), target.element_size(), address(ema), ema.element_size(), vec) &&
            pair_is_vector_aligned(address(param), param.element_size(), address(init), init.element_size(), vec);
      }
      for (size_t block = 0; block < plan.blocks.size(); ++block) {
        table.block_slot[block] = plan.blocks[block].tensor_slot;
        table.block_chunk[block] = plan.blocks[block].chunk_index;
      }
      launch_bema(static_cast<at::ScalarType>(std::get<0>(dtypes)), static_cast<at::ScalarType>(std::get<1>(dtypes)),
                  static_cast<at::ScalarType>(std::get<2>(dtypes)), table, static_cast<int>(plan.blocks.size()),
                  chunk_size, static_cast<float>(alpha), static_cast<float>(beta), stream);
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(pyalign_C, CUDA, m) {
  m.impl("multi_tensor_apply_", &multi_tensor_apply_cuda_);
  m.impl("multi_tensor_bema_", &multi_tensor_bema_cuda_);
}

}  // namespace pyalign
#endif  // PYALIGN_KERNELS_ONLY
