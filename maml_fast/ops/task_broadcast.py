"""θ broadcast over the tasks of a group, and its adjoint, the sum over the tasks, for a list of tensors
at once:

    broadcast_over_tasks(params, T)[i] = params[i].expand(T, *params[i].shape)   (views, no copy; vectors
                                                                                   of one length copied together)
    its backward:  d params[i] = Σ_t d out[i][t]                                  (`sum_over_tasks`)

Autograd's own backward of ``expand`` reduces each tensor on its own (one reduction per parameter,
per inner loop). Here the gradients are laid end to end in their memory order (one concatenation)
and reduced once. `sum_over_tasks` is made of differentiable ops, so a second-order backward
differentiates it exactly (its own backward is the broadcast again: views).

`broadcast_over_tasks(params, T, uses=2)` gives each parameter a second view, from a second output of
the same node: MAML's first update reads θ through it while the network reads the first. Both
gradients then reach this node apart and are summed in its one reduction, where autograd would add
them tensor by tensor (one op per parameter) before it.
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


def sum_over_tasks(grads: Sequence[torch.Tensor], pairs: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
    """``[g.sum(0) for g in grads]`` by one concatenation and one reduction (each result keeps its
    gradient's memory order); with `pairs` (a tensor or None per gradient), ``grads[i].sum(0) +
    pairs[i].sum(0)`` in the same reduction wherever the two share shape and memory order. Differentiable
    to any order."""
    pairs = list(pairs) if pairs is not None else [None] * len(grads)
    tensors = [*grads, *(p for p in pairs if p is not None)]
    if len(tensors) < 2 or len({(g.dtype, g.device) for g in tensors}) > 1:
        return [g.sum(0) if p is None else g.sum(0) + p.sum(0) for g, p in zip(grads, pairs)]
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
