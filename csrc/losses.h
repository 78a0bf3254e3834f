// maml_fast::cross_entropy_per_task{,_backward,_double_backward} and maml_fast::mse_per_task{,_backward}:
// the parts shared by the CPU and CUDA kernels: input checks (errors name the argument), the
// host-side preparation (contiguous inputs, outputs, kernel arguments) and the per-row formulas.
//
// Cross-entropy, logits x [T, B, N] (row (t, b) of N class scores), labels y [T, B] (int64):
//   lse_tb = log sum_n exp(x_tbn)            (the row's max is subtracted first)
//   loss_t = (1/B) sum_b (lse_tb - x_tb,y_tb),   accuracy_t = (1/B) #{b : argmax_n x_tbn == y_tb}
// where argmax takes the first maximum (torch.argmax's rule; a NaN counts as the maximum).
// backward, with p = softmax(x) = exp(x - lse) and g = grad_loss [T]:
//   grad_x_tbn = g_t / B (p_tbn - [n == y_tb])
// double backward of L = <gg, grad_x> (gg [T, B, N]); the softmax Jacobian diag(p) - p p^T is
// symmetric, so with s_tb = sum_n p_tbn gg_tbn:
//   d g_t      = (1/B) sum_b (s_tb - gg_tb,y_tb)
//   d x_tbn    = g_t / B p_tbn (gg_tbn - s_tb)
// lse is returned (and taken back) in the "accumulation" dtype: float for float/half/bfloat16
// logits, double for double logits; every sum is accumulated in it too.
//
// MSE, prediction p and target y [T, M] (the M values of a task, flattened):
//   loss_t = (1/M) sum_m (p_tm - y_tm)^2,   backward: grad_p_tm = 2 g_t / M (p_tm - y_tm)
// (the gradient for the target is -grad_p; the double backward is plain torch ops, see
// maml_fast/ops/losses.py).
//
// Labels out of [0, N): the CPU ops reject them (ValueError naming `labels`). The CUDA kernels do not
// check (a device-side assert would kill the CUDA context, and a host check would synchronise): the
// caller validates labels on the host (MAML checks them against the network's output size at the
// first loss, `maml_fast.task_batch.check_labels`). A CUDA kernel meeting one anyway reads no memory
// out of bounds: that row's loss is NaN and it has no one-hot term.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <tuple>

namespace maml_fast {
namespace losses {

constexpr const char* kCrossEntropyName = "maml_fast::cross_entropy_per_task";
constexpr const char* kCrossEntropyBackwardName = "maml_fast::cross_entropy_per_task_backward";
constexpr const char* kCrossEntropyDoubleBackwardName =
    "maml_fast::cross_entropy_per_task_double_backward";
constexpr const char* kMseName = "maml_fast::mse_per_task";
constexpr const char* kMseBackwardName = "maml_fast::mse_per_task_backward";

// The dtype of logsumexp (and of every accumulation) for logits of dtype `dtype`.
inline at::ScalarType acc_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// Each check throws TypeError / ValueError (TORCH_CHECK_TYPE / _VALUE) naming the operator and the
// offending argument. They neither copy nor read values (the CPU label range is checked apart).
void check_cross_entropy_inputs(const char* op, const at::Tensor& logits, const at::Tensor& labels);
void check_cross_entropy_backward_inputs(
    const char* op, const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& labels,
    const at::Tensor& logsumexp);
void check_cross_entropy_double_backward_inputs(
    const at::Tensor& grad_grad_logits, const at::Tensor& grad_loss, const at::Tensor& logits,
    const at::Tensor& labels, const at::Tensor& logsumexp);
void check_mse_inputs(const char* op, const at::Tensor& prediction, const at::Tensor& target);
void check_mse_backward_inputs(
    const at::Tensor& grad_loss, const at::Tensor& prediction, const at::Tensor& target);

// ---------------------------------------------------------------------------------------------
// Host-side preparation shared by the CPU and CUDA launchers: after the input checks (and, on
// CUDA, under the device guard) a launcher builds one of the *Op structs below, which holds the
// contiguous inputs and the freshly allocated outputs and gives the kernel's arguments for the
// dispatched dtype; it then dispatches on dtype(), runs its kernel when has_work() and returns
// outputs().

// The sizes every kernel indexes with: T tasks of `rows` rows of `width` values (cross-entropy:
// rows = B examples of width = N classes; MSE: one row of width = M values).
// The class scores of cross-entropy (logits, their gradients) may be any layout whose rows are
// contiguous: row (t, b) starts at t * task_stride + b * row_stride (e.g. the [T, B, N] view of the
// grouped layout [B, T*N], which the task-batched linear layer writes).
struct Extent {
  std::int64_t tasks, rows, width;
  std::int64_t task_stride, row_stride;

  // Offset of row `row` = t * rows + b.
  C10_HOST_DEVICE std::int64_t offset(std::int64_t row) const {
    return (row / rows) * task_stride + (row % rows) * row_stride;
  }
};

template <typename scalar_t>
struct CrossEntropyArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* logits;
  const std::int64_t* labels;
  scalar_t* loss;
  scalar_t* accuracy;
  acc_t* logsumexp;
  Extent size;
};

template <typename scalar_t>
struct CrossEntropyBackwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad_loss;
  const scalar_t* logits;
  const std::int64_t* labels;
  const acc_t* logsumexp;
  scalar_t* grad_logits;
  Extent size;
};

template <typename scalar_t>
struct CrossEntropyDoubleBackwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad_grad_logits;
  const scalar_t* grad_loss;
  const scalar_t* logits;
  const std::int64_t* labels;
  const acc_t* logsumexp;
  scalar_t* grad_grad_loss;
  scalar_t* grad_logits;
  Extent size;
};

template <typename scalar_t>
struct MseArgs {
  const scalar_t* prediction;
  const scalar_t* target;
  const scalar_t* grad_loss;  // backward only
  scalar_t* out;              // forward: loss [T]; backward: grad_prediction [T, M]
  Extent size;
};

inline Extent cross_entropy_extent(const at::Tensor& logits) {
  return {logits.size(0), logits.size(1), logits.size(2), logits.stride(0), logits.stride(1)};
}

inline Extent mse_extent(const at::Tensor& prediction) {
  return {prediction.size(0), 1, prediction.size(1), prediction.size(1), prediction.size(1)};
}

// logits as they are when their rows are contiguous and the tensor is dense (so that outputs made
// by at::empty_like share its strides), else a contiguous copy.
inline at::Tensor with_contiguous_rows(const at::Tensor& logits) {
  return logits.stride(2) == 1 && logits.is_non_overlapping_and_dense() ? logits : logits.contiguous();
}

// `tensor` (of logits' shape) laid out exactly as `logits`: itself, or a copy.
inline at::Tensor laid_out_as(const at::Tensor& tensor, const at::Tensor& logits) {
  return tensor.strides() == logits.strides() ? tensor : at::empty_like(logits).copy_(tensor);
}

struct CrossEntropyOp {
  at::Tensor logits, labels;               // contiguous inputs
  at::Tensor loss, accuracy, logsumexp;    // outputs

  CrossEntropyOp(const at::Tensor& logits_in, const at::Tensor& labels_in)
      : logits(with_contiguous_rows(logits_in)),
        labels(labels_in.contiguous()),
        loss(at::empty({logits.size(0)}, logits.options())),
        accuracy(at::empty({logits.size(0)}, logits.options())),
        logsumexp(at::empty({logits.size(0), logits.size(1)},
                            logits.options().dtype(acc_dtype(logits.scalar_type())))) {}

  at::ScalarType dtype() const { return logits.scalar_type(); }
  bool has_work() const { return logits.numel() > 0; }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> outputs() const { return {loss, accuracy, logsumexp}; }

  template <typename scalar_t>
  CrossEntropyArgs<scalar_t> args() const {
    using acc_t = at::opmath_type<scalar_t>;
    return {logits.const_data_ptr<scalar_t>(), labels.const_data_ptr<std::int64_t>(),
            loss.mutable_data_ptr<scalar_t>(), accuracy.mutable_data_ptr<scalar_t>(),
            logsumexp.mutable_data_ptr<acc_t>(), cross_entropy_extent(logits)};
  }
};

// The inputs both cross-entropy backward ops read: contiguous, logits with contiguous rows.
struct CrossEntropySaved {
  at::Tensor grad_loss, logits, labels, logsumexp;

  CrossEntropySaved(const at::Tensor& grad_loss_in, const at::Tensor& logits_in,
                    const at::Tensor& labels_in, const at::Tensor& logsumexp_in)
      : grad_loss(grad_loss_in.contiguous()),
        logits(with_contiguous_rows(logits_in)),
        labels(labels_in.contiguous()),
        logsumexp(logsumexp_in.contiguous()) {}

  at::ScalarType dtype() const { return logits.scalar_type(); }
  bool has_work() const { return logits.numel() > 0; }
};

struct CrossEntropyBackwardOp : CrossEntropySaved {
  at::Tensor grad_logits;  // output

  CrossEntropyBackwardOp(const at::Tensor& grad_loss_in, const at::Tensor& logits_in,
                         const at::Tensor& labels_in, const at::Tensor& logsumexp_in)
      : CrossEntropySaved(grad_loss_in, logits_in, labels_in, logsumexp_in),
        grad_logits(at::empty_like(logits)) {}

  at::Tensor outputs() const { return grad_logits; }

  template <typename scalar_t>
  CrossEntropyBackwardArgs<scalar_t> args() const {
    using acc_t = at::opmath_type<scalar_t>;
    return {grad_loss.const_data_ptr<scalar_t>(), logits.const_data_ptr<scalar_t>(),
            labels.const_data_ptr<std::int64_t>(), logsumexp.const_data_ptr<acc_t>(),
            grad_logits.mutable_data_ptr<scalar_t>(), cross_entropy_extent(logits)};
  }
};

struct CrossEntropyDoubleBackwardOp : CrossEntropySaved {
  at::Tensor grad_grad_logits;             // input, laid out as logits
  at::Tensor grad_grad_loss, grad_logits;  // outputs (grad_logits laid out as logits)

  CrossEntropyDoubleBackwardOp(const at::Tensor& grad_grad_logits_in,
                               const at::Tensor& grad_loss_in, const at::Tensor& logits_in,
                               const at::Tensor& labels_in, const at::Tensor& logsumexp_in)
      : CrossEntropySaved(grad_loss_in, logits_in, labels_in, logsumexp_in),
        grad_grad_logits(laid_out_as(grad_grad_logits_in, logits)),
        grad_grad_loss(at::empty({logits.size(0)}, logits.options())),
        grad_logits(at::empty_like(logits)) {}

  std::tuple<at::Tensor, at::Tensor> outputs() const { return {grad_grad_loss, grad_logits}; }

  template <typename scalar_t>
  CrossEntropyDoubleBackwardArgs<scalar_t> args() const {
    using acc_t = at::opmath_type<scalar_t>;
    return {grad_grad_logits.const_data_ptr<scalar_t>(), grad_loss.const_data_ptr<scalar_t>(),
            logits.const_data_ptr<scalar_t>(), labels.const_data_ptr<std::int64_t>(),
            logsumexp.const_data_ptr<acc_t>(), grad_grad_loss.mutable_data_ptr<scalar_t>(),
            grad_logits.mutable_data_ptr<scalar_t>(), cross_entropy_extent(logits)};
  }
};

// Forward (no grad_loss; out = loss [T]) and backward (out = grad_prediction [T, M]).
struct MseOp {
  at::Tensor prediction, target, grad_loss;  // contiguous inputs (grad_loss: backward only)
  at::Tensor out;

  MseOp(const at::Tensor& prediction_in, const at::Tensor& target_in)
      : prediction(prediction_in.contiguous()),
        target(target_in.contiguous()),
        out(at::empty({prediction.size(0)}, prediction.options())) {}

  MseOp(const at::Tensor& grad_loss_in, const at::Tensor& prediction_in, const at::Tensor& target_in)
      : prediction(prediction_in.contiguous()),
        target(target_in.contiguous()),
        grad_loss(grad_loss_in.contiguous()),
        out(at::empty(prediction.sizes(), prediction.options())) {}

  at::ScalarType dtype() const { return prediction.scalar_type(); }
  bool has_work() const { return prediction.numel() > 0; }

  template <typename scalar_t>
  MseArgs<scalar_t> args() const {
    return {prediction.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(),
            grad_loss.defined() ? grad_loss.const_data_ptr<scalar_t>() : nullptr,
            out.mutable_data_ptr<scalar_t>(), mse_extent(prediction)};
  }
};

// ---------------------------------------------------------------------------------------------
// Per-row formulas, written once for both devices. `logits` points at the row's N values.

// The sums of a cross-entropy row: its logsumexp and whether its first maximum is the label.
template <typename acc_t>
struct RowStatistics {
  acc_t logsumexp;
  acc_t label_logit;  // NaN when the label is out of range
  bool correct;
};

template <typename acc_t>
C10_HOST_DEVICE inline bool is_nan(acc_t v) {
  return v != v;
}

// exp in acc_t's own precision on both devices (the global ::exp of the host is double's).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t exp_of(acc_t v) {
#if defined(__CUDA_ARCH__)
  return ::exp(v);
#else
  return std::exp(v);
#endif
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t log_of(acc_t v) {
#if defined(__CUDA_ARCH__)
  return ::log(v);
#else
  return std::log(v);
#endif
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
C10_HOST_DEVICE inline RowStatistics<acc_t> row_statistics(
    const scalar_t* logits, std::int64_t label, std::int64_t classes) {
  // First maximum, a NaN beating any number (torch.argmax).
  acc_t best = static_cast<acc_t>(logits[0]);
  std::int64_t best_index = 0;
  for (std::int64_t n = 1; n < classes; ++n) {
    const acc_t v = static_cast<acc_t>(logits[n]);
    if (!is_nan(best) && (v > best || is_nan(v))) {
      best = v;
      best_index = n;
    }
  }
  // The maximum is subtracted even when infinite: the row is then NaN, as in F.cross_entropy.
  acc_t sum = acc_t(0);
  for (std::int64_t n = 0; n < classes; ++n) {
    sum += exp_of(static_cast<acc_t>(logits[n]) - best);
  }
  const bool in_range = label >= 0 && label < classes;
  const acc_t label_logit = in_range ? static_cast<acc_t>(logits[label]) : acc_t(NAN);
  return {best + log_of(sum), label_logit, best_index == label};
}

// One row of the backward: grad[n] = scale (exp(x_n - lse) - [n == label]), scale = g_t / B.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t cross_entropy_grad(acc_t logit, acc_t logsumexp, bool is_label, acc_t scale) {
  return scale * (exp_of(logit - logsumexp) - (is_label ? acc_t(1) : acc_t(0)));
}

// One row of the double backward: writes d x for its N values and returns s - gg[label], the row's
// summand of d g_t (before the 1/B).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
C10_HOST_DEVICE inline acc_t cross_entropy_double_backward_row(
    const scalar_t* logits, const scalar_t* grad_grad, std::int64_t label, acc_t logsumexp,
    acc_t scale, std::int64_t classes, scalar_t* grad_logits) {
  acc_t s = acc_t(0);
  for (std::int64_t n = 0; n < classes; ++n) {
    s += exp_of(static_cast<acc_t>(logits[n]) - logsumexp) * static_cast<acc_t>(grad_grad[n]);
  }
  for (std::int64_t n = 0; n < classes; ++n) {
    const acc_t p = exp_of(static_cast<acc_t>(logits[n]) - logsumexp);
    grad_logits[n] = static_cast<scalar_t>(scale * p * (static_cast<acc_t>(grad_grad[n]) - s));
  }
  const bool in_range = label >= 0 && label < classes;
  return s - (in_range ? static_cast<acc_t>(grad_grad[label]) : acc_t(0));
}

}  // namespace losses
}  // namespace maml_fast
