// The CPU kernels of the BatchNorm+ReLU family (maml_fast::batch_norm_relu*, and the max-pooled
// variant of batch_norm_relu_pool.cpp): the two-pass row loops, and the BatchNorm+ReLU kernels whose
// per-column coefficients and per-element formulas the pooled kernels reuse.
//
// Every op is two parallel passes over "units" (rows of the [rows, channels] view; 2x2 cells of
// the image for the pooled op) that stream contiguous memory:
//   1. column sums: the units are cut into at most one chunk per thread; a chunk sums groups of
//      about kRowGroup positions in acc_t vectors and adds each group's sums into its own float64
//      totals; the chunks' totals are added in chunk order (deterministic for a given thread count);
//   2. the per-column coefficients (a few per column, from the sums), then the elementwise outputs.
// A unit is walked in vectors of kLanes adjacent columns (GCC/Clang vector extension: 16 floats =
// one AVX-512 register, four SSE registers), so the loops are explicit vector code; the last,
// narrower vector (channels % kLanes) loads and stores only its columns (its other lanes are zero
// and never stored). Walking columns blocks down the rows instead would hit the same few cache sets
// over and over: rows are typically a power of two bytes apart. The loops are compiled for the
// baseline ISA, AVX2 and AVX-512 and picked at run time.
#pragma once

#include "batch_norm_relu.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__)
// Vectors of 64 bytes pass between inlined helpers; GCC warns that their ABI differs between ISAs.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace maml_fast {
namespace bn_relu {
namespace cpu {

constexpr std::int64_t kLanes = 16;
constexpr std::int64_t kRowGroup = 64;
// Elements below which a parallel_for chunk is not split further (ATen's own default).
constexpr std::int64_t kGrainElements = 32768;

#if defined(__GNUC__)
#define MAML_FAST_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define MAML_FAST_ALWAYS_INLINE inline
#endif

template <typename acc_t>
struct VecTypes {
  typedef acc_t Vec __attribute__((vector_size(sizeof(acc_t) * kLanes)));
};

// Heap storage for vectors. GCC gives a vector type different alignments under different target
// ISAs, and drops alignment attributes on template arguments; alignas on a struct is part of the
// type, so std::vector<VecSlot<Vec>> is 64-byte aligned whatever the ISA of the code using it.
template <typename Vec>
struct alignas(64) VecSlot {
  Vec value;
};

using FullWidth = std::integral_constant<std::int64_t, kLanes>;

// p[0, width) as a vector of acc_t (lanes >= width are zero).
template <typename acc_t, typename scalar_t, typename Width>
MAML_FAST_ALWAYS_INLINE typename VecTypes<acc_t>::Vec load(const scalar_t* p, Width width) {
  using Vec = typename VecTypes<acc_t>::Vec;
  Vec v{};
  if constexpr (std::is_same_v<scalar_t, acc_t> && std::is_same_v<Width, FullWidth>) {
    std::memcpy(&v, p, sizeof(Vec));
  } else {
    for (std::int64_t j = 0; j < width; ++j) {
      v[j] = static_cast<acc_t>(p[j]);
    }
  }
  return v;
}

template <typename acc_t, typename scalar_t, typename Width>
MAML_FAST_ALWAYS_INLINE void store(scalar_t* p, const typename VecTypes<acc_t>::Vec& v, Width width) {
  if constexpr (std::is_same_v<scalar_t, acc_t> && std::is_same_v<Width, FullWidth>) {
    std::memcpy(p, &v, sizeof(v));
  } else {
    for (std::int64_t j = 0; j < width; ++j) {
      p[j] = static_cast<scalar_t>(v[j]);
    }
  }
}

// y = z where z > 0, else negative_slope z (ReLU at slope 0: exact zeros; NaN stays NaN).
template <typename Vec, typename acc_t>
MAML_FAST_ALWAYS_INLINE Vec activation(const Vec& z, acc_t negative_slope) {
  return z < Vec{} ? (negative_slope == acc_t(0) ? Vec{} : z * negative_slope) : z;
}

// m v, m the activation's derivative read off its output y: v where y > 0, else negative_slope v
// (selects: NaN in v stays NaN where kept, and ReLU's masked elements are exact zeros).
template <typename Vec, typename acc_t>
MAML_FAST_ALWAYS_INLINE Vec activation_grad(const Vec& y, const Vec& v, acc_t negative_slope) {
  return y > Vec{} ? v : (negative_slope == acc_t(0) ? Vec{} : v * negative_slope);
}

// Each kernel below provides
//   Position, locate(args, unit), kPositions, units(args)        where it walks (RowUnits)
//   kSums, accumulate(args, position, column, width, acc[kSums]) the column sums' summands
//   kCoefs, column(args, column, sums[kSums], coefs[kCoefs])     per column: coefficients (and
//                                                                the per-channel outputs)
//   apply(args, position, column, width, coefs[kCoefs])          the elementwise outputs
// with `column` the first of the vector's columns and sums in float64.

template <typename scalar_t>
struct ForwardKernel : RowUnits {
  using scalar_type = scalar_t;
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = typename VecTypes<acc_t>::Vec;
  using Args = ForwardArgs<scalar_t>;

  // Sums of (x - s) and (x - s)^2 with s = x[0, c], a value of the column: shifted, the one-pass
  // variance keeps its precision when |mean| >> std.
  static constexpr int kSums = 2;
  template <typename Width>
  static MAML_FAST_ALWAYS_INLINE void accumulate(
      const Args& a, std::int64_t offset, std::int64_t column, Width width, Vec* acc) {
    const Vec d = load<acc_t>(a.x + offset + column, width) - load<acc_t>(a.x + column, width);
    acc[0] += d;
    acc[1] += d * d;
  }

  // mean and rstd of column c from its sums, written to the outputs.
  static void statistics(const Args& a, std::int64_t c, const double* sums, double& mean, double& r) {
    const double rows = static_cast<double>(a.rows);
    const double shifted_mean = sums[0] / rows;
    const double var = std::max(sums[1] / rows - shifted_mean * shifted_mean, 0.0);
    mean = static_cast<double>(a.x[c]) + shifted_mean;
    r = 1.0 / std::sqrt(var + a.eps);
    a.mean[c] = static_cast<acc_t>(mean);
    a.rstd[c] = static_cast<acc_t>(r);
  }

  // y = activation(x scale + shift), scale = gamma r, shift = beta - mean gamma r.
  static constexpr int kCoefs = 2;
  static void column(const Args& a, std::int64_t c, const double* sums, acc_t* coefs) {
    double mean, r;
    statistics(a, c, sums, mean, r);
    const double scale = static_cast<double>(a.weight[c]) * r;
    coefs[0] = static_cast<acc_t>(scale);
    coefs[1] = static_cast<acc_t>(static_cast<double>(a.bias[c]) - mean * scale);
  }

  template <typename Width>
  static MAML_FAST_ALWAYS_INLINE void apply(
      const Args& a, std::int64_t offset, std::int64_t column, Width width, const Vec* coefs) {
    const Vec z = load<acc_t>(a.x + offset + column, width) * coefs[0] + coefs[1];
    store<acc_t>(a.y + offset + column, activation(z, a.negative_slope), width);
  }
};

// x_hat = (x - mean) rstd of the vector of columns at `column`, element offset `offset`.
template <typename acc_t, typename Args, typename Width>
MAML_FAST_ALWAYS_INLINE typename VecTypes<acc_t>::Vec normalized(
    const Args& a, std::int64_t offset, std::int64_t column, Width width,
    const typename VecTypes<acc_t>::Vec& mean, const typename VecTypes<acc_t>::Vec& rstd) {
  return (load<acc_t>(a.x + offset + column, width) - mean) * rstd;
}

template <typename scalar_t>
struct BackwardKernel : RowUnits {
  using scalar_type = scalar_t;
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = typename VecTypes<acc_t>::Vec;
  using Args = BackwardArgs<scalar_t>;

  template <typename Width>
  static MAML_FAST_ALWAYS_INLINE void load_row(
      const Args& a, std::int64_t offset, std::int64_t column, Width width, Vec& gz, Vec& x_hat) {
    gz = activation_grad(load<acc_t>(a.y + offset + column, width), load<acc_t>(a.grad_y + offset + column, width),
                         a.negative_slope);
    x_hat = normalized<acc_t>(a, offset, column, width, load<acc_t>(a.mean + column, width),
                              load<acc_t>(a.rstd + column, width));
  }

  // A = sum(gz), B = sum(gz x_hat); add_sums adds the summands of the element at offset + column.
  static constexpr int kSums = 2;
  template <typename Width>
  static MAML_FAST_ALWAYS_INLINE void add_sums(const Args&, std::int64_t, std::int64_t, Width, const Vec& gz,
                                               const Vec& x_hat, Vec* acc) {
    acc[0] += gz;
    acc[1] += gz * x_hat;
  }
  template <typename Width>
  static MAML_FAST_ALWAYS_INLINE void accumulate(
      const Args& a, std::int64_t offset, std::int64_t column, Width width, Vec* acc) {
    Vec gz, x_hat;
    load_row(a, offset, column, width, gz, x_hat);
    add_sums(a, offset, column, width, gz, x_hat, acc);
  }

  // gx = coef_gz gz + coef_xhat x_hat + coef_one.
  static constexpr int kCoefs = 3;
  static void column(const Args& a, std::int64_t c, const double* sums, acc_t* coefs) {
    const BackwardColumn<double> col = backward_column<double>(
        a.mean[c], a.rstd[c], static_cast<double>(a.weight[c]), sums[0], sums[1],
        1.0 / static_cast<double>(a.rows));
    coefs[0] = static_cast<acc_t>(col.coef_gz);
    coefs[1] = static_cast<acc_t>(col.coef_xhat);
    coefs[2] = static_cast<acc_t>(col.coef_one);
    a.grad_weight[c] = static_cast<scalar_t>(sums[1]);
    a.grad_bias[c] = static_cast<scalar_t>(sums[0]);
  }
  static MAML_FAST_ALWAYS_INLINE Vec grad_x(const Vec* coefs, const Vec& gz, const Vec& x_hat) {
    return coefs[0] * gz + coefs[1] * x_hat + coefs[2];
  }

  template <typename Width>
  static MAML_FAST_ALWAYS_INLINE void apply(
      const Args& a, std::int64_t offset, std::int64_t column, Width width, const Vec* coefs) {
    Vec gz, x_hat;
    load_row(a, offset, column, width, gz, x_hat);
    store<acc_t>(a.grad_x + offset + column, grad_x(coefs, gz, x_hat), width);
  }
};

// kHasGgx: grad_grad_x is given (otherwise it is zero and its sums and terms drop out).
template <typename scalar_t, bool kHasGgx>
struct DoubleBackwardKernel : RowUnits {
  using scalar_type = scalar_t;
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = typename VecTypes<acc_t>::Vec;
  using Args = DoubleBackwardArgs<scalar_t>;

  // grad_grad_x of the vector at `offset + column` (zero when not given).
  template <typename Width>
  static MAML_FAST_ALWAYS_INLINE Vec load_ggx(const Args& a, std::int64_t offset, std::int64_t column,
                                             Width width) {
    if constexpr (kHasGgx) {
      return load<acc_t>(a.grad_grad_x + offset + column, width);
    } else {
      return Vec{};
    }
  }

  // A = sum(gz), B = sum(gz x_hat), C = sum(ggx), D = sum(ggx x_hat), E = sum(ggx gz); add_sums
  // adds the summands of the element at offset + column.
  static constexpr int kSums = kHasGgx ? 5 : 2;
  template <typename Width>
  static MAML_FAST_ALWAYS_INLINE void add_sums(const Args& a, std::int64_t offset, std::int64_t column,
                                               Width width, const Vec& gz, const Vec& x_hat, Vec* acc) {
    acc[0] += gz;
    acc[1] += gz * x_hat;
    if constexpr (kHasGgx) {
      const Vec ggx = load_ggx(a, offset, column, width);
      acc[2] += ggx;
      acc[3] += ggx * x_hat;
      acc[4] += ggx * gz;
    }
  }
  template <typename Width>
  static MAML_FAST_ALWAYS_INLINE void accumulate(
      const Args& a, std::int64_t offset, std::int64_t column, Width width, Vec* acc) {
    const Vec gz = activation_grad(load<acc_t>(a.y + offset + column, width),
                                   load<acc_t>(a.grad_y + offset + column, width), a.negative_slope);
    const Vec x_hat = normalized<acc_t>(a, offset, column, width, load<acc_t>(a.mean + column, width),
                                        load<acc_t>(a.rstd + column, width));
    add_sums(a, offset, column, width, gz, x_hat, acc);
  }

  // coefs: mean, rstd, then, with P(gz) = gz - a - x_hat b and P(ggx) = ggx - c - x_hat d expanded:
  //   d gz = k_ggx ggx + e_xhat x_hat + e_one       (d gy = m d gz)
  //   d x  = f_gz gz + f_ggx ggx + f_xhat x_hat + f_one
  static constexpr int kCoefs = 9;
  static void column(const Args& a, std::int64_t c, const double* sums, acc_t* coefs) {
    const double zero = 0.0;
    const DoubleBackwardColumn<double> col = double_backward_column<double>(
        a.mean[c], a.rstd[c], static_cast<double>(a.weight[c]),
        static_cast<double>(a.grad_grad_weight[c]), static_cast<double>(a.grad_grad_bias[c]),
        sums[0], sums[1], kHasGgx ? sums[2] : zero, kHasGgx ? sums[3] : zero,
        kHasGgx ? sums[4] : zero, 1.0 / static_cast<double>(a.rows));
    coefs[0] = static_cast<acc_t>(col.mean);
    coefs[1] = static_cast<acc_t>(col.rstd);
    coefs[2] = static_cast<acc_t>(col.k_pggx);
    coefs[3] = static_cast<acc_t>(col.gg_gamma - col.k_pggx * col.d);
    coefs[4] = static_cast<acc_t>(col.gg_beta - col.k_pggx * col.c);
    coefs[5] = static_cast<acc_t>(col.k_pgz);
    coefs[6] = static_cast<acc_t>(col.k_pggx_x);
    coefs[7] = static_cast<acc_t>(col.k_xhat - col.k_pgz * col.b - col.k_pggx_x * col.d);
    coefs[8] = static_cast<acc_t>(-col.k_pgz * col.a - col.k_pggx_x * col.c);
    a.grad_weight[c] = static_cast<scalar_t>(col.d_gamma);
  }
  // The unmasked d gz and d x of one element.
  static MAML_FAST_ALWAYS_INLINE void outputs(const Vec* coefs, const Vec& gz, const Vec& x_hat,
                                              const Vec& ggx, Vec& d_gz, Vec& d_x) {
    d_gz = coefs[3] * x_hat + coefs[4];
    d_x = coefs[5] * gz + coefs[7] * x_hat + coefs[8];
    if constexpr (kHasGgx) {
      d_gz += coefs[2] * ggx;
      d_x += coefs[6] * ggx;
    }
  }

  template <typename Width>
  static MAML_FAST_ALWAYS_INLINE void apply(
      const Args& a, std::int64_t offset, std::int64_t column, Width width, const Vec* coefs) {
    const Vec y = load<acc_t>(a.y + offset + column, width);
    const Vec gz = activation_grad(y, load<acc_t>(a.grad_y + offset + column, width), a.negative_slope);
    const Vec x_hat = normalized<acc_t>(a, offset, column, width, coefs[0], coefs[1]);
    Vec d_gz, d_x;
    outputs(coefs, gz, x_hat, load_ggx(a, offset, column, width), d_gz, d_x);
    store<acc_t>(a.grad_grad_y + offset + column, activation_grad(y, d_gz, a.negative_slope), width);
    store<acc_t>(a.grad_x + offset + column, d_x, width);
  }
};

// The two unit loops of a kernel, written once and compiled three times: for the compiler's
// baseline, for AVX2 + FMA and for AVX-512 (x86-64 GCC/Clang), selected at run time.
template <typename Kernel>
struct UnitLoops {
  using Args = typename Kernel::Args;
  using Vec = typename Kernel::Vec;
  static constexpr int kSums = Kernel::kSums;
  static constexpr int kCoefs = Kernel::kCoefs;

  // group[v * kSums + k] += summand k of units [begin, end), vector v of the row.
  static MAML_FAST_ALWAYS_INLINE void accumulate(
      const Args& a, std::int64_t begin, std::int64_t end, Vec* group) {
    const std::int64_t full = a.channels / kLanes;
    const std::int64_t tail = a.channels - full * kLanes;
    for (std::int64_t unit = begin; unit < end; ++unit) {
      const typename Kernel::Position at = Kernel::locate(a, unit);
      for (std::int64_t v = 0; v < full; ++v) {
        Kernel::accumulate(a, at, v * kLanes, FullWidth{}, group + v * kSums);
      }
      if (tail > 0) {
        Kernel::accumulate(a, at, full * kLanes, tail, group + full * kSums);
      }
    }
  }

  static MAML_FAST_ALWAYS_INLINE void apply(
      const Args& a, std::int64_t begin, std::int64_t end, const Vec* coefs) {
    const std::int64_t full = a.channels / kLanes;
    const std::int64_t tail = a.channels - full * kLanes;
    for (std::int64_t unit = begin; unit < end; ++unit) {
      const typename Kernel::Position at = Kernel::locate(a, unit);
      for (std::int64_t v = 0; v < full; ++v) {
        Kernel::apply(a, at, v * kLanes, FullWidth{}, coefs + v * kCoefs);
      }
      if (tail > 0) {
        Kernel::apply(a, at, full * kLanes, tail, coefs + full * kCoefs);
      }
    }
  }
};

template <typename Kernel>
struct LoopFunctions {
  using Args = typename Kernel::Args;
  using Vec = typename Kernel::Vec;
  void (*accumulate)(const Args&, std::int64_t, std::int64_t, Vec*);
  void (*apply)(const Args&, std::int64_t, std::int64_t, const Vec*);
};

template <typename Kernel>
void accumulate_baseline(const typename Kernel::Args& a, std::int64_t begin, std::int64_t end,
                         typename Kernel::Vec* group) {
  UnitLoops<Kernel>::accumulate(a, begin, end, group);
}
template <typename Kernel>
void apply_baseline(const typename Kernel::Args& a, std::int64_t begin, std::int64_t end,
                    const typename Kernel::Vec* coefs) {
  UnitLoops<Kernel>::apply(a, begin, end, coefs);
}

#if defined(__GNUC__) && defined(__x86_64__)
#define MAML_FAST_X86_VARIANTS 1
#define MAML_FAST_AVX2 __attribute__((target("avx2,fma")))
#define MAML_FAST_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))

template <typename Kernel>
MAML_FAST_AVX2 void accumulate_avx2(const typename Kernel::Args& a, std::int64_t begin,
                                    std::int64_t end, typename Kernel::Vec* group) {
  UnitLoops<Kernel>::accumulate(a, begin, end, group);
}
template <typename Kernel>
MAML_FAST_AVX2 void apply_avx2(const typename Kernel::Args& a, std::int64_t begin, std::int64_t end,
                               const typename Kernel::Vec* coefs) {
  UnitLoops<Kernel>::apply(a, begin, end, coefs);
}
template <typename Kernel>
MAML_FAST_AVX512 void accumulate_avx512(const typename Kernel::Args& a, std::int64_t begin,
                                        std::int64_t end, typename Kernel::Vec* group) {
  UnitLoops<Kernel>::accumulate(a, begin, end, group);
}
template <typename Kernel>
MAML_FAST_AVX512 void apply_avx512(const typename Kernel::Args& a, std::int64_t begin,
                                   std::int64_t end, const typename Kernel::Vec* coefs) {
  UnitLoops<Kernel>::apply(a, begin, end, coefs);
}
#endif

enum class CpuVariant { kBaseline, kAvx2, kAvx512 };

// The widest variant that both this CPU and ATen's capability setting allow (ATEN_CPU_CAPABILITY
// =default|avx2 lowers it, as it does for PyTorch's own kernels). Every kernel of a dtype runs the
// same variant, so an expression evaluated by two kernels rounds alike in both.
inline CpuVariant cpu_variant() {
  static const CpuVariant variant = [] {
#ifdef MAML_FAST_X86_VARIANTS
    const std::string capability = at::get_cpu_capability();  // "DEFAULT", "AVX2", "AVX512", ...
    __builtin_cpu_init();
    if (capability == "AVX512" && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq")) {
      return CpuVariant::kAvx512;
    }
    if ((capability == "AVX512" || capability == "AVX2") && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma")) {
      return CpuVariant::kAvx2;
    }
#endif
    return CpuVariant::kBaseline;
  }();
  return variant;
}

template <typename Kernel>
LoopFunctions<Kernel> loop_functions() {
#ifdef MAML_FAST_X86_VARIANTS
  // float16 / bfloat16 take the baseline build: they are not the CPU's working precision (and
  // GCC 12 crashes compiling their AVX-512 variant).
  using scalar_t = typename Kernel::scalar_type;
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    switch (cpu_variant()) {
      case CpuVariant::kAvx512:
        return {&accumulate_avx512<Kernel>, &apply_avx512<Kernel>};
      case CpuVariant::kAvx2:
        return {&accumulate_avx2<Kernel>, &apply_avx2<Kernel>};
      default:
        break;
    }
  }
#endif
  return {&accumulate_baseline<Kernel>, &apply_baseline<Kernel>};
}

// The column sums, the per-column coefficients, then the elementwise outputs (see the top).
template <typename Kernel>
void run_kernel(const typename Kernel::Args& a) {
  using Vec = typename Kernel::Vec;
  using acc_t = typename Kernel::acc_t;
  constexpr int kSums = Kernel::kSums;
  constexpr int kCoefs = Kernel::kCoefs;
  const LoopFunctions<Kernel> loops = loop_functions<Kernel>();
  const std::int64_t units = Kernel::units(a);
  const std::int64_t channels = a.channels;
  const std::int64_t vectors = (channels + kLanes - 1) / kLanes;
  const std::int64_t unit_grain = std::max<std::int64_t>(1, kGrainElements / (channels * Kernel::kPositions));
  const std::int64_t unit_group = std::max<std::int64_t>(1, kRowGroup / Kernel::kPositions);

  // 1. Column sums: chunk c of units [c * chunk_units, ...) adds into totals[c][k][channel].
  const std::int64_t chunks = std::max<std::int64_t>(
      1, std::min<std::int64_t>(at::get_num_threads(), (units + unit_grain - 1) / unit_grain));
  const std::int64_t chunk_units = (units + chunks - 1) / chunks;
  static_assert(sizeof(VecSlot<Vec>) == sizeof(Vec), "vector slots must be contiguous");
  std::vector<double> totals(static_cast<std::size_t>(chunks * kSums * channels), 0.0);
  at::parallel_for(0, chunks, 1, [&](std::int64_t chunk_begin, std::int64_t chunk_end) {
    std::vector<VecSlot<Vec>> group_slots(static_cast<std::size_t>(vectors * kSums));
    Vec* group = &group_slots[0].value;
    for (std::int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      double* chunk_totals = totals.data() + chunk * kSums * channels;
      const std::int64_t end = std::min(units, (chunk + 1) * chunk_units);
      for (std::int64_t begin = chunk * chunk_units; begin < end; begin += unit_group) {
        std::fill(group, group + vectors * kSums, Vec{});
        loops.accumulate(a, begin, std::min(end, begin + unit_group), group);
        for (std::int64_t v = 0; v < vectors; ++v) {
          const std::int64_t first = v * kLanes;
          const std::int64_t width = std::min(kLanes, channels - first);
          for (int k = 0; k < kSums; ++k) {
            const Vec& lanes = group[v * kSums + k];
            double* out = chunk_totals + k * channels + first;
            for (std::int64_t j = 0; j < width; ++j) {
              out[j] += static_cast<double>(lanes[j]);
            }
          }
        }
      }
    }
  });

  // 2. Per-column coefficients, laid out as coefs[vector][k] (lanes = columns).
  std::vector<VecSlot<Vec>> coef_slots(static_cast<std::size_t>(vectors * kCoefs), VecSlot<Vec>{Vec{}});
  Vec* coefs = &coef_slots[0].value;
  for (std::int64_t c = 0; c < channels; ++c) {
    double sums[kSums];
    for (int k = 0; k < kSums; ++k) {
      sums[k] = 0.0;
      for (std::int64_t chunk = 0; chunk < chunks; ++chunk) {
        sums[k] += totals[(chunk * kSums + k) * channels + c];
      }
    }
    acc_t column_coefs[kCoefs];
    Kernel::column(a, c, sums, column_coefs);
    for (int k = 0; k < kCoefs; ++k) {
      coefs[(c / kLanes) * kCoefs + k][c % kLanes] = column_coefs[k];
    }
  }

  // 3. The elementwise outputs.
  at::parallel_for(0, units, unit_grain, [&](std::int64_t begin, std::int64_t end) {
    loops.apply(a, begin, end, coefs);
  });
}

// An op on the CPU: runs Kernel<scalar_t> for the dtype of `op` (a *Op struct of
// batch_norm_relu.h) on its arguments, when it has channels, and returns its outputs.
template <template <typename> class Kernel, typename Op>
TensorTriple run_op(const Op& op) {
  if (op.has_channels()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, op.dtype(), "maml_fast::batch_norm_relu*_cpu", [&] {
      run_kernel<Kernel<scalar_t>>(op.template args<scalar_t>());
    });
  }
  return op.outputs();
}

// A double backward op: Kernel<scalar_t, whether grad_grad_x was given>.
template <template <typename, bool> class Kernel, typename Op>
TensorTriple run_double_backward_op(const Op& op) {
  if (op.has_channels()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, op.dtype(), "maml_fast::batch_norm_relu*_cpu", [&] {
      if (op.has_ggx) {
        run_kernel<Kernel<scalar_t, true>>(op.template args<scalar_t>());
      } else {
        run_kernel<Kernel<scalar_t, false>>(op.template args<scalar_t>());
      }
    });
  }
  return op.outputs();
}

}  // namespace cpu
}  // namespace bn_relu
}  // namespace maml_fast
