// maml_fast::batch_norm_relu{,_backward,_double_backward}: input checks and the CPU launchers.
//
// Each op is two parallel passes over whole rows (at::parallel_for, OpenMP): the column sums (one
// read of each input), then the elementwise outputs (one more read, one write); x_hat is recomputed
// from x, mean and rstd, and the ReLU mask from y. The kernels are in batch_norm_relu_cpu.h.
#include "batch_norm_relu.h"

#include "batch_norm_relu_cpu.h"
#include "op_checks.h"

#include <torch/library.h>

#include <cmath>

namespace maml_fast {
namespace bn_relu {

void check_dtype(const char* op, const char* name, const at::Tensor& tensor) {
  const at::ScalarType dtype = tensor.scalar_type();
  TORCH_CHECK_TYPE(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
      ": ", name, " must be a float32, float64, float16 or bfloat16 tensor, got ", dtype);
}

void check_like_x(
    const char* op, const char* name, const at::Tensor& tensor, const at::Tensor& x,
    at::IntArrayRef sizes) {
  check_dtype_and_device_of_x(op, name, tensor, x);
  TORCH_CHECK_VALUE(
      tensor.sizes() == sizes, op, ": ", name, " must have shape ", sizes, " (x has shape ",
      x.sizes(), "), got ", tensor.sizes());
}

void check_channel_vector(
    const char* op, const char* name, const at::Tensor& tensor, const at::Tensor& x,
    at::ScalarType dtype) {
  TORCH_CHECK_TYPE(
      tensor.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, " (x is ",
      x.scalar_type(), "), got ", tensor.scalar_type());
  TORCH_CHECK_VALUE(
      tensor.device() == x.device(), op, ": ", name, " is on ", tensor.device(), " but x is on ",
      x.device());
  TORCH_CHECK_VALUE(
      tensor.dim() == 1 && tensor.size(0) == x.size(-1), op, ": ", name, " must have shape [",
      x.size(-1), "] (one value per channel of x ", x.sizes(), "), got ", tensor.sizes());
}

void check_eps(const char* op, double eps) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
}

void check_negative_slope(const char* op, double negative_slope) {
  TORCH_CHECK_VALUE(
      std::isfinite(negative_slope) && negative_slope >= 0, op,
      ": negative_slope must be finite and >= 0 (the derivative is read off y > 0), got ", negative_slope);
}

void check_grad_grads(
    const char* op, const std::optional<at::Tensor>& grad_grad_x,
    const std::optional<at::Tensor>& grad_grad_weight,
    const std::optional<at::Tensor>& grad_grad_bias, const at::Tensor& x) {
  if (is_given(grad_grad_x)) {
    check_like_x(op, "grad_grad_x", *grad_grad_x, x, x.sizes());
  }
  if (is_given(grad_grad_weight)) {
    check_channel_vector(op, "grad_grad_weight", *grad_grad_weight, x, x.scalar_type());
  }
  if (is_given(grad_grad_bias)) {
    check_channel_vector(op, "grad_grad_bias", *grad_grad_bias, x, x.scalar_type());
  }
}

namespace {

void check_rows(const char* op, const char* name, const at::Tensor& tensor) {
  check_dtype(op, name, tensor);
  TORCH_CHECK_VALUE(
      tensor.dim() == 2, op, ": ", name, " must be 2-D [rows, channels], got shape ",
      tensor.sizes());
  TORCH_CHECK_VALUE(
      tensor.size(0) >= 2, op, ": ", name,
      " needs at least 2 rows (batch statistics of a single value per channel are undefined), "
      "got shape ",
      tensor.sizes());
}

void check_saved(
    const char* op, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& y,
    const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd) {
  check_rows(op, "x", x);
  check_like_x(op, "grad_y", grad_y, x, x.sizes());
  check_like_x(op, "y", y, x, x.sizes());
  check_channel_vector(op, "weight", weight, x, x.scalar_type());
  check_channel_vector(op, "mean", mean, x, stats_dtype(x.scalar_type()));
  check_channel_vector(op, "rstd", rstd, x, stats_dtype(x.scalar_type()));
}

}  // namespace

void check_forward_inputs(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
    double negative_slope) {
  check_rows(kForwardName, "x", x);
  check_channel_vector(kForwardName, "weight", weight, x, x.scalar_type());
  check_channel_vector(kForwardName, "bias", bias, x, x.scalar_type());
  check_eps(kForwardName, eps);
  check_negative_slope(kForwardName, negative_slope);
}

void check_backward_inputs(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight,
    const at::Tensor& mean, const at::Tensor& rstd, double negative_slope) {
  check_saved(kBackwardName, grad_y, x, y, weight, mean, rstd);
  check_negative_slope(kBackwardName, negative_slope);
}

void check_double_backward_inputs(
    const std::optional<at::Tensor>& grad_grad_x, const std::optional<at::Tensor>& grad_grad_weight,
    const std::optional<at::Tensor>& grad_grad_bias, const at::Tensor& grad_y, const at::Tensor& x,
    const at::Tensor& y, const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd,
    double negative_slope) {
  check_saved(kDoubleBackwardName, grad_y, x, y, weight, mean, rstd);
  check_grad_grads(kDoubleBackwardName, grad_grad_x, grad_grad_weight, grad_grad_bias, x);
  check_negative_slope(kDoubleBackwardName, negative_slope);
}

namespace {

using cpu::BackwardKernel;
using cpu::DoubleBackwardKernel;
using cpu::ForwardKernel;

TensorTriple batch_norm_relu_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
    double negative_slope) {
  check_forward_inputs(x, weight, bias, eps, negative_slope);
  return cpu::run_op<ForwardKernel>(ForwardOp(x, weight, bias, eps, negative_slope));
}

TensorTriple batch_norm_relu_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight,
    const at::Tensor& mean, const at::Tensor& rstd, double negative_slope) {
  check_backward_inputs(grad_y, x, y, weight, mean, rstd, negative_slope);
  return cpu::run_op<BackwardKernel>(BackwardOp(grad_y, x, y, weight, mean, rstd, negative_slope));
}

TensorTriple batch_norm_relu_double_backward_cpu(
    const std::optional<at::Tensor>& grad_grad_x, const std::optional<at::Tensor>& grad_grad_weight,
    const std::optional<at::Tensor>& grad_grad_bias, const at::Tensor& grad_y, const at::Tensor& x,
    const at::Tensor& y, const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd,
    double negative_slope) {
  check_double_backward_inputs(
      grad_grad_x, grad_grad_weight, grad_grad_bias, grad_y, x, y, weight, mean, rstd, negative_slope);
  return cpu::run_double_backward_op<DoubleBackwardKernel>(
      DoubleBackwardOp(grad_grad_x, grad_grad_weight, grad_grad_bias, grad_y, x, y, weight, mean, rstd,
                       negative_slope));
}

}  // namespace
}  // namespace bn_relu
}  // namespace maml_fast

TORCH_LIBRARY_IMPL(maml_fast, CPU, m) {
  m.impl("batch_norm_relu", &maml_fast::bn_relu::batch_norm_relu_cpu);
  m.impl("batch_norm_relu_backward", &maml_fast::bn_relu::batch_norm_relu_backward_cpu);
  m.impl("batch_norm_relu_double_backward", &maml_fast::bn_relu::batch_norm_relu_double_backward_cpu);
}
