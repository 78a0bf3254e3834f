// The CUDA kernels of the BatchNorm+ReLU family (maml_fast::batch_norm_relu*, and the max-pooled
// variant of batch_norm_relu_pool_cuda.cu): the two launches, and the BatchNorm+ReLU kernels whose
// per-column coefficients and per-element formulas the pooled kernels reuse.
//
// Every op is two launches over the same grid: blocks of 32 columns x 8 unit-threads, the units
// (rows of the [rows, channels] view; 2x2 cells for the pooled op) cut into `splits` ranges
// (grid.y) so that narrow matrices with many rows still fill the GPU.
//   1. column_sums_kernel: each block sums its units of its 32 columns (one warp reads 32 adjacent
//      columns of a row: coalesced) and writes one partial sum per split to a workspace;
//   2. apply_kernel: each block adds the partial sums of its columns (in split order, so every block
//      gets the same coefficients), computes the per-column coefficients, and writes its units of
//      the elementwise outputs; the blocks of split 0 also write the per-channel outputs.
// No host synchronisation and no host-to-device copy: the launches can be captured in a CUDA graph.
// The forward's statistics are shifted sums, with the column's first value as the shift, so the
// one-pass variance keeps its precision when |mean| >> std.
//
// Each kernel provides Position, units(args), locate(args, unit) (where it walks: RowUnits), kSums,
// accumulate(args, position, column, acc), kCoefs, column(args, column, sums, coefs, write_outputs)
// and apply(args, position, column, coefs).
#pragma once

#include "batch_norm_relu.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

namespace maml_fast {
namespace bn_relu {
namespace cuda {

constexpr int kTileColumns = 32;  // threadIdx.x: a warp's columns
constexpr int kRowThreads = 8;    // threadIdx.y
constexpr int kThreads = kTileColumns * kRowThreads;
constexpr std::int64_t kMinRowsPerSplit = 32;
constexpr std::int64_t kMaxSplits = 1024;

// y = z where z > 0, else negative_slope z (ReLU at slope 0: exact zeros; NaN stays NaN).
template <typename acc_t>
__device__ __forceinline__ acc_t activation(acc_t z, acc_t negative_slope) {
  return z < acc_t(0) ? (negative_slope == acc_t(0) ? acc_t(0) : z * negative_slope) : z;
}

// m v, m the activation's derivative read off its output y: v where y > 0, else negative_slope v.
template <typename acc_t>
__device__ __forceinline__ acc_t activation_grad(acc_t y, acc_t v, acc_t negative_slope) {
  return y > acc_t(0) ? v : (negative_slope == acc_t(0) ? acc_t(0) : v * negative_slope);
}

template <typename scalar_t>
struct ForwardKernel : RowUnits {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kSums = 2;
  static constexpr int kCoefs = 2;
  using Args = ForwardArgs<scalar_t>;

  __device__ static void accumulate(const Args& a, std::int64_t offset, std::int64_t c, acc_t* acc) {
    const acc_t d = static_cast<acc_t>(a.x[offset + c]) - static_cast<acc_t>(a.x[c]);
    acc[0] += d;
    acc[1] += d * d;
  }

  // mean and rstd of column c from its sums (written to the outputs by split 0's blocks).
  __device__ static void statistics(const Args& a, std::int64_t c, const acc_t* sums, bool write_outputs,
                                    acc_t& mean, acc_t& r) {
    const acc_t inv_rows = acc_t(1) / static_cast<acc_t>(a.rows);
    const acc_t shifted_mean = sums[0] * inv_rows;
    const acc_t var = ::max(sums[1] * inv_rows - shifted_mean * shifted_mean, acc_t(0));
    mean = static_cast<acc_t>(a.x[c]) + shifted_mean;
    r = acc_t(1) / ::sqrt(var + static_cast<acc_t>(a.eps));
    if (write_outputs) {
      a.mean[c] = mean;
      a.rstd[c] = r;
    }
  }

  // y = activation(x scale + shift)
  __device__ static void column(const Args& a, std::int64_t c, const acc_t* sums, acc_t* coefs,
                                bool write_outputs) {
    acc_t mean, r;
    statistics(a, c, sums, write_outputs, mean, r);
    const acc_t scale = static_cast<acc_t>(a.weight[c]) * r;
    coefs[0] = scale;
    coefs[1] = static_cast<acc_t>(a.bias[c]) - mean * scale;
  }

  __device__ static void apply(const Args& a, std::int64_t offset, std::int64_t c, const acc_t* coefs) {
    const acc_t z = static_cast<acc_t>(a.x[offset + c]) * coefs[0] + coefs[1];
    a.y[offset + c] = static_cast<scalar_t>(activation(z, a.negative_slope));
  }
};

// x_hat = (x - mean) rstd of column c at element offset `offset`.
template <typename acc_t, typename Args>
__device__ __forceinline__ acc_t normalized(const Args& a, std::int64_t offset, std::int64_t c, acc_t mean,
                                            acc_t rstd) {
  return (static_cast<acc_t>(a.x[offset + c]) - mean) * rstd;
}

template <typename scalar_t>
struct BackwardKernel : RowUnits {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kSums = 2;
  static constexpr int kCoefs = 5;
  using Args = BackwardArgs<scalar_t>;

  // The summands of the element at offset + c.
  __device__ static void add_sums(const Args&, std::int64_t, std::int64_t, acc_t gz, acc_t x_hat, acc_t* acc) {
    acc[0] += gz;
    acc[1] += gz * x_hat;
  }

  __device__ static void accumulate(const Args& a, std::int64_t offset, std::int64_t c, acc_t* acc) {
    const acc_t gz = activation_grad(static_cast<acc_t>(a.y[offset + c]), static_cast<acc_t>(a.grad_y[offset + c]),
                                     a.negative_slope);
    add_sums(a, offset, c, gz, normalized(a, offset, c, a.mean[c], a.rstd[c]), acc);
  }

  // coefs: mean, rstd, then gx = coef_gz gz + coef_xhat x_hat + coef_one
  __device__ static void column(const Args& a, std::int64_t c, const acc_t* sums, acc_t* coefs,
                                bool write_outputs) {
    const BackwardColumn<acc_t> col = backward_column<acc_t>(
        a.mean[c], a.rstd[c], static_cast<acc_t>(a.weight[c]), sums[0], sums[1],
        acc_t(1) / static_cast<acc_t>(a.rows));
    coefs[0] = col.mean;
    coefs[1] = col.rstd;
    coefs[2] = col.coef_gz;
    coefs[3] = col.coef_xhat;
    coefs[4] = col.coef_one;
    if (write_outputs) {
      a.grad_weight[c] = static_cast<scalar_t>(sums[1]);
      a.grad_bias[c] = static_cast<scalar_t>(sums[0]);
    }
  }

  __device__ static acc_t grad_x(const acc_t* coefs, acc_t gz, acc_t x_hat) {
    return coefs[2] * gz + coefs[3] * x_hat + coefs[4];
  }

  __device__ static void apply(const Args& a, std::int64_t offset, std::int64_t c, const acc_t* coefs) {
    const acc_t gz = activation_grad(static_cast<acc_t>(a.y[offset + c]), static_cast<acc_t>(a.grad_y[offset + c]),
                                     a.negative_slope);
    a.grad_x[offset + c] = static_cast<scalar_t>(grad_x(coefs, gz, normalized(a, offset, c, coefs[0], coefs[1])));
  }
};

template <typename scalar_t, bool kHasGgx>
struct DoubleBackwardKernel : RowUnits {
  using acc_t = at::opmath_type<scalar_t>;
  using Args = DoubleBackwardArgs<scalar_t>;
  static constexpr int kSums = kHasGgx ? 5 : 2;
  static constexpr int kCoefs = 9;

  // grad_grad_x at element offset + c (zero when not given).
  __device__ static acc_t load_ggx(const Args& a, std::int64_t offset, std::int64_t c) {
    if constexpr (kHasGgx) {
      return static_cast<acc_t>(a.grad_grad_x[offset + c]);
    } else {
      return acc_t(0);
    }
  }

  // The summands of the element at offset + c.
  __device__ static void add_sums(const Args& a, std::int64_t offset, std::int64_t c, acc_t gz, acc_t x_hat,
                                  acc_t* acc) {
    acc[0] += gz;
    acc[1] += gz * x_hat;
    if constexpr (kHasGgx) {
      const acc_t ggx = load_ggx(a, offset, c);
      acc[2] += ggx;
      acc[3] += ggx * x_hat;
      acc[4] += ggx * gz;
    }
  }

  __device__ static void accumulate(const Args& a, std::int64_t offset, std::int64_t c, acc_t* acc) {
    const acc_t gz = activation_grad(static_cast<acc_t>(a.y[offset + c]), static_cast<acc_t>(a.grad_y[offset + c]),
                                     a.negative_slope);
    add_sums(a, offset, c, gz, normalized(a, offset, c, a.mean[c], a.rstd[c]), acc);
  }

  // coefs: mean, rstd, k_ggx, e_xhat, e_one, f_gz, f_ggx, f_xhat, f_one with
  //   d gz = k_ggx ggx + e_xhat x_hat + e_one (d gy = m d gz),  d x = f_gz gz + f_ggx ggx + f_xhat x_hat + f_one
  __device__ static void column(const Args& a, std::int64_t c, const acc_t* sums, acc_t* coefs,
                                bool write_outputs) {
    const DoubleBackwardColumn<acc_t> col = double_backward_column<acc_t>(
        a.mean[c], a.rstd[c], static_cast<acc_t>(a.weight[c]),
        static_cast<acc_t>(a.grad_grad_weight[c]), static_cast<acc_t>(a.grad_grad_bias[c]), sums[0],
        sums[1], kHasGgx ? sums[2] : acc_t(0), kHasGgx ? sums[3] : acc_t(0),
        kHasGgx ? sums[4] : acc_t(0), acc_t(1) / static_cast<acc_t>(a.rows));
    coefs[0] = col.mean;
    coefs[1] = col.rstd;
    coefs[2] = col.k_pggx;
    coefs[3] = col.gg_gamma - col.k_pggx * col.d;
    coefs[4] = col.gg_beta - col.k_pggx * col.c;
    coefs[5] = col.k_pgz;
    coefs[6] = col.k_pggx_x;
    coefs[7] = col.k_xhat - col.k_pgz * col.b - col.k_pggx_x * col.d;
    coefs[8] = -col.k_pgz * col.a - col.k_pggx_x * col.c;
    if (write_outputs) {
      a.grad_weight[c] = static_cast<scalar_t>(col.d_gamma);
    }
  }

  // The unmasked d gz and d x of one element.
  __device__ static void outputs(const acc_t* coefs, acc_t gz, acc_t x_hat, acc_t ggx, acc_t& d_gz, acc_t& d_x) {
    d_gz = coefs[3] * x_hat + coefs[4];
    d_x = coefs[5] * gz + coefs[7] * x_hat + coefs[8];
    if constexpr (kHasGgx) {
      d_gz += coefs[2] * ggx;
      d_x += coefs[6] * ggx;
    }
  }

  __device__ static void apply(const Args& a, std::int64_t offset, std::int64_t c, const acc_t* coefs) {
    const acc_t y = static_cast<acc_t>(a.y[offset + c]);
    const acc_t gz = activation_grad(y, static_cast<acc_t>(a.grad_y[offset + c]), a.negative_slope);
    acc_t d_gz, d_x;
    outputs(coefs, gz, normalized(a, offset, c, coefs[0], coefs[1]), load_ggx(a, offset, c), d_gz, d_x);
    a.grad_grad_y[offset + c] = static_cast<scalar_t>(activation_grad(y, d_gz, a.negative_slope));
    a.grad_x[offset + c] = static_cast<scalar_t>(d_x);
  }
};

template <typename Kernel, typename acc_t>
__global__ void __launch_bounds__(kThreads) column_sums_kernel(
    const typename Kernel::Args a, acc_t* __restrict__ partial, std::int64_t units_per_split) {
  constexpr int kSums = Kernel::kSums;
  __shared__ acc_t shared[kSums][kRowThreads][kTileColumns];
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * kTileColumns + threadIdx.x;
  const std::int64_t split = blockIdx.y;
  const std::int64_t begin = split * units_per_split;
  const std::int64_t end = ::min(Kernel::units(a), begin + units_per_split);
  acc_t acc[kSums];
#pragma unroll
  for (int k = 0; k < kSums; ++k) {
    acc[k] = acc_t(0);
  }
  if (c < a.channels) {
    for (std::int64_t unit = begin + threadIdx.y; unit < end; unit += kRowThreads) {
      Kernel::accumulate(a, Kernel::locate(a, unit), c, acc);
    }
  }
#pragma unroll
  for (int k = 0; k < kSums; ++k) {
    shared[k][threadIdx.y][threadIdx.x] = acc[k];
  }
  __syncthreads();
  if (threadIdx.y == 0 && c < a.channels) {
    const std::int64_t splits = gridDim.y;
#pragma unroll
    for (int k = 0; k < kSums; ++k) {
      acc_t sum = acc_t(0);
#pragma unroll
      for (int j = 0; j < kRowThreads; ++j) {
        sum += shared[k][j][threadIdx.x];
      }
      partial[(k * splits + split) * a.channels + c] = sum;
    }
  }
}

template <typename Kernel, typename acc_t>
__global__ void __launch_bounds__(kThreads) apply_kernel(
    const typename Kernel::Args a, const acc_t* __restrict__ partial, std::int64_t units_per_split) {
  constexpr int kSums = Kernel::kSums;
  constexpr int kCoefs = Kernel::kCoefs;
  __shared__ acc_t shared_coefs[kCoefs][kTileColumns];
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * kTileColumns + threadIdx.x;
  const std::int64_t split = blockIdx.y;
  const std::int64_t splits = gridDim.y;
  if (threadIdx.y == 0 && c < a.channels) {
    acc_t sums[kSums];
#pragma unroll
    for (int k = 0; k < kSums; ++k) {
      acc_t sum = acc_t(0);
      for (std::int64_t s = 0; s < splits; ++s) {
        sum += partial[(k * splits + s) * a.channels + c];
      }
      sums[k] = sum;
    }
    acc_t coefs[kCoefs];
    Kernel::column(a, c, sums, coefs, split == 0);
#pragma unroll
    for (int k = 0; k < kCoefs; ++k) {
      shared_coefs[k][threadIdx.x] = coefs[k];
    }
  }
  __syncthreads();
  if (c >= a.channels) {
    return;
  }
  acc_t coefs[kCoefs];
#pragma unroll
  for (int k = 0; k < kCoefs; ++k) {
    coefs[k] = shared_coefs[k][threadIdx.x];
  }
  const std::int64_t begin = split * units_per_split;
  const std::int64_t end = ::min(Kernel::units(a), begin + units_per_split);
  for (std::int64_t unit = begin + threadIdx.y; unit < end; unit += kRowThreads) {
    Kernel::apply(a, Kernel::locate(a, unit), c, coefs);
  }
}

inline int multiprocessor_count(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// The two launches of one op on the current stream.
template <typename Kernel>
void launch(const typename Kernel::Args& a, const at::Tensor& like) {
  using acc_t = typename Kernel::acc_t;
  const std::int64_t units = Kernel::units(a);
  const std::int64_t tiles = (a.channels + kTileColumns - 1) / kTileColumns;
  TORCH_CHECK(tiles <= 2147483647LL, "maml_fast::batch_norm_relu: too many channels (", a.channels, ")");
  // About four blocks per multiprocessor, at least kMinRowsPerSplit units per split.
  const std::int64_t wanted = (4LL * multiprocessor_count(like.get_device()) + tiles - 1) / tiles;
  const std::int64_t most = (units + kMinRowsPerSplit - 1) / kMinRowsPerSplit;
  const std::int64_t splits = std::max<std::int64_t>(1, std::min({wanted, most, kMaxSplits}));
  const std::int64_t units_per_split = (units + splits - 1) / splits;
  const at::Tensor partial = at::empty(
      {Kernel::kSums, splits, a.channels}, like.options().dtype(stats_dtype(like.scalar_type())));
  const dim3 grid(static_cast<unsigned int>(tiles), static_cast<unsigned int>(splits));
  const dim3 block(kTileColumns, kRowThreads);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  column_sums_kernel<Kernel, acc_t><<<grid, block, 0, stream>>>(
      a, partial.mutable_data_ptr<acc_t>(), units_per_split);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  apply_kernel<Kernel, acc_t><<<grid, block, 0, stream>>>(
      a, partial.const_data_ptr<acc_t>(), units_per_split);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// An op on CUDA (under the caller's device guard): launches Kernel<scalar_t> for the dtype of `op`
// (a *Op struct of batch_norm_relu.h) on its arguments, when it has channels; returns its outputs.
template <template <typename> class Kernel, typename Op>
TensorTriple launch_op(const Op& op) {
  if (op.has_channels()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, op.dtype(), "maml_fast::batch_norm_relu*_cuda", [&] {
      launch<Kernel<scalar_t>>(op.template args<scalar_t>(), op.x);
    });
  }
  return op.outputs();
}

// A double backward op: Kernel<scalar_t, whether grad_grad_x was given>.
template <template <typename, bool> class Kernel, typename Op>
TensorTriple launch_double_backward_op(const Op& op) {
  if (op.has_channels()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, op.dtype(), "maml_fast::batch_norm_relu*_cuda", [&] {
      if (op.has_ggx) {
        launch<Kernel<scalar_t, true>>(op.template args<scalar_t>(), op.x);
      } else {
        launch<Kernel<scalar_t, false>>(op.template args<scalar_t>(), op.x);
      }
    });
  }
  return op.outputs();
}

}  // namespace cuda
}  // namespace bn_relu
}  // namespace maml_fast
