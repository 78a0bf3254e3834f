// maml_fast::pooled_linear{,_backward,_double_backward}: the CUDA launchers (formulas in
// pooled_linear.h). One block per task; the block's threads take the task's output elements in
// strides, each element one thread's sum in a fixed order (deterministic, no atomics). No host
// synchronisation: the launches can be captured in a CUDA graph.
#include "pooled_linear.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace maml_fast {
namespace pooled_linear {
namespace {

constexpr int kTaskThreads = 256;

// ---------------------------------------------------------------------------------------------
// The per-task formulas. Each loops over its outputs from `first` in steps of `step` (the thread's
// index and the block's size), so each output element is one thread's.

template <typename scalar_t, typename acc_t>
__device__ inline acc_t pooled(const View<const scalar_t>& x, std::int64_t b, std::int64_t channel,
                                    const Extent& e) {
  acc_t sum = acc_t(0);
  for (std::int64_t h = 0; h < e.height; ++h) {
    for (std::int64_t w = 0; w < e.width; ++w) {
      sum += static_cast<acc_t>(x.at(b, channel, h, w));
    }
  }
  return sum / static_cast<acc_t>(e.height * e.width);
}

// y (forward), or d grad_y (double backward: the forward of grad_grad_x with weight, plus that of x
// with grad_grad_weight, plus grad_grad_bias) of task t.
template <typename scalar_t, typename acc_t>
__device__ inline void linear_of_pooled(const Args<scalar_t>& a, bool double_backward, std::int64_t t,
                                             std::int64_t first, std::int64_t step) {
  const Extent& e = a.size;
  const View<const scalar_t>& bias = double_backward ? a.grad_grad_bias : a.bias;
  for (std::int64_t i = first; i < e.batch * e.out; i += step) {
    const std::int64_t b = i / e.out, o = i % e.out;
    acc_t sum = bias.data != nullptr ? static_cast<acc_t>(bias.at(t, o)) : acc_t(0);
    for (std::int64_t c = 0; c < e.in; ++c) {
      if (!double_backward) {
        sum += static_cast<acc_t>(a.weight.at(t, o, c)) * pooled<scalar_t, acc_t>(a.x, b, t * e.in + c, e);
        continue;
      }
      if (a.grad_grad_x.data != nullptr) {
        sum += static_cast<acc_t>(a.weight.at(t, o, c)) * pooled<scalar_t, acc_t>(a.grad_grad_x, b, t * e.in + c, e);
      }
      if (a.grad_grad_weight.data != nullptr) {
        sum += static_cast<acc_t>(a.grad_grad_weight.at(t, o, c)) * pooled<scalar_t, acc_t>(a.x, b, t * e.in + c, e);
      }
    }
    a.y.at(b, t * e.out + o) = static_cast<scalar_t>(sum);
  }
}

// grad_x[b, tC+c, p] = (1/P) sum_o grad_y[b, tO+o] w[t,o,c] for task t; w = weight (backward) or
// grad_grad_weight (double backward), zeros when absent.
template <typename scalar_t, typename acc_t>
__device__ inline void input_grad(const Args<scalar_t>& a, const View<const scalar_t>& w, std::int64_t t,
                                       std::int64_t first, std::int64_t step) {
  const Extent& e = a.size;
  const std::int64_t pixels = e.height * e.width;
  for (std::int64_t i = first; i < e.batch * e.in * pixels; i += step) {
    const std::int64_t b = i / (e.in * pixels), c = (i / pixels) % e.in, p = i % pixels;
    acc_t sum = acc_t(0);
    if (w.data != nullptr) {
      for (std::int64_t o = 0; o < e.out; ++o) {
        sum += static_cast<acc_t>(a.grad_y.at(b, t * e.out + o)) * static_cast<acc_t>(w.at(t, o, c));
      }
    }
    a.grad_x.at(b, t * e.in + c, p / e.width, p % e.width) = static_cast<scalar_t>(sum / static_cast<acc_t>(pixels));
  }
}

// grad_weight[t,o,c] = sum_b grad_y[b, tO+o] pooled(m)[b,t,c] for m = x (backward) or grad_grad_x
// (double backward, zeros when absent); with `bias_too`, grad_bias[t,o] = sum_b grad_y[b, tO+o].
template <typename scalar_t, typename acc_t>
__device__ inline void weight_grad(const Args<scalar_t>& a, const View<const scalar_t>& m, bool bias_too,
                                        std::int64_t t, std::int64_t first, std::int64_t step) {
  const Extent& e = a.size;
  for (std::int64_t i = first; i < e.out * e.in; i += step) {
    const std::int64_t o = i / e.in, c = i % e.in;
    acc_t sum = acc_t(0);
    if (m.data != nullptr) {
      for (std::int64_t b = 0; b < e.batch; ++b) {
        sum += static_cast<acc_t>(a.grad_y.at(b, t * e.out + o)) * pooled<scalar_t, acc_t>(m, b, t * e.in + c, e);
      }
    }
    a.grad_weight.at(t, o, c) = static_cast<scalar_t>(sum);
  }
  for (std::int64_t o = first; bias_too && o < e.out; o += step) {
    acc_t sum = acc_t(0);
    for (std::int64_t b = 0; b < e.batch; ++b) {
      sum += static_cast<acc_t>(a.grad_y.at(b, t * e.out + o));
    }
    a.grad_bias.at(t, o) = static_cast<scalar_t>(sum);
  }
}

// The three ops' work for task t.
template <typename scalar_t, typename acc_t>
__device__ inline void forward_task(const Args<scalar_t>& a, std::int64_t t, std::int64_t first,
                                         std::int64_t step) {
  linear_of_pooled<scalar_t, acc_t>(a, false, t, first, step);
}

template <typename scalar_t, typename acc_t>
__device__ inline void backward_task(const Args<scalar_t>& a, std::int64_t t, std::int64_t first,
                                          std::int64_t step) {
  input_grad<scalar_t, acc_t>(a, a.weight, t, first, step);
  weight_grad<scalar_t, acc_t>(a, a.x, true, t, first, step);
}

template <typename scalar_t, typename acc_t>
__device__ inline void double_backward_task(const Args<scalar_t>& a, std::int64_t t, std::int64_t first,
                                                 std::int64_t step) {
  linear_of_pooled<scalar_t, acc_t>(a, true, t, first, step);
  input_grad<scalar_t, acc_t>(a, a.grad_grad_weight, t, first, step);
  weight_grad<scalar_t, acc_t>(a, a.grad_grad_x, false, t, first, step);
}


template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kTaskThreads) forward_kernel(const Args<scalar_t> a) {
  forward_task<scalar_t, acc_t>(a, blockIdx.x, threadIdx.x, blockDim.x);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kTaskThreads) backward_kernel(const Args<scalar_t> a) {
  backward_task<scalar_t, acc_t>(a, blockIdx.x, threadIdx.x, blockDim.x);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kTaskThreads) double_backward_kernel(const Args<scalar_t> a) {
  double_backward_task<scalar_t, acc_t>(a, blockIdx.x, threadIdx.x, blockDim.x);
}

dim3 task_grid(const Extent& e) {
  TORCH_CHECK(e.tasks <= 2147483647LL, "maml_fast: too many tasks for one launch (", e.tasks, ")");
  return dim3(static_cast<unsigned int>(e.tasks));
}

at::Tensor pooled_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_inputs(kForwardName, x, weight, bias);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const Op op = forward_op(x, weight, bias);
  if (op.has_work()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pooled_linear_cuda", [&] {
      const auto a = op.args<scalar_t>();
      forward_kernel<scalar_t, at::opmath_type<scalar_t>>
          <<<task_grid(a.size), kTaskThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return op.y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pooled_linear_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight) {
  check_backward_inputs(kBackwardName, grad_y, x, weight);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const Op op = backward_op(grad_y, x, weight);
  if (op.has_work()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pooled_linear_backward_cuda", [&] {
      const auto a = op.args<scalar_t>();
      backward_kernel<scalar_t, at::opmath_type<scalar_t>>
          <<<task_grid(a.size), kTaskThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {op.grad_x, op.grad_weight, op.grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pooled_linear_double_backward_cuda(
    const std::optional<at::Tensor>& grad_grad_x, const std::optional<at::Tensor>& grad_grad_weight,
    const std::optional<at::Tensor>& grad_grad_bias, const at::Tensor& grad_y, const at::Tensor& x,
    const at::Tensor& weight) {
  check_double_backward_inputs(grad_grad_x, grad_grad_weight, grad_grad_bias, grad_y, x, weight);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const Op op = double_backward_op(grad_grad_x, grad_grad_weight, grad_grad_bias, grad_y, x, weight);
  if (op.has_work()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pooled_linear_double_backward_cuda", [&] {
      const auto a = op.args<scalar_t>();
      double_backward_kernel<scalar_t, at::opmath_type<scalar_t>>
          <<<task_grid(a.size), kTaskThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {op.y, op.grad_x, op.grad_weight};
}

}  // namespace
}  // namespace pooled_linear
}  // namespace maml_fast

TORCH_LIBRARY_IMPL(maml_fast, CUDA, m) {
  m.impl("pooled_linear", &maml_fast::pooled_linear::pooled_linear_cuda);
  m.impl("pooled_linear_backward", &maml_fast::pooled_linear::pooled_linear_backward_cuda);
  m.impl("pooled_linear_double_backward", &maml_fast::pooled_linear::pooled_linear_double_backward_cuda);
}
