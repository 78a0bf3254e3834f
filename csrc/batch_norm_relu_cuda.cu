// maml_fast::batch_norm_relu{,_backward,_double_backward}: the CUDA launchers (formulas in
// batch_norm_relu.h, kernels in batch_norm_relu_cuda.cuh).
#include "batch_norm_relu.h"

#include "batch_norm_relu_cuda.cuh"

#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace maml_fast {
namespace bn_relu {
namespace {

using cuda::BackwardKernel;
using cuda::DoubleBackwardKernel;
using cuda::ForwardKernel;

TensorTriple batch_norm_relu_cuda(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
    double negative_slope) {
  check_forward_inputs(x, weight, bias, eps, negative_slope);
  const c10::cuda::CUDAGuard device_guard(x.device());
  return cuda::launch_op<ForwardKernel>(ForwardOp(x, weight, bias, eps, negative_slope));
}

TensorTriple batch_norm_relu_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight,
    const at::Tensor& mean, const at::Tensor& rstd, double negative_slope) {
  check_backward_inputs(grad_y, x, y, weight, mean, rstd, negative_slope);
  const c10::cuda::CUDAGuard device_guard(x.device());
  return cuda::launch_op<BackwardKernel>(BackwardOp(grad_y, x, y, weight, mean, rstd, negative_slope));
}

TensorTriple batch_norm_relu_double_backward_cuda(
    const std::optional<at::Tensor>& grad_grad_x, const std::optional<at::Tensor>& grad_grad_weight,
    const std::optional<at::Tensor>& grad_grad_bias, const at::Tensor& grad_y, const at::Tensor& x,
    const at::Tensor& y, const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd,
    double negative_slope) {
  check_double_backward_inputs(
      grad_grad_x, grad_grad_weight, grad_grad_bias, grad_y, x, y, weight, mean, rstd, negative_slope);
  const c10::cuda::CUDAGuard device_guard(x.device());
  return cuda::launch_double_backward_op<DoubleBackwardKernel>(
      DoubleBackwardOp(grad_grad_x, grad_grad_weight, grad_grad_bias, grad_y, x, y, weight, mean, rstd,
                       negative_slope));
}

}  // namespace
}  // namespace bn_relu
}  // namespace maml_fast

TORCH_LIBRARY_IMPL(maml_fast, CUDA, m) {
  m.impl("batch_norm_relu", &maml_fast::bn_relu::batch_norm_relu_cuda);
  m.impl("batch_norm_relu_backward", &maml_fast::bn_relu::batch_norm_relu_backward_cuda);
  m.impl("batch_norm_relu_double_backward", &maml_fast::bn_relu::batch_norm_relu_double_backward_cuda);
}
