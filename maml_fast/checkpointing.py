"""Checkpointed inner steps (``MAML(checkpoint_inner_steps=True)``): an inner step that keeps no
graph. Its backward recomputes the step (with the graph for the second-order terms) and returns the
vector-Jacobian product, so memory for K steps is the fast weights per step plus one step's graph,
not K graphs."""
from __future__ import annotations

import math

import torch

from .ops.low_rank_conv import flatten, flat_size, unflatten


class _CheckpointedInnerStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, step, layouts, new_layouts, create_graph, *tensors):
        ctx.step, ctx.layouts, ctx.create_graph = step, layouts, create_graph
        ctx.save_for_backward(*tensors)
        with torch.enable_grad():
            new_fast, loss, accuracy = step.flat(_fresh_inputs(tensors, layouts), layouts, False)
        outputs, layouts_out = flatten(new_fast)
        new_layouts.extend(layouts_out)
        loss = loss.detach()
        accuracy = loss.new_full(loss.shape, math.nan) if accuracy is None else accuracy
        ctx.mark_non_differentiable(loss, accuracy)
        return (*[f.detach() for f in outputs], loss, accuracy)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_outputs):
        tensors = ctx.saved_tensors
        with torch.enable_grad():
            inputs = _fresh_inputs(tensors, ctx.layouts)
            new_fast, _, _ = ctx.step.flat(inputs, ctx.layouts, ctx.create_graph)
            outputs = [(out, grad) for out, grad in zip(flatten(new_fast)[0], grad_outputs) if out.requires_grad]
            wrt = [i for i in inputs if i.requires_grad]
            grads = iter(torch.autograd.grad([out for out, _ in outputs], wrt, [grad for _, grad in outputs],
                                             allow_unused=True))
        return (None, None, None, None, *[next(grads) if i.requires_grad else None for i in inputs])


def _fresh_inputs(tensors, layouts):
    # The fast weights' tensors always need a gradient (the inner gradient is taken w.r.t. them).
    num_fast = flat_size(layouts)
    return [t.detach().requires_grad_(i < num_fast or t.requires_grad) for i, t in enumerate(tensors)]


def checkpointed_inner_step(step, fast: list, meta: list[torch.Tensor], create_graph: bool):
    """``step(fast, meta, create_graph)`` (an `maml_fast.inner_loop.InnerStep`) without keeping its
    graph: (new fast weights, support loss [T], accuracy [T] or NaN). Fast weights may be tensors or
    factored conv weights (`maml_fast.ops.low_rank_conv`), passed as their tensors."""
    tensors, layouts = flatten(fast)
    new_layouts: list = []
    *outputs, loss, accuracy = _CheckpointedInnerStep.apply(step, layouts, new_layouts, create_graph, *tensors, *meta)
    return unflatten(outputs, new_layouts), loss, accuracy
