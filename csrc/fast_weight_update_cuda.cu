// maml_fast::fast_weight_update, CUDA kernel: one launch updates every tensor of every task.
//
// The tensors' pointers, sizes and layouts travel in a table passed by value as the kernel
// argument (no host-to-device copy, so the launch can be captured in a CUDA graph). Each tensor is
// cut into blocks of kElementsPerBlock; a block finds its tensor by binary search over the
// tensors' first block numbers.
#include "fast_weight_update.h"
#include "tensor_lists.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace maml_fast {
namespace {

constexpr int kThreadsPerBlock = 256;
constexpr int kElementsPerThread = 8;
constexpr std::int64_t kElementsPerBlock = kThreadsPerBlock * kElementsPerThread;
// Tensors per launch: keeps the table within the classic 4 KiB kernel-argument limit (models with more
// adapted tensors take one launch per group: `launch_per_table`).
constexpr int kMaxEntriesPerLaunch = 64;

template <typename scalar_t>
struct KernelEntry {
  scalar_t* out;
  const scalar_t* param;
  const scalar_t* grad;
  const scalar_t* lr;
  std::int64_t numel;
  std::int64_t inner;
  std::int32_t first_block;
  OperandLayout param_layout;
  OperandLayout grad_layout;
  OperandLayout lr_layout;
};

template <typename scalar_t>
struct KernelTable {
  KernelEntry<scalar_t> entries[kMaxEntriesPerLaunch];
  std::int32_t count;
};

static_assert(sizeof(KernelTable<double>) <= 4096, "kernel argument table exceeds 4 KiB");

template <typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
    fast_weight_update_kernel(const __grid_constant__ KernelTable<scalar_t> table) {
  const std::int32_t block = static_cast<std::int32_t>(blockIdx.x);
  const KernelEntry<scalar_t>& entry = table.entries[entry_of_block(table.entries, table.count, block)];

  using opmath_t = at::opmath_type<scalar_t>;
  const std::int64_t begin =
      static_cast<std::int64_t>(block - entry.first_block) * kElementsPerBlock;
  const std::int64_t end = ::min(begin + kElementsPerBlock, entry.numel);
  std::int64_t index = begin + threadIdx.x;
  // Kept alongside `index` so that a division is needed only when a step wraps past a task.
  std::int64_t index_in_task = index % entry.inner;
  for (; index < end; index += kThreadsPerBlock) {
    const opmath_t param =
        entry.param[element_offset(entry.param_layout, index, index_in_task)];
    const opmath_t grad = entry.grad[element_offset(entry.grad_layout, index, index_in_task)];
    const opmath_t lr = entry.lr[element_offset(entry.lr_layout, index, index_in_task)];
    entry.out[index] = static_cast<scalar_t>(param - lr * grad);
    index_in_task += kThreadsPerBlock;
    if (index_in_task >= entry.inner) {
      index_in_task %= entry.inner;
    }
  }
}

template <typename scalar_t>
void launch_fast_weight_update(const std::vector<UpdateEntry>& entries, cudaStream_t stream) {
  launch_per_table(
      entries, kMaxEntriesPerLaunch, KernelTable<scalar_t>{}, "maml_fast::fast_weight_update",
      [](KernelTable<scalar_t>& table, const UpdateEntry& entry, std::int32_t first_block) {
        table.entries[table.count++] = {
            entry.out.mutable_data_ptr<scalar_t>(),
            entry.param.tensor.const_data_ptr<scalar_t>(),
            entry.grad.tensor.const_data_ptr<scalar_t>(),
            entry.lr.tensor.const_data_ptr<scalar_t>(),
            entry.out.numel(),
            entry.inner,
            first_block,
            entry.param.layout,
            entry.grad.layout,
            entry.lr.layout,
        };
        return (entry.out.numel() + kElementsPerBlock - 1) / kElementsPerBlock;
      },
      [stream](const KernelTable<scalar_t>& table, unsigned int blocks) {
        fast_weight_update_kernel<scalar_t><<<blocks, kThreadsPerBlock, 0, stream>>>(table);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

std::vector<at::Tensor> fast_weight_update_cuda(
    at::TensorList params, at::TensorList grads, at::TensorList lrs) {
  UpdatePlan plan = plan_fast_weight_update(params, grads, lrs);
  if (!plan.entries.empty()) {
    const c10::cuda::CUDAGuard device_guard(params[0].device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, params[0].scalar_type(), "fast_weight_update_cuda",
        [&] { launch_fast_weight_update<scalar_t>(plan.entries, stream); });
  }
  return plan.outputs;
}

}  // namespace
}  // namespace maml_fast

TORCH_LIBRARY_IMPL(maml_fast, CUDA, m) {
  m.impl("fast_weight_update", &maml_fast::fast_weight_update_cuda);
}
