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
// Host-side preparation: the outputs of each op and its kernel arguments.

struct ForwardOp {
  at::Tensor x, weight, bias, y;

  ForwardOp(const at::Tensor& x_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in)
      : x(x_in), weight(weight_in), bias(given(bias_in)),
        y(at::empty({x_in.size(0), weight_in.size(0) * weight_in.size(1)}, x_in.options())) {}

  bool has_work() const { return y.numel() > 0; }

  template <typename scalar_t>
  Args<scalar_t> args() const {
    Args<scalar_t> a{};
    a.x = view_of<const scalar_t>(x);
    a.weight = view_of<const scalar_t>(weight);
    a.bias = view_of<const scalar_t>(bias);
    a.y = view_of<scalar_t>(y);
    a.size = extent_of(x, weight);
    return a;
  }
};

struct BackwardOp {
  at::Tensor grad_y, x, weight;
  at::Tensor grad_x, grad_weight, grad_bias;

  BackwardOp(const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& weight_in)
      : grad_y(grad_y_in), x(x_in), weight(weight_in), grad_x(empty_laid_out_as(x_in)),
        grad_weight(at::empty(weight_in.sizes(), weight_in.options())),
        grad_bias(at::empty({weight_in.size(0), weight_in.size(1)}, weight_in.options())) {}

  bool has_work() const { return x.numel() > 0 || weight.numel() > 0; }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> outputs() const { return {grad_x, grad_weight, grad_bias}; }

  template <typename scalar_t>
  Args<scalar_t> args() const {
    Args<scalar_t> a{};
    a.x = view_of<const scalar_t>(x);
    a.weight = view_of<const scalar_t>(weight);
    a.grad_y = view_of<const scalar_t>(grad_y);
    a.grad_x = view_of<scalar_t>(grad_x);
    a.grad_weight = view_of<scalar_t>(grad_weight);
    a.grad_bias = view_of<scalar_t>(grad_bias);
    a.size = extent_of(x, weight);
    return a;
  }
};

struct DoubleBackwardOp {
  at::Tensor grad_grad_x, grad_grad_weight, grad_grad_bias, grad_y, x, weight;
  at::Tensor grad_grad_y, grad_x, grad_weight;  // outputs

  DoubleBackwardOp(const std::optional<at::Tensor>& ggx, const std::optional<at::Tensor>& ggw,
                   const std::optional<at::Tensor>& ggb, const at::Tensor& grad_y_in, const at::Tensor& x_in,
                   const at::Tensor& weight_in)
      : grad_grad_x(given(ggx)), grad_grad_weight(given(ggw)), grad_grad_bias(given(ggb)),
        grad_y(grad_y_in), x(x_in), weight(weight_in),
        grad_grad_y(at::empty(grad_y_in.sizes(), grad_y_in.options())),
        grad_x(empty_laid_out_as(x_in)),
        grad_weight(at::empty(weight_in.sizes(), weight_in.options())) {}

  bool has_work() const { return x.numel() > 0 || weight.numel() > 0 || grad_y.numel() > 0; }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> outputs() const { return {grad_grad_y, grad_x, grad_weight}; }

  template <typename scalar_t>
  Args<scalar_t> args() const {
    Args<scalar_t> a{};
    a.x = view_of<const scalar_t>(x);
    a.weight = view_of<const scalar_t>(weight);
    a.grad_y = view_of<const scalar_t>(grad_y);
    a.grad_grad_x = view_of<const scalar_t>(grad_grad_x);
    a.grad_grad_weight = view_of<const scalar_t>(grad_grad_weight);
    a.grad_grad_bias = view_of<const scalar_t>(grad_grad_bias);
    a.y = view_of<scalar_t>(grad_grad_y);
    a.grad_x = view_of<scalar_t>(grad_x);
    a.grad_weight = view_of<scalar_t>(grad_weight);
    a.size = extent_of(x, weight);
    return a;
  }
};

}  // namespace pooled_linear
}  // namespace maml_fast
