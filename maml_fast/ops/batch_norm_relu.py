"""Per-task BatchNorm with batch statistics followed by ReLU or LeakyReLU, as one fused op with
closed-form backward and double backward.

On the ``[rows, channels]`` view of a task-batched activation (``[B*H*W, T*C]`` for a channels-last
``[B, T*C, H, W]``, or a ``[B, T*C]`` matrix), per column, with N = rows and the negative slope
s >= 0 (ReLU: s = 0; s = 1, `IDENTITY_SLOPE`, is BatchNorm alone):

    mean = sum(x)/N,  var = sum((x - mean)^2)/N,  r = (var + eps)^-1/2,  x_hat = (x - mean) r
    y = leaky_relu(gamma x_hat + beta, s),        m = 1 where y > 0, else s

    backward (gz = m gy):   gx = gamma r P(gz),  g_gamma = sum(gz x_hat),  g_beta = sum(gz)
    with P(v) = v - mean(v) - x_hat mean(v x_hat)  (the projection of `norm._project`)

    double backward of L = <ggx, gx> + <gg_gamma, g_gamma> + <gg_beta, g_beta>, with
    S1 = sum(ggx P(gz)), S2 = sum(ggx x_hat):
      dL/dgy    = m (gamma r P(ggx) + gg_gamma x_hat + gg_beta)
      dL/dx     = gg_gamma r P(gz) - gamma r^2 [S1/N x_hat + mean(gz x_hat) P(ggx) + S2/N P(gz)]
      dL/dgamma = r S1,    dL/dbeta = 0 (m is piecewise constant)

These are `norm._BatchNormRows`'s formulas with gy replaced by gz = m gy. The compiled operators
(``torch.ops.maml_fast.batch_norm_relu{,_backward,_double_backward}``, CPU and CUDA) evaluate them
with one pass for the column sums and one for the elementwise outputs; x_hat is recomputed from x,
mean and rstd (never stored) and m from y (with s >= 0, y > 0 exactly where gamma x_hat + beta > 0).

Autograd: `_BatchNormReluRows` (forward op) has a backward that applies `_BatchNormReluRowsBackward`
(backward op), whose own backward is the double-backward op: first and second derivatives are
exact and run on the kernels — second-order MAML differentiates through the inner-loop gradient.
Derivatives of every order exist: when a third derivative is being recorded (``create_graph=True``
around the second backward), the double backward runs as the same closed form in differentiable
PyTorch ops instead of the kernel (slower, but exact).

Here are the pure-PyTorch references, the input checks, the launcher and the autograd glue.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from maml_fast import _extension

from . import _autograd, norm
from ._checks import check_tensor

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


_OPS = _extension.CompiledOps("batch_norm_relu", "batch_norm_relu_backward", "batch_norm_relu_double_backward")
unavailable_reasons = _OPS.unavailable_reasons
is_available = _OPS.is_available


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the op's mean and rstd outputs (and of its accumulations) for activations of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


#: The negative slope that makes the op's activation the identity: the op is then BatchNorm alone.
IDENTITY_SLOPE = 1.0


def activation(z, negative_slope: float = 0.0):
    """The op's activation: F.relu at slope 0, the identity at `IDENTITY_SLOPE`, else F.leaky_relu."""
    if negative_slope == IDENTITY_SLOPE:
        return z
    return F.leaky_relu(z, negative_slope) if negative_slope else F.relu(z)


# ----------------------------------------------------------------------------------- references
def batch_norm_relu_rows_reference(x, weight, bias, eps: float = 1e-5, negative_slope: float = 0.0):
    """The op's definition on ``[rows, channels]``: (y, mean, rstd). Plain PyTorch, differentiable to
    any order (through x, weight and bias; mean and rstd are computed in the stats dtype)."""
    acc = x.to(stats_dtype(x.dtype))
    mean = acc.mean(0)
    rstd = torch.rsqrt((acc - mean).pow(2).mean(0) + eps)
    x_hat = (acc - mean) * rstd
    y = activation(x_hat * weight.to(acc.dtype) + bias.to(acc.dtype), negative_slope).to(x.dtype)
    return y, mean, rstd


def batch_norm_relu_reference(x, weight, bias, tasks: int, eps: float = 1e-5, negative_slope: float = 0.0):
    """The activation of batch_norm in the grouped layout, one plain F.batch_norm per task (a Python loop)."""
    return activation(norm.batch_norm_reference(x, weight, bias, tasks, eps), negative_slope)


# ------------------------------------------------------------------------------------- checks
def check_batch_norm_relu_rows_inputs(x, weight, bias, eps, negative_slope=0.0) -> None:
    """Raise TypeError / ValueError naming the argument unless the inputs fit the op:
    x ``[rows >= 2, channels]`` of a supported floating dtype; weight, bias ``[channels]`` of x's
    dtype on x's device; eps and negative_slope finite numbers >= 0."""
    check_tensors_and_dtype(x, weight, bias)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [rows, channels], got shape {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(
            f"x needs at least 2 rows (batch statistics of a single value per channel are undefined), "
            f"got shape {tuple(x.shape)}"
        )
    check_affine_and_eps(x, weight, bias, eps)
    check_negative_slope(negative_slope)


def check_negative_slope(negative_slope) -> None:
    """negative_slope is a finite number >= 0 (the op reads its derivative off y > 0)."""
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
        raise TypeError(f"negative_slope must be a number, got {type(negative_slope).__name__}")
    if not (negative_slope >= 0 and negative_slope != float("inf")):
        raise ValueError(f"negative_slope must be finite and >= 0, got {negative_slope}")


def check_tensors_and_dtype(x, weight, bias) -> None:
    """x, weight and bias are tensors, x of a supported floating dtype (TypeError naming the argument)."""
    for name, tensor in (("x", x), ("weight", weight), ("bias", bias)):
        check_tensor(name, tensor)
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"x must be a float32, float64, float16 or bfloat16 tensor, got {x.dtype}")


def check_affine_and_eps(x, weight, bias, eps) -> None:
    """weight, bias ``[channels]`` (x's last dimension) of x's dtype on x's device; eps finite >= 0."""
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {tensor.dtype} but x has {x.dtype}")
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}")
        if tuple(tensor.shape) != (x.shape[-1],):
            raise ValueError(
                f"{name} must have shape ({x.shape[-1]},) (one value per channel of x {tuple(x.shape)}), "
                f"got {tuple(tensor.shape)}"
            )
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a number, got {type(eps).__name__}")
    if not (eps >= 0 and eps != float("inf")):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")


# ------------------------------------------------------------------------------ autograd glue
class _BatchNormReluRows(torch.autograd.Function):
    """y = leaky_relu(batch_norm(x), s) by the forward op; the backward is `_BatchNormReluRowsBackward`."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, negative_slope):
        y, mean, rstd = torch.ops.maml_fast.batch_norm_relu(x, weight, bias, eps, negative_slope)
        # x_hat is not kept: the backward recomputes it from x, mean and rstd; y gives m.
        ctx.save_for_backward(x, weight, y, mean, rstd)
        ctx.eps, ctx.negative_slope = eps, negative_slope
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, y, mean, rstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = _BatchNormReluRowsBackward.apply(grad_y, x, y, weight, mean, rstd, ctx.eps,
                                                                          ctx.negative_slope)
        return grad_x, grad_weight, grad_bias, None, None


class _BatchNormReluRowsBackward(torch.autograd.Function):
    """(gy, x, y, weight) -> (gx, g_weight, g_bias) by the backward op.

    mean and rstd are x's cached statistics and y supplies the activation's derivative m: none of them is
    differentiated. x is the differentiable input and the double backward returns the true
    derivative with respect to it (statistics included). y gets no gradient: m is piecewise
    constant (so does the bias, which enters the backward only through m).

    The double backward runs the double-backward op, except when autograd records it (a third
    derivative was asked for: ``create_graph=True`` around the second backward); then the same
    closed form runs as differentiable PyTorch ops (`double_backward_composite`)."""

    @staticmethod
    def forward(ctx, grad_y, x, y, weight, mean, rstd, eps, negative_slope):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad_y, x, y, weight, mean, rstd)
        ctx.eps, ctx.negative_slope = eps, negative_slope
        return tuple(torch.ops.maml_fast.batch_norm_relu_backward(grad_y, x, y, weight, mean, rstd, negative_slope))

    @staticmethod
    def backward(ctx, grad_grad_x, grad_grad_weight, grad_grad_bias):
        if grad_grad_x is None and grad_grad_weight is None and grad_grad_bias is None:
            return None, None, None, None, None, None, None, None
        d_grad_y, d_x, d_weight = double_backward(grad_grad_x, grad_grad_weight, grad_grad_bias, *ctx.saved_tensors,
                                                  eps=ctx.eps, negative_slope=ctx.negative_slope)
        needs = ctx.needs_input_grad
        return (d_grad_y if needs[0] else None, d_x if needs[1] else None, None,
                d_weight if needs[3] else None, None, None, None, None)


def double_backward(grad_grad_x, grad_grad_weight, grad_grad_bias, grad_y, x, y, weight, mean, rstd, eps=None,
                    negative_slope=0.0):
    """(d grad_y, d x, d weight) of the backward op: by the double-backward op, or, when autograd records
    (a third derivative was asked for), by `double_backward_composite` (with eps, or, where the caller
    has none, with the statistics' derivatives recovered from mean and rstd: `_autograd.statistics_of`)."""
    if not torch.is_grad_enabled():
        return torch.ops.maml_fast.batch_norm_relu_double_backward(
            grad_grad_x, grad_grad_weight, grad_grad_bias, grad_y, x, y, weight, mean, rstd, negative_slope)
    statistics = None if eps is not None else _autograd.statistics_of(x, mean, rstd)
    return double_backward_composite(grad_grad_x, grad_grad_weight, grad_grad_bias, grad_y, x, y > 0, weight, eps,
                                     statistics=statistics, negative_slope=negative_slope)


def activation_grad(mask, v, negative_slope: float = 0.0):
    """m v: v where `mask` (y > 0), else negative_slope v (exact zeros for ReLU)."""
    return torch.where(mask, v, v * negative_slope if negative_slope else torch.zeros((), dtype=v.dtype,
                                                                                       device=v.device))


def double_backward_composite(grad_grad_x, grad_grad_weight, grad_grad_bias, grad_y, x, mask, weight, eps,
                              statistics=None, negative_slope=0.0):
    """The double-backward op's formulas (see the module docstring) as PyTorch ops on ``[rows,
    channels]``, differentiable again: the statistics are recomputed from x with autograd ops (or
    given: `statistics` = (mean, rstd) as functions of x, e.g. `_autograd.statistics_of`), the
    activation's derivative (1 where the bool `mask` = y > 0, else negative_slope) is a constant.
    Returns (d grad_y, d x, d weight)."""
    acc = stats_dtype(x.dtype)
    rows = x.shape[0]
    xf, gy, w = x.to(acc), grad_y.to(acc), weight.to(acc)
    if statistics is None:
        mean = xf.mean(0)
        centred = xf - mean
        r = torch.rsqrt(centred.pow(2).mean(0) + eps)
    else:
        mean, r = statistics
        centred = xf - mean
    x_hat = centred * r
    gz = activation_grad(mask, gy, negative_slope)
    sum_gz, sum_gz_xhat = gz.sum(0), (gz * x_hat).sum(0)
    p_gz = gz - sum_gz / rows - x_hat * (sum_gz_xhat / rows)
    gamma_r = w * r
    gamma_r2 = gamma_r * r
    gg_w = torch.zeros_like(w) if grad_grad_weight is None else grad_grad_weight.to(acc)
    gg_b = torch.zeros_like(w) if grad_grad_bias is None else grad_grad_bias.to(acc)
    d_gz = gg_w * x_hat + gg_b
    d_x = (gg_w * r) * p_gz
    d_weight = torch.zeros_like(w)
    if grad_grad_x is not None:
        ggx = grad_grad_x.to(acc)
        sum_ggx_xhat = (ggx * x_hat).sum(0)
        p_ggx = ggx - ggx.mean(0) - x_hat * (sum_ggx_xhat / rows)
        s1 = (ggx * p_gz).sum(0)
        d_gz = d_gz + gamma_r * p_ggx
        d_x = d_x - gamma_r2 * ((s1 / rows) * x_hat + (sum_gz_xhat / rows) * p_ggx + (sum_ggx_xhat / rows) * p_gz)
        d_weight = r * s1
    d_grad_y = activation_grad(mask, d_gz, negative_slope)
    return d_grad_y.to(x.dtype), d_x.to(x.dtype), d_weight.to(weight.dtype)


# ------------------------------------------------------------------------------------ launchers
def batch_norm_relu_rows(x, weight, bias, eps: float = 1e-5, negative_slope: float = 0.0):
    """leaky_relu(batch_norm(x), negative_slope) (ReLU at slope 0) per column of x ``[rows, channels]`` by
    the compiled op (with checks), differentiable twice in x, weight and bias. weight/bias ``[channels]``."""
    check_batch_norm_relu_rows_inputs(x, weight, bias, eps, negative_slope)
    if not is_available(x.device):
        raise RuntimeError("maml_fast.batch_norm_relu cannot run: " + "; ".join(unavailable_reasons(x.device)))
    return _BatchNormReluRows.apply(x, weight, bias, float(eps), float(negative_slope))


def _rows_view(x):
    """x as ``[rows, channels]`` without a copy, and the function that brings the result back to
    x's shape and layout; None when x's layout has no such view (x is then left to the torch path)."""
    if x.dim() == 2:
        return x, lambda rows: rows
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        batch, total, height, width = x.shape
        return (x.permute(0, 2, 3, 1).reshape(-1, total),
                lambda rows: rows.reshape(batch, height, width, total).permute(0, 3, 1, 2))
    return None


def _affine(param, total, x, fill: float):
    if param is None:
        return x.new_full((total,), fill)
    return param.reshape(total)


def extension_affine(x, weight, bias, tasks: int, available: bool):
    """weight and bias ``[T, C]`` (or None) as the ``[T*C]`` vectors of a fused op, when the fused op
    can take x: the op ``available`` on x's device, x of a supported dtype and the
    affine parameters of x's dtype; None otherwise (x goes to the unfused path). Raises like
    `norm.batch_norm` for a bad ``tasks`` or affine shape."""
    if not (available and x.dtype in _SUPPORTED_DTYPES):
        return None
    if not all(p is None or (isinstance(p, torch.Tensor) and p.dtype == x.dtype) for p in (weight, bias)):
        return None
    if x.shape[1] % tasks:
        raise ValueError(f"x must have shape [batch, tasks*channels, ...] with tasks={tasks}, got {tuple(x.shape)}")
    channels = x.shape[1] // tasks
    norm._check_affine("weight", weight, tasks, (channels,))
    norm._check_affine("bias", bias, tasks, (channels,))
    total = x.shape[1]
    return _affine(weight, total, x, 1.0), _affine(bias, total, x, 0.0)


def batch_norm_relu(x, weight, bias, tasks: int, eps: float = 1e-5, negative_slope: float = 0.0):
    """leaky_relu(per-task batch_norm(x), negative_slope) (ReLU at slope 0) in the grouped layout: x ``[B,
    T*C]`` or ``[B, T*C, H, W]``; weight/bias ``[T, C]`` or None. Checked like `norm.batch_norm`, and
    negative_slope a finite number >= 0.

    When the compiled op can run on x's device, x is a 2-D matrix or a channels-last 4-D tensor (a
    free ``[rows, T*C]`` view) and weight/bias share x's dtype, the fused op runs; otherwise
    `batch_norm_relu_unfused`, the same function, does."""
    check_negative_slope(negative_slope)
    if isinstance(x, torch.Tensor):
        view = _rows_view(x)
        affine = None if view is None else extension_affine(x, weight, bias, tasks, is_available(x.device))
        if affine is not None:
            rows, restore = view
            if rows.shape[0] < 2:
                raise ValueError("batch_norm needs more than one value per channel (batch of 1 with no spatial dims)")
            return restore(batch_norm_relu_rows(rows, *affine, eps, negative_slope))
    return batch_norm_relu_unfused(x, weight, bias, tasks, eps, negative_slope)


def batch_norm_relu_unfused(x, weight, bias, tasks: int, eps: float = 1e-5, negative_slope: float = 0.0):
    """The activation of per-task batch_norm(x) by two ops (`norm.batch_norm`, then ReLU or LeakyReLU): the
    fused op's reference."""
    return activation(norm.batch_norm(x, weight, bias, tasks, eps), negative_slope)


# ---------------------------------------------------------------------------- fake (meta) kernels
if _OPS.registered:

    @torch.library.register_fake("maml_fast::batch_norm_relu")
    def _batch_norm_relu_fake(x, weight, bias, eps, negative_slope=0.0):
        channels = x.shape[1]
        stats = stats_dtype(x.dtype)
        return x.new_empty(x.shape), x.new_empty((channels,), dtype=stats), x.new_empty((channels,), dtype=stats)

    @torch.library.register_fake("maml_fast::batch_norm_relu_backward")
    def _batch_norm_relu_backward_fake(grad_y, x, y, weight, mean, rstd, negative_slope=0.0):
        channels = x.shape[1]
        return x.new_empty(x.shape), x.new_empty((channels,)), x.new_empty((channels,))

    @torch.library.register_fake("maml_fast::batch_norm_relu_double_backward")
    def _batch_norm_relu_double_backward_fake(grad_grad_x, grad_grad_weight, grad_grad_bias, grad_y, x, y,
                                              weight, mean, rstd, negative_slope=0.0):
        channels = x.shape[1]
        return x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty((channels,))


# ---------------------------------------------------------------- autograd of the ops called directly
# The derivatives the autograd glue above uses, registered on the operators themselves:
# torch.ops.maml_fast.batch_norm_relu{,_backward,_double_backward} called directly are differentiable
# to every order, as batch_norm_relu_rows is. The forward op's mean and rstd outputs are
# differentiable too (the batch statistics' own derivatives). The backward ops take x's cached
# statistics (mean, rstd) and y (the activation's derivative) as inputs: their registered derivatives treat those
# as cached values of x, as the glue does. The derivative in x is the total one (statistics
# recomputed from x), and y, mean and rstd get none: exact for the backward ops applied to the
# forward op's outputs, which is what they compute.
if _OPS.registered:

    def _saving_tensors_setup(ctx, inputs, output):
        *tensors, ctx.negative_slope = inputs  # the tensor inputs (some may be None), then the slope
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*tensors)

    def _backward_backward(ctx, grad_grad_x, grad_grad_weight, grad_grad_bias):
        if grad_grad_x is None and grad_grad_weight is None and grad_grad_bias is None:
            return None, None, None, None, None, None, None
        d_grad_y, d_x, d_weight = double_backward(grad_grad_x, grad_grad_weight, grad_grad_bias, *ctx.saved_tensors,
                                                  negative_slope=ctx.negative_slope)
        needs = ctx.needs_input_grad
        return (d_grad_y if needs[0] else None, d_x if needs[1] else None, None, d_weight if needs[3] else None,
                None, None, None)

    def _double_backward_backward(ctx, *grads):
        ggx, ggw, ggb, grad_y, x, y, weight, mean, rstd = ctx.saved_tensors
        mask = y > 0

        def composite(ggx, ggw, ggb, grad_y, x, weight):
            return double_backward_composite(ggx, ggw, ggb, grad_y, x, mask, weight, None,
                                             statistics=_autograd.statistics_of(x, mean, rstd),
                                             negative_slope=ctx.negative_slope)

        needs = ctx.needs_input_grad
        result = _autograd.vjp_of(composite, (ggx, ggw, ggb, grad_y, x, weight), needs[:5] + (needs[6],), grads)
        return (*result[:5], None, result[5], None, None, None)

    _autograd.register_batch_norm_autograd(
        "maml_fast::batch_norm_relu",
        lambda grad_y, x, weight, bias, y, mean, rstd, eps, negative_slope: _BatchNormReluRowsBackward.apply(
            grad_y, x, y, weight, mean, rstd, eps, negative_slope))
    torch.library.register_autograd("maml_fast::batch_norm_relu_backward", _backward_backward,
                                    setup_context=_saving_tensors_setup)
    torch.library.register_autograd("maml_fast::batch_norm_relu_double_backward", _double_backward_backward,
                                    setup_context=_saving_tensors_setup)
