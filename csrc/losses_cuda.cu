// maml_fast::cross_entropy_per_task{,_backward,_double_backward} and maml_fast::mse_per_task{,_backward}:
// the CUDA kernels (formulas in losses.h).
//
// The ops whose outputs sum over a task (the forwards and the cross-entropy double backward) run one
// block per task: its threads take the task's rows (cross-entropy: a row of N classes each) or
// values (MSE) in strides, then the block adds the threads' partial sums in a fixed tree order
// (deterministic, no atomics). The elementwise backward ops run one thread per element. No host
// synchronisation and no host-to-device copy: the launches can be captured in a CUDA graph. Labels
// are not range-checked on the device (see losses.h: the caller validates them on the host).
#include "losses.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace maml_fast {
namespace losses {
namespace {

constexpr int kTaskThreads = 128;      // threads of a per-task block
constexpr int kElementThreads = 256;   // threads of an elementwise block
constexpr std::int64_t kMaxElementBlocks = 65535;

// The sums of kValues per-thread values over the block, in thread 0 (a fixed tree order).
template <int kValues, typename acc_t>
__device__ void block_sums(acc_t (&values)[kValues]) {
  __shared__ acc_t shared[kValues][kTaskThreads];
#pragma unroll
  for (int k = 0; k < kValues; ++k) {
    shared[k][threadIdx.x] = values[k];
  }
  __syncthreads();
  for (int half = kTaskThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) {
#pragma unroll
      for (int k = 0; k < kValues; ++k) {
        shared[k][threadIdx.x] += shared[k][threadIdx.x + half];
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int k = 0; k < kValues; ++k) {
    values[k] = shared[k][0];
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kTaskThreads) cross_entropy_kernel(const CrossEntropyArgs<scalar_t> a) {
  const Extent e = a.size;
  const std::int64_t t = blockIdx.x;
  acc_t sums[2] = {acc_t(0), acc_t(0)};  // loss, correct predictions
  for (std::int64_t b = threadIdx.x; b < e.rows; b += kTaskThreads) {
    const std::int64_t row = t * e.rows + b;
    const RowStatistics<acc_t> stats =
        row_statistics<scalar_t, acc_t>(a.logits + e.offset(row), a.labels[row], e.width);
    a.logsumexp[row] = stats.logsumexp;
    sums[0] += stats.logsumexp - stats.label_logit;
    sums[1] += stats.correct ? acc_t(1) : acc_t(0);
  }
  block_sums(sums);
  if (threadIdx.x == 0) {
    const acc_t rows = static_cast<acc_t>(e.rows);
    a.loss[t] = static_cast<scalar_t>(sums[0] / rows);
    a.accuracy[t] = static_cast<scalar_t>(sums[1] / rows);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kElementThreads) cross_entropy_backward_kernel(
    const CrossEntropyBackwardArgs<scalar_t> a) {
  const Extent e = a.size;
  const std::int64_t total = e.tasks * e.rows * e.width;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * kElementThreads + threadIdx.x; i < total;
       i += static_cast<std::int64_t>(gridDim.x) * kElementThreads) {
    const std::int64_t row = i / e.width;
    const std::int64_t n = i - row * e.width;
    const std::int64_t j = e.offset(row) + n;
    const acc_t scale = static_cast<acc_t>(a.grad_loss[row / e.rows]) / static_cast<acc_t>(e.rows);
    a.grad_logits[j] = static_cast<scalar_t>(cross_entropy_grad<acc_t>(
        static_cast<acc_t>(a.logits[j]), a.logsumexp[row], n == a.labels[row], scale));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kTaskThreads) cross_entropy_double_backward_kernel(
    const CrossEntropyDoubleBackwardArgs<scalar_t> a) {
  const Extent e = a.size;
  const std::int64_t t = blockIdx.x;
  const acc_t inv_rows = acc_t(1) / static_cast<acc_t>(e.rows);
  const acc_t scale = static_cast<acc_t>(a.grad_loss[t]) * inv_rows;
  acc_t sums[1] = {acc_t(0)};
  for (std::int64_t b = threadIdx.x; b < e.rows; b += kTaskThreads) {
    const std::int64_t row = t * e.rows + b;
    sums[0] += cross_entropy_double_backward_row<scalar_t, acc_t>(
        a.logits + e.offset(row), a.grad_grad_logits + e.offset(row), a.labels[row], a.logsumexp[row],
        scale, e.width, a.grad_logits + e.offset(row));
  }
  block_sums(sums);
  if (threadIdx.x == 0) {
    a.grad_grad_loss[t] = static_cast<scalar_t>(sums[0] * inv_rows);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kTaskThreads) mse_kernel(const MseArgs<scalar_t> a) {
  const Extent e = a.size;
  const std::int64_t t = blockIdx.x;
  acc_t sums[1] = {acc_t(0)};
  for (std::int64_t m = t * e.width + threadIdx.x; m < (t + 1) * e.width; m += kTaskThreads) {
    const acc_t d = static_cast<acc_t>(a.prediction[m]) - static_cast<acc_t>(a.target[m]);
    sums[0] += d * d;
  }
  block_sums(sums);
  if (threadIdx.x == 0) {
    a.out[t] = static_cast<scalar_t>(sums[0] / static_cast<acc_t>(e.width));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kElementThreads) mse_backward_kernel(const MseArgs<scalar_t> a) {
  const Extent e = a.size;
  const std::int64_t total = e.tasks * e.width;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * kElementThreads + threadIdx.x; i < total;
       i += static_cast<std::int64_t>(gridDim.x) * kElementThreads) {
    const acc_t scale = acc_t(2) * static_cast<acc_t>(a.grad_loss[i / e.width]) / static_cast<acc_t>(e.width);
    a.out[i] = static_cast<scalar_t>(
        scale * (static_cast<acc_t>(a.prediction[i]) - static_cast<acc_t>(a.target[i])));
  }
}

// Grid of a per-task kernel: one block per task.
dim3 task_grid(const Extent& e) {
  TORCH_CHECK(e.tasks <= 2147483647LL, "maml_fast: too many tasks for one launch (", e.tasks, ")");
  return dim3(static_cast<unsigned int>(e.tasks));
}

// Grid of an elementwise kernel over `elements` (grid-stride loops cover the rest).
dim3 element_grid(std::int64_t elements) {
  return dim3(static_cast<unsigned int>(
      std::min<std::int64_t>(kMaxElementBlocks, (elements + kElementThreads - 1) / kElementThreads)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_per_task_cuda(
    const at::Tensor& logits, const at::Tensor& labels) {
  check_cross_entropy_inputs(kCrossEntropyName, logits, labels);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const CrossEntropyOp op(logits, labels);
  if (op.has_work()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, op.dtype(), "cross_entropy_per_task_cuda", [&] {
      const auto args = op.args<scalar_t>();
      cross_entropy_kernel<scalar_t, at::opmath_type<scalar_t>>
          <<<task_grid(args.size), kTaskThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return op.outputs();
}

at::Tensor cross_entropy_per_task_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& labels,
    const at::Tensor& logsumexp) {
  check_cross_entropy_backward_inputs(kCrossEntropyBackwardName, grad_loss, logits, labels, logsumexp);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const CrossEntropyBackwardOp op(grad_loss, logits, labels, logsumexp);
  if (op.has_work()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, op.dtype(), "cross_entropy_per_task_backward_cuda", [&] {
      cross_entropy_backward_kernel<scalar_t, at::opmath_type<scalar_t>>
          <<<element_grid(op.logits.numel()), kElementThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
              op.args<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return op.outputs();
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_per_task_double_backward_cuda(
    const at::Tensor& grad_grad_logits, const at::Tensor& grad_loss, const at::Tensor& logits,
    const at::Tensor& labels, const at::Tensor& logsumexp) {
  check_cross_entropy_double_backward_inputs(grad_grad_logits, grad_loss, logits, labels, logsumexp);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const CrossEntropyDoubleBackwardOp op(grad_grad_logits, grad_loss, logits, labels, logsumexp);
  if (op.has_work()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, op.dtype(), "cross_entropy_per_task_double_backward_cuda", [&] {
      const auto args = op.args<scalar_t>();
      cross_entropy_double_backward_kernel<scalar_t, at::opmath_type<scalar_t>>
          <<<task_grid(args.size), kTaskThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return op.outputs();
}

at::Tensor mse_per_task_cuda(const at::Tensor& prediction, const at::Tensor& target) {
  check_mse_inputs(kMseName, prediction, target);
  const c10::cuda::CUDAGuard device_guard(prediction.device());
  const MseOp op(prediction, target);
  if (op.has_work()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, op.dtype(), "mse_per_task_cuda", [&] {
      const auto args = op.args<scalar_t>();
      mse_kernel<scalar_t, at::opmath_type<scalar_t>>
          <<<task_grid(args.size), kTaskThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return op.out;
}

at::Tensor mse_per_task_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& prediction, const at::Tensor& target) {
  check_mse_backward_inputs(grad_loss, prediction, target);
  const c10::cuda::CUDAGuard device_guard(prediction.device());
  const MseOp op(grad_loss, prediction, target);
  if (op.has_work()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, op.dtype(), "mse_per_task_backward_cuda", [&] {
      mse_backward_kernel<scalar_t, at::opmath_type<scalar_t>>
          <<<element_grid(op.prediction.numel()), kElementThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
              op.args<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return op.out;
}

}  // namespace
}  // namespace losses
}  // namespace maml_fast

TORCH_LIBRARY_IMPL(maml_fast, CUDA, m) {
  m.impl("cross_entropy_per_task", &maml_fast::losses::cross_entropy_per_task_cuda);
  m.impl("cross_entropy_per_task_backward", &maml_fast::losses::cross_entropy_per_task_backward_cuda);
  m.impl("cross_entropy_per_task_double_backward", &maml_fast::losses::cross_entropy_per_task_double_backward_cuda);
  m.impl("mse_per_task", &maml_fast::losses::mse_per_task_cuda);
  m.impl("mse_per_task_backward", &maml_fast::losses::mse_per_task_backward_cuda);
}
