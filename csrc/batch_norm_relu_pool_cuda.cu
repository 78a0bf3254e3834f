// maml_fast::batch_norm_relu_max_pool{,_backward,_double_backward}: the CUDA kernels (formulas in
// batch_norm_relu_pool.h): the BatchNorm+ReLU kernels of batch_norm_relu_cuda.cuh walked over 2x2
// cells instead of rows (one thread: one column of one cell; a warp reads 32 adjacent columns).
#include "batch_norm_relu_pool.h"

#include "batch_norm_relu_cuda.cuh"

#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace maml_fast {
namespace bn_relu {
namespace pool {
namespace {

using cuda::normalized;

// The values of a cell's positions in column c; mean and rstd are the stored statistics.
template <typename acc_t, typename Args>
__device__ __forceinline__ CellValues<acc_t> cell_values(const Args& a, const Cell& cell, std::int64_t c,
                                                         acc_t mean, acc_t rstd) {
  const acc_t gamma = static_cast<acc_t>(a.weight[c]);
  const acc_t beta = static_cast<acc_t>(a.bias[c]);
  CellValues<acc_t> v;
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    if (cell.has(p)) {
      v.x_hat[p] = normalized(a, cell.offset(p), c, mean, rstd);
      v.z[p] = affine(v.x_hat[p], gamma, beta);
    }
  }
  if (cell.window()) {
    v.z_max = window_max(v.z);
  }
  return v;
}

// The backward kernels' view of a cell: values and the routed gz (zero outside the windows).
template <typename acc_t, typename Args>
__device__ __forceinline__ CellValues<acc_t> routed_cell(const Args& a, const Cell& cell, std::int64_t c,
                                                         acc_t* gz) {
  const CellValues<acc_t> v = cell_values<acc_t>(a, cell, c, a.mean[c], a.rstd[c]);
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    gz[p] = acc_t(0);
  }
  if (cell.window()) {
    route_to_first_max(v.z, v.z_max, static_cast<acc_t>(a.grad_y[cell.pooled + c]), gz);
  }
  return v;
}

template <typename scalar_t>
struct ForwardKernel : CellUnits {
  using Rows = cuda::ForwardKernel<scalar_t>;
  using acc_t = typename Rows::acc_t;
  using Args = ForwardArgs<scalar_t>;
  static constexpr int kSums = Rows::kSums;
  static constexpr int kCoefs = 2;

  __device__ static void accumulate(const Args& a, const Cell& cell, std::int64_t c, acc_t* acc) {
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      if (cell.has(p)) {
        Rows::accumulate(a, cell.offset(p), c, acc);
      }
    }
  }

  // coefs: mean, rstd (the backward ops recompute z from the same values).
  __device__ static void column(const Args& a, std::int64_t c, const acc_t* sums, acc_t* coefs,
                                bool write_outputs) {
    Rows::statistics(a, c, sums, write_outputs, coefs[0], coefs[1]);
  }

  __device__ static void apply(const Args& a, const Cell& cell, std::int64_t c, const acc_t* coefs) {
    if (cell.window()) {
      const acc_t z_max = cell_values<acc_t>(a, cell, c, coefs[0], coefs[1]).z_max;
      a.y[cell.pooled + c] = static_cast<scalar_t>(z_max < acc_t(0) ? acc_t(0) : z_max);  // NaN stays NaN
    }
  }
};

// The column sums and coefficients of the backward ops: Rows' (the BatchNorm+ReLU kernel's) over
// the routed gz.
template <typename Rows, typename ArgsT>
struct RoutedCellKernel : CellUnits {
  using acc_t = typename Rows::acc_t;
  using Args = ArgsT;
  static constexpr int kSums = Rows::kSums;
  static constexpr int kCoefs = Rows::kCoefs;

  __device__ static void accumulate(const Args& a, const Cell& cell, std::int64_t c, acc_t* acc) {
    acc_t gz[4];
    const CellValues<acc_t> v = routed_cell(a, cell, c, gz);
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      if (cell.has(p)) {
        Rows::add_sums(a, cell.offset(p), c, gz[p], v.x_hat[p], acc);
      }
    }
  }

  __device__ static void column(const Args& a, std::int64_t c, const acc_t* sums, acc_t* coefs,
                                bool write_outputs) {
    Rows::column(a, c, sums, coefs, write_outputs);
  }
};

template <typename scalar_t>
struct BackwardKernel : RoutedCellKernel<cuda::BackwardKernel<scalar_t>, BackwardArgs<scalar_t>> {
  using Rows = cuda::BackwardKernel<scalar_t>;
  using acc_t = typename Rows::acc_t;
  using Args = BackwardArgs<scalar_t>;

  __device__ static void apply(const Args& a, const Cell& cell, std::int64_t c, const acc_t* coefs) {
    acc_t gz[4];
    const CellValues<acc_t> v = routed_cell(a, cell, c, gz);
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      if (cell.has(p)) {
        a.grad_x[cell.offset(p) + c] = static_cast<scalar_t>(Rows::grad_x(coefs, gz[p], v.x_hat[p]));
      }
    }
  }
};

template <typename scalar_t, bool kHasGgx>
struct DoubleBackwardKernel
    : RoutedCellKernel<cuda::DoubleBackwardKernel<scalar_t, kHasGgx>, DoubleBackwardArgs<scalar_t>> {
  using Rows = cuda::DoubleBackwardKernel<scalar_t, kHasGgx>;
  using acc_t = typename Rows::acc_t;
  using Args = DoubleBackwardArgs<scalar_t>;

  // d x at every position; d gy of a window: d gz gathered from the routed position.
  __device__ static void apply(const Args& a, const Cell& cell, std::int64_t c, const acc_t* coefs) {
    acc_t gz[4], d_gz[4];
    const CellValues<acc_t> v = routed_cell(a, cell, c, gz);
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      if (cell.has(p)) {
        acc_t d_x;
        Rows::outputs(coefs, gz[p], v.x_hat[p], Rows::load_ggx(a, cell.offset(p), c), d_gz[p], d_x);
        a.grad_x[cell.offset(p) + c] = static_cast<scalar_t>(d_x);
      }
    }
    if (cell.window()) {
      a.grad_grad_y[cell.pooled + c] = static_cast<scalar_t>(gather_from_first_max(v.z, v.z_max, d_gz));
    }
  }
};

TensorTriple batch_norm_relu_max_pool_cuda(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  check_forward_inputs(x, weight, bias, eps);
  const c10::cuda::CUDAGuard device_guard(x.device());
  return cuda::launch_op<ForwardKernel>(ForwardOp(x, weight, bias, eps));
}

TensorTriple batch_norm_relu_max_pool_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& rstd) {
  check_backward_inputs(grad_y, x, weight, bias, mean, rstd);
  const c10::cuda::CUDAGuard device_guard(x.device());
  return cuda::launch_op<BackwardKernel>(BackwardOp(grad_y, x, weight, bias, mean, rstd));
}

TensorTriple batch_norm_relu_max_pool_double_backward_cuda(
    const std::optional<at::Tensor>& grad_grad_x, const std::optional<at::Tensor>& grad_grad_weight,
    const std::optional<at::Tensor>& grad_grad_bias, const at::Tensor& grad_y, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mean,
    const at::Tensor& rstd) {
  check_double_backward_inputs(
      grad_grad_x, grad_grad_weight, grad_grad_bias, grad_y, x, weight, bias, mean, rstd);
  const c10::cuda::CUDAGuard device_guard(x.device());
  return cuda::launch_double_backward_op<DoubleBackwardKernel>(
      DoubleBackwardOp(grad_grad_x, grad_grad_weight, grad_grad_bias, grad_y, x, weight, bias, mean, rstd));
}

}  // namespace
}  // namespace pool
}  // namespace bn_relu
}  // namespace maml_fast

TORCH_LIBRARY_IMPL(maml_fast, CUDA, m) {
  m.impl("batch_norm_relu_max_pool", &maml_fast::bn_relu::pool::batch_norm_relu_max_pool_cuda);
  m.impl("batch_norm_relu_max_pool_backward", &maml_fast::bn_relu::pool::batch_norm_relu_max_pool_backward_cuda);
  m.impl("batch_norm_relu_max_pool_double_backward",
         &maml_fast::bn_relu::pool::batch_norm_relu_max_pool_double_backward_cuda);
}
