"""Lowering: an `nn.Module` becomes a task-batched program of ops.

A program runs a network for all T tasks at once with per-task parameters ``{name: [T, *shape]}``.
Activations flow in the grouped layout ``[B, T*C, ...]`` (see `maml_fast.ops.conv2d`). Any
`nn.Sequential` (nested freely) of the layers in `_LOWERINGS` lowers; anything else makes `lower`
return the reason, and the learner falls back to `torch.func.vmap`. The backend
(`maml_fast.backends.ProgramBackend`) gives the primitives the ops run on and its fusion rules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .ops import conv2d as conv_ops
from .ops import linear as linear_ops
from .ops import norm as norm_ops

Layer = Callable[[torch.Tensor, dict, int], torch.Tensor]


def parameter(params: dict, prefix: str, name: str, module: nn.Module):
    return params[prefix + name] if getattr(module, name, None) is not None else None


class _BiasCancelledByBatchNorm(torch.autograd.Function):
    """h unchanged, and an exactly zero gradient for `bias`: the conv bias that a BatchNorm with batch
    statistics cancels (it subtracts the per-channel mean, bias included). Computed, that gradient is
    rounding noise (~1e-15), which Adam would normalise into real steps that differ with the task
    split; and the program saves the bias add and its gradient's reduction."""

    @staticmethod
    def forward(ctx, h, bias):
        ctx.bias_shape = bias.shape
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad_h):
        return grad_h, grad_h.new_zeros(ctx.bias_shape)


def cancel_bias_before_batch_norm(h, bias):
    """h, for a conv output whose bias a BatchNorm with batch statistics cancels: `bias` gets an exactly
    zero gradient (`_BiasCancelledByBatchNorm`)."""
    return _BiasCancelledByBatchNorm.apply(h, bias)


def is_batch_norm_with_batch_statistics(module: nn.Module | None) -> bool:
    return type(module) in (nn.BatchNorm1d, nn.BatchNorm2d) and not module.track_running_stats


def lower_conv2d(module: nn.Conv2d, prefix: str, backend, batch_norm_prefix: str | None = None):
    """The per-task conv; `batch_norm_prefix` names the BatchNorm (batch statistics) right after it,
    which cancels the bias (`_BiasCancelledByBatchNorm`) unless it normalises with MAML++ per-step
    running statistics (passed in params)."""
    if module.groups != 1 or module.dilation != (1, 1) or module.padding_mode != "zeros" or isinstance(module.padding, str):
        return None, "only groups=1, dilation=1, zero padding given as numbers is task-batched"
    stride, padding = module.stride, module.padding

    def run(x, params, tasks):
        weight, bias = params[prefix + "weight"], parameter(params, prefix, "bias", module)
        if bias is not None and batch_norm_prefix is not None and batch_norm_prefix + "running_mean" not in params:
            return cancel_bias_before_batch_norm(conv_ops.conv2d(x, weight, None, stride, padding, backend.conv), bias)
        return conv_ops.conv2d(x, weight, bias, stride, padding, backend.conv)
    return run, None


def _lower_linear(module: nn.Linear, prefix: str, backend):
    def run(x, params, tasks):
        return linear_ops.linear(x, params[prefix + "weight"], parameter(params, prefix, "bias", module), backend.matmul)
    return run, None


def lower_batch_norm(module: nn.modules.batchnorm._BatchNorm, prefix: str, backend):
    if module.track_running_stats:
        return None, "BatchNorm with track_running_stats=True (MAML uses per-task batch statistics)"

    def run(x, params, tasks):
        if prefix + "running_mean" in params:
            return batch_norm_with_statistics(x, params, prefix, module)
        return norm_ops.batch_norm(x, parameter(params, prefix, "weight", module),
                                   parameter(params, prefix, "bias", module), tasks, module.eps)
    return run, None


def batch_norm_with_statistics(x, params, prefix: str, module: nn.Module):
    """Eval with MAML++ per-step running statistics (passed as ``[T, C]`` entries of params, like
    functional_call's buffers): normalise with them instead of the batch statistics."""
    flat = lambda t: None if t is None else t.reshape(-1)
    return F.batch_norm(x, flat(params[prefix + "running_mean"]), flat(params[prefix + "running_var"]),
                        flat(parameter(params, prefix, "weight", module)), flat(parameter(params, prefix, "bias", module)),
                        training=False, eps=module.eps)


def _lower_layer_norm(module: nn.LayerNorm, prefix: str, backend):
    def run(x, params, tasks):
        return norm_ops.layer_norm(x, module.normalized_shape, parameter(params, prefix, "weight", module),
                                   parameter(params, prefix, "bias", module), tasks, module.eps)
    return run, None


def _lower_group_norm(module: nn.GroupNorm, prefix: str, backend):
    def run(x, params, tasks):
        return norm_ops.group_norm(x, module.num_groups, parameter(params, prefix, "weight", module),
                                   parameter(params, prefix, "bias", module), tasks, module.eps)
    return run, None


def _lower_stateless(module: nn.Module, prefix: str, backend):
    # Channel-wise ops compute the same function in the grouped layout as per task.
    return (lambda x, params, tasks: module(x)), None


def _lower_adaptive_avg_pool(module: nn.AdaptiveAvgPool2d, prefix: str, backend):
    if module.output_size not in (1, (1, 1)):
        return None, "only AdaptiveAvgPool2d(1) (global mean pool) is task-batched"
    return (lambda x, params, tasks: x.mean(dim=(2, 3), keepdim=True)), None


def _lower_flatten(module: nn.Flatten, prefix: str, backend):
    if module.start_dim != 1 or module.end_dim != -1:
        return None, "only Flatten(start_dim=1, end_dim=-1) is task-batched"
    # [B, T*C, H, W] in logical NCHW order flattens to [B, T*(C*H*W)]: task t's features stay in block t.
    return (lambda x, params, tasks: x.reshape(x.shape[0], -1)), None


_LOWERINGS = {
    nn.Conv2d: lower_conv2d,
    nn.Linear: _lower_linear,
    nn.BatchNorm1d: lower_batch_norm,
    nn.BatchNorm2d: lower_batch_norm,
    nn.LayerNorm: _lower_layer_norm,
    nn.GroupNorm: _lower_group_norm,
    nn.ReLU: _lower_stateless,
    nn.MaxPool2d: _lower_stateless,
    nn.AvgPool2d: _lower_stateless,
    nn.Identity: _lower_stateless,
    nn.AdaptiveAvgPool2d: _lower_adaptive_avg_pool,
    nn.Flatten: _lower_flatten,
}


@dataclass
class Program:
    layers: list[Layer]

    def __call__(self, params: dict, x: torch.Tensor) -> torch.Tensor:
        """Run all tasks: params ``{name: [T, ...]}``, x task-major ``[T, B, *features]``;
        returns task-major ``[T, B, *outputs]``."""
        tasks, batch = x.shape[:2]
        h = x.transpose(0, 1).reshape(batch, tasks * x.shape[2], *x.shape[3:])
        for layer in self.layers:
            h = layer(h, params, tasks)
        return h.reshape(batch, tasks, h.shape[1] // tasks, *h.shape[2:]).transpose(0, 1)


def lower(module: nn.Module, backend) -> tuple[Program | None, str | None]:
    """The task-batched program of `module` on `backend` (a `maml_fast.backends.ProgramBackend`), or
    (None, reason naming the layer that prevents it). The backend's fusion rules are tried at every
    position of an nn.Sequential before the per-layer lowerings."""
    layers: list[Layer] = []

    def visit(mod: nn.Module, prefix: str, batch_norm_prefix: str | None = None) -> str | None:
        if type(mod) is nn.Sequential:
            children = list(mod.named_children())
            index = 0
            while index < len(children):
                name, child = children[index]
                rules = (rule(children[index:], prefix, backend) for rule in backend.fusion_rules)
                fused = next(filter(None, rules), None)
                if fused is not None:
                    layers.append(fused[0])
                    index += fused[1]
                    continue
                following = children[index + 1][1] if index + 1 < len(children) else None
                cancels_bias = type(child) is nn.Conv2d and is_batch_norm_with_batch_statistics(following)
                reason = visit(child, f"{prefix}{name}.",
                               f"{prefix}{children[index + 1][0]}." if cancels_bias else None)
                if reason:
                    return reason
                index += 1
            return None
        where = prefix[:-1] or "the root module"
        lowering = _LOWERINGS.get(type(mod))
        if lowering is None:
            return f"layer {where!r} ({type(mod).__name__}) has no task-batched op"
        if isinstance(mod, nn.MaxPool2d) and (mod.dilation not in (1, (1, 1)) or mod.return_indices):
            return f"layer {where!r} (MaxPool2d with dilation or return_indices) has no task-batched op"
        extra = {"batch_norm_prefix": batch_norm_prefix} if batch_norm_prefix else {}
        run, reason = lowering(mod, prefix, backend, **extra)
        if reason:
            return f"layer {where!r} ({type(mod).__name__}): {reason}"
        layers.append(run)
        return None

    reason = visit(module, "")
    return (None, reason) if reason else (Program(layers), None)
