"""θ broadcast over the tasks of a group, and its adjoint, the sum over the tasks, for a list of tensors
at once:

    broadcast_over_tasks(params, T)[i] = params[i].expand(T, *params[i].shape)   (views, no copy; vectors
                                                                                   of one length copied together)
    its backward:  d params[i] = Σ_t d out[i][t]                                  (`sum_over_tasks`)

Autograd's own backward of ``expand`` reduces each tensor on its own (one reduction per parameter,
per inner loop). Here all gradients are reduced in one op: the compiled ``maml_fast::sum_over_tasks``
(one parallel loop on the CPU, one launch on CUDA, reading every task's gradient where it lies),
or without the extension one concatenation of the gradients laid end to end and one reduction. Both
are differentiable, so a second-order backward differentiates them exactly (their backward is the
broadcast again: views).

`broadcast_over_tasks(params, T, uses=2)` gives each parameter a second view, from a second output of
the same node: MAML's first update reads θ through it while the network reads the first. Both
gradients then reach this node apart and are summed in its one reduction, where autograd would add
them tensor by tensor (one op per parameter) before it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from maml_fast import _extension


def broadcast_over_tasks_reference(params: Sequence[torch.Tensor], tasks: int) -> list[torch.Tensor]:
    return [p.expand(tasks, *p.shape) for p in params]


def _memory_order(tensor: torch.Tensor) -> list[int]:
    """The dims of `tensor`, the first kept first, the others from the largest stride to the smallest:
    the permutation under which a dense tensor is contiguous."""
    return [0, *sorted(range(1, tensor.dim()), key=lambda d: (-tensor.stride(d), d))]


def sum_over_tasks_reference(grads: Sequence[torch.Tensor],
                             pairs: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
    """The definition: ``grads[i].sum(0)`` (``+ pairs[i].sum(0)``), one reduction per tensor."""
    pairs = list(pairs) if pairs is not None else [None] * len(grads)
    return [g.sum(0) if p is None else g.sum(0) + p.sum(0) for g, p in zip(grads, pairs)]


def sum_over_tasks(grads: Sequence[torch.Tensor], pairs: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
    """``[g.sum(0) for g in grads]`` in one op; with `pairs` (a tensor or None per gradient),
    ``grads[i].sum(0) + pairs[i].sum(0)`` in the same op. Each result keeps its gradient's memory
    order. Differentiable to any order. The compiled op where the extension runs on the gradients'
    device (and they share one dtype and task count), else one concatenation and one reduction."""
    pairs = list(pairs) if pairs is not None else [None] * len(grads)
    tensors = [*grads, *(p for p in pairs if p is not None)]
    if len(tensors) < 2 or len({(g.dtype, g.device) for g in tensors}) > 1:
        return sum_over_tasks_reference(grads, pairs)
    if _compiled_op_applies(grads, pairs):
        paired = [i for i, p in enumerate(pairs) if p is not None]
        return list(torch.ops.maml_fast.sum_over_tasks(list(grads), [pairs[i] for i in paired], paired))
    orders = [_memory_order(g) for g in grads]
    paired = [i for i, p in enumerate(pairs) if p is not None and p.shape == grads[i].shape
              and _memory_order(p) == orders[i] and _is_dense(p) and _is_dense(grads[i])]
    single = [i for i in range(len(grads)) if i not in set(paired)]

    def row(g, order):
        return g.permute(order).reshape(g.shape[0], -1)  # a view when g is dense

    blocks = ([row(grads[i], orders[i]) for i in paired] + [row(pairs[i], orders[i]) for i in paired]
              + [row(grads[i], orders[i]) for i in single])
    rows = torch.cat(blocks, dim=1)
    paired_size = sum(block.shape[1] for block in blocks[:len(paired)])
    if not single:
        totals = rows.view(rows.shape[0], 2, paired_size).sum((0, 1))
    else:
        summed = rows.sum(0)
        totals = summed.narrow(0, 2 * paired_size, summed.shape[0] - 2 * paired_size)
        if paired:
            totals = torch.cat([summed.narrow(0, 0, 2 * paired_size).view(2, paired_size).sum(0), totals])
    pieces = dict(zip(paired + single, totals.split([blocks[k].shape[1] for k in range(len(paired))]
                                                   + [blocks[2 * len(paired) + k].shape[1] for k in range(len(single))])))
    sums = []
    for i, (grad, order) in enumerate(zip(grads, orders)):
        inner = order[1:]
        restore = sorted(range(len(inner)), key=lambda k: inner[k])
        total = pieces[i].view([grad.shape[d] for d in inner]).permute(restore)
        unpaired = pairs[i] is not None and i in set(single)  # (a pair in another layout: added on its own)
        sums.append(total + pairs[i].sum(0) if unpaired else total)
    return sums


def _compiled_op_applies(grads: Sequence[torch.Tensor], pairs: Sequence[torch.Tensor | None]) -> bool:
    """Whether ``maml_fast::sum_over_tasks`` takes these (same-dtype, same-device) gradients: the
    extension runs on their device, they are floating point with one task count, and every pair has
    its gradient's shape."""
    first = grads[0]
    return (_extension.is_available(first.device) and first.is_floating_point()
            and all(g.dim() >= 1 and g.shape[0] == first.shape[0] for g in grads)
            and all(p is None or p.shape == g.shape for g, p in zip(grads, pairs)))


def _is_dense(tensor: torch.Tensor) -> bool:
    """Whether the [T, ...] tensor's rows are views (`sum_over_tasks`' reshape copies nothing)."""
    return tensor.permute(_memory_order(tensor)).is_contiguous()


class _BroadcastOverTasks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tasks: int, uses: int, *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)  # an output the loss does not use gets no reduction
        ctx.shapes = [param.shape for param in params]
        outputs = broadcast_over_tasks_reference(params, tasks)
        # Vectors (biases, BatchNorm's affine: small) are read as contiguous [T*C] by the fused ops, which
        # would copy each expanded one: those of one length are copied per task together, by one stack.
        by_length: dict[int, list[int]] = {}
        for i, param in enumerate(params):
            if param.dim() == 1:
                by_length.setdefault(param.shape[0], []).append(i)
        for group in by_length.values():
            if len(group) > 1:
                for i, copy in zip(group, torch.stack([outputs[i] for i in group]).unbind()):
                    outputs[i] = copy
        # (the second use's views stay expanded: the fast-weight update reads θ once for all tasks)
        return (*outputs, *broadcast_over_tasks_reference(params, tasks) * (uses - 1))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        count = len(ctx.shapes)
        grads, pairs = list(grads[:count]), [*grads[count:], *[None] * (2 * count - len(grads))]
        for i in range(count):  # (a gradient of the second use alone takes the first's place)
            if grads[i] is None:
                grads[i], pairs[i] = pairs[i], None
        needed = [i for i in range(count) if ctx.needs_input_grad[2 + i]]
        present = [i for i in needed if grads[i] is not None]
        d_params: list[torch.Tensor | None] = [None] * count
        for i, total in zip(present, sum_over_tasks([grads[i] for i in present], [pairs[i] for i in present])):
            d_params[i] = total
        # Outputs with no gradient (unused, or a cancelled conv bias) give their θ an exact zero, one
        # allocation for all of them.
        absent = [i for i in needed if grads[i] is None]
        if absent and present:
            shapes = [ctx.shapes[i] for i in absent]
            zeros = grads[present[0]].new_zeros(sum(math.prod(shape) for shape in shapes))
            for i, zero, shape in zip(absent, zeros.split([math.prod(shape) for shape in shapes]), shapes):
                d_params[i] = zero.view(shape)
        return (None, None, *d_params)


def broadcast_over_tasks(params: Sequence[torch.Tensor], tasks: int, uses: int = 1):
    """Each of `params` as ``[tasks, *shape]``: expanded (stride 0 over the tasks, no copy), or for
    vectors sharing a length with another, copied per task (one op per length); one reduction for all
    of their gradients; differentiable to any order. With ``uses=2``: a pair of lists, the second of
    expanded views whose gradients join the same reduction (see the module doc)."""
    if not isinstance(tasks, int) or isinstance(tasks, bool) or tasks < 1:
        raise ValueError(f"tasks must be a positive int, got {tasks!r}")
    if uses not in (1, 2):
        raise ValueError(f"uses must be 1 or 2, got {uses!r}")
    for i, param in enumerate(params):
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"params[{i}] must be a torch.Tensor, got {type(param).__name__}")
    if not params:
        return [] if uses == 1 else ([], [])
    outputs = list(_BroadcastOverTasks.apply(tasks, uses, *params))
    return outputs if uses == 1 else (outputs[:len(params)], outputs[len(params):])


def sum_output_like(grad: torch.Tensor) -> torch.Tensor:
    """An empty tensor in the compiled op's layout for ``grad.sum(0)`` (the rule of
    ``plan_sum_over_tasks`` in csrc/sum_over_tasks.cpp): a task block's strides when the block is
    non-overlapping and dense, else contiguous."""
    if grad.shape[0] == 0:
        return grad.new_empty(grad.shape[1:])
    return torch.empty_like(grad.select(0, 0))


if _extension.LOAD_ERROR is None:

    @torch.library.register_fake("maml_fast::sum_over_tasks")
    def _sum_over_tasks_fake(grads, pairs, paired):
        return [sum_output_like(grad) for grad in grads]

    # The op's derivative: each output gradient broadcast back over the tasks (a view), to grads and
    # pairs alike; differentiable, so every order of derivative exists.
    def _sum_setup(ctx, inputs, output):
        grads, _, paired = inputs
        ctx.set_materialize_grads(False)
        ctx.tasks = grads[0].shape[0] if grads else 0
        ctx.paired = list(paired)

    def _sum_backward(ctx, out_grads):
        spread = [None if g is None else g.expand(ctx.tasks, *g.shape) for g in out_grads]
        # (`paired` takes no gradient; torch.library's structure check reads an empty int list as an
        # empty tensor list, whose "gradient" is then an empty list)
        return spread, [spread[i] for i in ctx.paired], None if ctx.paired else []

    torch.library.register_autograd("maml_fast::sum_over_tasks", _sum_backward, setup_context=_sum_setup)
