"""Per-task BatchNorm with batch statistics, ReLU and a 2x2 max-pool (``nn.MaxPool2d(2)``: stride 2,
no padding, floor mode) as one fused op with closed-form backward and double backward.

On x ``[B, H, W, C]`` (the NHWC view of a channels-last ``[B, T*C, H, W]`` activation), with the
statistics of `maml_fast.ops.batch_norm_relu` over all N = B*H*W positions and z = gamma x_hat + beta:

    y[b, i, j] = relu(max of z over the window (2i + di, 2j + dj), di, dj in {0, 1})

Only y ``[B, H//2, W//2, C]`` is stored. relu and max commute, so this is
``max_pool2d(relu(batch_norm(x)), 2)``. Backward: each pooled gradient goes to its window's first
maximum of z in row-major order (PyTorch's max_pool2d rule), and nowhere when that maximum is <= 0
(the ReLU mask); with that routed gz, the BatchNorm+ReLU formulas hold unchanged (positions no
gradient is routed to, and the last row / column of an odd H / W that no window covers, have gz = 0
but still get a gradient through the statistics). Double backward: the BatchNorm+ReLU double
backward with the routed gz, and d grad_y = d gz gathered back from each window's routed position
(the routing is piecewise constant, so it has no derivative of its own).

The compiled operators ``torch.ops.maml_fast.batch_norm_relu_max_pool{,_backward,_double_backward}``
(CPU and CUDA, csrc/batch_norm_relu_pool.*) recompute z from x, mean, rstd, gamma and beta with the
same arithmetic in all three, so they route to the same argmax. The autograd glue mirrors
`maml_fast.ops.batch_norm_relu`: first and second derivatives on the kernels, third and higher
through a differentiable composite of the double backward.

Here are the pure-PyTorch references, the input checks, the launchers and the autograd glue.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from maml_fast import _extension

from . import _autograd
from . import batch_norm_relu as bnr

_OPS = _extension.CompiledOps("batch_norm_relu_max_pool", "batch_norm_relu_max_pool_backward",
                              "batch_norm_relu_max_pool_double_backward")
unavailable_reasons = _OPS.unavailable_reasons
is_available = _OPS.is_available


def pooled_shape(x) -> tuple[int, int, int, int]:
    """The shape of y for x ``[B, H, W, C]``."""
    batch, height, width, channels = x.shape
    return batch, height // 2, width // 2, channels


# ----------------------------------------------------------------------------------- references
def _nchw(x):
    return x.permute(0, 3, 1, 2)


def _nhwc(x):
    return x.permute(0, 2, 3, 1)


def batch_norm_relu_max_pool_reference(x, weight, bias, eps: float = 1e-5):
    """The op's definition on x ``[B, H, W, C]``: (y ``[B, H//2, W//2, C]``, mean, rstd) as
    ``max_pool2d(relu(batch_norm(x)), 2)`` in plain PyTorch, differentiable to any order."""
    batch, height, width, channels = x.shape
    y, mean, rstd = bnr.batch_norm_relu_rows_reference(x.reshape(-1, channels), weight, bias, eps)
    return _nhwc(F.max_pool2d(_nchw(y.reshape(batch, height, width, channels)), 2)), mean, rstd


def batch_norm_relu_max_pool_grouped_reference(x, weight, bias, tasks: int, eps: float = 1e-5):
    """max_pool2d(relu(batch_norm)) in the grouped layout, one plain F.batch_norm per task."""
    return F.max_pool2d(bnr.batch_norm_relu_reference(x, weight, bias, tasks, eps), 2)


# ------------------------------------------------------------------------------------- checks
def check_batch_norm_relu_max_pool_inputs(x, weight, bias, eps) -> None:
    """Raise TypeError / ValueError naming the argument unless the inputs fit the op: x
    ``[B >= 1, H >= 2, W >= 2, C]`` of a supported floating dtype; weight, bias ``[C]`` of x's dtype
    on x's device; eps a finite number >= 0."""
    bnr.check_tensors_and_dtype(x, weight, bias)
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [batch, height, width, channels], got shape {tuple(x.shape)}")
    if x.shape[0] < 1 or x.shape[1] < 2 or x.shape[2] < 2:
        raise ValueError(f"x needs batch >= 1 and height, width >= 2 for a 2x2 max-pool, got shape {tuple(x.shape)}")
    bnr.check_affine_and_eps(x, weight, bias, eps)


# ------------------------------------------------------------------------------ autograd glue
class _BatchNormReluMaxPool(torch.autograd.Function):
    """y = max_pool2d(relu(batch_norm(x))) by the forward op; the backward is
    `_BatchNormReluMaxPoolBackward`."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, rstd = torch.ops.maml_fast.batch_norm_relu_max_pool(x, weight, bias, eps)
        # Neither x_hat nor the argmax is kept: the backward recomputes both from x and the statistics.
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = _BatchNormReluMaxPoolBackward.apply(
            grad_y, x, weight, bias, mean, rstd, ctx.eps)
        return grad_x, grad_weight, grad_bias, None


class _BatchNormReluMaxPoolBackward(torch.autograd.Function):
    """(gy, x, weight, bias) -> (gx, g_weight, g_bias) by the backward op.

    x is the differentiable input (statistics included); bias enters only through the ReLU mask and
    the argmax, which are piecewise constant, so it gets no gradient; mean and rstd are x's cached
    statistics. The double backward runs the double-backward op, or, when autograd records it (a
    third derivative was asked for), `_double_backward_composite`."""

    @staticmethod
    def forward(ctx, grad_y, x, weight, bias, mean, rstd, eps):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad_y, x, weight, bias, mean, rstd)
        ctx.eps = eps
        return tuple(torch.ops.maml_fast.batch_norm_relu_max_pool_backward(grad_y, x, weight, bias, mean, rstd))

    @staticmethod
    def backward(ctx, grad_grad_x, grad_grad_weight, grad_grad_bias):
        if grad_grad_x is None and grad_grad_weight is None and grad_grad_bias is None:
            return None, None, None, None, None, None, None
        d_grad_y, d_x, d_weight = _double_backward(grad_grad_x, grad_grad_weight, grad_grad_bias, *ctx.saved_tensors,
                                                   eps=ctx.eps)
        needs = ctx.needs_input_grad
        return (d_grad_y if needs[0] else None, d_x if needs[1] else None, d_weight if needs[2] else None,
                None, None, None, None)


def _double_backward(grad_grad_x, grad_grad_weight, grad_grad_bias, grad_y, x, weight, bias, mean, rstd, eps=None):
    """(d grad_y, d x, d weight) of the backward op: by the double-backward op, or, when autograd records
    (a third derivative was asked for), by `_double_backward_composite` (eps None: the statistics'
    derivatives recovered from mean and rstd, `_autograd.statistics_of`)."""
    if not torch.is_grad_enabled():
        return torch.ops.maml_fast.batch_norm_relu_max_pool_double_backward(
            grad_grad_x, grad_grad_weight, grad_grad_bias, grad_y, x, weight, bias, mean, rstd)
    return _double_backward_composite(grad_grad_x, grad_grad_weight, grad_grad_bias, grad_y, x, weight, bias, mean,
                                      rstd, eps)


def _double_backward_composite(grad_grad_x, grad_grad_weight, grad_grad_bias, grad_y, x, weight, bias, mean, rstd,
                               eps):
    """The double-backward op as PyTorch ops, differentiable again: the argmax of each window (of z
    recomputed from the op's mean and rstd, without a graph) routes grad_y to full resolution,
    `bnr.double_backward_composite` does the rest (statistics recomputed from x with eps, or, eps None,
    `_autograd.statistics_of`), and its d grad_y is gathered back from the routed positions."""
    batch, height, width, channels = x.shape
    acc = bnr.stats_dtype(x.dtype)
    with torch.no_grad():
        z = (x.to(acc) - mean) * rstd * weight.to(acc) + bias.to(acc)
        z_max, argmax = F.max_pool2d(_nchw(z), 2, return_indices=True)
        index = argmax.flatten(2)  # [B, C, H//2 * W//2] into [B, C, H*W]
        routed = (z_max > 0).flatten(2)
    gy = torch.where(routed, _nchw(grad_y).flatten(2).to(acc), torch.zeros((), dtype=acc, device=x.device))
    gz = gy.new_zeros(batch, channels, height * width).scatter(2, index, gy)
    gz_rows = gz.transpose(1, 2).reshape(-1, channels)
    ggx_rows = None if grad_grad_x is None else grad_grad_x.reshape(-1, channels)
    everywhere = torch.ones((), dtype=torch.bool, device=x.device).expand(gz_rows.shape)
    x_rows = x.reshape(-1, channels)
    statistics = None if eps is not None else _autograd.statistics_of(x_rows, mean, rstd)
    d_gz, d_x, d_weight = bnr.double_backward_composite(
        ggx_rows, grad_grad_weight, grad_grad_bias, gz_rows, x_rows, everywhere, weight, eps, statistics=statistics)
    d_gz = d_gz.reshape(batch, height * width, channels).transpose(1, 2)
    d_grad_y = torch.where(routed, d_gz.gather(2, index), torch.zeros((), dtype=d_gz.dtype, device=x.device))
    return _nhwc(d_grad_y.reshape(batch, channels, height // 2, width // 2)), d_x.reshape(x.shape), d_weight


# ------------------------------------------------------------------------------------ launchers
def batch_norm_relu_max_pool_nhwc(x, weight, bias, eps: float = 1e-5):
    """max_pool2d(relu(batch_norm(x)), 2) of x ``[B, H, W, C]`` by the compiled op (with checks),
    differentiable in x, weight and bias (twice on the kernels). Returns y ``[B, H//2, W//2, C]``."""
    check_batch_norm_relu_max_pool_inputs(x, weight, bias, eps)
    if not is_available(x.device):
        raise RuntimeError("maml_fast.batch_norm_relu_max_pool cannot run: " + "; ".join(unavailable_reasons(x.device)))
    return _BatchNormReluMaxPool.apply(x, weight, bias, float(eps))


def batch_norm_relu_max_pool(x, weight, bias, tasks: int, eps: float = 1e-5):
    """max_pool2d(relu(per-task batch_norm(x)), 2) in the grouped layout: x ``[B, T*C, H, W]``,
    weight/bias ``[T, C]`` or None. Checked like `norm.batch_norm`.

    When the compiled op can run on x's device, x is channels-last (a free
    NHWC view) with H, W >= 2 and weight/bias share x's dtype, the fused op runs and y is
    channels-last; otherwise `bnr.batch_norm_relu` (fused BatchNorm+ReLU where it can run) and
    ``F.max_pool2d``, the same function."""
    if (isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[2] >= 2 and x.shape[3] >= 2
            and x.is_contiguous(memory_format=torch.channels_last)):
        affine = bnr.extension_affine(x, weight, bias, tasks, is_available(x.device))
        if affine is not None:
            return _nchw(batch_norm_relu_max_pool_nhwc(_nhwc(x), *affine, eps))
    return F.max_pool2d(bnr.batch_norm_relu(x, weight, bias, tasks, eps), 2)


# ---------------------------------------------------------------------------- fake (meta) kernels
if _OPS.registered:

    @torch.library.register_fake("maml_fast::batch_norm_relu_max_pool")
    def _batch_norm_relu_max_pool_fake(x, weight, bias, eps):
        channels = x.shape[-1]
        stats = bnr.stats_dtype(x.dtype)
        return (x.new_empty(pooled_shape(x)), x.new_empty((channels,), dtype=stats),
                x.new_empty((channels,), dtype=stats))

    @torch.library.register_fake("maml_fast::batch_norm_relu_max_pool_backward")
    def _batch_norm_relu_max_pool_backward_fake(grad_y, x, weight, bias, mean, rstd):
        channels = x.shape[-1]
        return x.new_empty(x.shape), x.new_empty((channels,)), x.new_empty((channels,))

    @torch.library.register_fake("maml_fast::batch_norm_relu_max_pool_double_backward")
    def _batch_norm_relu_max_pool_double_backward_fake(grad_grad_x, grad_grad_weight, grad_grad_bias, grad_y, x,
                                                       weight, bias, mean, rstd):
        return x.new_empty(grad_y.shape), x.new_empty(x.shape), x.new_empty((x.shape[-1],))


# ---------------------------------------------------------------- autograd of the ops called directly
# As for maml_fast.ops.batch_norm_relu: the glue's derivatives registered on the operators, so that
# torch.ops.maml_fast.batch_norm_relu_max_pool{,_backward,_double_backward} called directly are
# differentiable to every order; mean and rstd of the forward op are differentiable outputs; the
# backward ops treat mean and rstd as x's cached statistics (total derivative in x, none for them).
if _OPS.registered:

    def _save_inputs(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*inputs)

    def _backward_backward(ctx, grad_grad_x, grad_grad_weight, grad_grad_bias):
        if grad_grad_x is None and grad_grad_weight is None and grad_grad_bias is None:
            return None, None, None, None, None, None
        d_grad_y, d_x, d_weight = _double_backward(grad_grad_x, grad_grad_weight, grad_grad_bias, *ctx.saved_tensors)
        needs = ctx.needs_input_grad
        return (d_grad_y if needs[0] else None, d_x if needs[1] else None, d_weight if needs[2] else None,
                None, None, None)

    def _double_backward_backward(ctx, *grads):
        ggx, ggw, ggb, grad_y, x, weight, bias, mean, rstd = ctx.saved_tensors

        def composite(ggx, ggw, ggb, grad_y, x, weight):
            return _double_backward_composite(ggx, ggw, ggb, grad_y, x, weight, bias, mean, rstd, None)

        needs = ctx.needs_input_grad
        result = _autograd.vjp_of(composite, (ggx, ggw, ggb, grad_y, x, weight), needs[:6], grads)
        return (*result, None, None, None)

    _autograd.register_batch_norm_autograd(
        "maml_fast::batch_norm_relu_max_pool",
        lambda grad_y, x, weight, bias, y, mean, rstd, eps: _BatchNormReluMaxPoolBackward.apply(
            grad_y, x, weight, bias, mean, rstd, eps))
    torch.library.register_autograd("maml_fast::batch_norm_relu_max_pool_backward", _backward_backward,
                                    setup_context=_save_inputs)
    torch.library.register_autograd("maml_fast::batch_norm_relu_max_pool_double_backward", _double_backward_backward,
                                    setup_context=_save_inputs)
