// maml_fast::pooled_linear{,_backward,_double_backward}: the CUDA launchers (formulas in
// pooled_linear.h). One block per task; the block's threads take the task's output elements in
// strides, each element one thread's sum in a fixed order (deterministic, no atomics). No host
// synchronisation: the launches can be captured in a CUDA graph.
#include "pooled_linear.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace maml_fast {
namespace pooled_linear {
namespace {

constexpr int kTaskThreads = 256;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kTaskThreads) forward_kernel(const Args<scalar_t> a) {
  forward_task<scalar_t, acc_t>(a, blockIdx.x, threadIdx.x, blockDim.x);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kTaskThreads) backward_kernel(const Args<scalar_t> a) {
  backward_task<scalar_t, acc_t>(a, blockIdx.x, threadIdx.x, blockDim.x);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kTaskThreads) double_backward_kernel(const Args<scalar_t> a) {
  double_backward_task<scalar_t, acc_t>(a, blockIdx.x, threadIdx.x, blockDim.x);
}

dim3 task_grid(const Extent& e) {
  TORCH_CHECK(e.tasks <= 2147483647LL, "maml_fast: too many tasks for one launch (", e.tasks, ")");
  return dim3(static_cast<unsigned int>(e.tasks));
}

at::Tensor pooled_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_inputs(kForwardName, x, weight, bias);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const ForwardOp op(x, weight, bias);
  if (op.has_work()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pooled_linear_cuda", [&] {
      const auto a = op.args<scalar_t>();
      forward_kernel<scalar_t, at::opmath_type<scalar_t>>
          <<<task_grid(a.size), kTaskThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return op.y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pooled_linear_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight) {
  check_backward_inputs(kBackwardName, grad_y, x, weight);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const BackwardOp op(grad_y, x, weight);
  if (op.has_work()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pooled_linear_backward_cuda", [&] {
      const auto a = op.args<scalar_t>();
      backward_kernel<scalar_t, at::opmath_type<scalar_t>>
          <<<task_grid(a.size), kTaskThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return op.outputs();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pooled_linear_double_backward_cuda(
    const std::optional<at::Tensor>& grad_grad_x, const std::optional<at::Tensor>& grad_grad_weight,
    const std::optional<at::Tensor>& grad_grad_bias, const at::Tensor& grad_y, const at::Tensor& x,
    const at::Tensor& weight) {
  check_double_backward_inputs(grad_grad_x, grad_grad_weight, grad_grad_bias, grad_y, x, weight);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const DoubleBackwardOp op(grad_grad_x, grad_grad_weight, grad_grad_bias, grad_y, x, weight);
  if (op.has_work()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pooled_linear_double_backward_cuda", [&] {
      const auto a = op.args<scalar_t>();
      double_backward_kernel<scalar_t, at::opmath_type<scalar_t>>
          <<<task_grid(a.size), kTaskThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return op.outputs();
}

}  // namespace
}  // namespace pooled_linear
}  // namespace maml_fast

TORCH_LIBRARY_IMPL(maml_fast, CUDA, m) {
  m.impl("pooled_linear", &maml_fast::pooled_linear::pooled_linear_cuda);
  m.impl("pooled_linear_backward", &maml_fast::pooled_linear::pooled_linear_backward_cuda);
  m.impl("pooled_linear_double_backward", &maml_fast::pooled_linear::pooled_linear_double_backward_cuda);
}
