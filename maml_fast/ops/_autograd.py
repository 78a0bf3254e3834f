"""Helpers of the compiled ops' autograd registrations (``torch.library.register_autograd``).

Each op module registers, for each of its ``torch.ops.maml_fast`` operators, the derivative that its
Python wrapper's autograd glue uses, so that the operator called directly is differentiable to the
same order. Two helpers are shared:

* `vjp_of`: the vector-Jacobian product of a differentiable composite (the PyTorch-ops form of a
  double-backward kernel), differentiable again: the derivative of a double-backward op.
* `statistics_of`: a batch's column mean and rstd with the values of an op's cached statistics and
  the derivatives in x of recomputed ones, without eps (the backward ops' schemas have none).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def vjp_of(fn: Callable, primals: Sequence, differentiable: Sequence[bool], cotangents: Sequence) -> list:
    """``sum_k <cotangents[k], d fn(*primals)[k] / d primals[i]>`` for each i marked `differentiable`
    (None elsewhere, and for inputs fn does not use). `fn` is made of PyTorch ops and evaluated on
    the primals themselves (with their autograd history), so when the caller records (a higher
    derivative is being taken) the result is differentiable again, to any order."""
    create = torch.is_grad_enabled()
    with torch.enable_grad():
        inputs, wrt, where = [], [], []
        for i, (value, diff) in enumerate(zip(primals, differentiable, strict=True)):
            if diff and isinstance(value, torch.Tensor) and value.is_floating_point():
                value = value if value.requires_grad else value.detach().requires_grad_()
                wrt.append(value)
                where.append(i)
            inputs.append(value)
        outputs = fn(*inputs)
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, cotangents, strict=True)
                 if g is not None and isinstance(o, torch.Tensor) and o.requires_grad]
        result = [None] * len(primals)
        if not pairs or not wrt:
            return result
        grads = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], create_graph=create,
                                    allow_unused=True)
    for i, grad in zip(where, grads):
        result[i] = grad
    return result


def statistics_of(x_rows: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, rstd) of the columns of x ``[rows, channels]``: exactly the values `mean`, `rstd` given
    (an op's cached statistics, in their dtype), with the derivatives in x, to any order, of the batch
    statistics ``mean = sum(x)/N``, ``rstd = (var + eps)^-1/2``. rstd's derivatives depend on eps
    only through rstd's value, so ``eps = rstd^-2 - var`` (detached) stands in for it."""
    acc = mean.dtype
    xf = x_rows.to(acc)
    m = xf.mean(0)
    var = (xf - m).pow(2).mean(0)
    r = torch.rsqrt(var + (rstd.detach().to(acc).pow(-2) - var.detach()))
    return mean.detach() + (m - m.detach()), rstd.detach() + (r - r.detach())


def statistics_backward(x_rows: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, grad_mean, grad_rstd):
    """The gradient in x ``[rows, channels]`` of <grad_mean, mean> + <grad_rstd, rstd> for the batch
    statistics mean = sum(x)/N, rstd = (var + eps)^-1/2 (d rstd / d x = -rstd^3 (x - mean) / N), in
    differentiable ops of x and the (saved, differentiable) statistics themselves."""
    rows = x_rows.shape[0]
    acc = mean.dtype
    grad = torch.zeros((), dtype=acc, device=x_rows.device)
    if grad_mean is not None:
        grad = grad + grad_mean.to(acc) / rows
    if grad_rstd is not None:
        grad = grad - (grad_rstd.to(acc) * rstd.pow(3) / rows) * (x_rows.to(acc) - mean)
    return grad.expand(x_rows.shape).to(x_rows.dtype)


def register_batch_norm_autograd(name: str, grad_of_y: Callable) -> None:
    """``register_autograd`` for a BatchNorm forward operator ``(x [..., C], weight, bias, eps, *options) ->
    (y, mean, rstd)`` (options: non-tensor arguments such as an activation's slope): y's derivatives by
    ``grad_of_y(grad_y, x, weight, bias, y, mean, rstd, eps, *options)`` -> (grad_x, grad_weight,
    grad_bias) (the glue's differentiable backward), mean's and rstd's by `statistics_backward` over the
    rows of x."""

    def setup_context(ctx, inputs, output):
        x, weight, bias, eps, *options = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, bias, *output)
        ctx.eps, ctx.options = eps, options

    def backward(ctx, grad_y, grad_mean, grad_rstd):
        x, weight, bias, y, mean, rstd = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if grad_y is not None:
            grad_x, grad_weight, grad_bias = grad_of_y(grad_y, x, weight, bias, y, mean, rstd, ctx.eps, *ctx.options)
        if grad_mean is not None or grad_rstd is not None:
            grad_stats = statistics_backward(x.reshape(-1, x.shape[-1]), mean, rstd, grad_mean, grad_rstd)
            grad_stats = grad_stats.reshape(x.shape)
            grad_x = grad_stats if grad_x is None else grad_x + grad_stats
        needs = ctx.needs_input_grad
        return (grad_x if needs[0] else None, grad_weight if needs[1] else None, grad_bias if needs[2] else None,
                None, *(None for _ in ctx.options))

    torch.library.register_autograd(name, backward, setup_context=setup_context)
