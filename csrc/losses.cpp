// maml_fast::cross_entropy_per_task{,_backward,_double_backward} and maml_fast::mse_per_task{,_backward}:
// the schemas, the input checks and the CPU kernels (formulas in losses.h).
//
// The CPU kernels run at::parallel_for over tasks (the ops whose outputs sum over a task's rows) or
// over rows / elements (the elementwise backward ops); each task's sums are accumulated serially,
// in row order, so results do not depend on the thread count. Rows are short (N classes, a handful
// in few-shot learning), so the loops are plain scalar code.
#include "losses.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace maml_fast {
namespace losses {

namespace {

bool is_supported_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}

void check_floating(const char* op, const char* name, const at::Tensor& tensor) {
  TORCH_CHECK_TYPE(
      is_supported_dtype(tensor.scalar_type()), op, ": ", name,
      " must be a float32, float64, float16 or bfloat16 tensor, got ", tensor.scalar_type());
}

// `tensor` must have dtype `dtype`, `reference`'s device and shape `shape`.
void check_like(
    const char* op, const char* name, const at::Tensor& tensor, at::ScalarType dtype,
    const char* reference_name, const at::Tensor& reference, at::IntArrayRef shape) {
  TORCH_CHECK_TYPE(
      tensor.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, " (",
      reference_name, " is ", reference.scalar_type(), "), got ", tensor.scalar_type());
  TORCH_CHECK_VALUE(
      tensor.device() == reference.device(), op, ": ", name, " is on ", tensor.device(), " but ",
      reference_name, " is on ", reference.device());
  TORCH_CHECK_VALUE(
      tensor.sizes() == shape, op, ": ", name, " must have shape ", shape, " (", reference_name,
      " has shape ", reference.sizes(), "), got ", tensor.sizes());
}

// grad_loss [T] of the op's dtype, next to `reference` ([T, ...]).
void check_grad_loss(
    const char* op, const at::Tensor& grad_loss, const char* reference_name,
    const at::Tensor& reference) {
  check_like(op, "grad_loss", grad_loss, reference.scalar_type(), reference_name, reference,
             {reference.size(0)});
}

}  // namespace

void check_cross_entropy_inputs(const char* op, const at::Tensor& logits, const at::Tensor& labels) {
  check_floating(op, "logits", logits);
  TORCH_CHECK_VALUE(
      logits.dim() == 3, op, ": logits must be 3-D [tasks, examples, classes], got shape ",
      logits.sizes());
  TORCH_CHECK_VALUE(
      logits.size(1) >= 1 && logits.size(2) >= 1, op,
      ": logits needs at least one example per task and one class, got shape ", logits.sizes());
  check_like(op, "labels", labels, at::kLong, "logits", logits, {logits.size(0), logits.size(1)});
}

void check_cross_entropy_backward_inputs(
    const char* op, const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& labels,
    const at::Tensor& logsumexp) {
  check_cross_entropy_inputs(op, logits, labels);
  check_grad_loss(op, grad_loss, "logits", logits);
  check_like(op, "logsumexp", logsumexp, acc_dtype(logits.scalar_type()), "logits", logits,
             {logits.size(0), logits.size(1)});
}

void check_cross_entropy_double_backward_inputs(
    const at::Tensor& grad_grad_logits, const at::Tensor& grad_loss, const at::Tensor& logits,
    const at::Tensor& labels, const at::Tensor& logsumexp) {
  check_cross_entropy_backward_inputs(kCrossEntropyDoubleBackwardName, grad_loss, logits, labels, logsumexp);
  check_like(kCrossEntropyDoubleBackwardName, "grad_grad_logits", grad_grad_logits,
             logits.scalar_type(), "logits", logits, logits.sizes());
}

void check_mse_inputs(const char* op, const at::Tensor& prediction, const at::Tensor& target) {
  check_floating(op, "prediction", prediction);
  TORCH_CHECK_VALUE(
      prediction.dim() == 2 && prediction.size(1) >= 1, op,
      ": prediction must be 2-D [tasks, values] with at least one value per task, got shape ",
      prediction.sizes());
  check_like(op, "target", target, prediction.scalar_type(), "prediction", prediction,
             prediction.sizes());
}

void check_mse_backward_inputs(
    const at::Tensor& grad_loss, const at::Tensor& prediction, const at::Tensor& target) {
  check_mse_inputs(kMseBackwardName, prediction, target);
  check_grad_loss(kMseBackwardName, grad_loss, "prediction", prediction);
}

namespace {

// Items below which a parallel_for chunk is not split further, in elements (ATen's own default).
constexpr std::int64_t kGrainElements = 32768;

// fn(begin, end) over [0, count) items of `item_elements` elements each, in parallel chunks.
template <typename Fn>
void parallel_over(std::int64_t count, std::int64_t item_elements, const Fn& fn) {
  const std::int64_t grain = std::max<std::int64_t>(1, kGrainElements / std::max<std::int64_t>(1, item_elements));
  at::parallel_for(0, count, grain, fn);
}

// ValueError naming `labels` unless every label lies in [0, classes).
void check_label_range(const char* op, const at::Tensor& labels, std::int64_t classes) {
  const std::int64_t* data = labels.const_data_ptr<std::int64_t>();
  for (std::int64_t i = 0; i < labels.numel(); ++i) {
    TORCH_CHECK_VALUE(
        data[i] >= 0 && data[i] < classes, op, ": labels must lie in [0, ", classes,
        ") (the classes of logits), got ", data[i], " at flat index ", i);
  }
}

template <typename scalar_t>
void cross_entropy_kernel(const CrossEntropyArgs<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const Extent e = a.size;
  parallel_over(e.tasks, e.rows * e.width, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t t = begin; t < end; ++t) {
      acc_t loss = acc_t(0);
      std::int64_t correct = 0;
      for (std::int64_t b = 0; b < e.rows; ++b) {
        const std::int64_t row = t * e.rows + b;
        const RowStatistics<acc_t> stats = row_statistics(a.logits + e.offset(row), a.labels[row], e.width);
        a.logsumexp[row] = stats.logsumexp;
        loss += stats.logsumexp - stats.label_logit;
        correct += stats.correct;
      }
      a.loss[t] = static_cast<scalar_t>(loss / static_cast<acc_t>(e.rows));
      a.accuracy[t] = static_cast<scalar_t>(static_cast<acc_t>(correct) / static_cast<acc_t>(e.rows));
    }
  });
}

template <typename scalar_t>
void cross_entropy_backward_kernel(const CrossEntropyBackwardArgs<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const Extent e = a.size;
  parallel_over(e.tasks * e.rows, e.width, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t row = begin; row < end; ++row) {
      const acc_t scale = static_cast<acc_t>(a.grad_loss[row / e.rows]) / static_cast<acc_t>(e.rows);
      const std::int64_t label = a.labels[row];
      for (std::int64_t n = 0; n < e.width; ++n) {
        const std::int64_t i = e.offset(row) + n;
        a.grad_logits[i] = static_cast<scalar_t>(cross_entropy_grad<acc_t>(
            static_cast<acc_t>(a.logits[i]), a.logsumexp[row], n == label, scale));
      }
    }
  });
}

template <typename scalar_t>
void cross_entropy_double_backward_kernel(const CrossEntropyDoubleBackwardArgs<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const Extent e = a.size;
  const acc_t inv_rows = acc_t(1) / static_cast<acc_t>(e.rows);
  parallel_over(e.tasks, e.rows * e.width, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t t = begin; t < end; ++t) {
      const acc_t scale = static_cast<acc_t>(a.grad_loss[t]) * inv_rows;
      acc_t grad_grad_loss = acc_t(0);
      for (std::int64_t b = 0; b < e.rows; ++b) {
        const std::int64_t row = t * e.rows + b;
        grad_grad_loss += cross_entropy_double_backward_row<scalar_t>(
            a.logits + e.offset(row), a.grad_grad_logits + e.offset(row), a.labels[row],
            a.logsumexp[row], scale, e.width, a.grad_logits + e.offset(row));
      }
      a.grad_grad_loss[t] = static_cast<scalar_t>(grad_grad_loss * inv_rows);
    }
  });
}

template <typename scalar_t>
void mse_kernel(const MseArgs<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const Extent e = a.size;
  parallel_over(e.tasks, e.width, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t t = begin; t < end; ++t) {
      acc_t sum = acc_t(0);
      for (std::int64_t m = t * e.width; m < (t + 1) * e.width; ++m) {
        const acc_t d = static_cast<acc_t>(a.prediction[m]) - static_cast<acc_t>(a.target[m]);
        sum += d * d;
      }
      a.out[t] = static_cast<scalar_t>(sum / static_cast<acc_t>(e.width));
    }
  });
}

template <typename scalar_t>
void mse_backward_kernel(const MseArgs<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const Extent e = a.size;
  parallel_over(e.tasks * e.width, 1, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t i = begin; i < end; ++i) {
      const acc_t scale = acc_t(2) * static_cast<acc_t>(a.grad_loss[i / e.width]) / static_cast<acc_t>(e.width);
      a.out[i] = static_cast<scalar_t>(
          scale * (static_cast<acc_t>(a.prediction[i]) - static_cast<acc_t>(a.target[i])));
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_per_task_cpu(
    const at::Tensor& logits, const at::Tensor& labels) {
  check_cross_entropy_inputs(kCrossEntropyName, logits, labels);
  const CrossEntropyOp op(logits, labels);
  check_label_range(kCrossEntropyName, op.labels, logits.size(2));
  if (op.has_work()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, op.dtype(), "cross_entropy_per_task_cpu", [&] {
      cross_entropy_kernel<scalar_t>(op.args<scalar_t>());
    });
  }
  return op.outputs();
}

at::Tensor cross_entropy_per_task_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& labels,
    const at::Tensor& logsumexp) {
  check_cross_entropy_backward_inputs(kCrossEntropyBackwardName, grad_loss, logits, labels, logsumexp);
  const CrossEntropyBackwardOp op(grad_loss, logits, labels, logsumexp);
  if (op.has_work()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, op.dtype(), "cross_entropy_per_task_backward_cpu", [&] {
      cross_entropy_backward_kernel<scalar_t>(op.args<scalar_t>());
    });
  }
  return op.outputs();
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_per_task_double_backward_cpu(
    const at::Tensor& grad_grad_logits, const at::Tensor& grad_loss, const at::Tensor& logits,
    const at::Tensor& labels, const at::Tensor& logsumexp) {
  check_cross_entropy_double_backward_inputs(grad_grad_logits, grad_loss, logits, labels, logsumexp);
  const CrossEntropyDoubleBackwardOp op(grad_grad_logits, grad_loss, logits, labels, logsumexp);
  if (op.has_work()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, op.dtype(), "cross_entropy_per_task_double_backward_cpu", [&] {
      cross_entropy_double_backward_kernel<scalar_t>(op.args<scalar_t>());
    });
  }
  return op.outputs();
}

at::Tensor mse_per_task_cpu(const at::Tensor& prediction, const at::Tensor& target) {
  check_mse_inputs(kMseName, prediction, target);
  const MseOp op(prediction, target);
  if (op.has_work()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, op.dtype(), "mse_per_task_cpu", [&] {
      mse_kernel<scalar_t>(op.args<scalar_t>());
    });
  }
  return op.out;
}

at::Tensor mse_per_task_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& prediction, const at::Tensor& target) {
  check_mse_backward_inputs(grad_loss, prediction, target);
  const MseOp op(grad_loss, prediction, target);
  if (op.has_work()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, op.dtype(), "mse_per_task_backward_cpu", [&] {
      mse_backward_kernel<scalar_t>(op.args<scalar_t>());
    });
  }
  return op.out;
}

}  // namespace
}  // namespace losses
}  // namespace maml_fast

TORCH_LIBRARY_FRAGMENT(maml_fast, m) {
  // Where the fake (meta) implementations live, for FakeTensor tracing (torch.compile).
  m.set_python_module("maml_fast.ops.losses");
  // Per-task mean cross-entropy of logits [T, B, N] with int64 labels [T, B], the per-task accuracy
  // (first-maximum argmax) and each row's logsumexp (kept for the backward); formulas in losses.h.
  m.def(
      "cross_entropy_per_task(Tensor logits, Tensor labels) -> "
      "(Tensor loss, Tensor accuracy, Tensor logsumexp)");
  m.def(
      "cross_entropy_per_task_backward(Tensor grad_loss, Tensor logits, Tensor labels, "
      "Tensor logsumexp) -> Tensor grad_logits");
  m.def(
      "cross_entropy_per_task_double_backward(Tensor grad_grad_logits, Tensor grad_loss, "
      "Tensor logits, Tensor labels, Tensor logsumexp) -> (Tensor grad_grad_loss, Tensor grad_logits)");
  // Per-task mean squared error of prediction and target [T, M], and the gradient for prediction.
  m.def("mse_per_task(Tensor prediction, Tensor target) -> Tensor loss");
  m.def("mse_per_task_backward(Tensor grad_loss, Tensor prediction, Tensor target) -> Tensor grad_prediction");
}

TORCH_LIBRARY_IMPL(maml_fast, CPU, m) {
  m.impl("cross_entropy_per_task", &maml_fast::losses::cross_entropy_per_task_cpu);
  m.impl("cross_entropy_per_task_backward", &maml_fast::losses::cross_entropy_per_task_backward_cpu);
  m.impl("cross_entropy_per_task_double_backward", &maml_fast::losses::cross_entropy_per_task_double_backward_cpu);
  m.impl("mse_per_task", &maml_fast::losses::mse_per_task_cpu);
  m.impl("mse_per_task_backward", &maml_fast::losses::mse_per_task_backward_cpu);
}
