// maml_fast::pooled_linear{,_backward,_double_backward}: the schemas, the input checks and the CPU
// launchers (formulas in pooled_linear.h). The tasks run in parallel (at::parallel_for); each task's
// outputs are computed serially, so results do not depend on the thread count.
#include "pooled_linear.h"

#include "op_checks.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace maml_fast {
namespace pooled_linear {

namespace {

void check_dtype(const char* op, const at::Tensor& x) {
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK_TYPE(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
      ": x must be a float32, float64, float16 or bfloat16 tensor, got ", dtype);
}

// `tensor` (argument `name`) has x's dtype and device and shape `sizes`.
void check_like(const char* op, const char* name, const at::Tensor& tensor, const at::Tensor& x,
                at::IntArrayRef sizes) {
  check_dtype_and_device_of_x(op, name, tensor, x);
  TORCH_CHECK_VALUE(tensor.sizes() == sizes, op, ": ", name, " must have shape ", sizes, ", got ", tensor.sizes());
}

bool is_given(const std::optional<at::Tensor>& tensor) {
  return tensor.has_value() && tensor->defined();
}

}  // namespace

void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias) {
  check_dtype(op, x);
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be 4-D [batch, tasks*in_features, height, width], got shape ", x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 3, op, ": weight must be 3-D [tasks, out_features, in_features], got shape ",
                    weight.sizes());
  check_dtype_and_device_of_x(op, "weight", weight, x);
  TORCH_CHECK_VALUE(
      x.size(1) == weight.size(0) * weight.size(2), op, ": x must have tasks*in_features = ",
      weight.size(0) * weight.size(2), " channels for weight of shape ", weight.sizes(), ", got shape ", x.sizes());
  if (is_given(bias)) {
    check_like(op, "bias", *bias, x, {weight.size(0), weight.size(1)});
  }
}

void check_backward_inputs(const char* op, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight) {
  check_inputs(op, x, weight, std::nullopt);
  check_like(op, "grad_y", grad_y, x, {x.size(0), weight.size(0) * weight.size(1)});
}

void check_double_backward_inputs(
    const std::optional<at::Tensor>& grad_grad_x, const std::optional<at::Tensor>& grad_grad_weight,
    const std::optional<at::Tensor>& grad_grad_bias, const at::Tensor& grad_y, const at::Tensor& x,
    const at::Tensor& weight) {
  check_backward_inputs(kDoubleBackwardName, grad_y, x, weight);
  if (is_given(grad_grad_x)) {
    check_like(kDoubleBackwardName, "grad_grad_x", *grad_grad_x, x, x.sizes());
  }
  if (is_given(grad_grad_weight)) {
    check_like(kDoubleBackwardName, "grad_grad_weight", *grad_grad_weight, x, weight.sizes());
  }
  if (is_given(grad_grad_bias)) {
    check_like(kDoubleBackwardName, "grad_grad_bias", *grad_grad_bias, x, {weight.size(0), weight.size(1)});
  }
}

namespace {

// fn(task's args, t) for every task, the tasks in parallel chunks.
template <typename scalar_t, typename Fn>
void for_each_task(const Args<scalar_t>& a, const Fn& fn) {
  const Extent& e = a.size;
  const std::int64_t work = std::max<std::int64_t>(1, e.batch * e.in * e.height * e.width + e.out * e.in);
  at::parallel_for(0, e.tasks, std::max<std::int64_t>(1, 32768 / work), [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t t = begin; t < end; ++t) {
      fn(t);
    }
  });
}

at::Tensor pooled_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_inputs(kForwardName, x, weight, bias);
  const ForwardOp op(x, weight, bias);
  if (op.has_work()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pooled_linear_cpu", [&] {
      const auto a = op.args<scalar_t>();
      for_each_task(a, [&](std::int64_t t) { forward_task<scalar_t, at::opmath_type<scalar_t>>(a, t, 0, 1); });
    });
  }
  return op.y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pooled_linear_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight) {
  check_backward_inputs(kBackwardName, grad_y, x, weight);
  const BackwardOp op(grad_y, x, weight);
  if (op.has_work()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pooled_linear_backward_cpu", [&] {
      const auto a = op.args<scalar_t>();
      for_each_task(a, [&](std::int64_t t) { backward_task<scalar_t, at::opmath_type<scalar_t>>(a, t, 0, 1); });
    });
  }
  return op.outputs();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pooled_linear_double_backward_cpu(
    const std::optional<at::Tensor>& grad_grad_x, const std::optional<at::Tensor>& grad_grad_weight,
    const std::optional<at::Tensor>& grad_grad_bias, const at::Tensor& grad_y, const at::Tensor& x,
    const at::Tensor& weight) {
  check_double_backward_inputs(grad_grad_x, grad_grad_weight, grad_grad_bias, grad_y, x, weight);
  const DoubleBackwardOp op(grad_grad_x, grad_grad_weight, grad_grad_bias, grad_y, x, weight);
  if (op.has_work()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pooled_linear_double_backward_cpu", [&] {
      const auto a = op.args<scalar_t>();
      for_each_task(a, [&](std::int64_t t) { double_backward_task<scalar_t, at::opmath_type<scalar_t>>(a, t, 0, 1); });
    });
  }
  return op.outputs();
}

}  // namespace
}  // namespace pooled_linear
}  // namespace maml_fast

TORCH_LIBRARY_FRAGMENT(maml_fast, m) {
  // Where the fake (meta) implementations live, for FakeTensor tracing (torch.compile).
  m.set_python_module("maml_fast.ops.pooled_linear");
  // A task-batched classifier head: the global mean pool of x [B, T*C, H, W] and each task's linear
  // layer (weight [T, O, C], bias [T, O]) -> y [B, T*O]; formulas in pooled_linear.h.
  m.def("pooled_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor y");
  m.def(
      "pooled_linear_backward(Tensor grad_y, Tensor x, Tensor weight) -> "
      "(Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "pooled_linear_double_backward(Tensor? grad_grad_x, Tensor? grad_grad_weight, Tensor? grad_grad_bias, "
      "Tensor grad_y, Tensor x, Tensor weight) -> (Tensor grad_grad_y, Tensor grad_x, Tensor grad_weight)");
}

TORCH_LIBRARY_IMPL(maml_fast, CPU, m) {
  m.impl("pooled_linear", &maml_fast::pooled_linear::pooled_linear_cpu);
  m.impl("pooled_linear_backward", &maml_fast::pooled_linear::pooled_linear_backward_cpu);
  m.impl("pooled_linear_double_backward", &maml_fast::pooled_linear::pooled_linear_double_backward_cpu);
}
