"""θ broadcast over the tasks of a group, and its adjoint, the sum over the tasks, for a list of tensors
at once:

    broadcast_over_tasks(params, T)[i] = params[i].expand(T, *params[i].shape)   (views, no copy; vectors
                                                                                   of one length copied together)
    its backward:  d params[i] = Σ_t d out[i][t]                                  (`sum_over_tasks`)

Autograd's own backward of ``expand`` reduces each tensor on its own (one reduction per parameter,
per inner loop). Here the gradients are laid end to end in their memory order (one concatenation)
and reduced once. `sum_over_tasks` is made of differentiable ops, so a second-order backward
differentiates it exactly (its own backward is the broadcast again: views).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def broadcast_over_tasks_reference(params: Sequence[torch.Tensor], tasks: int) -> list[torch.Tensor]:
    return [p.expand(tasks, *p.shape) for p in params]


def _memory_order(tensor: torch.Tensor) -> list[int]:
    """The dims of `tensor`, the first kept first, the others from the largest stride to the smallest:
    the permutation under which a dense tensor is contiguous."""
    return [0, *sorted(range(1, tensor.dim()), key=lambda d: (-tensor.stride(d), d))]


def sum_over_tasks(grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``[g.sum(0) for g in grads]`` by one concatenation and one reduction (each result keeps its
    gradient's memory order); differentiable to any order."""
    if len(grads) < 2 or len({(g.dtype, g.device) for g in grads}) > 1:
        return [g.sum(0) for g in grads]
    orders = [_memory_order(g) for g in grads]
    rows = [g.permute(order).reshape(g.shape[0], -1) for g, order in zip(grads, orders)]  # views when dense
    totals = torch.cat(rows, dim=1).sum(0).split([row.shape[1] for row in rows])
    sums = []
    for total, grad, order in zip(totals, grads, orders):
        inner = order[1:]
        restore = sorted(range(len(inner)), key=lambda i: inner[i])
        sums.append(total.view([grad.shape[d] for d in inner]).permute(restore))
    return sums


class _BroadcastOverTasks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tasks: int, *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
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
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        needed = [i for i in range(len(grads)) if ctx.needs_input_grad[1 + i]]
        present = [i for i in needed if grads[i] is not None]
        d_params: list[torch.Tensor | None] = [None] * len(grads)
        for i, total in zip(present, sum_over_tasks([grads[i] for i in present])):
            d_params[i] = total
        # Outputs with no gradient (unused, or a cancelled conv bias) give their θ an exact zero, one
        # allocation for all of them.
        absent = [i for i in needed if grads[i] is None]
        if absent and present:
            shapes = [ctx.shapes[i] for i in absent]
            zeros = grads[present[0]].new_zeros(sum(math.prod(shape) for shape in shapes))
            for i, zero, shape in zip(absent, zeros.split([math.prod(shape) for shape in shapes]), shapes):
                d_params[i] = zero.view(shape)
        return (None, *d_params)


def broadcast_over_tasks(params: Sequence[torch.Tensor], tasks: int) -> list[torch.Tensor]:
    """Each of `params` as ``[tasks, *shape]``: expanded (stride 0 over the tasks, no copy), or for
    vectors sharing a length with another, copied per task (one op per length); one reduction for all
    of their gradients; differentiable to any order."""
    if not isinstance(tasks, int) or isinstance(tasks, bool) or tasks < 1:
        raise ValueError(f"tasks must be a positive int, got {tasks!r}")
    for i, param in enumerate(params):
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"params[{i}] must be a torch.Tensor, got {type(param).__name__}")
    if not params:
        return []
    return list(_BroadcastOverTasks.apply(tasks, *params))
