"""Task-batched normalisation with per-task affine parameters, in the grouped layout.

BatchNorm uses each task's own batch statistics (the transductive MAML convention): in the grouped
layout ``[B, T*C, ...]`` that is exactly batch_norm over T*C channels. GroupNorm with G groups per task
is group_norm with T*G groups. LayerNorm normalises each example's per-task features.
All three are built from PyTorch ops with native derivatives of every order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_affine(name, param, tasks, shape):
    if param is not None and tuple(param.shape) != (tasks, *shape):
        raise ValueError(f"{name} must have shape {(tasks, *shape)}, got {tuple(param.shape)}")


def _flat(param):
    return None if param is None else param.reshape(-1)


def batch_norm(x, weight, bias, tasks: int, eps: float = 1e-5):
    """x ``[B, T*C]`` or ``[B, T*C, H, W]``; weight/bias ``[T, C]`` or None; batch statistics per task."""
    if x.dim() not in (2, 3, 4) or x.shape[1] % tasks:
        raise ValueError(f"x must have shape [batch, tasks*channels, ...] with tasks={tasks}, got {tuple(x.shape)}")
    if x.shape[0] * (x[0, 0].numel()) < 2:
        raise ValueError("batch_norm needs more than one value per channel (batch of 1 with no spatial dims)")
    channels = x.shape[1] // tasks
    _check_affine("weight", weight, tasks, (channels,))
    _check_affine("bias", bias, tasks, (channels,))
    # Closed-form forward/backward/double backward on a [rows, channels] view (see _BatchNormRows):
    # a channels-last activation is already [B*H*W, T*C] in memory, so the view is free.
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        batch, total, height, width = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(-1, total)
        return _batch_norm_rows(rows, weight, bias, eps).reshape(batch, height, width, total).permute(0, 3, 1, 2)
    if x.dim() == 2:
        return _batch_norm_rows(x, weight, bias, eps)
    return F.batch_norm(x, None, None, _flat(weight), _flat(bias), training=True, eps=eps)


def _batch_norm_rows(rows, weight, bias, eps):
    total = rows.shape[1]
    gamma = rows.new_ones(total) if weight is None else weight.reshape(-1)
    beta = rows.new_zeros(total) if bias is None else bias.reshape(-1)
    return _BatchNormRows.apply(rows, gamma, beta, eps)


def _project(v, x_hat):
    """P(v) = v - mean(v) - x_hat * mean(v * x_hat), per column: the Jacobian of x -> x_hat (over r).
    Returns P(v) and the two column means."""
    mean_v = v.mean(0)
    mean_v_xhat = (v * x_hat).mean(0)
    return torch.addcmul(v - mean_v, x_hat, -mean_v_xhat), mean_v, mean_v_xhat


class _BatchNormRows(torch.autograd.Function):
    """Batch norm of the columns of ``[rows, channels]`` with batch statistics, in closed form.

    With x_hat = (x - mean) * r, r = (var + eps)^-1/2 and P as in `_project`:
      y = gamma * x_hat + beta;   gx = gamma * r * P(gy),  g_gamma = sum(gy * x_hat),  g_beta = sum(gy).
    The backward is `_BatchNormRowsBackward`, whose own backward is the closed-form second derivative,
    so second-order MAML through BatchNorm costs a handful of passes instead of autograd's long graph
    of elementwise ops (and aten's batch_norm double backward). x_hat is recomputed from x (one pass)
    where needed rather than stored."""

    @staticmethod
    def forward(ctx, x, gamma, beta, eps):
        # Two-pass statistics: torch.var_mean over dim 0 is ~10x slower than these on the CPU.
        mean = x.mean(0)
        centred = x - mean
        r = torch.rsqrt((centred * centred).mean(0) + eps)
        scale = gamma * r
        ctx.save_for_backward(x, gamma, mean, r)
        return torch.addcmul(beta, centred, scale)

    @staticmethod
    def backward(ctx, grad_y):
        x, gamma, mean, r = ctx.saved_tensors
        grad_x, grad_gamma, grad_beta = _BatchNormRowsBackward.apply(grad_y, x, gamma, mean, r)
        return grad_x, grad_gamma, grad_beta, None


def _normalised(x, mean, r):
    return torch.addcmul(-mean * r, x, r)


class _BatchNormRowsBackward(torch.autograd.Function):
    """(gy, x, gamma) -> (gx, g_gamma, g_beta). mean and r are x's cached statistics: x is the
    differentiable input, and the backward returns the true derivative with respect to it."""

    @staticmethod
    def forward(ctx, grad_y, x, gamma, mean, r):
        x_hat = _normalised(x, mean, r)
        rows = x.shape[0]
        mean_gy = grad_y.mean(0)
        mean_gy_xhat = (grad_y * x_hat).mean(0)
        scale = gamma * r
        grad_x = torch.addcmul(torch.addcmul(-scale * mean_gy, grad_y, scale), x_hat, -scale * mean_gy_xhat)
        ctx.save_for_backward(grad_y, x, gamma, mean, r)
        return grad_x, mean_gy_xhat * rows, mean_gy * rows

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gg_x, gg_gamma, gg_beta):
        # L = <gg_x, gx> + <gg_gamma, g_gamma> + <gg_beta, g_beta>, with dx_hat = r P(dx) and
        # dr = -r^2 mean(x_hat dx):
        #   dL/dgy    = gamma r P(gg_x) + gg_gamma x_hat + gg_beta
        #   dL/dgamma = r sum(gg_x P(gy))
        #   dL/dx     = gg_gamma r P(gy) - gamma r^2 [S1/N x_hat + mean(gy x_hat) P(gg_x) + S2/N P(gy)]
        # with S1 = sum(gg_x P(gy)) and S2 = sum(gg_x x_hat).
        grad_y, x, gamma, mean, r = ctx.saved_tensors
        x_hat = _normalised(x, mean, r)
        rows = x_hat.shape[0]
        proj_gy, _, mean_gy_xhat = _project(grad_y, x_hat)
        proj_ggx, _, mean_ggx_xhat = _project(gg_x, x_hat)
        s1 = (gg_x * proj_gy).sum(0)
        s2 = mean_ggx_xhat * rows
        gamma_r = gamma * r
        d_grad_y = torch.addcmul(gg_beta + proj_ggx * gamma_r, x_hat, gg_gamma)
        d_gamma = r * s1
        gamma_r2 = gamma_r * r
        d_x = proj_gy * (gg_gamma * r - gamma_r2 * s2 / rows)
        d_x = torch.addcmul(d_x, proj_ggx, -gamma_r2 * mean_gy_xhat)
        d_x = torch.addcmul(d_x, x_hat, -gamma_r2 * s1 / rows)
        return d_grad_y, d_x, d_gamma, None, None


def batch_norm_from_statistics(x, mean, var, weight, bias, tasks: int, eps: float = 1e-5):
    """`batch_norm` of x ``[B, T*C, ...]`` given its per-channel batch ``mean`` and biased ``var`` over
    batch and pixels (``[T*C]``, e.g. from `maml_fast.ops.conv2d.conv2d_with_batch_stats`, whose conv
    kernel computes them in its epilogue), so the statistics cost no pass over x:
    ``y = (x - mean) / sqrt(var + eps) * γ + β``.

    Plain differentiable torch ops: gradients reach x directly and through the statistics (the op that
    made them routes g_mean and g_var back into x), so every order of derivative exists.

    Precision: the conv epilogue accumulates each tile's Σx and Σ(x - tile mean)² and combines the
    tiles with Chan's update, not var = E[x²] - E[x]² from Σx and Σx²: that form cancels in fp32, with
    a relative error of about ε·(1 + mean²/var) times a summation factor, and measured 1e-3-scale BN
    output errors on conv4 layer 1 with Omniglot images (mean²/var up to 45; see kernels/README.md).
    tests/test_triton_fusion.py measures the fp32 error of this path against fp64."""
    if x.dim() < 2 or x.shape[1] % tasks:
        raise ValueError(f"x must have shape [batch, tasks*channels, ...] with tasks={tasks}, got {tuple(x.shape)}")
    total = x.shape[1]
    for name, value in (("mean", mean), ("var", var)):
        if tuple(value.shape) != (total,):
            raise ValueError(f"{name} must have shape {(total,)} (one value per channel of x), got {tuple(value.shape)}")
    if x.numel() // total < 2:
        raise ValueError("batch_norm_from_statistics needs more than one value per channel")
    channels = total // tasks
    _check_affine("weight", weight, tasks, (channels,))
    _check_affine("bias", bias, tasks, (channels,))
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.reshape(-1)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.reshape(-1)
    view = (1, total) + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.reshape(view), x, scale.reshape(view)).to(x.dtype)


def batch_norm_reference(x, weight, bias, tasks: int, eps: float = 1e-5):
    channels = x.shape[1] // tasks
    return torch.cat(
        [F.batch_norm(x[:, t * channels:(t + 1) * channels], None, None,
                      None if weight is None else weight[t], None if bias is None else bias[t],
                      training=True, eps=eps)
         for t in range(tasks)],
        dim=1,
    )


def group_norm(x, num_groups: int, weight, bias, tasks: int, eps: float = 1e-5):
    """x ``[B, T*C, ...]``; ``num_groups`` groups per task; weight/bias ``[T, C]`` or None."""
    channels = x.shape[1] // tasks
    if x.shape[1] % tasks or channels % num_groups:
        raise ValueError(f"x's {x.shape[1]} channels do not split into tasks={tasks} x groups={num_groups}")
    _check_affine("weight", weight, tasks, (channels,))
    _check_affine("bias", bias, tasks, (channels,))
    return F.group_norm(x, tasks * num_groups, _flat(weight), _flat(bias), eps)


def group_norm_reference(x, num_groups: int, weight, bias, tasks: int, eps: float = 1e-5):
    channels = x.shape[1] // tasks
    return torch.cat(
        [F.group_norm(x[:, t * channels:(t + 1) * channels], num_groups,
                      None if weight is None else weight[t], None if bias is None else bias[t], eps)
         for t in range(tasks)],
        dim=1,
    )


def layer_norm(x, normalized_shape: tuple[int, ...], weight, bias, tasks: int, eps: float = 1e-5):
    """x ``[B, T*C, ...]`` whose per-task feature shape ends with ``normalized_shape``; weight/bias
    ``[T, *normalized_shape]`` or None."""
    batch = x.shape[0]
    per_task = (x.shape[1] // tasks, *x.shape[2:])
    if x.shape[1] % tasks or tuple(per_task[len(per_task) - len(normalized_shape):]) != tuple(normalized_shape):
        raise ValueError(
            f"x of shape {tuple(x.shape)} with tasks={tasks} does not end with normalized_shape {tuple(normalized_shape)}"
        )
    _check_affine("weight", weight, tasks, normalized_shape)
    _check_affine("bias", bias, tasks, normalized_shape)
    y = F.layer_norm(x.reshape(batch, tasks, *per_task), normalized_shape, eps=eps)
    # Per-task affine parameters broadcast over the batch and the leading (non-normalised) feature dims.
    affine_view = (1, tasks) + (1,) * (len(per_task) - len(normalized_shape)) + tuple(normalized_shape)
    if weight is not None:
        y = y * weight.reshape(affine_view)
    if bias is not None:
        y = y + bias.reshape(affine_view)
    return y.reshape(x.shape)


def layer_norm_reference(x, normalized_shape, weight, bias, tasks: int, eps: float = 1e-5):
    channels = x.shape[1] // tasks
    return torch.cat(
        [F.layer_norm(x[:, t * channels:(t + 1) * channels], normalized_shape,
                      None if weight is None else weight[t], None if bias is None else bias[t], eps)
         for t in range(tasks)],
        dim=1,
    )
