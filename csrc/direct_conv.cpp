// maml_fast::direct_conv2d{,_weight_grad}: schemas, input checks, host-side preparation and the CPU
// kernels (the formulas are in direct_conv.h).
//
// CPU kernels. Output channels are walked in chunks of kVecs vectors of 64 bytes (GCC/Clang vector
// extension: 16 floats, one AVX-512 register or two AVX2 ones), so every tap's input value is
// broadcast once into kVecs fused multiply-adds. The kernels are compiled for x86-64-v4 (AVX-512),
// v3 (AVX2+FMA) and the baseline, and the loader picks the widest the CPU has (target_clones).
//   forward:     one parallel item per (image, task); per output row, kPixels adjacent pixels x one
//                chunk of output channels accumulate in registers over all taps; a tap whose input
//                row lies in the padding is skipped for the whole row.
//   weight grad: one parallel item per (task, chunk of output channels); the pixels of all images
//                are taken kPixelBlock at a time, and each block's sums (kTapBlock taps x one chunk,
//                in registers) are added into the item's running sums: two-level summation, whose
//                rounding error grows with pixels / kPixelBlock rather than with the pixel count.
//                Each item sums its pixels in a fixed order: results do not depend on threads.
#include "direct_conv.h"
#include "op_checks.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace maml_fast {
namespace direct_conv {
namespace {

// A pair of non-negative ints (stride, padding, kernel size) with at least `minimum` each.
void check_pair(const char* op, const char* name, at::IntArrayRef pair, std::int64_t minimum) {
  TORCH_CHECK_VALUE(
      pair.size() == 2, op, ": ", name, " must have two values (height, width), got ", pair);
  TORCH_CHECK_VALUE(
      pair[0] >= minimum && pair[1] >= minimum, op, ": ", name, " must be >= ", minimum,
      ", got ", pair);
}

void check_activation(const char* op, const char* name, const at::Tensor& tensor) {
  TORCH_CHECK_TYPE(
      tensor.scalar_type() == at::kFloat || tensor.scalar_type() == at::kDouble, op, ": ", name,
      " must be a float32 or float64 tensor, got ", tensor.scalar_type());
  TORCH_CHECK_VALUE(
      tensor.dim() == 4, op, ": ", name, " must be 4-D [batch, tasks*channels, H, W], got shape ",
      tensor.sizes());
}

// Fills the spatial part of `geo` from x, the kernel size, stride and padding, checking the output
// size.
void complete_geometry(const char* op, Geometry& geo, const at::Tensor& x, at::IntArrayRef kernel,
                       at::IntArrayRef stride, at::IntArrayRef padding) {
  check_pair(op, "stride", stride, 1);
  check_pair(op, "padding", padding, 0);
  geo.batch = x.size(0);
  geo.height = x.size(2);
  geo.width = x.size(3);
  geo.kernel_h = kernel[0];
  geo.kernel_w = kernel[1];
  geo.stride_h = stride[0];
  geo.stride_w = stride[1];
  geo.pad_h = padding[0];
  geo.pad_w = padding[1];
  const std::int64_t span_h = geo.height + 2 * geo.pad_h - geo.kernel_h;
  const std::int64_t span_w = geo.width + 2 * geo.pad_w - geo.kernel_w;
  TORCH_CHECK_VALUE(
      span_h >= 0 && span_w >= 0, op, ": x's spatial size ", x.sizes().slice(2),
      " is too small for kernel ", kernel, " with padding ", padding);
  geo.out_h = span_h / geo.stride_h + 1;
  geo.out_w = span_w / geo.stride_w + 1;
}

}  // namespace

Geometry check_forward_inputs(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding) {
  const char* op = kForwardName;
  check_activation(op, "x", x);
  check_dtype_and_device_of_x(op, "weight", weight, x);
  TORCH_CHECK_VALUE(
      weight.dim() == 5, op, ": weight must be 5-D [tasks, out, in, kh, kw], got shape ",
      weight.sizes());
  TORCH_CHECK_VALUE(
      weight.size(3) >= 1 && weight.size(4) >= 1, op, ": weight's kernel size must be >= 1, got ",
      weight.sizes().slice(3));
  Geometry geo{};
  geo.tasks = weight.size(0);
  geo.out_channels = weight.size(1);
  geo.in_channels = weight.size(2);
  TORCH_CHECK_VALUE(
      x.size(1) == geo.tasks * geo.in_channels, op, ": x must have tasks*in_channels = ",
      geo.tasks * geo.in_channels, " channels for weight of shape ", weight.sizes(),
      ", got shape ", x.sizes());
  if (bias.has_value() && bias->defined()) {
    check_dtype_and_device_of_x(op, "bias", *bias, x);
    TORCH_CHECK_VALUE(
        bias->dim() == 2 && bias->size(0) == geo.tasks && bias->size(1) == geo.out_channels, op,
        ": bias must have shape [", geo.tasks, ", ", geo.out_channels, "] (tasks, out), got ",
        bias->sizes());
  }
  complete_geometry(op, geo, x, weight.sizes().slice(3), stride, padding);
  return geo;
}

Geometry check_weight_grad_inputs(
    const at::Tensor& x, const at::Tensor& grad_out, std::int64_t tasks,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding) {
  const char* op = kWeightGradName;
  check_activation(op, "x", x);
  check_activation(op, "grad_out", grad_out);
  check_dtype_and_device_of_x(op, "grad_out", grad_out, x);
  check_pair(op, "kernel_size", kernel_size, 1);
  TORCH_CHECK_VALUE(tasks >= 1, op, ": tasks must be >= 1, got ", tasks);
  TORCH_CHECK_VALUE(
      x.size(1) % tasks == 0, op, ": x's ", x.size(1), " channels are not a multiple of tasks=",
      tasks);
  TORCH_CHECK_VALUE(
      grad_out.size(1) % tasks == 0, op, ": grad_out's ", grad_out.size(1),
      " channels are not a multiple of tasks=", tasks);
  Geometry geo{};
  geo.tasks = tasks;
  geo.in_channels = x.size(1) / tasks;
  geo.out_channels = grad_out.size(1) / tasks;
  complete_geometry(op, geo, x, kernel_size, stride, padding);
  TORCH_CHECK_VALUE(
      grad_out.size(0) == geo.batch && grad_out.size(2) == geo.out_h &&
          grad_out.size(3) == geo.out_w,
      op, ": grad_out must have shape [", geo.batch, ", tasks*out, ", geo.out_h, ", ", geo.out_w,
      "] (the convolution's output for x of shape ", x.sizes(), "), got ", grad_out.sizes());
  return geo;
}

InputStrides input_strides(const at::Tensor& x) {
  return {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
}

ForwardOp::ForwardOp(const at::Tensor& x_in, const at::Tensor& weight_in,
                     const std::optional<at::Tensor>& bias_in, at::IntArrayRef stride,
                     at::IntArrayRef padding)
    : geo(check_forward_inputs(x_in, weight_in, bias_in, stride, padding)),
      x(x_in),
      weight(weight_in.permute({0, 2, 3, 4, 1}).contiguous()),
      bias(bias_in.has_value() && bias_in->defined() ? bias_in->contiguous() : at::Tensor()),
      out(at::empty({geo.batch, geo.tasks * geo.out_channels, geo.out_h, geo.out_w},
                    x_in.options().memory_format(at::MemoryFormat::ChannelsLast))) {}

WeightGradOp::WeightGradOp(const at::Tensor& x_in, const at::Tensor& grad_out_in,
                           std::int64_t tasks, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                           at::IntArrayRef padding)
    : geo(check_weight_grad_inputs(x_in, grad_out_in, tasks, kernel_size, stride, padding)),
      x(x_in),
      grad_out(grad_out_in.contiguous(at::MemoryFormat::ChannelsLast)),
      grad_weight(at::empty({geo.tasks, geo.taps(), geo.out_channels}, x_in.options())) {}

at::Tensor WeightGradOp::output() const {
  return grad_weight.view({geo.tasks, geo.in_channels, geo.kernel_h, geo.kernel_w, geo.out_channels})
      .permute({0, 4, 1, 2, 3});
}

namespace {

constexpr std::int64_t kVectorBytes = 64;
constexpr int kVecs = 2;    // vectors per chunk of output channels
constexpr int kPixels = 4;  // forward: adjacent output pixels per register block
constexpr int kTapBlock = 9;  // weight grad: taps per register block (one 3x3 input channel)

#if defined(__GNUC__)
// The vector helpers are always inlined, so no call passes a vector across the ABI GCC warns about.
#pragma GCC diagnostic ignored "-Wpsabi"
#define MAML_FAST_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define MAML_FAST_ALWAYS_INLINE inline
#endif

#if defined(__GNUC__) && defined(__x86_64__)
#define MAML_FAST_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MAML_FAST_CPU_CLONES
#endif

template <typename scalar_t>
struct Lanes {
  static constexpr std::int64_t kCount = kVectorBytes / static_cast<std::int64_t>(sizeof(scalar_t));
  static constexpr std::int64_t kChunk = kVecs * kCount;  // output channels per chunk
  typedef scalar_t Vec __attribute__((vector_size(kVectorBytes)));
};

// p[0, width) as a vector (lanes >= width are zero); kFull: the whole vector (width is ignored).
template <bool kFull, typename scalar_t>
MAML_FAST_ALWAYS_INLINE typename Lanes<scalar_t>::Vec load(const scalar_t* p, std::int64_t width) {
  typename Lanes<scalar_t>::Vec v{};
  if (kFull || width >= Lanes<scalar_t>::kCount) {
    std::memcpy(&v, p, sizeof(v));
  } else {
    for (std::int64_t lane = 0; lane < width; ++lane) {
      v[lane] = p[lane];
    }
  }
  return v;
}

template <bool kFull, typename scalar_t>
MAML_FAST_ALWAYS_INLINE void store(scalar_t* p, const typename Lanes<scalar_t>::Vec& v,
                                   std::int64_t width) {
  if (kFull || width >= Lanes<scalar_t>::kCount) {
    std::memcpy(p, &v, sizeof(v));
  } else {
    for (std::int64_t lane = 0; lane < width; ++lane) {
      p[lane] = v[lane];
    }
  }
}

// x zero-padded by (ph, pw) on each side, contiguous [B, T*C, Hp, Wp], so that the kernels read
// every tap without bounds checks: tap k of output pixel (oh, ow) of image b, task t is at
// pixel(b, t, oh, ow)[tap_offsets()[k]].
template <typename scalar_t>
class PaddedInput {
 public:
  PaddedInput(const at::Tensor& x, const Geometry& g)
      : geo_(g),
        rows_(g.height + 2 * g.pad_h),
        columns_(g.width + 2 * g.pad_w),
        tensor_(at::zeros({g.batch, g.tasks * g.in_channels, rows_, columns_}, x.options())) {
    tensor_.narrow(2, g.pad_h, g.height).narrow(3, g.pad_w, g.width).copy_(x);
    data_ = tensor_.const_data_ptr<scalar_t>();
  }

  const scalar_t* pixel(std::int64_t b, std::int64_t t, std::int64_t oh, std::int64_t ow) const {
    return data_ + (((b * geo_.tasks + t) * geo_.in_channels * rows_) + oh * geo_.stride_h) * columns_ +
           ow * geo_.stride_w;
  }

  std::vector<std::int64_t> tap_offsets() const {
    std::vector<std::int64_t> offsets;
    offsets.reserve(static_cast<std::size_t>(geo_.taps()));
    for (std::int64_t c = 0; c < geo_.in_channels; ++c) {
      for (std::int64_t i = 0; i < geo_.kernel_h; ++i) {
        for (std::int64_t j = 0; j < geo_.kernel_w; ++j) {
          offsets.push_back((c * rows_ + i) * columns_ + j);
        }
      }
    }
    return offsets;
  }

 private:
  Geometry geo_;
  std::int64_t rows_, columns_;
  at::Tensor tensor_;
  const scalar_t* data_;
};

// Forward, kPixels output pixels at x + x_offsets[p] (the first `pixels` are stored; the others
// repeat the last one) x one chunk of output channels: out = bias + sum_k x_k w_k, with the chunk's
// weights at weight[k * out_ch].
template <bool kFull, typename scalar_t>
MAML_FAST_ALWAYS_INLINE void forward_block(
    const scalar_t* x, const std::int64_t* x_offsets, const std::int64_t* tap_offsets,
    std::int64_t num_taps, const scalar_t* weight, const scalar_t* bias, std::int64_t out_ch,
    scalar_t* out, std::int64_t out_step, std::int64_t pixels, std::int64_t width) {
  using L = Lanes<scalar_t>;
  using Vec = typename L::Vec;
  Vec acc[kPixels][kVecs];
  for (int v = 0; v < kVecs; ++v) {
    const Vec init = bias == nullptr ? Vec{} : load<kFull>(bias + v * L::kCount, width - v * L::kCount);
    for (int p = 0; p < kPixels; ++p) {
      acc[p][v] = init;
    }
  }
  for (std::int64_t k = 0; k < num_taps; ++k) {
    Vec w[kVecs];
    for (int v = 0; v < kVecs; ++v) {
      w[v] = load<kFull>(weight + k * out_ch + v * L::kCount, width - v * L::kCount);
    }
    const scalar_t* x_tap = x + tap_offsets[k];
    for (int p = 0; p < kPixels; ++p) {
      const scalar_t value = x_tap[x_offsets[p]];
      for (int v = 0; v < kVecs; ++v) {
        acc[p][v] += value * w[v];
      }
    }
  }
  for (int p = 0; p < kPixels; ++p) {
    if (p < pixels) {
      for (int v = 0; v < kVecs; ++v) {
        store<kFull>(out + p * out_step + v * L::kCount, acc[p][v], width - v * L::kCount);
      }
    }
  }
}

// Forward, output row oh of image b: every pixel, task and output channel, written in memory order.
template <typename scalar_t>
MAML_FAST_ALWAYS_INLINE void forward_row(const ForwardArgs<scalar_t>& a, const PaddedInput<scalar_t>& x,
                                         const std::int64_t* tap_offsets, std::int64_t b,
                                         std::int64_t oh) {
  using L = Lanes<scalar_t>;
  const Geometry& g = a.geo;
  const std::int64_t out_ch = g.out_channels;
  const std::int64_t num_taps = g.taps();
  const std::int64_t pixel_stride = g.tasks * out_ch;  // between adjacent output pixels
  scalar_t* out_row = a.out + (b * g.out_h + oh) * g.out_w * pixel_stride;
  for (std::int64_t ow = 0; ow < g.out_w; ow += kPixels) {
    const std::int64_t pixels = std::min<std::int64_t>(kPixels, g.out_w - ow);
    std::int64_t x_offsets[kPixels];
    for (int p = 0; p < kPixels; ++p) {
      x_offsets[p] = std::min<std::int64_t>(p, pixels - 1) * g.stride_w;
    }
    for (std::int64_t t = 0; t < g.tasks; ++t) {
      const scalar_t* weight = a.weight + t * num_taps * out_ch;
      const scalar_t* bias = a.bias == nullptr ? nullptr : a.bias + t * out_ch;
      for (std::int64_t oc = 0; oc < out_ch; oc += L::kChunk) {
        const scalar_t* chunk_bias = bias == nullptr ? nullptr : bias + oc;
        scalar_t* out = out_row + ow * pixel_stride + t * out_ch + oc;
        if (out_ch - oc >= L::kChunk) {
          forward_block<true>(x.pixel(b, t, oh, ow), x_offsets, tap_offsets, num_taps, weight + oc,
                              chunk_bias, out_ch, out, pixel_stride, pixels, L::kChunk);
        } else {
          forward_block<false>(x.pixel(b, t, oh, ow), x_offsets, tap_offsets, num_taps, weight + oc,
                               chunk_bias, out_ch, out, pixel_stride, pixels, out_ch - oc);
        }
      }
    }
  }
}

// Weight grad, the pixels of one output row (x at pixel(ow) = x + ow * x_step, grad_out at
// grad_out + ow * grad_step) x taps [k0, k0 + block_taps) x one chunk of output channels, added
// into sums[(k - k0) * sums_step + v].
template <bool kFull, typename scalar_t>
MAML_FAST_ALWAYS_INLINE void weight_grad_row_block(
    const scalar_t* x, std::int64_t x_step, std::int64_t out_w, const std::int64_t* tap_offsets,
    int block_taps, const scalar_t* grad_out, std::int64_t grad_step, std::int64_t width,
    typename Lanes<scalar_t>::Vec* sums, std::int64_t sums_step) {
  using L = Lanes<scalar_t>;
  using Vec = typename L::Vec;
  std::int64_t offsets[kTapBlock];
  for (int kb = 0; kb < kTapBlock; ++kb) {
    offsets[kb] = kb < block_taps ? tap_offsets[kb] : 0;
  }
  Vec acc[kTapBlock][kVecs] = {};
  for (std::int64_t ow = 0; ow < out_w; ++ow) {
    Vec go[kVecs];
    for (int v = 0; v < kVecs; ++v) {
      go[v] = load<kFull>(grad_out + ow * grad_step + v * L::kCount, width - v * L::kCount);
    }
    const scalar_t* x_pixel = x + ow * x_step;
    for (int kb = 0; kb < kTapBlock; ++kb) {
      if (kb == block_taps) {
        break;
      }
      const scalar_t value = x_pixel[offsets[kb]];
      for (int v = 0; v < kVecs; ++v) {
        acc[kb][v] += value * go[v];
      }
    }
  }
  for (int kb = 0; kb < block_taps; ++kb) {
    for (int v = 0; v < kVecs; ++v) {
      sums[kb * sums_step + v] += acc[kb][v];
    }
  }
}

// Heap storage for vectors: alignas on the struct is part of its type, so std::vector<VecSlot>
// is 64-byte aligned whatever the ISA of the code that uses it.
template <typename Vec>
struct alignas(64) VecSlot {
  Vec value;
};

// The weight grad's items: (task, part of the batch). The batch is cut into a number of parts that
// depends on the shape only (not on the thread count), so the sums are the same on any machine.
constexpr std::int64_t kMinWeightGradItems = 16;

std::int64_t batch_parts(const Geometry& g) {
  return std::max<std::int64_t>(1, std::min(g.batch, kMinWeightGradItems / g.tasks));
}

// Weight grad, task t, images of batch part `part`: sums over their pixels into
// partial[t, k, o] (the part's [T, K, O] slice), one output row at a time (each row's sums in
// registers, then added to the running sums).
template <typename scalar_t>
MAML_FAST_ALWAYS_INLINE void weight_grad_item(
    const WeightGradArgs<scalar_t>& a, const PaddedInput<scalar_t>& x, const std::int64_t* tap_offsets,
    std::int64_t t, std::int64_t part, std::vector<VecSlot<typename Lanes<scalar_t>::Vec>>& sums,
    scalar_t* partial) {
  using L = Lanes<scalar_t>;
  using Vec = typename L::Vec;
  const Geometry& g = a.geo;
  const std::int64_t out_ch = g.out_channels;
  const std::int64_t num_taps = g.taps();
  const std::int64_t pixel_stride = g.tasks * out_ch;
  const std::int64_t chunks = (out_ch + L::kChunk - 1) / L::kChunk;
  const std::int64_t sums_step = chunks * kVecs;  // sums[k * sums_step + chunk * kVecs + v]
  const std::int64_t parts = batch_parts(g);
  Vec* sum = &sums[0].value;
  std::fill(sum, sum + num_taps * sums_step, Vec{});
  for (std::int64_t b = part * g.batch / parts; b < (part + 1) * g.batch / parts; ++b) {
    for (std::int64_t oh = 0; oh < g.out_h; ++oh) {
      const scalar_t* grad_row = a.grad_out + (b * g.out_h + oh) * g.out_w * pixel_stride + t * out_ch;
      for (std::int64_t chunk = 0; chunk < chunks; ++chunk) {
        const std::int64_t oc = chunk * L::kChunk;
        for (std::int64_t k0 = 0; k0 < num_taps; k0 += kTapBlock) {
          const int block_taps = static_cast<int>(std::min<std::int64_t>(kTapBlock, num_taps - k0));
          Vec* block_sums = sum + k0 * sums_step + chunk * kVecs;
          if (out_ch - oc >= L::kChunk) {
            weight_grad_row_block<true>(x.pixel(b, t, oh, 0), g.stride_w, g.out_w, tap_offsets + k0,
                                        block_taps, grad_row + oc, pixel_stride, L::kChunk,
                                        block_sums, sums_step);
          } else {
            weight_grad_row_block<false>(x.pixel(b, t, oh, 0), g.stride_w, g.out_w,
                                         tap_offsets + k0, block_taps, grad_row + oc, pixel_stride,
                                         out_ch - oc, block_sums, sums_step);
          }
        }
      }
    }
  }
  scalar_t* out = partial + t * num_taps * out_ch;
  for (std::int64_t k = 0; k < num_taps; ++k) {
    for (std::int64_t chunk = 0; chunk < chunks; ++chunk) {
      const std::int64_t oc = chunk * L::kChunk;
      for (int v = 0; v < kVecs; ++v) {
        store<false>(out + k * out_ch + oc + v * L::kCount, sum[k * sums_step + chunk * kVecs + v],
                     out_ch - oc - v * L::kCount);
      }
    }
  }
}

// The entry points of the clones: items [begin, end) of each kernel.
template <typename scalar_t>
MAML_FAST_CPU_CLONES void forward_rows(const ForwardArgs<scalar_t>& a, const PaddedInput<scalar_t>& x,
                                       const std::int64_t* tap_offsets, std::int64_t begin,
                                       std::int64_t end) {
  for (std::int64_t row = begin; row < end; ++row) {
    forward_row<scalar_t>(a, x, tap_offsets, row / a.geo.out_h, row % a.geo.out_h);
  }
}

// Items (t, part) write the part's sums to partial [parts, T, K, O].
template <typename scalar_t>
MAML_FAST_CPU_CLONES void weight_grad_items(const WeightGradArgs<scalar_t>& a,
                                            const PaddedInput<scalar_t>& x,
                                            const std::int64_t* tap_offsets, std::int64_t begin,
                                            std::int64_t end, scalar_t* partial) {
  using L = Lanes<scalar_t>;
  const std::int64_t chunks = (a.geo.out_channels + L::kChunk - 1) / L::kChunk;
  std::vector<VecSlot<typename L::Vec>> sums(static_cast<std::size_t>(a.geo.taps() * chunks * kVecs));
  static_assert(sizeof(VecSlot<typename L::Vec>) == sizeof(typename L::Vec));
  const std::int64_t parts = batch_parts(a.geo);
  const std::int64_t part_size = a.geo.tasks * a.geo.taps() * a.geo.out_channels;
  for (std::int64_t item = begin; item < end; ++item) {
    const std::int64_t part = item % parts;
    weight_grad_item<scalar_t>(a, x, tap_offsets, item / parts, part, sums, partial + part * part_size);
  }
}

at::Tensor direct_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                             at::IntArrayRef padding) {
  const ForwardOp op(x, weight, bias, stride, padding);
  if (op.has_work()) {
    AT_DISPATCH_FLOATING_TYPES(op.dtype(), "direct_conv2d_cpu", [&] {
      const ForwardArgs<scalar_t> args = op.args<scalar_t>();
      const PaddedInput<scalar_t> padded(op.x, op.geo);
      const std::vector<std::int64_t> tap_offsets = padded.tap_offsets();
      at::parallel_for(0, op.geo.batch * op.geo.out_h, 1, [&](std::int64_t begin, std::int64_t end) {
        forward_rows<scalar_t>(args, padded, tap_offsets.data(), begin, end);
      });
    });
  }
  return op.out;
}

at::Tensor direct_conv2d_weight_grad_cpu(const at::Tensor& x, const at::Tensor& grad_out,
                                         std::int64_t tasks, at::IntArrayRef kernel_size,
                                         at::IntArrayRef stride, at::IntArrayRef padding) {
  const WeightGradOp op(x, grad_out, tasks, kernel_size, stride, padding);
  if (op.has_work()) {
    AT_DISPATCH_FLOATING_TYPES(op.dtype(), "direct_conv2d_weight_grad_cpu", [&] {
      const WeightGradArgs<scalar_t> args = op.args<scalar_t>();
      const PaddedInput<scalar_t> padded(op.x, op.geo);
      const std::vector<std::int64_t> tap_offsets = padded.tap_offsets();
      const std::int64_t parts = batch_parts(op.geo);
      // One part writes the result directly; several write partial sums, added in part order.
      at::Tensor partial = parts == 1 ? op.grad_weight
                                      : at::empty({parts, op.geo.tasks, op.geo.taps(), op.geo.out_channels},
                                                  op.grad_weight.options());
      scalar_t* partial_data = partial.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, op.geo.tasks * parts, 1, [&](std::int64_t begin, std::int64_t end) {
        weight_grad_items<scalar_t>(args, padded, tap_offsets.data(), begin, end, partial_data);
      });
      if (parts > 1) {
        scalar_t* out = op.grad_weight.mutable_data_ptr<scalar_t>();
        const std::int64_t size = op.grad_weight.numel();
        for (std::int64_t i = 0; i < size; ++i) {
          scalar_t total = partial_data[i];
          for (std::int64_t part = 1; part < parts; ++part) {
            total += partial_data[part * size + i];
          }
          out[i] = total;
        }
      }
    });
  }
  return op.output();
}

}  // namespace
}  // namespace direct_conv
}  // namespace maml_fast

TORCH_LIBRARY_FRAGMENT(maml_fast, m) {
  // Where the fake (meta) implementations live (see csrc/module.cpp).
  m.set_python_module("maml_fast.ops.direct_conv");
  m.def(
      "direct_conv2d(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding) -> Tensor");
  m.def(
      "direct_conv2d_weight_grad(Tensor x, Tensor grad_out, int tasks, int[2] kernel_size, "
      "int[2] stride, int[2] padding) -> Tensor");
}

TORCH_LIBRARY_IMPL(maml_fast, CPU, m) {
  m.impl("direct_conv2d", &maml_fast::direct_conv::direct_conv2d_cpu);
  m.impl("direct_conv2d_weight_grad", &maml_fast::direct_conv::direct_conv2d_weight_grad_cpu);
}
