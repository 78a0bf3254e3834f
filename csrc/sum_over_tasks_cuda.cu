// maml_fast::sum_over_tasks, CUDA kernel: one launch sums every tensor over its tasks.
//
// The table of pointers, task strides and sizes is passed by value as the kernel argument (no
// host-to-device copy, so the launch can be captured in a CUDA graph). Each output is cut into
// blocks of kElementsPerBlock; a thread owns one output element at a time and walks the T task
// rows, so neighbouring threads read neighbouring addresses of every row.
#include "sum_over_tasks.h"
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
constexpr int kElementsPerThread = 4;
constexpr std::int64_t kElementsPerBlock = kThreadsPerBlock * kElementsPerThread;
// Tensors per launch: keeps the table within the classic 4 KiB kernel-argument limit.
constexpr int kMaxEntriesPerLaunch = 64;

template <typename scalar_t>
struct KernelEntry {
  scalar_t* out;
  const scalar_t* grad;
  const scalar_t* pair;  // nullptr: none
  std::int64_t grad_task_stride;
  std::int64_t pair_task_stride;
  std::int64_t inner;
  std::int32_t first_block;
};

template <typename scalar_t>
struct KernelTable {
  KernelEntry<scalar_t> entries[kMaxEntriesPerLaunch];
  std::int64_t tasks;
  std::int32_t count;
};

static_assert(sizeof(KernelTable<double>) <= 4096, "kernel argument table exceeds 4 KiB");

template <typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
    sum_over_tasks_kernel(const __grid_constant__ KernelTable<scalar_t> table) {
  const std::int32_t block = static_cast<std::int32_t>(blockIdx.x);
  const KernelEntry<scalar_t>& entry = table.entries[entry_of_block(table.entries, table.count, block)];
  using opmath_t = at::opmath_type<scalar_t>;
  const std::int64_t begin = static_cast<std::int64_t>(block - entry.first_block) * kElementsPerBlock;
  const std::int64_t end = ::min(begin + kElementsPerBlock, entry.inner);
  for (std::int64_t index = begin + threadIdx.x; index < end; index += kThreadsPerBlock) {
    opmath_t total = 0;
    for (std::int64_t t = 0; t < table.tasks; ++t) {
      total += static_cast<opmath_t>(entry.grad[t * entry.grad_task_stride + index]);
    }
    if (entry.pair != nullptr) {
      for (std::int64_t t = 0; t < table.tasks; ++t) {
        total += static_cast<opmath_t>(entry.pair[t * entry.pair_task_stride + index]);
      }
    }
    entry.out[index] = static_cast<scalar_t>(total);
  }
}

template <typename scalar_t>
void launch_sum_over_tasks(const TaskSumPlan& plan, cudaStream_t stream) {
  KernelTable<scalar_t> empty_table{};
  empty_table.tasks = plan.tasks;
  launch_per_table(
      plan.entries, kMaxEntriesPerLaunch, empty_table, "maml_fast::sum_over_tasks",
      [](KernelTable<scalar_t>& table, const TaskSumEntry& entry, std::int32_t first_block) {
        const bool paired = entry.pair.tensor.defined();
        table.entries[table.count++] = {
            entry.out.mutable_data_ptr<scalar_t>(),
            entry.grad.tensor.const_data_ptr<scalar_t>(),
            paired ? entry.pair.tensor.const_data_ptr<scalar_t>() : nullptr,
            entry.grad.task_stride,
            entry.pair.task_stride,
            entry.inner,
            first_block,
        };
        return (entry.inner + kElementsPerBlock - 1) / kElementsPerBlock;
      },
      [stream](const KernelTable<scalar_t>& table, unsigned int blocks) {
        sum_over_tasks_kernel<scalar_t><<<blocks, kThreadsPerBlock, 0, stream>>>(table);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

std::vector<at::Tensor> sum_over_tasks_cuda(
    at::TensorList grads, at::TensorList pairs, at::IntArrayRef paired) {
  TaskSumPlan plan = plan_sum_over_tasks(grads, pairs, paired);
  if (!plan.entries.empty()) {
    const c10::cuda::CUDAGuard device_guard(grads[0].device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, grads[0].scalar_type(), "sum_over_tasks_cuda",
        [&] { launch_sum_over_tasks<scalar_t>(plan, stream); });
  }
  return plan.outputs;
}

}  // namespace
}  // namespace maml_fast

TORCH_LIBRARY_IMPL(maml_fast, CUDA, m) {
  m.impl("sum_over_tasks", &maml_fast::sum_over_tasks_cuda);
}
