// maml_fast::direct_conv2d{,_weight_grad}: the parts shared by the CPU and CUDA kernels: input
// checks (errors name the argument) and the host-side preparation (operand layouts, outputs,
// kernel arguments).
//
// A task-batched convolution with few input channels (the first layer of a network: 1 or 3), in
// the grouped layout: x [B, T*C, H, W] (any strides), per-task weights [T, O, C, kh, kw], output
// [B, T*O, Ho, Wo] channels-last, i.e. memory [B, Ho, Wo, T, O]. With C that small an implicit GEMM
// has a reduction of only C*kh*kw "taps"; the direct kernels instead compute every output pixel's O
// channels as vectors, reading the tap's input value once for all of them:
//
//   forward:      out[b, t*O + o, p]   = bias[t, o] + sum_k x_k(b, t, p) w[t, k, o]
//   weight grad:  grad_w[t, o, k]      = sum_{b, p} x_k(b, t, p) grad_out[b, t*O + o, p]
//
// with k = (c, i, j) a tap, p = (oh, ow) an output pixel and x_k(b, t, p) = x[b, t*C + c,
// oh*sh - ph + i, ow*sw - pw + j] (zero outside the image). The weights travel tap-major
// ([T, K, O], K = C*kh*kw, output channels contiguous), which is also the memory layout of the
// weight gradient the op returns (a [T, O, C, kh, kw] view of it).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <optional>

namespace maml_fast {
namespace direct_conv {

constexpr const char* kForwardName = "maml_fast::direct_conv2d";
constexpr const char* kWeightGradName = "maml_fast::direct_conv2d_weight_grad";

struct Geometry {
  std::int64_t batch, tasks, in_channels, out_channels;
  std::int64_t height, width, kernel_h, kernel_w;
  std::int64_t stride_h, stride_w, pad_h, pad_w;
  std::int64_t out_h, out_w;

  C10_HOST_DEVICE std::int64_t taps() const { return in_channels * kernel_h * kernel_w; }
  C10_HOST_DEVICE std::int64_t out_pixels() const { return out_h * out_w; }
};

// Each check throws TypeError / ValueError (TORCH_CHECK_TYPE / _VALUE) naming the operator and the
// offending argument, and returns the geometry. They do not copy.
Geometry check_forward_inputs(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding);
Geometry check_weight_grad_inputs(
    const at::Tensor& x, const at::Tensor& grad_out, std::int64_t tasks,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding);

// ---------------------------------------------------------------------------------------------
// Host-side preparation shared by the CPU and CUDA launchers: after the checks (and, on CUDA,
// under the device guard) a launcher builds ForwardOp / WeightGradOp, dispatches on dtype(), runs
// its kernel when has_work(), and returns the output.

// x's element (b, channel, ih, iw) sits at b * batch + channel * channel + ih * row + iw * column.
struct InputStrides {
  std::int64_t batch, channel, row, column;
};

template <typename scalar_t>
struct ForwardArgs {
  const scalar_t* x;
  InputStrides x_strides;
  const scalar_t* weight;  // [T, K, O]
  const scalar_t* bias;    // [T, O], or null
  scalar_t* out;           // [B, Ho, Wo, T, O]
  Geometry geo;
};

template <typename scalar_t>
struct WeightGradArgs {
  const scalar_t* x;
  InputStrides x_strides;
  const scalar_t* grad_out;  // [B, Ho, Wo, T, O]
  scalar_t* grad_weight;     // [T, K, O]
  Geometry geo;
};

InputStrides input_strides(const at::Tensor& x);

struct ForwardOp {
  Geometry geo;
  at::Tensor x;       // as given
  at::Tensor weight;  // [T, K, O] contiguous
  at::Tensor bias;    // [T, O] contiguous, or undefined
  at::Tensor out;     // [B, T*O, Ho, Wo] channels-last

  ForwardOp(const at::Tensor& x_in, const at::Tensor& weight_in,
            const std::optional<at::Tensor>& bias_in, at::IntArrayRef stride,
            at::IntArrayRef padding);

  at::ScalarType dtype() const { return x.scalar_type(); }
  bool has_work() const { return out.numel() > 0; }

  template <typename scalar_t>
  ForwardArgs<scalar_t> args() const {
    return {x.const_data_ptr<scalar_t>(),
            input_strides(x),
            weight.const_data_ptr<scalar_t>(),
            bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
            out.mutable_data_ptr<scalar_t>(),
            geo};
  }
};

struct WeightGradOp {
  Geometry geo;
  at::Tensor x;            // as given
  at::Tensor grad_out;     // channels-last
  at::Tensor grad_weight;  // [T, K, O] contiguous (the kernels write every element)

  WeightGradOp(const at::Tensor& x_in, const at::Tensor& grad_out_in, std::int64_t tasks,
               at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding);

  at::ScalarType dtype() const { return x.scalar_type(); }
  bool has_work() const { return grad_weight.numel() > 0; }
  // grad_weight as [T, O, C, kh, kw] (a view; O is the innermost dimension in memory).
  at::Tensor output() const;

  template <typename scalar_t>
  WeightGradArgs<scalar_t> args() const {
    return {x.const_data_ptr<scalar_t>(), input_strides(x), grad_out.const_data_ptr<scalar_t>(),
            grad_weight.mutable_data_ptr<scalar_t>(), geo};
  }
};

}  // namespace direct_conv
}  // namespace maml_fast
