// maml_fast::sum_over_tasks: input checks, operand layouts and the CPU kernel.
#include "sum_over_tasks.h"

#include "tensor_lists.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

namespace maml_fast {
namespace {

constexpr const char* kOpName = "maml_fast::sum_over_tasks";
// Output elements per thread range below which at::parallel_for stays on one thread (each reads T
// or 2T inputs).
constexpr std::int64_t kGrainSize = 4096;
// Output elements accumulated at once: the accumulators stay in L1 while every task row streams by.
constexpr std::int64_t kChunk = 512;

// The rows of a [T, *s] operand in the layout of `out` (s, dense): the operand itself when its task
// blocks have out's strides, else a copy laid out so.
TaskRows describe_rows(const at::Tensor& operand, const at::Tensor& out) {
  if (has_strides(operand.select(0, 0), out.strides())) {
    return {operand, operand.size(0) > 1 ? operand.stride(0) : 0};
  }
  std::vector<std::int64_t> strides{out.numel()};
  strides.insert(strides.end(), out.strides().begin(), out.strides().end());
  at::Tensor copy = at::empty_strided(operand.sizes(), strides, operand.options()).copy_(operand);
  return {copy, out.numel()};
}

void check_matches_first(const char* name, std::size_t index, const at::Tensor& tensor, const at::Tensor& first) {
  TORCH_CHECK_TYPE(
      tensor.scalar_type() == first.scalar_type(), kOpName, ": ", name, "[", index, "] has dtype ",
      tensor.scalar_type(), " but grads[0] has ", first.scalar_type(), "; all tensors must share one dtype");
  TORCH_CHECK_VALUE(
      tensor.device() == first.device(), kOpName, ": ", name, "[", index, "] is on ", tensor.device(),
      " but grads[0] is on ", first.device());
}

// out[lo, lo + count) of one entry: the task rows summed in order, grads' then pairs'.
template <typename scalar_t>
void sum_entry_range(const TaskSumEntry& entry, std::int64_t tasks, std::int64_t begin, std::int64_t end) {
  using opmath_t = at::opmath_type<scalar_t>;
  std::array<opmath_t, kChunk> total;
  scalar_t* out = entry.out.mutable_data_ptr<scalar_t>();
  for (std::int64_t lo = begin; lo < end; lo += kChunk) {
    const std::int64_t count = std::min(kChunk, end - lo);
    std::fill(total.begin(), total.begin() + count, opmath_t(0));
    for (const TaskRows* rows : {&entry.grad, &entry.pair}) {
      if (!rows->tensor.defined()) {
        continue;
      }
      const scalar_t* data = rows->tensor.const_data_ptr<scalar_t>() + lo;
      for (std::int64_t t = 0; t < tasks; ++t) {
        const scalar_t* row = data + t * rows->task_stride;
        for (std::int64_t j = 0; j < count; ++j) {
          total[j] += static_cast<opmath_t>(row[j]);
        }
      }
    }
    for (std::int64_t j = 0; j < count; ++j) {
      out[lo + j] = static_cast<scalar_t>(total[j]);
    }
  }
}

std::vector<at::Tensor> sum_over_tasks_cpu(
    at::TensorList grads, at::TensorList pairs, at::IntArrayRef paired) {
  TaskSumPlan plan = plan_sum_over_tasks(grads, pairs, paired);
  if (!plan.entries.empty()) {
    std::vector<std::int64_t> sizes;
    for (const TaskSumEntry& entry : plan.entries) {
      sizes.push_back(entry.inner);
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "sum_over_tasks_cpu", [&] {
      parallel_for_entries(sizes, kGrainSize, [&](std::size_t entry, std::int64_t begin, std::int64_t end) {
        sum_entry_range<scalar_t>(plan.entries[entry], plan.tasks, begin, end);
      });
    });
  }
  return plan.outputs;
}

}  // namespace

TaskSumPlan plan_sum_over_tasks(at::TensorList grads, at::TensorList pairs, at::IntArrayRef paired) {
  TORCH_CHECK_VALUE(
      paired.size() == pairs.size(), kOpName, ": paired has ", paired.size(), " indices but pairs has ",
      pairs.size(), " tensors");
  TaskSumPlan plan;
  if (grads.empty()) {
    TORCH_CHECK_VALUE(pairs.empty(), kOpName, ": pairs has ", pairs.size(), " tensors but grads is empty");
    return plan;
  }
  const at::Tensor& first = grads[0];
  TORCH_CHECK_TYPE(
      at::isFloatingType(first.scalar_type()), kOpName, ": grads[0] must be a floating-point tensor, got ",
      first.scalar_type());
  TORCH_CHECK_VALUE(
      first.dim() >= 1, kOpName, ": grads[0] must have a leading task dimension [T, ...], got a 0-dim tensor");
  std::vector<const at::Tensor*> pair_of(grads.size(), nullptr);
  for (std::size_t k = 0; k < paired.size(); ++k) {
    const std::int64_t i = paired[k];
    TORCH_CHECK_VALUE(
        i >= 0 && i < static_cast<std::int64_t>(grads.size()), kOpName, ": paired[", k, "] = ", i,
        " is not an index of grads (", grads.size(), " tensors)");
    TORCH_CHECK_VALUE(pair_of[i] == nullptr, kOpName, ": paired[", k, "] = ", i, " names grads[", i, "] twice");
    check_matches_first("pairs", k, pairs[k], first);
    TORCH_CHECK_VALUE(
        pairs[k].sizes() == grads[i].sizes(), kOpName, ": pairs[", k, "] has shape ", pairs[k].sizes(),
        " but grads[", i, "] (paired[", k, "]) has shape ", grads[i].sizes());
    pair_of[i] = &pairs[k];
  }
  plan.tasks = first.size(0);
  plan.outputs.reserve(grads.size());
  for (std::size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& grad = grads[i];
    check_matches_first("grads", i, grad, first);
    TORCH_CHECK_VALUE(
        grad.dim() >= 1 && grad.size(0) == plan.tasks, kOpName, ": grads[", i, "] has shape ", grad.sizes(),
        " but grads[0] has ", plan.tasks, " tasks in dim 0");
    const at::Tensor* pair = pair_of[i];
    if (plan.tasks == 0) {
      plan.outputs.push_back(at::zeros(grad.sizes().slice(1), grad.options()));
      continue;
    }
    // empty_like keeps the task block's strides when it is non-overlapping and dense.
    at::Tensor out = at::empty_like(grad.select(0, 0));
    plan.outputs.push_back(out);
    if (out.numel() == 0) {
      continue;
    }
    plan.entries.push_back(
        {out, describe_rows(grad, out), pair != nullptr ? describe_rows(*pair, out) : TaskRows{at::Tensor(), 0},
         out.numel()});
  }
  return plan;
}

}  // namespace maml_fast

TORCH_LIBRARY_IMPL(maml_fast, CPU, m) {
  m.impl("sum_over_tasks", &maml_fast::sum_over_tasks_cpu);
}
