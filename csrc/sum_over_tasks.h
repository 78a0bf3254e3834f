// maml_fast::sum_over_tasks, the parts shared by the CPU and CUDA kernels: input checks and the
// layout of each operand.
//
//   out_i = sum_t grads_i[t] (+ sum_t pairs_k[t] for the k with paired[k] = i),
//   grads_i, pairs_k: [T, *s_i],   out_i: s_i
//
// (The pairs come as a list of tensors with their gradients' indices, not as a Tensor?[] with
// Nones: autograd through torch.library differentiates a list only when it holds no None.)
//
// The adjoint of θ broadcast over the tasks (maml_fast/ops/task_broadcast.py): each task's gradient
// block is read where it lies, with no concatenation into one buffer first.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace maml_fast {

// A [T, *s] operand whose every task block has the strides of the output: element j of task t is at
// data + t * task_stride + j (j in the output's memory order). task_stride may be 0 (a tensor
// expanded over the tasks).
struct TaskRows {
  at::Tensor tensor;  // undefined: no operand
  std::int64_t task_stride;
};

// One gradient (and its pair) with at least one element per task.
struct TaskSumEntry {
  at::Tensor out;  // s, dense
  TaskRows grad;
  TaskRows pair;
  std::int64_t inner;  // numel(s)
};

struct TaskSumPlan {
  std::vector<at::Tensor> outputs;    // one per gradient, in order
  std::vector<TaskSumEntry> entries;  // those with elements; `out` aliases `outputs`
  std::int64_t tasks = 0;
};

// Checks the lists (errors name the offending argument), allocates the outputs (each laid out like
// its gradient's task block when that is dense, else contiguous; zeros when there are no tasks) and
// describes every non-empty entry, copying only operands whose task blocks no TaskRows can describe.
TaskSumPlan plan_sum_over_tasks(at::TensorList grads, at::TensorList pairs, at::IntArrayRef paired);

}  // namespace maml_fast
