// maml_fast::batch_norm_relu_max_pool{,_backward,_double_backward}: the schemas, input checks and
// CPU kernels (formulas in batch_norm_relu_pool.h).
//
// The kernels are the BatchNorm+ReLU kernels of batch_norm_relu_cpu.h (their column sums,
// per-column coefficients and per-element formulas) walked over 2x2 cells instead of rows: a cell
// loads its (up to) four positions, recomputes z there, and routes the pooled gradient to the
// window's first maximum (or gathers the second-order gradient back from it).
// batch_norm_relu_cpu.h first: it silences GCC's vector-ABI note for the window routines too.
#include "batch_norm_relu_cpu.h"

#include "batch_norm_relu_pool.h"

#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(maml_fast, m) {
  // The fake (meta) implementations are registered by this module.
  m.set_python_module("maml_fast.ops.batch_norm_relu_pool");
  // x [batch, height, width, channels] -> y [batch, height/2, width/2, channels]; mean and rstd as
  // for batch_norm_relu (float32 for float32/float16/bfloat16 x, float64 for float64 x).
  m.def(
      "batch_norm_relu_max_pool(Tensor x, Tensor weight, Tensor bias, float eps) -> "
      "(Tensor y, Tensor mean, Tensor rstd)");
  m.def(
      "batch_norm_relu_max_pool_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor bias, "
      "Tensor mean, Tensor rstd) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "batch_norm_relu_max_pool_double_backward(Tensor? grad_grad_x, Tensor? grad_grad_weight, "
      "Tensor? grad_grad_bias, Tensor grad_y, Tensor x, Tensor weight, Tensor bias, Tensor mean, "
      "Tensor rstd) -> (Tensor grad_grad_y, Tensor grad_x, Tensor grad_weight)");
}

namespace maml_fast {
namespace bn_relu {
namespace pool {

namespace {

void check_x(const char* op, const at::Tensor& x) {
  check_dtype(op, "x", x);
  TORCH_CHECK_VALUE(
      x.dim() == 4, op, ": x must be 4-D [batch, height, width, channels], got shape ", x.sizes());
  TORCH_CHECK_VALUE(
      x.size(0) >= 1 && x.size(1) >= 2 && x.size(2) >= 2, op,
      ": x needs batch >= 1 and height, width >= 2 for a 2x2 max-pool, got shape ", x.sizes());
}

// The inputs of both backward ops.
void check_saved(
    const char* op, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& rstd) {
  check_x(op, x);
  check_like_x(op, "grad_y", grad_y, x, pooled_sizes(x));
  check_channel_vector(op, "weight", weight, x, x.scalar_type());
  check_channel_vector(op, "bias", bias, x, x.scalar_type());
  check_channel_vector(op, "mean", mean, x, stats_dtype(x.scalar_type()));
  check_channel_vector(op, "rstd", rstd, x, stats_dtype(x.scalar_type()));
}

}  // namespace

void check_forward_inputs(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  check_x(kForwardName, x);
  check_channel_vector(kForwardName, "weight", weight, x, x.scalar_type());
  check_channel_vector(kForwardName, "bias", bias, x, x.scalar_type());
  check_eps(kForwardName, eps);
}

void check_backward_inputs(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& rstd) {
  check_saved(kBackwardName, grad_y, x, weight, bias, mean, rstd);
}

void check_double_backward_inputs(
    const std::optional<at::Tensor>& grad_grad_x, const std::optional<at::Tensor>& grad_grad_weight,
    const std::optional<at::Tensor>& grad_grad_bias, const at::Tensor& grad_y, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mean,
    const at::Tensor& rstd) {
  check_saved(kDoubleBackwardName, grad_y, x, weight, bias, mean, rstd);
  check_grad_grads(kDoubleBackwardName, grad_grad_x, grad_grad_weight, grad_grad_bias, x);
}

namespace {

using cpu::FullWidth;
using cpu::load;
using cpu::normalized;
using cpu::store;

// The values of a cell's positions in the vector of columns at `column`; mean and rstd are the
// stored statistics.
template <typename acc_t, typename Args, typename Width, typename Vec = typename cpu::VecTypes<acc_t>::Vec>
MAML_FAST_ALWAYS_INLINE CellValues<Vec> cell_values(
    const Args& a, const Cell& cell, std::int64_t column, Width width, const Vec& mean, const Vec& rstd) {
  const Vec gamma = load<acc_t>(a.weight + column, width);
  const Vec beta = load<acc_t>(a.bias + column, width);
  CellValues<Vec> v;
  for (int p = 0; p < 4; ++p) {
    if (cell.has(p)) {
      v.x_hat[p] = normalized<acc_t>(a, cell.offset(p), column, width, mean, rstd);
      v.z[p] = affine(v.x_hat[p], gamma, beta);
    }
  }
  if (cell.window()) {
    v.z_max = window_max(v.z);
  }
  return v;
}

// The backward kernels' view of a cell: values and the routed gz (zero outside the windows).
template <typename acc_t, typename Args, typename Width, typename Vec = typename cpu::VecTypes<acc_t>::Vec>
MAML_FAST_ALWAYS_INLINE CellValues<Vec> routed_cell(
    const Args& a, const Cell& cell, std::int64_t column, Width width, Vec* gz) {
  const CellValues<Vec> v = cell_values<acc_t>(
      a, cell, column, width, load<acc_t>(a.mean + column, width), load<acc_t>(a.rstd + column, width));
  if (cell.window()) {
    route_to_first_max(v.z, v.z_max, load<acc_t>(a.grad_y + cell.pooled + column, width), gz);
  } else {
    for (int p = 0; p < 4; ++p) {
      gz[p] = Vec{};
    }
  }
  return v;
}

template <typename scalar_t>
struct ForwardKernel : CellUnits {
  using Rows = cpu::ForwardKernel<scalar_t>;
  using scalar_type = scalar_t;
  using acc_t = typename Rows::acc_t;
  using Vec = typename Rows::Vec;
  using Args = ForwardArgs<scalar_t>;

  static constexpr int kSums = Rows::kSums;
  template <typename Width>
  static MAML_FAST_ALWAYS_INLINE void accumulate(
      const Args& a, const Cell& cell, std::int64_t column, Width width, Vec* acc) {
    for (int p = 0; p < 4; ++p) {
      if (cell.has(p)) {
        Rows::accumulate(a, cell.offset(p), column, width, acc);
      }
    }
  }

  // The stored (rounded) mean and rstd: the backward ops recompute z from them.
  static constexpr int kCoefs = 2;
  static void column(const Args& a, std::int64_t c, const double* sums, acc_t* coefs) {
    double mean, r;
    Rows::statistics(a, c, sums, mean, r);
    coefs[0] = a.mean[c];
    coefs[1] = a.rstd[c];
  }

  template <typename Width>
  static MAML_FAST_ALWAYS_INLINE void apply(
      const Args& a, const Cell& cell, std::int64_t column, Width width, const Vec* coefs) {
    if (cell.window()) {
      const Vec z_max = cell_values<acc_t>(a, cell, column, width, coefs[0], coefs[1]).z_max;
      store<acc_t>(a.y + cell.pooled + column, z_max < Vec{} ? Vec{} : z_max, width);  // NaN stays NaN
    }
  }
};

// The column sums and coefficients of the backward ops: Rows' (the BatchNorm+ReLU kernel's) over
// the routed gz.
template <typename Rows, typename ArgsT>
struct RoutedCellKernel : CellUnits {
  using scalar_type = typename Rows::scalar_type;
  using acc_t = typename Rows::acc_t;
  using Vec = typename Rows::Vec;
  using Args = ArgsT;

  static constexpr int kSums = Rows::kSums;
  template <typename Width>
  static MAML_FAST_ALWAYS_INLINE void accumulate(
      const Args& a, const Cell& cell, std::int64_t column, Width width, Vec* acc) {
    Vec gz[4];
    const CellValues<Vec> v = routed_cell<acc_t>(a, cell, column, width, gz);
    for (int p = 0; p < 4; ++p) {
      if (cell.has(p)) {
        Rows::add_sums(a, cell.offset(p), column, width, gz[p], v.x_hat[p], acc);
      }
    }
  }

  static constexpr int kCoefs = Rows::kCoefs;
  static void column(const Args& a, std::int64_t c, const double* sums, acc_t* coefs) {
    Rows::column(a, c, sums, coefs);
  }
};

template <typename scalar_t>
struct BackwardKernel : RoutedCellKernel<cpu::BackwardKernel<scalar_t>, BackwardArgs<scalar_t>> {
  using Rows = cpu::BackwardKernel<scalar_t>;
  using acc_t = typename Rows::acc_t;
  using Vec = typename Rows::Vec;
  using Args = BackwardArgs<scalar_t>;

  template <typename Width>
  static MAML_FAST_ALWAYS_INLINE void apply(
      const Args& a, const Cell& cell, std::int64_t column, Width width, const Vec* coefs) {
    Vec gz[4];
    const CellValues<Vec> v = routed_cell<acc_t>(a, cell, column, width, gz);
    for (int p = 0; p < 4; ++p) {
      if (cell.has(p)) {
        store<acc_t>(a.grad_x + cell.offset(p) + column, Rows::grad_x(coefs, gz[p], v.x_hat[p]), width);
      }
    }
  }
};

template <typename scalar_t, bool kHasGgx>
struct DoubleBackwardKernel
    : RoutedCellKernel<cpu::DoubleBackwardKernel<scalar_t, kHasGgx>, DoubleBackwardArgs<scalar_t>> {
  using Rows = cpu::DoubleBackwardKernel<scalar_t, kHasGgx>;
  using acc_t = typename Rows::acc_t;
  using Vec = typename Rows::Vec;
  using Args = DoubleBackwardArgs<scalar_t>;

  // d x at every position; d gy of a window: d gz gathered from the routed position.
  template <typename Width>
  static MAML_FAST_ALWAYS_INLINE void apply(
      const Args& a, const Cell& cell, std::int64_t column, Width width, const Vec* coefs) {
    Vec gz[4], d_gz[4];
    const CellValues<Vec> v = routed_cell<acc_t>(a, cell, column, width, gz);
    for (int p = 0; p < 4; ++p) {
      if (cell.has(p)) {
        Vec d_x;
        Rows::outputs(coefs, gz[p], v.x_hat[p], Rows::load_ggx(a, cell.offset(p), column, width), d_gz[p], d_x);
        store<acc_t>(a.grad_x + cell.offset(p) + column, d_x, width);
      }
    }
    if (cell.window()) {
      store<acc_t>(a.grad_grad_y + cell.pooled + column, gather_from_first_max(v.z, v.z_max, d_gz), width);
    }
  }
};

TensorTriple batch_norm_relu_max_pool_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  check_forward_inputs(x, weight, bias, eps);
  return cpu::run_op<ForwardKernel>(ForwardOp(x, weight, bias, eps));
}

TensorTriple batch_norm_relu_max_pool_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& rstd) {
  check_backward_inputs(grad_y, x, weight, bias, mean, rstd);
  return cpu::run_op<BackwardKernel>(BackwardOp(grad_y, x, weight, bias, mean, rstd));
}

TensorTriple batch_norm_relu_max_pool_double_backward_cpu(
    const std::optional<at::Tensor>& grad_grad_x, const std::optional<at::Tensor>& grad_grad_weight,
    const std::optional<at::Tensor>& grad_grad_bias, const at::Tensor& grad_y, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mean,
    const at::Tensor& rstd) {
  check_double_backward_inputs(
      grad_grad_x, grad_grad_weight, grad_grad_bias, grad_y, x, weight, bias, mean, rstd);
  return cpu::run_double_backward_op<DoubleBackwardKernel>(
      DoubleBackwardOp(grad_grad_x, grad_grad_weight, grad_grad_bias, grad_y, x, weight, bias, mean, rstd));
}

}  // namespace
}  // namespace pool
}  // namespace bn_relu
}  // namespace maml_fast

TORCH_LIBRARY_IMPL(maml_fast, CPU, m) {
  m.impl("batch_norm_relu_max_pool", &maml_fast::bn_relu::pool::batch_norm_relu_max_pool_cpu);
  m.impl("batch_norm_relu_max_pool_backward", &maml_fast::bn_relu::pool::batch_norm_relu_max_pool_backward_cpu);
  m.impl("batch_norm_relu_max_pool_double_backward",
         &maml_fast::bn_relu::pool::batch_norm_relu_max_pool_double_backward_cpu);
}
