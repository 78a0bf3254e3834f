// maml_fast::pooled_linear{,_backward,_double_backward}: a classifier head (global mean pool, then each
// task's linear layer) and its closed-form derivatives; the parts shared by the CPU and CUDA kernels:
// input checks (errors name the argument), the host-side preparation (outputs, kernel arguments) and
// the per-task formulas.
//
// x [B, T*C, H, W] (task t's channels in block t, any strides), weight [T, O, C], bias [T, O] or none
// (any strides, e.g. θ expanded over the tasks), P = H*W; with the pooled features
//   f[b,t,c] = (1/P) sum_p x[b, tC+c, p]
// forward:          y[b, tO+o] = bias[t,o] + sum_c weight[t,o,c] f[b,t,c]             (y [B, T*O])
// backward (gy = dL/dy [B, T*O]):
//   gx[b, tC+c, p] = (1/P) sum_o gy[b,tO+o] weight[t,o,c]
//   gweight[t,o,c] = sum_b gy[b,tO+o] f[b,t,c],      gbias[t,o] = sum_b gy[b,tO+o]
// double backward of L = <ggx, gx> + <ggweight, gweight> + <ggbias, gbias> (each gg may be absent),
// with gf[b,t,c] = (1/P) sum_p ggx[b, tC+c, p] (the forward's pooling of ggx):
//   d gy[b, tO+o] = sum_c (gf[b,t,c] weight[t,o,c] + f[b,t,c] ggweight[t,o,c]) + ggbias[t,o]
//   d x[b, tC+c, p] = (1/P) sum_o gy[b,tO+o] ggweight[t,o,c]
//   d weight[t,o,c] = sum_b gy[b,tO+o] gf[b,t,c]
// Every output element is one thread's sum in a fixed order (deterministic on both devices), in the
// accumulation type (float for float/half/bfloat16, double for double).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace maml_fast {
namespace pooled_linear {

constexpr const char* kForwardName = "maml_fast::pooled_linear";
constexpr const char* kBackwardName = "maml_fast::pooled_linear_backward";
constexpr const char* kDoubleBackwardName = "maml_fast::pooled_linear_double_backward";

// Each check throws TypeError / ValueError naming the operator and the offending argument.
void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias);
void check_backward_inputs(const char* op, const at::Tensor& grad_y, const at::Tensor& x,
                           const at::Tensor& weight);
void check_double_backward_inputs(
    const std::optional<at::Tensor>& grad_grad_x, const std::optional<at::Tensor>& grad_grad_weight,
    const std::optional<at::Tensor>& grad_grad_bias, const at::Tensor& grad_y, const at::Tensor& x,
    const at::Tensor& weight);

// A strided view of up to 4 dims: element (i, j, k, l) at data + i*s0 + j*s1 + k*s2 + l*s3. A null
// view (absent tensor) reads as zeros where the formulas say so.
template <typename T>
struct View {
  T* data;
  std::int64_t s0, s1, s2, s3;

  C10_HOST_DEVICE T& at(std::int64_t i, std::int64_t j, std::int64_t k = 0, std::int64_t l = 0) const {
    return data[i * s0 + j * s1 + k * s2 + l * s3];
  }
};

template <typename T>
View<T> view_of(const at::Tensor& tensor) {
  std::int64_t s[4] = {0, 0, 0, 0};
  if (!tensor.defined()) {
    return {nullptr, 0, 0, 0, 0};
  }
  for (std::int64_t d = 0; d < tensor.dim(); ++d) {
    s[d] = tensor.stride(d);
  }
  return {const_cast<T*>(tensor.const_data_ptr<T>()), s[0], s[1], s[2], s[3]};
}

// Sizes: B examples, T tasks, C input features per task, O outputs per task, an H x W map.
struct Extent {
  std::int64_t batch, tasks, in, out, height, width;
};

// The kernels' arguments; the outputs a kernel does not write are null.
template <typename scalar_t>
struct Args {
  View<const scalar_t> x, weight, bias, grad_y, grad_grad_x, grad_grad_weight, grad_grad_bias;
  View<scalar_t> y, grad_x, grad_weight, grad_bias;
  Extent size;
};

// An optional argument: the tensor, or an undefined one when absent.
inline at::Tensor given(const std::optional<at::Tensor>& tensor) {
  return tensor.has_value() ? *tensor : at::Tensor();
}

// The output laid out as `like` when that is dense (e.g. a channels-last x), else contiguous.
inline at::Tensor empty_laid_out_as(const at::Tensor& like) {
  at::Tensor out = at::empty_like(like);
  return out.strides() == like.strides() ? out : at::empty(like.sizes(), like.options());
}

inline Extent extent_of(const at::Tensor& x, const at::Tensor& weight) {
  return {x.size(0), weight.size(0), weight.size(2), weight.size(1), x.size(2), x.size(3)};
}

// ---------------------------------------------------------------------------------------------
// Host-side preparation: an op's tensors (inputs as given, outputs allocated; the others undefined)
// and the kernel arguments, made by `forward_op`, `backward_op` and `double_backward_op`.

struct Op {
  at::Tensor x, weight, bias, grad_y, grad_grad_x, grad_grad_weight, grad_grad_bias;  // inputs
  at::Tensor y, grad_x, grad_weight, grad_bias;                                       // outputs

  // (empty batches and feature sizes still have outputs to write: zero sums, or the bias)
  bool has_work() const { return weight.size(0) > 0; }

  template <typename scalar_t>
  Args<scalar_t> args() const {
    return {view_of<const scalar_t>(x), view_of<const scalar_t>(weight), view_of<const scalar_t>(bias),
            view_of<const scalar_t>(grad_y), view_of<const scalar_t>(grad_grad_x),
            view_of<const scalar_t>(grad_grad_weight), view_of<const scalar_t>(grad_grad_bias),
            view_of<scalar_t>(y), view_of<scalar_t>(grad_x), view_of<scalar_t>(grad_weight),
            view_of<scalar_t>(grad_bias), extent_of(x, weight)};
  }
};

// y [B, T*O].
inline Op forward_op(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  Op op;
  op.x = x, op.weight = weight, op.bias = given(bias);
  op.y = at::empty({x.size(0), weight.size(0) * weight.size(1)}, x.options());
  return op;
}

// (grad_x laid out as x, grad_weight, grad_bias).
inline Op backward_op(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight) {
  Op op;
  op.grad_y = grad_y, op.x = x, op.weight = weight;
  op.grad_x = empty_laid_out_as(x);
  op.grad_weight = at::empty(weight.sizes(), weight.options());
  op.grad_bias = at::empty({weight.size(0), weight.size(1)}, weight.options());
  return op;
}

// (d grad_y in y's place, d x in grad_x's, d weight in grad_weight's).
inline Op double_backward_op(const std::optional<at::Tensor>& grad_grad_x,
                             const std::optional<at::Tensor>& grad_grad_weight,
                             const std::optional<at::Tensor>& grad_grad_bias, const at::Tensor& grad_y,
                             const at::Tensor& x, const at::Tensor& weight) {
  Op op;
  op.grad_grad_x = given(grad_grad_x), op.grad_grad_weight = given(grad_grad_weight);
  op.grad_grad_bias = given(grad_grad_bias), op.grad_y = grad_y, op.x = x, op.weight = weight;
  op.y = at::empty(grad_y.sizes(), grad_y.options());
  op.grad_x = empty_laid_out_as(x);
  op.grad_weight = at::empty(weight.sizes(), weight.options());
  return op;
}

}  // namespace pooled_linear
}  // namespace maml_fast
