"""The fast-weight update of MAML's inner loop, for every adapted tensor of every task in one call.

    out_i = params_i - lrs_i * grads_i

``params_i`` and ``grads_i`` have shape ``[T, *s_i]`` (``params_i`` may be θ expanded over the
tasks, stride 0); ``lrs_i`` is one of: ``[]`` (one rate), ``s_i`` (one rate per element shared by
the tasks, as in Meta-SGD) or ``[T, *s_i]``. All tensors share one dtype and one device.

The compiled op lays ``out_i`` out like ``grads_i`` when that is dense with the task dimension
outermost (`update_output_like`): a convolution's channels-last weight gradient gives a
channels-last fast weight, which the next convolution reads without a copy.

Here are the pure-PyTorch reference, the input checks, the compiled kernel
(``maml_fast::fast_weight_update``: one parallel loop on CPU, one launch per 64 tensors on CUDA)
and its autograd: a backward made of differentiable ops, so second-order MAML differentiates
through it exactly.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from maml_fast import _extension


def fast_weight_update_reference(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], lrs: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Plain PyTorch, one update per tensor, checked (`check_fast_weight_update_inputs`);
    differentiable to any order."""
    check_fast_weight_update_inputs(params, grads, lrs)
    return [param - lr * grad for param, grad, lr in zip(params, grads, lrs, strict=True)]


def check_fast_weight_update_inputs(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], lrs: Sequence[torch.Tensor]
) -> None:
    """Raise TypeError / ValueError naming the argument unless the lists fit the contract above."""
    for name, tensors in (("params", params), ("grads", grads), ("lrs", lrs)):
        for i, tensor in enumerate(tensors):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(tensor).__name__}")
    for name, tensors in (("grads", grads), ("lrs", lrs)):
        if len(tensors) != len(params):
            raise ValueError(f"{name} has {len(tensors)} tensors but params has {len(params)}")
    if not params:
        return
    first = params[0]
    if not first.is_floating_point():
        raise TypeError(f"params[0] must be a floating-point tensor, got {first.dtype}")
    if first.dim() == 0:
        raise ValueError("params[0] must have a leading task dimension [T, ...], got a 0-dim tensor")
    tasks = first.shape[0]
    for i, (param, grad, lr) in enumerate(zip(params, grads, lrs)):
        for name, tensor in (("params", param), ("grads", grad), ("lrs", lr)):
            if tensor.dtype != first.dtype:
                raise TypeError(
                    f"{name}[{i}] has dtype {tensor.dtype} but params[0] has {first.dtype}; "
                    "all tensors must share one dtype"
                )
            if tensor.device != first.device:
                raise ValueError(f"{name}[{i}] is on {tensor.device} but params[0] is on {first.device}")
        if param.dim() == 0 or param.shape[0] != tasks:
            raise ValueError(
                f"params[{i}] has shape {tuple(param.shape)} but params[0] has {tasks} tasks in dim 0"
            )
        if grad.shape != param.shape:
            raise ValueError(
                f"grads[{i}] has shape {tuple(grad.shape)} but params[{i}] has shape {tuple(param.shape)}"
            )
        if lr.shape not in ((), param.shape[1:], param.shape):
            raise ValueError(
                f"lrs[{i}] has shape {tuple(lr.shape)}; for params[{i}] of shape {tuple(param.shape)} it "
                f"must be () (one rate), {tuple(param.shape[1:])} (per element, shared by the tasks) "
                f"or {tuple(param.shape)} (per task and element)"
            )


class _FastWeightUpdate(torch.autograd.Function):
    """The compiled kernel forward; a backward of ordinary differentiable ops.

    d out/d param = identity, d out/d grad = -lr, d out/d lr = -grad summed to lr's shape. Built from
    autograd-tracked ops, the backward is itself differentiated when MAML's outer backward runs
    through the inner loop's ``autograd.grad(..., create_graph=True)``.
    """

    @staticmethod
    def forward(ctx, count: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        params, grads, lrs = tensors[:count], tensors[count : 2 * count], tensors[2 * count :]
        ctx.count = count
        ctx.set_materialize_grads(False)  # outputs that the loss does not use get no gradient work
        ctx.save_for_backward(*grads, *lrs)
        return tuple(torch.ops.maml_fast.fast_weight_update(params, grads, lrs))

    @staticmethod
    def backward(ctx, *out_grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        count = ctx.count
        saved = ctx.saved_tensors
        needs = [ctx.needs_input_grad[1 + k * count : 1 + (k + 1) * count] for k in range(3)]
        d_params, d_grads, d_lrs = _update_backward(out_grads, saved[:count], saved[count:], needs)
        return (None, *d_params, *d_grads, *d_lrs)


def _update_backward(out_grads, grads, lrs, needs):
    """(d params, d grads, d lrs) lists of ``out_i = params_i - lrs_i * grads_i`` for the output
    gradients `out_grads` (None: unused); `needs`: which of the three lists' entries need one.
    Differentiable: d params is the output gradient itself, and every d grads_i = 0 - lrs_i * out_grad_i
    comes from one more call of the compiled update (its params a zero expanded to each shape), so the
    backward of every order stays one launch for all tensors."""
    needs_param, needs_grad, needs_lr = needs
    count = len(grads)
    d_params: list[torch.Tensor | None] = [None] * count
    d_grads: list[torch.Tensor | None] = [None] * count
    d_lrs: list[torch.Tensor | None] = [None] * count
    scaled = [i for i, out_grad in enumerate(out_grads) if out_grad is not None and needs_grad[i]]
    if scaled:
        zero = out_grads[scaled[0]].new_zeros(())
        d_scaled = _FastWeightUpdate.apply(len(scaled), *(zero.expand_as(out_grads[i]) for i in scaled),
                                           *(out_grads[i] for i in scaled), *(lrs[i] for i in scaled))
        for i, d_grad in zip(scaled, d_scaled):
            d_grads[i] = d_grad
    for i, out_grad in enumerate(out_grads):
        if out_grad is None:
            continue
        if needs_param[i]:
            d_params[i] = out_grad
        if needs_lr[i]:
            d_lrs[i] = (-grads[i] * out_grad).sum_to_size(lrs[i].shape)
    return d_params, d_grads, d_lrs


def fast_weight_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    lrs: Sequence[torch.Tensor],
) -> list[torch.Tensor]:
    """``[params_i - lrs_i * grads_i]``, differentiable in all three inputs to any order, by the
    compiled kernel where it can run on the tensors' device (see
    `maml_fast._extension.extension_unavailable_reasons`), else by the reference.
    """
    if not (params and isinstance(params[0], torch.Tensor) and _extension.is_available(params[0].device)):
        return fast_weight_update_reference(params, grads, lrs)
    check_fast_weight_update_inputs(params, grads, lrs)
    return list(_FastWeightUpdate.apply(len(params), *params, *grads, *lrs))


def update_output_like(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """An empty tensor in the compiled op's layout for ``param - lr * grad`` (the rule of
    ``allocate_output`` in csrc/fast_weight_update.cpp): grad's strides when grad is non-overlapping
    and dense with the task dimension outermost, else contiguous."""
    out = torch.empty_like(grad)
    if out.shape[0] > 1 and out.stride(0) != out.numel() // out.shape[0]:
        return param.new_empty(param.shape)
    return out


if _extension.LOAD_ERROR is None:

    @torch.library.register_fake("maml_fast::fast_weight_update")
    def _fast_weight_update_fake(params, grads, lrs):
        return [update_output_like(param, grad) for param, grad in zip(params, grads)]


    # The glue's derivative registered on the operator: torch.ops.maml_fast.fast_weight_update called
    # directly is differentiable in all three lists to every order (the backward is plain ops).
    def _update_setup(ctx, inputs, output):
        params, grads, lrs = inputs
        ctx.set_materialize_grads(False)
        ctx.count = len(params)
        ctx.save_for_backward(*grads, *lrs)

    def _update_autograd_backward(ctx, out_grads):
        saved = ctx.saved_tensors
        return _update_backward(out_grads, saved[:ctx.count], saved[ctx.count:], ctx.needs_input_grad)

    torch.library.register_autograd("maml_fast::fast_weight_update", _update_autograd_backward,
                                    setup_context=_update_setup)
