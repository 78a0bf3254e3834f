"""A task-batched classifier head as one op: the global mean pool of each task's feature map, then
the task's linear layer.

    x [B, T*C, H, W] (grouped layout),  weight [T, O, C],  bias [T, O] or None   ->   y [B, T*O]
    y[:, t] = mean_{h,w}(x[:, t]) @ weight[t].T + bias[t]

It is ``AdaptiveAvgPool2d(1) -> Flatten -> Linear``, the head of conv4 (Omniglot), ResNet-12 and WRN,
which the "fused" backend lowers to it (`maml_fast.backends.fused.fuse_pooled_linear`). The layer is
linear in x and bilinear in (x, weight), so its derivatives are products of the same kind, each one
compiled op (``torch.ops.maml_fast.pooled_linear{,_backward,_double_backward}``, CPU and CUDA;
formulas in csrc/pooled_linear.h): the forward, its backward (gx, gweight, gbias at once) and the
backward's backward (d grad_y, d x, d weight at once). Unfused, the same head is a mean, a batched
matmul, a copy into the grouped layout and their derivatives: about 20 ops per second-order step
where these are 5.

Autograd: `_PooledLinear`'s backward is `_PooledLinearBackward`, whose backward is the double-backward
op, except when autograd records it (a third derivative was asked for): then the same formulas run
as PyTorch ops (`_double_backward_composite`), differentiable again.

Here are the pure-PyTorch reference, the input checks, the autograd glue, the launcher and the fake
kernels.
"""
from __future__ import annotations

import torch

from maml_fast import _extension

from . import _autograd
from . import linear as linear_ops
from ._checks import check_tensor

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_OPS = _extension.CompiledOps("pooled_linear", "pooled_linear_backward", "pooled_linear_double_backward")
unavailable_reasons = _OPS.unavailable_reasons
is_available = _OPS.is_available


def pooled_linear_reference(x, weight, bias=None):
    """The op's definition: per-task F.linear of the spatially averaged features."""
    return linear_ops.linear_reference(x.mean(dim=(2, 3)), weight, bias)


def check_pooled_linear_inputs(x, weight, bias) -> None:
    """Raise TypeError / ValueError naming the argument unless x ``[B, T*C, H, W]`` of a supported
    floating dtype, weight ``[T, O, C]`` and bias ``[T, O]`` (or None) of its dtype on its device fit."""
    check_tensor("x", x)
    check_tensor("weight", weight)
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"x must be a float32, float64, float16 or bfloat16 tensor, got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [batch, tasks*in_features, height, width], got shape {tuple(x.shape)}")
    if weight.dim() != 3:
        raise ValueError(f"weight must have shape [tasks, out, in], got {tuple(weight.shape)}")
    tasks, out_features, in_features = weight.shape
    if x.shape[1] != tasks * in_features:
        raise ValueError(f"x must have tasks*in_features = {tasks * in_features} channels for weight of shape "
                         f"{tuple(weight.shape)}, got shape {tuple(x.shape)}")
    named = [("weight", weight)] + ([("bias", bias)] if bias is not None else [])
    if bias is not None:
        check_tensor("bias", bias)
        if bias.shape != (tasks, out_features):
            raise ValueError(f"bias must have shape {(tasks, out_features)}, got {tuple(bias.shape)}")
    for name, tensor in named:
        if tensor.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {tensor.dtype} but x has {x.dtype}")
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}")


def fits(x, weight, bias) -> bool:
    """Whether the compiled op runs these inputs (else the unfused layers do)."""
    return (x.dim() == 4 and weight.dim() == 3 and x.dtype in _SUPPORTED_DTYPES and weight.dtype == x.dtype
            and (bias is None or bias.dtype == x.dtype) and is_available(x.device))


# ------------------------------------------------------------------------------ autograd glue
class _PooledLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.set_materialize_grads(False)
        return torch.ops.maml_fast.pooled_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        if grad_y is None:
            return None, None, None
        x, weight = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = _PooledLinearBackward.apply(grad_y, x, weight)
        needs = ctx.needs_input_grad
        return grad_x if needs[0] else None, grad_weight if needs[1] else None, grad_bias if needs[2] else None


class _PooledLinearBackward(torch.autograd.Function):
    """(grad_y, x, weight) -> (grad_x, grad_weight, grad_bias) by the backward op; its backward is the
    double-backward op (or, recording a third derivative, `_double_backward_composite`)."""

    @staticmethod
    def forward(ctx, grad_y, x, weight):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad_y, x, weight)
        return torch.ops.maml_fast.pooled_linear_backward(grad_y, x, weight)

    @staticmethod
    def backward(ctx, grad_grad_x, grad_grad_weight, grad_grad_bias):
        if grad_grad_x is None and grad_grad_weight is None and grad_grad_bias is None:
            return None, None, None
        grad_y, x, weight = ctx.saved_tensors
        if torch.is_grad_enabled():
            outputs = _double_backward_composite(grad_grad_x, grad_grad_weight, grad_grad_bias, grad_y, x, weight)
        else:
            outputs = torch.ops.maml_fast.pooled_linear_double_backward(
                grad_grad_x, grad_grad_weight, grad_grad_bias, grad_y, x, weight)
        return tuple(out if need else None for out, need in zip(outputs, ctx.needs_input_grad))


def _double_backward_composite(grad_grad_x, grad_grad_weight, grad_grad_bias, grad_y, x, weight):
    """(d grad_y, d x, d weight) of the backward op (csrc/pooled_linear.h) as PyTorch ops,
    differentiable again."""
    batch, tasks, pixels = x.shape[0], weight.shape[0], x.shape[2] * x.shape[3]
    per_task = lambda t: t.reshape(batch, tasks, -1).transpose(0, 1)  # noqa: E731  ([T, B, ...])
    gy = per_task(grad_y)
    d_grad_y = torch.zeros_like(gy)
    d_weight = torch.zeros_like(weight)
    d_x = torch.zeros_like(x)
    if grad_grad_x is not None:
        pooled_gg = per_task(grad_grad_x.mean(dim=(2, 3)))
        d_grad_y = d_grad_y + pooled_gg @ weight.transpose(1, 2)
        d_weight = gy.transpose(1, 2) @ pooled_gg
    if grad_grad_weight is not None:
        d_grad_y = d_grad_y + per_task(x.mean(dim=(2, 3))) @ grad_grad_weight.transpose(1, 2)
        d_pooled = (gy @ grad_grad_weight).transpose(0, 1).reshape(batch, -1, 1, 1) / pixels
        d_x = d_pooled.expand(x.shape)
    if grad_grad_bias is not None:
        d_grad_y = d_grad_y + grad_grad_bias.unsqueeze(1)
    return d_grad_y.transpose(0, 1).reshape(batch, -1), d_x, d_weight


# ------------------------------------------------------------------------------------ launcher
def pooled_linear(x, weight, bias=None):
    """`pooled_linear_reference` by the compiled ops (with checks): y ``[B, T*O]``, differentiable to
    any order in x, weight and bias."""
    check_pooled_linear_inputs(x, weight, bias)
    if not is_available(x.device):
        raise RuntimeError("maml_fast.pooled_linear cannot run: " + "; ".join(unavailable_reasons(x.device)))
    return _PooledLinear.apply(x, weight, bias)


# ---------------------------------------------------------------------------- fake (meta) kernels
if _OPS.registered:

    def _laid_out_as(like):
        out = torch.empty_like(like)  # (its strides are like's exactly when like is dense)
        return out if out.stride() == like.stride() else like.new_empty(like.shape)

    @torch.library.register_fake("maml_fast::pooled_linear")
    def _pooled_linear_fake(x, weight, bias):
        return x.new_empty((x.shape[0], weight.shape[0] * weight.shape[1]))

    @torch.library.register_fake("maml_fast::pooled_linear_backward")
    def _pooled_linear_backward_fake(grad_y, x, weight):
        return _laid_out_as(x), weight.new_empty(weight.shape), weight.new_empty(weight.shape[:2])

    @torch.library.register_fake("maml_fast::pooled_linear_double_backward")
    def _pooled_linear_double_backward_fake(grad_grad_x, grad_grad_weight, grad_grad_bias, grad_y, x, weight):
        return grad_y.new_empty(grad_y.shape), _laid_out_as(x), weight.new_empty(weight.shape)


# ---------------------------------------------------------------- autograd of the ops called directly
# torch.ops.maml_fast.pooled_linear* called directly are differentiable to every order, as the glue is:
# the forward's derivative is the backward op (`_PooledLinearBackward`), the backward op's is the
# double-backward op (the same Function's backward), and the double-backward op's is that of its
# differentiable composite (`_autograd.vjp_of`).
if _OPS.registered:

    def _save_inputs(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*inputs)

    def _pooled_linear_setup(ctx, inputs, output):  # (as `_PooledLinear.forward` saves: its backward serves)
        x, weight, _ = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight)

    def _double_backward_backward(ctx, *grads):
        inputs = ctx.saved_tensors
        return tuple(_autograd.vjp_of(_double_backward_composite, inputs, ctx.needs_input_grad, grads))

    torch.library.register_autograd("maml_fast::pooled_linear", _PooledLinear.backward,
                                    setup_context=_pooled_linear_setup)
    torch.library.register_autograd("maml_fast::pooled_linear_backward", _PooledLinearBackward.backward,
                                    setup_context=_save_inputs)
    torch.library.register_autograd("maml_fast::pooled_linear_double_backward", _double_backward_backward,
                                    setup_context=_save_inputs)
