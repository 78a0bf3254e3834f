// maml_fast::fast_weight_update: input checks, operand layouts and the CPU kernel.
#include "fast_weight_update.h"
#include "tensor_lists.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace maml_fast {
namespace {

constexpr const char* kOpName = "maml_fast::fast_weight_update";
// Elements below which at::parallel_for stays on one thread (ATen's own default).
constexpr std::int64_t kGrainSize = 32768;

// The output of one update: laid out like `grad` when that is dense with the task dimension
// outermost (e.g. the channels-last weight gradients of a convolution, which the next conv then
// reads without a copy), else contiguous. Every operand is then brought into this layout, so the
// kernels walk all of them in memory order.
at::Tensor allocate_output(const at::Tensor& param, const at::Tensor& grad) {
  at::Tensor out = at::empty_like(grad);  // grad's strides when grad is non-overlapping and dense
  if (out.size(0) > 1 && out.stride(0) != out.numel() / out.size(0)) {
    return at::empty(param.sizes(), param.options());
  }
  return out;
}

// Whether every element of `tensor` is the one at its data pointer (a value expanded to a shape).
bool is_single_value(const at::Tensor& tensor) {
  return has_strides(tensor, std::vector<std::int64_t>(tensor.dim(), 0));
}

// Layout of a [T, *s] operand with at least one element, relative to the output `out`; copies only
// what no layout can describe.
Operand describe_task_major(const at::Tensor& tensor, const at::Tensor& out) {
  if (is_single_value(tensor)) {  // e.g. the zero `params` of the update's own backward
    return {tensor, OperandLayout::kScalar};
  }
  if (tensor.size(0) > 1 && tensor.stride(0) == 0) {  // broadcast over tasks: keep one task's copy
    return {in_layout_of(tensor.select(0, 0), out.select(0, 0)), OperandLayout::kShared};
  }
  return {in_layout_of(tensor, out), OperandLayout::kPerTask};
}

// Layout of a learning rate; its shape was checked to be [], s or [T, *s].
Operand describe_lr(const at::Tensor& lr, const at::Tensor& out) {
  if (lr.dim() == 0) {
    return {lr, OperandLayout::kScalar};
  }
  if (lr.dim() == out.dim()) {
    return describe_task_major(lr, out);
  }
  return {in_layout_of(lr, out.select(0, 0)), OperandLayout::kShared};
}

void check_matches_first(
    const char* name, std::size_t index, const at::Tensor& tensor, const at::Tensor& first_param) {
  TORCH_CHECK_TYPE(
      tensor.scalar_type() == first_param.scalar_type(), kOpName, ": ", name, "[", index,
      "] has dtype ", tensor.scalar_type(), " but params[0] has ", first_param.scalar_type(),
      "; all tensors must share one dtype");
  TORCH_CHECK_VALUE(
      tensor.device() == first_param.device(), kOpName, ": ", name, "[", index, "] is on ",
      tensor.device(), " but params[0] is on ", first_param.device());
}

// out[k] = param[k] - lr[k] * grad[k] over one contiguous run inside a task.
// `param_step`, `grad_step`: 1, or 0 for a single-value operand (kScalar).
template <typename scalar_t, bool kScalarLr>
void update_run(
    scalar_t* __restrict__ out, const scalar_t* param, std::int64_t param_step, const scalar_t* grad,
    std::int64_t grad_step, const scalar_t* lr, std::int64_t count) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t scalar_lr = kScalarLr ? static_cast<opmath_t>(lr[0]) : opmath_t(0);
  for (std::int64_t k = 0; k < count; ++k) {
    const opmath_t rate = kScalarLr ? scalar_lr : static_cast<opmath_t>(lr[k]);
    out[k] = static_cast<scalar_t>(
        static_cast<opmath_t>(param[k * param_step]) - rate * static_cast<opmath_t>(grad[k * grad_step]));
  }
}

// Elements [begin, end) of one entry, split at task boundaries where the operands are contiguous.
template <typename scalar_t>
void update_entry_range(const UpdateEntry& entry, std::int64_t begin, std::int64_t end) {
  scalar_t* out = entry.out.mutable_data_ptr<scalar_t>();
  const scalar_t* param = entry.param.tensor.const_data_ptr<scalar_t>();
  const scalar_t* grad = entry.grad.tensor.const_data_ptr<scalar_t>();
  const scalar_t* lr = entry.lr.tensor.const_data_ptr<scalar_t>();
  const bool scalar_lr = entry.lr.layout == OperandLayout::kScalar;
  const std::int64_t param_step = entry.param.layout == OperandLayout::kScalar ? 0 : 1;
  const std::int64_t grad_step = entry.grad.layout == OperandLayout::kScalar ? 0 : 1;
  for (std::int64_t index = begin; index < end;) {
    const std::int64_t index_in_task = index % entry.inner;
    const std::int64_t count = std::min(entry.inner - index_in_task, end - index);
    const scalar_t* param_run = param + element_offset(entry.param.layout, index, index_in_task);
    const scalar_t* grad_run = grad + element_offset(entry.grad.layout, index, index_in_task);
    const scalar_t* lr_run = lr + element_offset(entry.lr.layout, index, index_in_task);
    if (scalar_lr) {
      update_run<scalar_t, true>(out + index, param_run, param_step, grad_run, grad_step, lr_run, count);
    } else {
      update_run<scalar_t, false>(out + index, param_run, param_step, grad_run, grad_step, lr_run, count);
    }
    index += count;
  }
}

// One parallel loop over the elements of all entries, laid end to end.
template <typename scalar_t>
void update_entries_cpu(const std::vector<UpdateEntry>& entries) {
  std::vector<std::int64_t> sizes;
  sizes.reserve(entries.size());
  for (const UpdateEntry& entry : entries) {
    sizes.push_back(entry.out.numel());
  }
  parallel_for_entries(sizes, kGrainSize, [&](std::size_t entry, std::int64_t begin, std::int64_t end) {
    update_entry_range<scalar_t>(entries[entry], begin, end);
  });
}

std::vector<at::Tensor> fast_weight_update_cpu(
    at::TensorList params, at::TensorList grads, at::TensorList lrs) {
  UpdatePlan plan = plan_fast_weight_update(params, grads, lrs);
  if (!plan.entries.empty()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, params[0].scalar_type(), "fast_weight_update_cpu",
        [&] { update_entries_cpu<scalar_t>(plan.entries); });
  }
  return plan.outputs;
}

}  // namespace

UpdatePlan plan_fast_weight_update(at::TensorList params, at::TensorList grads, at::TensorList lrs) {
  TORCH_CHECK_VALUE(
      grads.size() == params.size(), kOpName, ": grads has ", grads.size(),
      " tensors but params has ", params.size());
  TORCH_CHECK_VALUE(
      lrs.size() == params.size(), kOpName, ": lrs has ", lrs.size(), " tensors but params has ",
      params.size());
  UpdatePlan plan;
  if (params.empty()) {
    return plan;
  }
  const at::Tensor& first_param = params[0];
  TORCH_CHECK_TYPE(
      at::isFloatingType(first_param.scalar_type()), kOpName,
      ": params[0] must be a floating-point tensor, got ", first_param.scalar_type());
  TORCH_CHECK_VALUE(
      first_param.dim() >= 1, kOpName,
      ": params[0] must have a leading task dimension [T, ...], got a 0-dim tensor");
  const std::int64_t tasks = first_param.size(0);

  plan.outputs.reserve(params.size());
  for (std::size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& param = params[i];
    const at::Tensor& grad = grads[i];
    const at::Tensor& lr = lrs[i];
    check_matches_first("params", i, param, first_param);
    check_matches_first("grads", i, grad, first_param);
    check_matches_first("lrs", i, lr, first_param);
    TORCH_CHECK_VALUE(
        param.dim() >= 1 && param.size(0) == tasks, kOpName, ": params[", i, "] has shape ",
        param.sizes(), " but params[0] has ", tasks, " tasks in dim 0");
    TORCH_CHECK_VALUE(
        grad.sizes() == param.sizes(), kOpName, ": grads[", i, "] has shape ", grad.sizes(),
        " but params[", i, "] has shape ", param.sizes());
    const at::IntArrayRef task_shape = param.sizes().slice(1);
    TORCH_CHECK_VALUE(
        lr.dim() == 0 || lr.sizes() == task_shape || lr.sizes() == param.sizes(), kOpName,
        ": lrs[", i, "] has shape ", lr.sizes(), "; for params[", i, "] of shape ", param.sizes(),
        " it must be [] (one rate), ", task_shape, " (per element, shared by the tasks) or ",
        param.sizes(), " (per task and element)");

    at::Tensor out = allocate_output(param, grad);
    plan.outputs.push_back(out);
    if (param.numel() == 0) {
      continue;
    }
    plan.entries.push_back(
        {out, describe_task_major(param, out), describe_task_major(grad, out), describe_lr(lr, out),
         param.numel() / tasks});
  }
  return plan;
}

}  // namespace maml_fast

TORCH_LIBRARY_IMPL(maml_fast, CPU, m) {
  m.impl("fast_weight_update", &maml_fast::fast_weight_update_cpu);
}
