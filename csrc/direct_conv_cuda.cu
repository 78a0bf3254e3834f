// maml_fast::direct_conv2d{,_weight_grad}: the CUDA kernels (formulas in direct_conv.h).
//
//   forward:     one thread per output element, in the output's memory order [B, Ho, Wo, T, O]:
//                a warp writes adjacent output channels (coalesced), reads their weights [T, K, O]
//                (coalesced) and one input value per tap (the same address for the whole warp);
//   weight grad: blocks of 32 output channels x 8 pixel-threads for one task, the pixels of all
//                images cut into `splits` ranges (grid.y); each block sums kTapBlock taps at a time
//                over its range, adds its 8 pixel-threads through shared memory and writes one
//                partial sum per split; the partial sums are then added in split order (a
//                deterministic sum, no atomics).
// No host synchronisation and no host-to-device copy: the launches can be captured in a CUDA graph.
#include "direct_conv.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace maml_fast {
namespace direct_conv {
namespace {

constexpr int kForwardThreads = 256;
constexpr int kChannelLanes = 32;  // threadIdx.x of the weight grad: a warp's output channels
constexpr int kPixelThreads = 8;   // threadIdx.y
constexpr int kTapBlock = 9;       // taps summed per pass over the pixels
constexpr std::int64_t kMinPixelsPerSplit = 256;
constexpr std::int64_t kMaxSplits = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kForwardThreads)
    direct_conv2d_kernel(const ForwardArgs<scalar_t> a, std::int64_t numel) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry g = a.geo;
  const std::int64_t index = static_cast<std::int64_t>(blockIdx.x) * kForwardThreads + threadIdx.x;
  if (index >= numel) {
    return;
  }
  const std::int64_t o = index % g.out_channels;
  const std::int64_t t = (index / g.out_channels) % g.tasks;
  const std::int64_t pixel = index / (g.out_channels * g.tasks);
  const std::int64_t ow = pixel % g.out_w;
  const std::int64_t oh = (pixel / g.out_w) % g.out_h;
  const std::int64_t b = pixel / g.out_pixels();
  const std::int64_t ih0 = oh * g.stride_h - g.pad_h;
  const std::int64_t iw0 = ow * g.stride_w - g.pad_w;
  const scalar_t* x = a.x + b * a.x_strides.batch + t * g.in_channels * a.x_strides.channel;
  const scalar_t* weight = a.weight + t * g.taps() * g.out_channels + o;
  acc_t acc = a.bias == nullptr ? acc_t(0) : static_cast<acc_t>(a.bias[t * g.out_channels + o]);
  std::int64_t k = 0;
  for (std::int64_t c = 0; c < g.in_channels; ++c) {
    for (std::int64_t i = 0; i < g.kernel_h; ++i) {
      const std::int64_t ih = ih0 + i;
      for (std::int64_t j = 0; j < g.kernel_w; ++j, ++k) {
        const std::int64_t iw = iw0 + j;
        if (ih >= 0 && ih < g.height && iw >= 0 && iw < g.width) {
          const acc_t value = static_cast<acc_t>(
              x[c * a.x_strides.channel + ih * a.x_strides.row + iw * a.x_strides.column]);
          acc += value * static_cast<acc_t>(weight[k * g.out_channels]);
        }
      }
    }
  }
  a.out[index] = static_cast<scalar_t>(acc);
}

// grid (tasks * channel blocks, splits); partial[split, t, k, o] = the split's sum.
template <typename scalar_t>
__global__ void __launch_bounds__(kChannelLanes* kPixelThreads)
    direct_conv2d_weight_grad_kernel(const WeightGradArgs<scalar_t> a,
                                     at::opmath_type<scalar_t>* partial,
                                     std::int64_t pixels_per_split) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t shared[kTapBlock][kPixelThreads][kChannelLanes];
  const Geometry g = a.geo;
  const std::int64_t channel_blocks = (g.out_channels + kChannelLanes - 1) / kChannelLanes;
  const std::int64_t t = blockIdx.x / channel_blocks;
  const std::int64_t o = (blockIdx.x % channel_blocks) * kChannelLanes + threadIdx.x;
  const bool active = o < g.out_channels;
  const std::int64_t num_taps = g.taps();
  const std::int64_t pixels = g.batch * g.out_pixels();
  const std::int64_t begin = blockIdx.y * pixels_per_split;
  const std::int64_t end = ::min(pixels, begin + pixels_per_split);
  const scalar_t* x = a.x + t * g.in_channels * a.x_strides.channel;
  const scalar_t* grad_out = a.grad_out + t * g.out_channels + o;
  acc_t* out = partial + (blockIdx.y * g.tasks + t) * num_taps * g.out_channels + o;

  for (std::int64_t k0 = 0; k0 < num_taps; k0 += kTapBlock) {
    acc_t acc[kTapBlock];
#pragma unroll
    for (int kb = 0; kb < kTapBlock; ++kb) {
      acc[kb] = acc_t(0);
    }
    for (std::int64_t n = begin + threadIdx.y; n < end; n += kPixelThreads) {
      const std::int64_t b = n / g.out_pixels();
      const std::int64_t oh = (n / g.out_w) % g.out_h;
      const std::int64_t ow = n % g.out_w;
      const std::int64_t ih0 = oh * g.stride_h - g.pad_h;
      const std::int64_t iw0 = ow * g.stride_w - g.pad_w;
      const acc_t go = active ? static_cast<acc_t>(grad_out[n * g.tasks * g.out_channels]) : acc_t(0);
#pragma unroll
      for (int kb = 0; kb < kTapBlock; ++kb) {
        const std::int64_t k = k0 + kb;
        if (k < num_taps) {
          const std::int64_t c = k / (g.kernel_h * g.kernel_w);
          const std::int64_t ih = ih0 + (k / g.kernel_w) % g.kernel_h;
          const std::int64_t iw = iw0 + k % g.kernel_w;
          if (ih >= 0 && ih < g.height && iw >= 0 && iw < g.width) {
            acc[kb] += go * static_cast<acc_t>(x[b * a.x_strides.batch + c * a.x_strides.channel +
                                                 ih * a.x_strides.row + iw * a.x_strides.column]);
          }
        }
      }
    }
#pragma unroll
    for (int kb = 0; kb < kTapBlock; ++kb) {
      shared[kb][threadIdx.y][threadIdx.x] = acc[kb];
    }
    __syncthreads();
    // Thread row y adds up taps y, y + 8, ... of the block over the pixel-threads, in order.
    for (int kb = threadIdx.y; kb < kTapBlock; kb += kPixelThreads) {
      acc_t sum = acc_t(0);
      for (int y = 0; y < kPixelThreads; ++y) {
        sum += shared[kb][y][threadIdx.x];
      }
      if (active && k0 + kb < num_taps) {
        out[(k0 + kb) * g.out_channels] = sum;
      }
    }
    __syncthreads();
  }
}

at::Tensor direct_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                              at::IntArrayRef padding) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  const ForwardOp op(x, weight, bias, stride, padding);
  if (op.has_work()) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const std::int64_t numel = op.out.numel();
    const std::int64_t blocks = (numel + kForwardThreads - 1) / kForwardThreads;
    TORCH_CHECK(blocks <= 0x7fffffff, kForwardName, ": output too large for one launch (", numel,
                " elements)");
    AT_DISPATCH_FLOATING_TYPES(op.dtype(), "direct_conv2d_cuda", [&] {
      direct_conv2d_kernel<scalar_t>
          <<<static_cast<unsigned int>(blocks), kForwardThreads, 0, stream>>>(
              op.args<scalar_t>(), numel);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return op.out;
}

at::Tensor direct_conv2d_weight_grad_cuda(const at::Tensor& x, const at::Tensor& grad_out,
                                          std::int64_t tasks, at::IntArrayRef kernel_size,
                                          at::IntArrayRef stride, at::IntArrayRef padding) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  const WeightGradOp op(x, grad_out, tasks, kernel_size, stride, padding);
  if (op.has_work()) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const Geometry& g = op.geo;
    const std::int64_t pixels = g.batch * g.out_pixels();
    // At least one split, so that an empty batch gives zeros.
    const std::int64_t splits =
        std::max<std::int64_t>(1, std::min(kMaxSplits, pixels / kMinPixelsPerSplit));
    const std::int64_t pixels_per_split = (pixels + splits - 1) / splits;
    const std::int64_t channel_blocks = (g.out_channels + kChannelLanes - 1) / kChannelLanes;
    const dim3 grid(static_cast<unsigned int>(g.tasks * channel_blocks),
                    static_cast<unsigned int>(splits));
    const dim3 block(kChannelLanes, kPixelThreads);
    AT_DISPATCH_FLOATING_TYPES(op.dtype(), "direct_conv2d_weight_grad_cuda", [&] {
      // float32 / float64 accumulate in their own type (at::opmath_type), so the partial sums
      // share the output's dtype.
      static_assert(std::is_same_v<at::opmath_type<scalar_t>, scalar_t>);
      at::Tensor partial = at::empty({splits, g.tasks, g.taps(), g.out_channels}, op.grad_weight.options());
      direct_conv2d_weight_grad_kernel<scalar_t><<<grid, block, 0, stream>>>(
          op.args<scalar_t>(), partial.mutable_data_ptr<scalar_t>(), pixels_per_split);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::Tensor grad_weight = op.grad_weight;  // shares op's storage (op itself is const)
      at::sum_out(grad_weight, partial, at::IntArrayRef{0});
    });
  }
  return op.output();
}

}  // namespace
}  // namespace direct_conv
}  // namespace maml_fast

TORCH_LIBRARY_IMPL(maml_fast, CUDA, m) {
  m.impl("direct_conv2d", &maml_fast::direct_conv::direct_conv2d_cuda);
  m.impl("direct_conv2d_weight_grad", &maml_fast::direct_conv::direct_conv2d_weight_grad_cuda);
}
