"""Task-batched linear layer: y[:, t] = x[:, t] @ weight[t].T + bias[t].

x is ``[B, T*F]`` (the grouped layout), weight ``[T, O, F]``, bias ``[T, O]``. One batched matmul for all
tasks; its derivatives are batched matmuls again, so every order of derivative stays task-batched.

By default (``matmul=None``) the product is torch.bmm / baddbmm with PyTorch's autograd. A backend's
``matmul`` (an object with ``matmul(a, b, bias, batch_major)``, see `_BatchedMatmul`) runs all three
products instead: the layer is bilinear, so

    c = a @ b (+ bias)   ->   ga = gc @ b^T,   gb = a^T @ gc,   gbias = Σ_rows gc

where the two products are `_BatchedMatmul` again, differentiable to any order on the same kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

def _batch_major(t: torch.Tensor) -> bool:
    """Whether the [T, M, N] tensor t is laid out rows-first (a view of the grouped layout [M, T*N]);
    not a tensor expanded over the tasks (stride 0)."""
    return 0 < t.stride(0) < t.stride(1)


def _column_major(t: torch.Tensor) -> bool:
    """Whether each [M, N] matrix of t is laid out column by column (e.g. a weight's transpose)."""
    return t.stride(1) == 1 and t.stride(2) != 1 and t.shape[1] > 1


class _BatchedMatmul(torch.autograd.Function):
    """c ``[T, M, N]`` = a ``[T, M, K]`` @ b ``[T, K, N]`` (+ bias ``[T, N]``) on ``matmul``'s kernel.
    Each gradient is laid out as its operand (batch-major, column-major or contiguous), so that
    grouped-layout views stay free and every gradient of one weight has one layout (the task
    broadcast then sums them in one reduction)."""

    @staticmethod
    def forward(ctx, a, b, bias, matmul, batch_major):
        ctx.save_for_backward(a, b)
        ctx.matmul = matmul
        ctx.layouts = _batch_major(a), _batch_major(b), _column_major(b)
        return matmul.matmul(a, b, bias, batch_major)

    @staticmethod
    def backward(ctx, grad_c):
        a, b = ctx.saved_tensors
        grad_a = grad_b = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_a = batched_matmul(grad_c, b.transpose(1, 2), None, ctx.matmul, ctx.layouts[0])
        if ctx.needs_input_grad[1] and ctx.layouts[2]:  # (grad_b^T = grad_c^T @ a, contiguous)
            grad_b = batched_matmul(grad_c.transpose(1, 2), a, None, ctx.matmul).transpose(1, 2)
        elif ctx.needs_input_grad[1]:
            grad_b = batched_matmul(a.transpose(1, 2), grad_c, None, ctx.matmul, ctx.layouts[1])
        if ctx.needs_input_grad[2]:
            grad_bias = grad_c.sum(1)
        return grad_a, grad_b, grad_bias, None, None


class TorchBatchedMatmul:
    """The products of `_BatchedMatmul` as torch.bmm / baddbmm writing straight into the layout asked
    for: a batch-major ``[T, M, N]`` is the grouped layout ``[M, T*N]`` itself, which the autograd
    baddbmm would copy the product into."""

    @staticmethod
    def matmul(a, b, bias, batch_major):
        tasks, rows, cols = a.shape[0], a.shape[1], b.shape[2]
        out = a.new_empty(rows, tasks, cols).transpose(0, 1) if batch_major else a.new_empty(tasks, rows, cols)
        if bias is None:
            return torch.bmm(a, b, out=out)
        return torch.baddbmm(bias.unsqueeze(1), a, b, out=out)


def batched_matmul(a, b, bias, matmul, batch_major: bool = False):
    """a @ b (+ bias) per task on the kernel of `matmul`."""
    return _BatchedMatmul.apply(a, b, bias, matmul, batch_major)


def linear(x, weight, bias=None, matmul=None):
    if weight.dim() != 3:
        raise ValueError(f"weight must have shape [tasks, out, in], got {tuple(weight.shape)}")
    tasks, out_features, in_features = weight.shape
    if x.dim() != 2 or x.shape[1] != tasks * in_features:
        raise ValueError(
            f"x must have shape [batch, tasks*in_features={tasks * in_features}], got {tuple(x.shape)}"
        )
    if bias is not None and bias.shape != (tasks, out_features):
        raise ValueError(f"bias must have shape {(tasks, out_features)}, got {tuple(bias.shape)}")
    batch = x.shape[0]
    task_major = x.reshape(batch, tasks, in_features).transpose(0, 1)            # [T, B, F]
    if matmul is not None:
        y = batched_matmul(task_major, weight.transpose(1, 2), bias, matmul, batch_major=True)
    elif bias is None:
        y = torch.bmm(task_major, weight.transpose(1, 2))
    else:
        y = torch.baddbmm(bias.unsqueeze(1), task_major, weight.transpose(1, 2))  # [T, B, O]
    return y.transpose(0, 1).reshape(batch, tasks * out_features)  # (a view when y is batch-major)


def linear_reference(x, weight, bias=None):
    tasks, _, in_features = weight.shape
    return torch.cat(
        [F.linear(x[:, t * in_features:(t + 1) * in_features], weight[t], None if bias is None else bias[t])
         for t in range(tasks)],
        dim=1,
    )
