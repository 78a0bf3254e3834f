// maml_fast::batch_norm_relu{,_backward,_double_backward}: the parts shared by the CPU and CUDA
// kernels: input checks (errors name the argument), the host-side preparation (contiguous inputs,
// outputs, kernel arguments) and the per-element formulas.
//
// Per-task BatchNorm with batch statistics followed by ReLU (or LeakyReLU: negative slope s >= 0), on
// the [rows, channels] view of a task-batched activation (row-major: channel c of row n at
// n * channels + c). Per column c, with N = rows:
//
//   mean = sum(x) / N,  var = sum((x - mean)^2) / N,  r = (var + eps)^-1/2,  x_hat = (x - mean) r
//   z = gamma x_hat + beta,  y = z where z > 0 else s z,
//   m = 1 where y > 0 else s         (the activation's derivative, recomputed from y: with s >= 0,
//                                     y > 0 exactly where z > 0)
//
// backward, with gz = m gy, A = sum(gz), B = sum(gz x_hat):
//   gx = gamma r (gz - A/N - x_hat B/N),  g_gamma = B,  g_beta = A
//
// double backward: L = <ggx, gx> + <gg_gamma, g_gamma> + <gg_beta, g_beta> differentiated with
// respect to (gy, x, gamma); with C = sum(ggx), D = sum(ggx x_hat), E = sum(ggx gz) and
//   P(gz)  = gz  - A/N - x_hat B/N,     P(ggx) = ggx - C/N - x_hat D/N,     S1 = E - C A/N - D B/N:
//   d gy    = m (gamma r P(ggx) + gg_gamma x_hat + gg_beta)
//   d x     = (gg_gamma r - gamma r^2 D/N) P(gz) - gamma r^2 B/N P(ggx) - gamma r^2 S1/N x_hat
//   d gamma = r S1
// (m is piecewise constant, so beta and y get no gradient). mean and rstd are returned in
// the "stats" dtype: float for float/half/bfloat16 inputs, double for double inputs.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/accumulate.h>
#include <c10/core/ScalarType.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace maml_fast {
namespace bn_relu {

constexpr const char* kForwardName = "maml_fast::batch_norm_relu";
constexpr const char* kBackwardName = "maml_fast::batch_norm_relu_backward";
constexpr const char* kDoubleBackwardName = "maml_fast::batch_norm_relu_double_backward";

// The dtype of mean and rstd (and of every accumulation) for activations of dtype `dtype`.
inline at::ScalarType stats_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// Each check throws TypeError / ValueError (TORCH_CHECK_TYPE / _VALUE) naming the operator and the
// offending argument. They do not copy: the *Op structs below take `.contiguous()`.
void check_forward_inputs(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
    double negative_slope);
void check_backward_inputs(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight,
    const at::Tensor& mean, const at::Tensor& rstd, double negative_slope);
void check_double_backward_inputs(
    const std::optional<at::Tensor>& grad_grad_x, const std::optional<at::Tensor>& grad_grad_weight,
    const std::optional<at::Tensor>& grad_grad_bias, const at::Tensor& grad_y, const at::Tensor& x,
    const at::Tensor& y, const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd,
    double negative_slope);

// The checks' parts, shared with the max-pooled op (batch_norm_relu_pool.h), whose x has the
// channels last too. `tensor` has a supported floating dtype:
void check_dtype(const char* op, const char* name, const at::Tensor& tensor);
// ... x's dtype and device, and shape `sizes`:
void check_like_x(
    const char* op, const char* name, const at::Tensor& tensor, const at::Tensor& x,
    at::IntArrayRef sizes);
// ... is a per-channel vector [channels] (x's last dimension) of dtype `dtype` on x's device:
void check_channel_vector(
    const char* op, const char* name, const at::Tensor& tensor, const at::Tensor& x,
    at::ScalarType dtype);
// eps is finite and >= 0:
void check_eps(const char* op, double eps);
// negative_slope is finite and >= 0 (y > 0 then tells where z > 0):
void check_negative_slope(const char* op, double negative_slope);
// the double backward's optional incoming gradients, where given, are like x and per-channel:
void check_grad_grads(
    const char* op, const std::optional<at::Tensor>& grad_grad_x,
    const std::optional<at::Tensor>& grad_grad_weight,
    const std::optional<at::Tensor>& grad_grad_bias, const at::Tensor& x);

// ---------------------------------------------------------------------------------------------
// Host-side preparation shared by the CPU and CUDA launchers. After the input checks (and, on
// CUDA, under the device guard), each launcher builds one of the *Op structs below: it holds the
// contiguous inputs and the freshly allocated outputs, and gives the kernels' arguments (raw
// pointers into those tensors) for the dispatched dtype. The launcher then only dispatches on
// dtype() and runs its kernels when has_channels(), and returns outputs().

// Whether an optional tensor argument was given (present and defined).
inline bool is_given(const std::optional<at::Tensor>& tensor) {
  return tensor.has_value() && tensor->defined();
}

// Options of mean and rstd for activations `x`.
inline at::TensorOptions stats_options(const at::Tensor& x) {
  return x.options().dtype(stats_dtype(x.scalar_type()));
}

// x's channels (its last dimension) and rows (the product of the others): the [rows, channels] view.
inline std::int64_t channels_of(const at::Tensor& x) {
  return x.size(-1);
}
inline std::int64_t rows_of(const at::Tensor& x) {
  return c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
}

template <typename scalar_t>
struct ForwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  const scalar_t* weight;
  const scalar_t* bias;
  scalar_t* y;
  acc_t* mean;
  acc_t* rstd;
  std::int64_t rows, channels;
  double eps;
  acc_t negative_slope;
};

template <typename scalar_t>
struct BackwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad_y;
  const scalar_t* x;
  const scalar_t* y;
  const scalar_t* weight;
  const acc_t* mean;
  const acc_t* rstd;
  scalar_t* grad_x;
  scalar_t* grad_weight;
  scalar_t* grad_bias;
  std::int64_t rows, channels;
  acc_t negative_slope;
};

template <typename scalar_t>
struct DoubleBackwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad_grad_x;  // null: grad_grad_x was not given (zero)
  const scalar_t* grad_grad_weight;
  const scalar_t* grad_grad_bias;
  const scalar_t* grad_y;
  const scalar_t* x;
  const scalar_t* y;
  const scalar_t* weight;
  const acc_t* mean;
  const acc_t* rstd;
  scalar_t* grad_grad_y;
  scalar_t* grad_x;
  scalar_t* grad_weight;
  std::int64_t rows, channels;
  acc_t negative_slope;
};

using TensorTriple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Where the kernels' loops walk (batch_norm_relu_cpu.h, batch_norm_relu_cuda.cuh): units(args)
// units of kPositions elements per column; locate(args, unit) gives a unit's Position. Here the
// units are the rows of the [rows, channels] view, a row's position its first element's offset.
struct RowUnits {
  using Position = std::int64_t;
  static constexpr std::int64_t kPositions = 1;
  template <typename Args>
  C10_HOST_DEVICE static std::int64_t units(const Args& a) {
    return a.rows;
  }
  template <typename Args>
  C10_HOST_DEVICE static Position locate(const Args& a, std::int64_t row) {
    return row * a.channels;
  }
};

struct ForwardOp {
  at::Tensor x, weight, bias;  // contiguous inputs
  at::Tensor y, mean, rstd;    // outputs
  double eps;
  double negative_slope;

  ForwardOp(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& bias_in,
            double eps_in, double negative_slope_in)
      : ForwardOp(x_in, weight_in, bias_in, eps_in, x_in.sizes(), negative_slope_in) {}
  // y of shape `y_sizes` (the pooled op's y is smaller than x).
  ForwardOp(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& bias_in,
            double eps_in, at::IntArrayRef y_sizes, double negative_slope_in)
      : x(x_in.contiguous()),
        weight(weight_in.contiguous()),
        bias(bias_in.contiguous()),
        y(at::empty(y_sizes, x.options())),
        mean(at::empty({channels_of(x)}, stats_options(x))),
        rstd(at::empty({channels_of(x)}, stats_options(x))),
        eps(eps_in),
        negative_slope(negative_slope_in) {}

  at::ScalarType dtype() const { return x.scalar_type(); }
  bool has_channels() const { return channels_of(x) > 0; }
  TensorTriple outputs() const { return {y, mean, rstd}; }

  template <typename scalar_t>
  ForwardArgs<scalar_t> args() const {
    using acc_t = at::opmath_type<scalar_t>;
    return {x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
            bias.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
            mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>(), rows_of(x),
            channels_of(x), eps, static_cast<acc_t>(negative_slope)};
  }
};

// The inputs both backward ops read (the forward's inputs, outputs and statistics), contiguous.
// y is undefined for the pooled op, which recomputes its mask from x (its activation is ReLU).
struct SavedInputs {
  at::Tensor grad_y, x, y, weight, mean, rstd;
  double negative_slope;

  SavedInputs(const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& y_in,
              const at::Tensor& weight_in, const at::Tensor& mean_in, const at::Tensor& rstd_in,
              double negative_slope_in)
      : grad_y(grad_y_in.contiguous()),
        x(x_in.contiguous()),
        y(y_in.defined() ? y_in.contiguous() : y_in),
        weight(weight_in.contiguous()),
        mean(mean_in.contiguous()),
        rstd(rstd_in.contiguous()),
        negative_slope(negative_slope_in) {}

  at::ScalarType dtype() const { return x.scalar_type(); }
  bool has_channels() const { return channels_of(x) > 0; }

  template <typename scalar_t>
  const scalar_t* y_data() const {
    return y.defined() ? y.const_data_ptr<scalar_t>() : nullptr;
  }
};

struct BackwardOp : SavedInputs {
  at::Tensor grad_x, grad_weight, grad_bias;  // outputs

  BackwardOp(const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& y_in,
             const at::Tensor& weight_in, const at::Tensor& mean_in, const at::Tensor& rstd_in,
             double negative_slope_in)
      : SavedInputs(grad_y_in, x_in, y_in, weight_in, mean_in, rstd_in, negative_slope_in),
        grad_x(at::empty(x.sizes(), x.options())),
        grad_weight(at::empty({channels_of(x)}, x.options())),
        grad_bias(at::empty({channels_of(x)}, x.options())) {}

  TensorTriple outputs() const { return {grad_x, grad_weight, grad_bias}; }

  template <typename scalar_t>
  BackwardArgs<scalar_t> args() const {
    using acc_t = at::opmath_type<scalar_t>;
    return {grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
            y_data<scalar_t>(), weight.const_data_ptr<scalar_t>(),
            mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(),
            grad_x.mutable_data_ptr<scalar_t>(), grad_weight.mutable_data_ptr<scalar_t>(),
            grad_bias.mutable_data_ptr<scalar_t>(), rows_of(x), channels_of(x),
            static_cast<acc_t>(negative_slope)};
  }
};

struct DoubleBackwardOp : SavedInputs {
  bool has_ggx;                                 // grad_grad_x was given
  at::Tensor grad_grad_x;                       // contiguous, or undefined when not given
  at::Tensor grad_grad_weight, grad_grad_bias;  // contiguous, zeros when not given
  at::Tensor grad_grad_y, grad_x, grad_weight;  // outputs

  DoubleBackwardOp(
      const std::optional<at::Tensor>& grad_grad_x_in,
      const std::optional<at::Tensor>& grad_grad_weight_in,
      const std::optional<at::Tensor>& grad_grad_bias_in, const at::Tensor& grad_y_in,
      const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& weight_in,
      const at::Tensor& mean_in, const at::Tensor& rstd_in, double negative_slope_in)
      : SavedInputs(grad_y_in, x_in, y_in, weight_in, mean_in, rstd_in, negative_slope_in),
        has_ggx(is_given(grad_grad_x_in)),
        grad_grad_x(has_ggx ? grad_grad_x_in->contiguous() : at::Tensor()),
        grad_grad_weight(given_or_zeros(grad_grad_weight_in)),
        grad_grad_bias(given_or_zeros(grad_grad_bias_in)),
        grad_grad_y(at::empty(grad_y.sizes(), x.options())),
        grad_x(at::empty(x.sizes(), x.options())),
        grad_weight(at::empty({channels_of(x)}, x.options())) {}

  TensorTriple outputs() const { return {grad_grad_y, grad_x, grad_weight}; }

  template <typename scalar_t>
  DoubleBackwardArgs<scalar_t> args() const {
    using acc_t = at::opmath_type<scalar_t>;
    return {has_ggx ? grad_grad_x.const_data_ptr<scalar_t>() : nullptr,
            grad_grad_weight.const_data_ptr<scalar_t>(), grad_grad_bias.const_data_ptr<scalar_t>(),
            grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
            y_data<scalar_t>(), weight.const_data_ptr<scalar_t>(),
            mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(),
            grad_grad_y.mutable_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(),
            grad_weight.mutable_data_ptr<scalar_t>(), rows_of(x), channels_of(x),
            static_cast<acc_t>(negative_slope)};
  }

 private:
  // A given per-channel tensor (contiguous), or zeros of x's dtype and device.
  at::Tensor given_or_zeros(const std::optional<at::Tensor>& tensor) const {
    return is_given(tensor) ? tensor->contiguous() : at::zeros({channels_of(x)}, x.options());
  }
};

// Per-column coefficients of the elementwise passes, computed once per column from its sums.

// Backward: x_hat = (x - mean) r;  gx = coef_gz gz + coef_xhat x_hat + coef_one  (gz = m gy).
template <typename acc_t>
struct BackwardColumn {
  acc_t mean, rstd;
  acc_t coef_gz, coef_xhat, coef_one;
};

template <typename acc_t>
C10_HOST_DEVICE inline BackwardColumn<acc_t> backward_column(
    acc_t mean, acc_t rstd, acc_t gamma, acc_t sum_gz, acc_t sum_gz_xhat, acc_t inv_rows) {
  const acc_t gamma_r = gamma * rstd;
  return {mean, rstd, gamma_r, -gamma_r * sum_gz_xhat * inv_rows, -gamma_r * sum_gz * inv_rows};
}

// Double backward, from the five column sums (A..E above):
//   P(gz) = gz - a - x_hat b,   P(ggx) = ggx - c - x_hat d
//   d gy = m (k_pggx P(ggx) + gg_gamma x_hat + gg_beta)
//   d x  = k_pgz P(gz) + k_pggx_x P(ggx) + k_xhat x_hat
template <typename acc_t>
struct DoubleBackwardColumn {
  acc_t mean, rstd;
  acc_t a, b, c, d;
  acc_t k_pggx, gg_gamma, gg_beta;
  acc_t k_pgz, k_pggx_x, k_xhat;
  acc_t d_gamma;
};

template <typename acc_t>
C10_HOST_DEVICE inline DoubleBackwardColumn<acc_t> double_backward_column(
    acc_t mean, acc_t rstd, acc_t gamma, acc_t gg_gamma, acc_t gg_beta, acc_t sum_gz,
    acc_t sum_gz_xhat, acc_t sum_ggx, acc_t sum_ggx_xhat, acc_t sum_ggx_gz, acc_t inv_rows) {
  DoubleBackwardColumn<acc_t> col;
  col.mean = mean;
  col.rstd = rstd;
  col.a = sum_gz * inv_rows;
  col.b = sum_gz_xhat * inv_rows;
  col.c = sum_ggx * inv_rows;
  col.d = sum_ggx_xhat * inv_rows;
  const acc_t s1 = sum_ggx_gz - sum_ggx * col.a - sum_ggx_xhat * col.b;
  const acc_t gamma_r = gamma * rstd;
  const acc_t gamma_r2 = gamma_r * rstd;
  col.k_pggx = gamma_r;
  col.gg_gamma = gg_gamma;
  col.gg_beta = gg_beta;
  col.k_pgz = gg_gamma * rstd - gamma_r2 * col.d;
  col.k_pggx_x = -gamma_r2 * col.b;
  col.k_xhat = -gamma_r2 * s1 * inv_rows;
  col.d_gamma = rstd * s1;
  return col;
}

}  // namespace bn_relu
}  // namespace maml_fast
