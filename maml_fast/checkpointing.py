"""Checkpointed inner steps (``MAML(checkpoint_inner_steps=True)``): an inner step that keeps no
graph. Its backward recomputes the step (with the graph for the second-order terms) and returns the
vector-Jacobian product, so memory for K steps is the fast weights per step plus one step's graph,
not K graphs."""
from __future__ import annotations

import math

import torch


class _CheckpointedInnerStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, step, num_fast, create_graph, *tensors):
        ctx.step, ctx.num_fast, ctx.create_graph = step, num_fast, create_graph
        ctx.save_for_backward(*tensors)
        with torch.enable_grad():
            inputs = _fresh_inputs(tensors, num_fast)
            new_fast, loss, accuracy = step.flat(inputs, num_fast, False)
        loss = loss.detach()
        accuracy = loss.new_full(loss.shape, math.nan) if accuracy is None else accuracy
        ctx.mark_non_differentiable(loss, accuracy)
        return (*[f.detach() for f in new_fast], loss, accuracy)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_outputs):
        tensors = ctx.saved_tensors
        with torch.enable_grad():
            inputs = _fresh_inputs(tensors, ctx.num_fast)
            new_fast, _, _ = ctx.step.flat(inputs, ctx.num_fast, ctx.create_graph)
            wrt = [i for i in inputs if i.requires_grad]
            grads = iter(torch.autograd.grad(new_fast, wrt, grad_outputs[:len(new_fast)], allow_unused=True))
        return (None, None, None, *[next(grads) if i.requires_grad else None for i in inputs])


def _fresh_inputs(tensors, num_fast):
    # Fast weights always need a gradient (the inner gradient is taken w.r.t. them).
    return [t.detach().requires_grad_(i < num_fast or t.requires_grad) for i, t in enumerate(tensors)]


def checkpointed_inner_step(step, fast: list[torch.Tensor], meta: list[torch.Tensor], create_graph: bool):
    """``step(fast, meta, create_graph)`` (an `maml_fast.inner_loop.InnerStep`) without keeping its
    graph: (new fast weights, support loss [T], accuracy [T] or NaN)."""
    *new_fast, loss, accuracy = _CheckpointedInnerStep.apply(step, len(fast), create_graph, *fast, *meta)
    return new_fast, loss, accuracy
