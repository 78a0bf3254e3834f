// maml_fast::pooled_linear{,_backward,_double_backward}: the schemas, the input checks and the CPU
// kernels (formulas in pooled_linear.h). The tasks run in parallel (at::parallel_for); each task runs
// nested loops over its outputs, serially, with its pooled features in a buffer, so results do not
// depend on the thread count.
#include "pooled_linear.h"

#include "op_checks.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace maml_fast {
namespace pooled_linear {

namespace {

void check_dtype(const char* op, const at::Tensor& x) {
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK_TYPE(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
      ": x must be a float32, float64, float16 or bfloat16 tensor, got ", dtype);
}

// `tensor` (argument `name`) has x's dtype and device and shape `sizes`.
void check_like(const char* op, const char* name, const at::Tensor& tensor, const at::Tensor& x,
                at::IntArrayRef sizes) {
  check_dtype_and_device_of_x(op, name, tensor, x);
  TORCH_CHECK_VALUE(tensor.sizes() == sizes, op, ": ", name, " must have shape ", sizes, ", got ", tensor.sizes());
}

bool is_given(const std::optional<at::Tensor>& tensor) {
  return tensor.has_value() && tensor->defined();
}

}  // namespace

void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias) {
  check_dtype(op, x);
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be 4-D [batch, tasks*in_features, height, width], got shape ", x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 3, op, ": weight must be 3-D [tasks, out_features, in_features], got shape ",
                    weight.sizes());
  check_dtype_and_device_of_x(op, "weight", weight, x);
  TORCH_CHECK_VALUE(
      x.size(1) == weight.size(0) * weight.size(2), op, ": x must have tasks*in_features = ",
      weight.size(0) * weight.size(2), " channels for weight of shape ", weight.sizes(), ", got shape ", x.sizes());
  if (is_given(bias)) {
    check_like(op, "bias", *bias, x, {weight.size(0), weight.size(1)});
  }
}

void check_backward_inputs(const char* op, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight) {
  check_inputs(op, x, weight, std::nullopt);
  check_like(op, "grad_y", grad_y, x, {x.size(0), weight.size(0) * weight.size(1)});
}

void check_double_backward_inputs(
    const std::optional<at::Tensor>& grad_grad_x, const std::optional<at::Tensor>& grad_grad_weight,
    const std::optional<at::Tensor>& grad_grad_bias, const at::Tensor& grad_y, const at::Tensor& x,
    const at::Tensor& weight) {
  check_backward_inputs(kDoubleBackwardName, grad_y, x, weight);
  if (is_given(grad_grad_x)) {
    check_like(kDoubleBackwardName, "grad_grad_x", *grad_grad_x, x, x.sizes());
  }
  if (is_given(grad_grad_weight)) {
    check_like(kDoubleBackwardName, "grad_grad_weight", *grad_grad_weight, x, weight.sizes());
  }
  if (is_given(grad_grad_bias)) {
    check_like(kDoubleBackwardName, "grad_grad_bias", *grad_grad_bias, x, {weight.size(0), weight.size(1)});
  }
}

namespace {

// fn(t) for every task, the tasks in parallel chunks.
template <typename scalar_t, typename Fn>
void for_each_task(const Args<scalar_t>& a, const Fn& fn) {
  const Extent& e = a.size;
  const std::int64_t work = std::max<std::int64_t>(1, e.batch * e.in * e.height * e.width + e.out * e.in);
  at::parallel_for(0, e.tasks, std::max<std::int64_t>(1, 32768 / work), [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t t = begin; t < end; ++t) {
      fn(t);
    }
  });
}

// Task t's computations in nested loops (no index arithmetic per element), with its pooled features
// kept in a [B, C] buffer.
template <typename scalar_t>
struct TaskLoops {
  using acc_t = at::opmath_type<scalar_t>;
  const Args<scalar_t>& a;
  std::int64_t t;

  // out[b*C + c] = (1/P) sum_p m[b, tC+c, p].
  void pool(const View<const scalar_t>& m, std::vector<acc_t>& out) const {
    const Extent& e = a.size;
    const acc_t scale = acc_t(1) / static_cast<acc_t>(e.height * e.width);
    for (std::int64_t b = 0; b < e.batch; ++b) {
      for (std::int64_t c = 0; c < e.in; ++c) {
        acc_t sum = acc_t(0);
        for (std::int64_t h = 0; h < e.height; ++h) {
          for (std::int64_t w = 0; w < e.width; ++w) {
            sum += static_cast<acc_t>(m.at(b, t * e.in + c, h, w));
          }
        }
        out[b * e.in + c] = sum * scale;
      }
    }
  }

  // sums[b*O + o] += sum_c w[t,o,c] f[b*C+c].
  void linear(const std::vector<acc_t>& f, const View<const scalar_t>& w, std::vector<acc_t>& sums) const {
    const Extent& e = a.size;
    for (std::int64_t b = 0; b < e.batch; ++b) {
      for (std::int64_t o = 0; o < e.out; ++o) {
        acc_t sum = acc_t(0);
        for (std::int64_t c = 0; c < e.in; ++c) {
          sum += static_cast<acc_t>(w.at(t, o, c)) * f[b * e.in + c];
        }
        sums[b * e.out + o] += sum;
      }
    }
  }

  void write_rows(const std::vector<acc_t>& sums, const View<const scalar_t>& bias, const View<scalar_t>& out) const {
    const Extent& e = a.size;
    for (std::int64_t b = 0; b < e.batch; ++b) {
      for (std::int64_t o = 0; o < e.out; ++o) {
        const acc_t shift = bias.data != nullptr ? static_cast<acc_t>(bias.at(t, o)) : acc_t(0);
        out.at(b, t * e.out + o) = static_cast<scalar_t>(sums[b * e.out + o] + shift);
      }
    }
  }

  // out[b, tC+c, p] = (1/P) sum_o grad_y[b, tO+o] w[t,o,c] (zeros without w).
  void input_grad(const View<const scalar_t>& w, std::vector<acc_t>& scratch) const {
    const Extent& e = a.size;
    const acc_t scale = acc_t(1) / static_cast<acc_t>(e.height * e.width);
    std::fill(scratch.begin(), scratch.end(), acc_t(0));
    for (std::int64_t b = 0; w.data != nullptr && b < e.batch; ++b) {
      for (std::int64_t o = 0; o < e.out; ++o) {
        const acc_t g = static_cast<acc_t>(a.grad_y.at(b, t * e.out + o));
        for (std::int64_t c = 0; c < e.in; ++c) {
          scratch[b * e.in + c] += g * static_cast<acc_t>(w.at(t, o, c));
        }
      }
    }
    for (std::int64_t b = 0; b < e.batch; ++b) {
      for (std::int64_t c = 0; c < e.in; ++c) {
        const scalar_t value = static_cast<scalar_t>(scratch[b * e.in + c] * scale);
        for (std::int64_t h = 0; h < e.height; ++h) {
          for (std::int64_t w_ = 0; w_ < e.width; ++w_) {
            a.grad_x.at(b, t * e.in + c, h, w_) = value;
          }
        }
      }
    }
  }

  // grad_weight[t,o,c] = sum_b grad_y[b, tO+o] f[b*C+c] (zeros without f); with `bias_too`, grad_bias.
  void weight_grad(const std::vector<acc_t>* f, bool bias_too) const {
    const Extent& e = a.size;
    for (std::int64_t o = 0; o < e.out; ++o) {
      for (std::int64_t c = 0; c < e.in; ++c) {
        acc_t sum = acc_t(0);
        for (std::int64_t b = 0; f != nullptr && b < e.batch; ++b) {
          sum += static_cast<acc_t>(a.grad_y.at(b, t * e.out + o)) * (*f)[b * e.in + c];
        }
        a.grad_weight.at(t, o, c) = static_cast<scalar_t>(sum);
      }
      if (bias_too) {
        acc_t sum = acc_t(0);
        for (std::int64_t b = 0; b < e.batch; ++b) {
          sum += static_cast<acc_t>(a.grad_y.at(b, t * e.out + o));
        }
        a.grad_bias.at(t, o) = static_cast<scalar_t>(sum);
      }
    }
  }
};

template <typename scalar_t>
void forward_cpu_kernel(const Args<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const Extent& e = a.size;
  for_each_task(a, [&](std::int64_t t) {
    const TaskLoops<scalar_t> loops{a, t};
    std::vector<acc_t> f(e.batch * e.in), sums(e.batch * e.out, acc_t(0));
    loops.pool(a.x, f);
    loops.linear(f, a.weight, sums);
    loops.write_rows(sums, a.bias, a.y);
  });
}

template <typename scalar_t>
void backward_cpu_kernel(const Args<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const Extent& e = a.size;
  for_each_task(a, [&](std::int64_t t) {
    const TaskLoops<scalar_t> loops{a, t};
    std::vector<acc_t> f(e.batch * e.in), scratch(e.batch * e.in);
    loops.pool(a.x, f);
    loops.input_grad(a.weight, scratch);
    loops.weight_grad(&f, true);
  });
}

template <typename scalar_t>
void double_backward_cpu_kernel(const Args<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const Extent& e = a.size;
  for_each_task(a, [&](std::int64_t t) {
    const TaskLoops<scalar_t> loops{a, t};
    std::vector<acc_t> f(e.batch * e.in), gf(e.batch * e.in), sums(e.batch * e.out, acc_t(0));
    const bool has_ggx = a.grad_grad_x.data != nullptr;
    if (has_ggx) {
      loops.pool(a.grad_grad_x, gf);
      loops.linear(gf, a.weight, sums);
    }
    if (a.grad_grad_weight.data != nullptr) {
      loops.pool(a.x, f);
      loops.linear(f, a.grad_grad_weight, sums);
    }
    loops.write_rows(sums, a.grad_grad_bias, a.y);
    loops.input_grad(a.grad_grad_weight, f);  // (f is no longer needed: its buffer is the scratch)
    loops.weight_grad(has_ggx ? &gf : nullptr, false);
  });
}

at::Tensor pooled_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_inputs(kForwardName, x, weight, bias);
  const Op op = forward_op(x, weight, bias);
  if (op.has_work()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pooled_linear_cpu", [&] {
      forward_cpu_kernel<scalar_t>(op.args<scalar_t>());
    });
  }
  return op.y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pooled_linear_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight) {
  check_backward_inputs(kBackwardName, grad_y, x, weight);
  const Op op = backward_op(grad_y, x, weight);
  if (op.has_work()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pooled_linear_backward_cpu", [&] {
      backward_cpu_kernel<scalar_t>(op.args<scalar_t>());
    });
  }
  return {op.grad_x, op.grad_weight, op.grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pooled_linear_double_backward_cpu(
    const std::optional<at::Tensor>& grad_grad_x, const std::optional<at::Tensor>& grad_grad_weight,
    const std::optional<at::Tensor>& grad_grad_bias, const at::Tensor& grad_y, const at::Tensor& x,
    const at::Tensor& weight) {
  check_double_backward_inputs(grad_grad_x, grad_grad_weight, grad_grad_bias, grad_y, x, weight);
  const Op op = double_backward_op(grad_grad_x, grad_grad_weight, grad_grad_bias, grad_y, x, weight);
  if (op.has_work()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pooled_linear_double_backward_cpu", [&] {
      double_backward_cpu_kernel<scalar_t>(op.args<scalar_t>());
    });
  }
  return {op.y, op.grad_x, op.grad_weight};
}

}  // namespace
}  // namespace pooled_linear
}  // namespace maml_fast

TORCH_LIBRARY_FRAGMENT(maml_fast, m) {
  // Where the fake (meta) implementations live, for FakeTensor tracing (torch.compile).
  m.set_python_module("maml_fast.ops.pooled_linear");
  // A task-batched classifier head: the global mean pool of x [B, T*C, H, W] and each task's linear
  // layer (weight [T, O, C], bias [T, O]) -> y [B, T*O]; formulas in pooled_linear.h.
  m.def("pooled_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor y");
  m.def(
      "pooled_linear_backward(Tensor grad_y, Tensor x, Tensor weight) -> "
      "(Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "pooled_linear_double_backward(Tensor? grad_grad_x, Tensor? grad_grad_weight, Tensor? grad_grad_bias, "
      "Tensor grad_y, Tensor x, Tensor weight) -> (Tensor grad_grad_y, Tensor grad_x, Tensor grad_weight)");
}

TORCH_LIBRARY_IMPL(maml_fast, CPU, m) {
  m.impl("pooled_linear", &maml_fast::pooled_linear::pooled_linear_cpu);
  m.impl("pooled_linear_backward", &maml_fast::pooled_linear::pooled_linear_backward_cpu);
  m.impl("pooled_linear_double_backward", &maml_fast::pooled_linear::pooled_linear_double_backward_cpu);
}
