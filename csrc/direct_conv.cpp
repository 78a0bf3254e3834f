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

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
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

void check_matches_x(const char* op, const char* name, const at::Tensor& tensor, const at::Tensor& x) {
  TORCH_CHECK_TYPE(
      tensor.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", tensor.scalar_type(),
      " but x has ", x.scalar_type());
  TORCH_CHECK_VALUE(
      tensor.device() == x.device(), op, ": ", name, " is on ", tensor.device(), " but x is on ",
      x.device());
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
  check_matches_x(op, "weight", weight, x);
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
    check_matches_x(op, "bias", *bias, x);
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
  check_matches_x(op, "grad_out", grad_out, x);
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

// One image of one task, zero-padded ([C, H + 2 ph, W + 2 pw] and a zero tail), so that the
// kernels read every tap without bounds checks; the tail covers the forward's reads for pixels
// past the end of the last row (computed, never stored).
template <typename scalar_t>
class PaddedImage {
 public:
  explicit PaddedImage(const Geometry& g)
      : geo_(g),
        rows_(g.height + 2 * g.pad_h),
        columns_(g.width + 2 * g.pad_w),
        data_(static_cast<std::size_t>(g.in_channels * rows_ * columns_ +
                                       kPixels * g.stride_w + g.kernel_w),
              scalar_t(0)) {}

  // Copies image `x` (channel 0 of the task in image b) into the interior; the border stays zero.
  void load(const scalar_t* x, const InputStrides& s) {
    for (std::int64_t c = 0; c < geo_.in_channels; ++c) {
      for (std::int64_t ih = 0; ih < geo_.height; ++ih) {
        scalar_t* row = data_.data() + (c * rows_ + ih + geo_.pad_h) * columns_ + geo_.pad_w;
        const scalar_t* source = x + c * s.channel + ih * s.row;
        for (std::int64_t iw = 0; iw < geo_.width; ++iw) {
          row[iw] = source[iw * s.column];
        }
      }
    }
  }

  // The top-left input of output pixel (oh, ow): tap k is at pixel(oh, ow)[tap_offsets()[k]].
  const scalar_t* pixel(std::int64_t oh, std::int64_t ow) const {
    return data_.data() + oh * geo_.stride_h * columns_ + ow * geo_.stride_w;
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
  std::vector<scalar_t> data_;
};

// Forward, kPixels adjacent output pixels (the first `pixels` are stored) x one chunk of output
// channels: out = bias + sum_k x_k w_k, with the chunk's weights at weight[k * out_ch].
template <bool kFull, typename scalar_t>
MAML_FAST_ALWAYS_INLINE void forward_block(
    const scalar_t* x, std::int64_t x_step, const std::int64_t* tap_offsets, std::int64_t num_taps,
    const scalar_t* weight, const scalar_t* bias, std::int64_t out_ch, scalar_t* out,
    std::int64_t out_step, std::int64_t pixels, std::int64_t width) {
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
      const scalar_t value = x_tap[p * x_step];
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

// Forward, image b of task t: every output pixel, every output channel.
template <typename scalar_t>
MAML_FAST_ALWAYS_INLINE void forward_item(const ForwardArgs<scalar_t>& a, PaddedImage<scalar_t>& image,
                                          const std::int64_t* tap_offsets, std::int64_t b,
                                          std::int64_t t) {
  using L = Lanes<scalar_t>;
  const Geometry& g = a.geo;
  const std::int64_t out_ch = g.out_channels;
  const std::int64_t num_taps = g.taps();
  image.load(a.x + b * a.x_strides.batch + t * g.in_channels * a.x_strides.channel, a.x_strides);
  const scalar_t* weight = a.weight + t * num_taps * out_ch;
  const scalar_t* bias = a.bias == nullptr ? nullptr : a.bias + t * out_ch;
  const std::int64_t pixel_stride = g.tasks * out_ch;  // between adjacent output pixels
  for (std::int64_t oh = 0; oh < g.out_h; ++oh) {
    scalar_t* out_row = a.out + (b * g.out_h + oh) * g.out_w * pixel_stride + t * out_ch;
    for (std::int64_t ow = 0; ow < g.out_w; ow += kPixels) {
      const std::int64_t pixels = std::min<std::int64_t>(kPixels, g.out_w - ow);
      for (std::int64_t oc = 0; oc < out_ch; oc += L::kChunk) {
        const scalar_t* chunk_bias = bias == nullptr ? nullptr : bias + oc;
        scalar_t* out = out_row + ow * pixel_stride + oc;
        if (out_ch - oc >= L::kChunk) {
          forward_block<true>(image.pixel(oh, ow), g.stride_w, tap_offsets, num_taps, weight + oc,
                              chunk_bias, out_ch, out, pixel_stride, pixels, L::kChunk);
        } else {
          forward_block<false>(image.pixel(oh, ow), g.stride_w, tap_offsets, num_taps, weight + oc,
                               chunk_bias, out_ch, out, pixel_stride, pixels, out_ch - oc);
        }
      }
    }
  }
}

// Weight grad, one output row's pixels x taps [k0, k0 + block_taps) x one chunk of output
// channels, added into sums[(k - k0) * kVecs + v].
template <bool kFull, typename scalar_t>
MAML_FAST_ALWAYS_INLINE void weight_grad_row_block(
    const PaddedImage<scalar_t>& image, std::int64_t oh, std::int64_t out_w,
    const std::int64_t* tap_offsets, int block_taps, const scalar_t* grad_out,
    std::int64_t grad_step, std::int64_t width, typename Lanes<scalar_t>::Vec* sums) {
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
    const scalar_t* x = image.pixel(oh, ow);
    for (int kb = 0; kb < kTapBlock; ++kb) {
      if (kb == block_taps) {
        break;
      }
      const scalar_t value = x[offsets[kb]];
      for (int v = 0; v < kVecs; ++v) {
        acc[kb][v] += value * go[v];
      }
    }
  }
  for (int kb = 0; kb < block_taps; ++kb) {
    for (int v = 0; v < kVecs; ++v) {
      sums[kb * kVecs + v] += acc[kb][v];
    }
  }
}

// Weight grad, task t, output channels [oc, oc + chunk): sums over every pixel of every image,
// one output row at a time (each row's sums in registers, then added to the running sums).
template <bool kFull, typename scalar_t>
MAML_FAST_ALWAYS_INLINE void weight_grad_item(
    const WeightGradArgs<scalar_t>& a, PaddedImage<scalar_t>& image, const std::int64_t* tap_offsets,
    std::int64_t t, std::int64_t oc, std::int64_t width, typename Lanes<scalar_t>::Vec* sums) {
  using L = Lanes<scalar_t>;
  using Vec = typename L::Vec;
  const Geometry& g = a.geo;
  const std::int64_t out_ch = g.out_channels;
  const std::int64_t num_taps = g.taps();
  const std::int64_t pixel_stride = g.tasks * out_ch;
  std::fill(sums, sums + num_taps * kVecs, Vec{});
  for (std::int64_t b = 0; b < g.batch; ++b) {
    image.load(a.x + b * a.x_strides.batch + t * g.in_channels * a.x_strides.channel, a.x_strides);
    for (std::int64_t oh = 0; oh < g.out_h; ++oh) {
      const scalar_t* grad_out = a.grad_out + (b * g.out_h + oh) * g.out_w * pixel_stride + t * out_ch + oc;
      for (std::int64_t k0 = 0; k0 < num_taps; k0 += kTapBlock) {
        const int block_taps = static_cast<int>(std::min<std::int64_t>(kTapBlock, num_taps - k0));
        weight_grad_row_block<kFull>(image, oh, g.out_w, tap_offsets + k0, block_taps, grad_out,
                                     pixel_stride, width, sums + k0 * kVecs);
      }
    }
  }
  scalar_t* grad_weight = a.grad_weight + t * num_taps * out_ch + oc;
  for (std::int64_t k = 0; k < num_taps; ++k) {
    for (int v = 0; v < kVecs; ++v) {
      store<kFull>(grad_weight + k * out_ch + v * L::kCount, sums[k * kVecs + v], width - v * L::kCount);
    }
  }
}

// The entry points of the clones: items [begin, end) of each kernel.
template <typename scalar_t>
MAML_FAST_CPU_CLONES void forward_items(const ForwardArgs<scalar_t>& a, std::int64_t begin,
                                        std::int64_t end) {
  PaddedImage<scalar_t> image(a.geo);
  const std::vector<std::int64_t> tap_offsets = image.tap_offsets();
  for (std::int64_t item = begin; item < end; ++item) {
    forward_item<scalar_t>(a, image, tap_offsets.data(), item / a.geo.tasks, item % a.geo.tasks);
  }
}

// Heap storage for vectors: alignas on the struct is part of its type, so std::vector<VecSlot>
// is 64-byte aligned whatever the ISA of the code that uses it.
template <typename Vec>
struct alignas(64) VecSlot {
  Vec value;
};

template <typename scalar_t>
MAML_FAST_CPU_CLONES void weight_grad_items(const WeightGradArgs<scalar_t>& a, std::int64_t begin,
                                            std::int64_t end) {
  using L = Lanes<scalar_t>;
  PaddedImage<scalar_t> image(a.geo);
  const std::vector<std::int64_t> tap_offsets = image.tap_offsets();
  std::vector<VecSlot<typename L::Vec>> sums(static_cast<std::size_t>(a.geo.taps() * kVecs));
  static_assert(sizeof(VecSlot<typename L::Vec>) == sizeof(typename L::Vec));
  const std::int64_t chunks = (a.geo.out_channels + L::kChunk - 1) / L::kChunk;
  for (std::int64_t item = begin; item < end; ++item) {
    const std::int64_t t = item / chunks;
    const std::int64_t oc = (item % chunks) * L::kChunk;
    if (a.geo.out_channels - oc >= L::kChunk) {
      weight_grad_item<true>(a, image, tap_offsets.data(), t, oc, L::kChunk, &sums[0].value);
    } else {
      weight_grad_item<false>(a, image, tap_offsets.data(), t, oc, a.geo.out_channels - oc,
                              &sums[0].value);
    }
  }
}

at::Tensor direct_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                             at::IntArrayRef padding) {
  const ForwardOp op(x, weight, bias, stride, padding);
  if (op.has_work()) {
    AT_DISPATCH_FLOATING_TYPES(op.dtype(), "direct_conv2d_cpu", [&] {
      const ForwardArgs<scalar_t> args = op.args<scalar_t>();
      at::parallel_for(0, op.geo.batch * op.geo.tasks, 1, [&](std::int64_t begin, std::int64_t end) {
        forward_items<scalar_t>(args, begin, end);
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
      const std::int64_t chunks = (op.geo.out_channels + Lanes<scalar_t>::kChunk - 1) / Lanes<scalar_t>::kChunk;
      at::parallel_for(0, op.geo.tasks * chunks, 1, [&](std::int64_t begin, std::int64_t end) {
        weight_grad_items<scalar_t>(args, begin, end);
      });
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
