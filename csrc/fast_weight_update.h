// maml_fast::fast_weight_update, the parts shared by the CPU and CUDA kernels: input checks and the
// memory layout of each operand, which the kernels index with.
//
//   out_i = params_i - lrs_i * grads_i,   params_i, grads_i: [T, *s_i],   lrs_i: [], s_i or [T, *s_i]
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <vector>

namespace maml_fast {

// Every operand is walked in the memory order of the output, which is dense with the task
// dimension outermost (contiguous, or e.g. channels-last inside each task). An operand of logical
// shape [T, *s] is brought into one of these layouts without copying along the task dimension, so
// θ expanded to T tasks (stride 0) is read from its single copy. Index k counts the output's memory
// (k = t * inner + j, j the position inside task t's block).
enum class OperandLayout : std::uint8_t {
  kPerTask,  // [T, *s] with the output's strides: element k at k
  kShared,   // s with the strides of one task of the output, the same for every task: k at j
  kScalar,   // a single value for every element (a 0-dim learning rate)
};

struct Operand {
  at::Tensor tensor;
  OperandLayout layout;
};

// One (param, grad, lr) triple with at least one element, ready for a kernel.
struct UpdateEntry {
  at::Tensor out;  // [T, *s], dense, task dimension outermost
  Operand param;
  Operand grad;
  Operand lr;
  std::int64_t inner;  // elements per task: numel(s)
};

struct UpdatePlan {
  std::vector<at::Tensor> outputs;   // one per input triple, in order (empty ones included)
  std::vector<UpdateEntry> entries;  // the triples with elements; their `out` alias `outputs`
};

// Checks the three lists (errors name the offending argument), allocates the outputs and describes
// every non-empty triple. Throws ValueError / TypeError (via TORCH_CHECK_VALUE / _TYPE) on bad input.
UpdatePlan plan_fast_weight_update(at::TensorList params, at::TensorList grads, at::TensorList lrs);

// Offset of element `index` (in the output's memory order; `index_in_task` = index mod numel(s)) in
// an operand.
C10_HOST_DEVICE inline std::int64_t element_offset(
    OperandLayout layout, std::int64_t index, std::int64_t index_in_task) {
  switch (layout) {
    case OperandLayout::kPerTask:
      return index;
    case OperandLayout::kShared:
      return index_in_task;
    default:
      return 0;
  }
}

}  // namespace maml_fast
