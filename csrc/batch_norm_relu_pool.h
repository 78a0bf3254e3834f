// maml_fast::batch_norm_relu_max_pool{,_backward,_double_backward}: per-task BatchNorm (batch
// statistics) + ReLU + 2x2 max-pool (stride 2, no padding, floor mode), the parts shared by the CPU
// and CUDA kernels.
//
// x is [batch, height, width, channels] (the NHWC view of a channels-last activation); the
// statistics are those of batch_norm_relu.h over all rows = batch * height * width positions
// (including an odd last row / column that no window covers). With z = gamma x_hat + beta:
//
//   y[b, i, j] = relu(max over the window (2i + di, 2j + dj) of z)       (only y is stored)
//
// relu and max commute. The backward routes each pooled gradient to the window's first maximum of
// z in row-major order (PyTorch's max_pool2d rule), or nowhere when the max is <= 0 (the ReLU mask):
// that is gz, and then the formulas of batch_norm_relu.h hold unchanged with this gz (positions no
// window routes to, and the uncovered ones, have gz = 0 but still get gx through the statistics).
// The double backward is batch_norm_relu.h's with this gz, and with d gy[b, i, j] = d gz at the
// window's routed position (zero where the gradient was not routed): the routing is piecewise
// constant. z is recomputed by every kernel from x, the stored mean and rstd, gamma and beta with
// the same arithmetic (same code, same rounding), so the argmax is the same in all three.
#pragma once

#include "batch_norm_relu.h"

#include <c10/macros/Macros.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace maml_fast {
namespace bn_relu {
namespace pool {

constexpr const char* kForwardName = "maml_fast::batch_norm_relu_max_pool";
constexpr const char* kBackwardName = "maml_fast::batch_norm_relu_max_pool_backward";
constexpr const char* kDoubleBackwardName = "maml_fast::batch_norm_relu_max_pool_double_backward";

// Checks naming the argument; x must be 4-D [batch >= 1, height >= 2, width >= 2, channels].
void check_forward_inputs(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps);
void check_backward_inputs(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& rstd);
void check_double_backward_inputs(
    const std::optional<at::Tensor>& grad_grad_x, const std::optional<at::Tensor>& grad_grad_weight,
    const std::optional<at::Tensor>& grad_grad_bias, const at::Tensor& grad_y, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mean,
    const at::Tensor& rstd);

// [batch, height / 2, width / 2, channels]: the shape of y for x [batch, height, width, channels].
inline std::vector<std::int64_t> pooled_sizes(const at::Tensor& x) {
  return {x.size(0), x.size(1) / 2, x.size(2) / 2, x.size(3)};
}

// ---------------------------------------------------------------------------------------------
// The kernels walk "cells": the 2x2 blocks of positions (b, 2i + di, 2j + dj), di, dj in {0, 1},
// that exist. Full cells are the pooling windows; with an odd height or width, the last row or
// column of cells holds the 1 or 2 positions that no window covers.
// Position p of a cell (row-major window order: p = 2 di + dj) exists when has(p); the loops over
// p run to 4 with constant p, so per-position values stay in registers.
struct Cell {
  std::int64_t first;      // element offset of position 0
  std::int64_t right;      // element step to the right neighbour (channels)
  std::int64_t below;      // element step to the row below (width * channels)
  bool has_right, has_below;
  std::int64_t pooled;     // element offset of the window's output in y (windows only)

  C10_HOST_DEVICE bool window() const { return has_right && has_below; }
  C10_HOST_DEVICE bool has(int p) const { return ((p & 1) == 0 || has_right) && ((p & 2) == 0 || has_below); }
  C10_HOST_DEVICE std::int64_t offset(int p) const { return first + (p & 1) * right + (p >> 1) * below; }
};

struct Geometry {
  std::int64_t batch, height, width, channels;  // of x

  C10_HOST_DEVICE std::int64_t cell_rows() const { return (height + 1) / 2; }
  C10_HOST_DEVICE std::int64_t cell_columns() const { return (width + 1) / 2; }
  C10_HOST_DEVICE std::int64_t cells() const { return batch * cell_rows() * cell_columns(); }

  C10_HOST_DEVICE Cell cell(std::int64_t index) const {
    const std::int64_t j = index % cell_columns();
    const std::int64_t rest = index / cell_columns();
    const std::int64_t i = rest % cell_rows();
    const std::int64_t b = rest / cell_rows();
    return {((b * height + 2 * i) * width + 2 * j) * channels, channels, width * channels,
            2 * j + 1 < width, 2 * i + 1 < height,
            ((b * (height / 2) + i) * (width / 2) + j) * channels};
  }
};

inline Geometry geometry_of(const at::Tensor& x) {
  return {x.size(0), x.size(1), x.size(2), x.size(3)};
}

// The kernels' units (see RowUnits in batch_norm_relu.h): the cells of x.
struct CellUnits {
  using Position = Cell;
  static constexpr std::int64_t kPositions = 4;
  template <typename Args>
  C10_HOST_DEVICE static std::int64_t units(const Args& a) {
    return a.geometry.cells();
  }
  template <typename Args>
  C10_HOST_DEVICE static Cell locate(const Args& a, std::int64_t unit) {
    return a.geometry.cell(unit);
  }
};

// A cell's x_hat and z at its positions (those that exist) and, for a window, its max z; V is one
// value (CUDA) or a vector of columns (CPU).
template <typename V>
struct CellValues {
  V x_hat[4], z[4], z_max;
};

// Window routines for one value (CUDA) or a vector of columns (CPU, GCC vector extension): V is
// acc_t or a vector of acc_t, comparisons give bool or lane masks alike.

// The largest z of a window (z[0..3], row-major).
template <typename V>
C10_HOST_DEVICE inline V window_max(const V* z) {
  V best = z[0];
  for (int p = 1; p < 4; ++p) {
    best = z[p] > best ? z[p] : best;
  }
  return best;
}

// gz[p] = g at the window's first maximum (the first p with z[p] == z_max) when z_max > 0 (ReLU),
// 0 elsewhere.
template <typename V>
C10_HOST_DEVICE inline void route_to_first_max(const V* z, const V& z_max, const V& g, V* gz) {
  V remaining = z_max > V{} ? g : V{};
  for (int p = 0; p < 4; ++p) {
    const auto hit = z[p] == z_max;
    gz[p] = hit ? remaining : V{};
    remaining = hit ? V{} : remaining;
  }
}

// The transpose of route_to_first_max: d at the window's first maximum when z_max > 0, else 0.
template <typename V>
C10_HOST_DEVICE inline V gather_from_first_max(const V* z, const V& z_max, const V* d) {
  V picked = d[3];
  for (int p = 2; p >= 0; --p) {
    picked = z[p] == z_max ? d[p] : picked;
  }
  return z_max > V{} ? picked : V{};
}

// z = gamma x_hat + beta, the pre-ReLU value every kernel compares.
template <typename V>
C10_HOST_DEVICE inline V affine(const V& x_hat, const V& gamma, const V& beta) {
  return x_hat * gamma + beta;
}

// ---------------------------------------------------------------------------------------------
// Kernel arguments: those of the BatchNorm+ReLU kernels, with y the pooled output (forward) or
// absent (backward: y == nullptr; the mask comes from recomputed z), grad_y / grad_grad_y pooled,
// and `rows` = batch * height * width.
template <typename scalar_t>
struct ForwardArgs : bn_relu::ForwardArgs<scalar_t> {
  Geometry geometry;
};

template <typename scalar_t>
struct BackwardArgs : bn_relu::BackwardArgs<scalar_t> {
  const scalar_t* bias;
  Geometry geometry;
};

template <typename scalar_t>
struct DoubleBackwardArgs : bn_relu::DoubleBackwardArgs<scalar_t> {
  const scalar_t* bias;
  Geometry geometry;
};

// The pooled op's activation is ReLU: its kernels route through the window's maximum when it is > 0.
constexpr double kReluSlope = 0.0;

struct ForwardOp : bn_relu::ForwardOp {
  ForwardOp(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& bias_in,
            double eps_in)
      : bn_relu::ForwardOp(x_in, weight_in, bias_in, eps_in, pooled_sizes(x_in), kReluSlope) {}

  template <typename scalar_t>
  ForwardArgs<scalar_t> args() const {
    return {bn_relu::ForwardOp::args<scalar_t>(), geometry_of(x)};
  }
};

struct BackwardOp : bn_relu::BackwardOp {
  at::Tensor bias;

  BackwardOp(const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& weight_in,
             const at::Tensor& bias_in, const at::Tensor& mean_in, const at::Tensor& rstd_in)
      : bn_relu::BackwardOp(grad_y_in, x_in, at::Tensor(), weight_in, mean_in, rstd_in, kReluSlope),
        bias(bias_in.contiguous()) {}

  template <typename scalar_t>
  BackwardArgs<scalar_t> args() const {
    return {bn_relu::BackwardOp::args<scalar_t>(), bias.const_data_ptr<scalar_t>(), geometry_of(x)};
  }
};

struct DoubleBackwardOp : bn_relu::DoubleBackwardOp {
  at::Tensor bias;

  DoubleBackwardOp(
      const std::optional<at::Tensor>& grad_grad_x_in,
      const std::optional<at::Tensor>& grad_grad_weight_in,
      const std::optional<at::Tensor>& grad_grad_bias_in, const at::Tensor& grad_y_in,
      const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& bias_in,
      const at::Tensor& mean_in, const at::Tensor& rstd_in)
      : bn_relu::DoubleBackwardOp(grad_grad_x_in, grad_grad_weight_in, grad_grad_bias_in, grad_y_in,
                                  x_in, at::Tensor(), weight_in, mean_in, rstd_in, kReluSlope),
        bias(bias_in.contiguous()) {}

  template <typename scalar_t>
  DoubleBackwardArgs<scalar_t> args() const {
    return {bn_relu::DoubleBackwardOp::args<scalar_t>(), bias.const_data_ptr<scalar_t>(),
            geometry_of(x)};
  }
};

}  // namespace pool
}  // namespace bn_relu
}  // namespace maml_fast
