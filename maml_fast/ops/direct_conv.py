"""Direct task-batched convolution for layers with few input channels (a network's first layer).

Grouped layout as everywhere (`maml_fast.ops.conv2d`): x ``[B, T*C, H, W]``, per-task weights
``[T, O, C, kh, kw]``, output ``[B, T*O, Ho, Wo]``. With C = 1 or 3 the reduction of each output
value has only C*kh*kw terms, so an implicit GEMM (or oneDNN's grouped convolution) runs far below
peak; the compiled ops ``maml_fast::direct_conv2d`` (forward, bias fused) and
``maml_fast::direct_conv2d_weight_grad`` compute every output pixel's O channels as vectors
(formulas and kernels: csrc/direct_conv.h). They take x in any memory layout, return channels-last
activations and a weight gradient whose memory is ``[T, C, kh, kw, O]``, and work for any C; the
"fused" backend uses them where they were measured faster (`maml_fast.backends.fused`).

These ops are primitives, not autograd functions: `maml_fast.ops.conv2d`'s autograd Functions
call them (through the fused backend's conv primitives), and there every derivative of a convolution is again
a forward, input-gradient or weight-gradient primitive, so derivatives of every order exist.

Here are the references (`maml_fast.ops.conv2d.conv2d_reference` is the definition), the input
checks, the launchers and the fake (meta) implementations.
"""
from __future__ import annotations

import torch

from maml_fast import _extension

from ._checks import check_tensor
from .conv2d import ConvGeometry, conv2d_forward, conv2d_input_grad, conv2d_reference, conv2d_weight_grad

SUPPORTED_DTYPES = (torch.float32, torch.float64)


_OPS = _extension.CompiledOps("direct_conv2d", "direct_conv2d_weight_grad")
unavailable_reasons = _OPS.unavailable_reasons
is_available = _OPS.is_available


# ----------------------------------------------------------------------------------- references
def direct_conv2d_reference(x, weight, bias=None, stride=(1, 1), padding=(0, 0)):
    """The forward op's definition: `conv2d_reference` (one F.conv2d per task)."""
    return conv2d_reference(x, weight, bias, tuple(stride), tuple(padding))


def direct_conv2d_weight_grad_reference(x, grad_out, tasks: int, kernel_size, stride=(1, 1), padding=(0, 0)):
    """The weight-gradient op's definition: the gradient of ``<grad_out, conv2d_reference(x, w)>``
    with respect to w ``[T, O, C, kh, kw]`` (the convolution is linear in w, so w's value is moot)."""
    weight = x.new_zeros((tasks, grad_out.shape[1] // tasks, x.shape[1] // tasks, *kernel_size), requires_grad=True)
    with torch.enable_grad():
        out = conv2d_reference(x.detach(), weight, None, tuple(stride), tuple(padding))
        (grad_weight,) = torch.autograd.grad(out, weight, grad_out)
    return grad_weight


# ------------------------------------------------------------------------------------- checks
def _check_pair(name: str, pair, minimum: int) -> None:
    if not isinstance(pair, (tuple, list)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"{name} must be a pair of ints (height, width), got {pair!r}")
    if len(pair) != 2:
        raise ValueError(f"{name} must have two values (height, width), got {tuple(pair)}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {tuple(pair)}")


def _check_activation(name: str, tensor) -> None:
    check_tensor(name, tensor)
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be a float32 or float64 tensor, got {tensor.dtype}")
    if tensor.dim() != 4:
        raise ValueError(f"{name} must be 4-D [batch, tasks*channels, H, W], got shape {tuple(tensor.shape)}")


def _check_like_x(name: str, tensor, x) -> None:
    if tensor.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {tensor.dtype} but x has {x.dtype}")
    if tensor.device != x.device:
        raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}")


def _geometry(x, tasks: int, kernel_size, stride, padding) -> ConvGeometry:
    geo = ConvGeometry(tasks, tuple(stride), tuple(padding), tuple(x.shape[2:]), tuple(kernel_size))
    if min(geo.output_hw()) < 1:
        raise ValueError(
            f"x's spatial size {tuple(x.shape[2:])} is too small for kernel {tuple(kernel_size)} "
            f"with padding {tuple(padding)}"
        )
    return geo


def check_direct_conv2d_inputs(x, weight, bias, stride, padding) -> ConvGeometry:
    """Raise TypeError / ValueError naming the argument unless: x ``[B, T*C, H, W]`` float32/64;
    weight ``[T, O, C, kh, kw]`` and bias ``[T, O]`` (or None) of x's dtype on x's device; stride
    (>= 1) and padding (>= 0) pairs of ints giving an output of at least one pixel."""
    _check_activation("x", x)
    check_tensor("weight", weight)
    _check_like_x("weight", weight, x)
    if weight.dim() != 5 or min(weight.shape[3:], default=0) < 1:
        raise ValueError(f"weight must have shape [tasks, out, in, kh >= 1, kw >= 1], got {tuple(weight.shape)}")
    tasks, out_ch, in_ch = weight.shape[:3]
    if x.shape[1] != tasks * in_ch:
        raise ValueError(
            f"x must have tasks*in_channels = {tasks * in_ch} channels for weight of shape "
            f"{tuple(weight.shape)}, got shape {tuple(x.shape)}"
        )
    if bias is not None:
        check_tensor("bias", bias)
        _check_like_x("bias", bias, x)
        if tuple(bias.shape) != (tasks, out_ch):
            raise ValueError(f"bias must have shape {(tasks, out_ch)} (tasks, out), got {tuple(bias.shape)}")
    _check_pair("stride", stride, 1)
    _check_pair("padding", padding, 0)
    return _geometry(x, tasks, weight.shape[3:], stride, padding)


def check_direct_conv2d_weight_grad_inputs(x, grad_out, tasks, kernel_size, stride, padding) -> ConvGeometry:
    """Raise TypeError / ValueError naming the argument unless: x ``[B, T*C, H, W]`` float32/64;
    grad_out ``[B, T*O, Ho, Wo]`` of x's dtype on x's device, the shape of the convolution's output;
    tasks >= 1 dividing both channel counts; kernel_size (>= 1), stride (>= 1), padding (>= 0) pairs."""
    _check_activation("x", x)
    _check_activation("grad_out", grad_out)
    _check_like_x("grad_out", grad_out, x)
    if isinstance(tasks, bool) or not isinstance(tasks, int):
        raise TypeError(f"tasks must be an int, got {type(tasks).__name__}")
    if tasks < 1:
        raise ValueError(f"tasks must be >= 1, got {tasks}")
    for name, tensor in (("x", x), ("grad_out", grad_out)):
        if tensor.shape[1] % tasks:
            raise ValueError(f"{name}'s {tensor.shape[1]} channels are not a multiple of tasks={tasks}")
    _check_pair("kernel_size", kernel_size, 1)
    _check_pair("stride", stride, 1)
    _check_pair("padding", padding, 0)
    geo = _geometry(x, tasks, kernel_size, stride, padding)
    expected = (x.shape[0], grad_out.shape[1], *geo.output_hw())
    if tuple(grad_out.shape) != expected:
        raise ValueError(
            f"grad_out must have shape {expected} (the convolution's output for x of shape "
            f"{tuple(x.shape)}), got {tuple(grad_out.shape)}"
        )
    return geo


# ------------------------------------------------------------------------------------ launchers
def _require_op(device) -> None:
    if not is_available(device):
        raise RuntimeError("maml_fast.direct_conv2d cannot run: " + "; ".join(unavailable_reasons(device)))


def direct_conv2d(x, weight, bias=None, stride=(1, 1), padding=(0, 0)):
    """conv(x, w) + bias per task by the compiled op (with checks); channels-last output."""
    check_direct_conv2d_inputs(x, weight, bias, stride, padding)
    _require_op(x.device)
    return torch.ops.maml_fast.direct_conv2d(x, weight, bias, list(stride), list(padding))


def direct_conv2d_weight_grad(x, grad_out, tasks: int, kernel_size, stride=(1, 1), padding=(0, 0)):
    """The gradient ``[T, O, C, kh, kw]`` of ``<grad_out, conv(x, w)>`` with respect to w, by the
    compiled op (with checks)."""
    check_direct_conv2d_weight_grad_inputs(x, grad_out, tasks, kernel_size, stride, padding)
    _require_op(x.device)
    return torch.ops.maml_fast.direct_conv2d_weight_grad(
        x, grad_out, tasks, list(kernel_size), list(stride), list(padding))


# ---------------------------------------------------------------------------- fake (meta) kernels
if _OPS.registered:

    @torch.library.register_fake("maml_fast::direct_conv2d")
    def _direct_conv2d_fake(x, weight, bias, stride, padding):
        tasks, out_ch = weight.shape[:2]
        out_hw = ConvGeometry(tasks, tuple(stride), tuple(padding), tuple(x.shape[2:]), tuple(weight.shape[3:])).output_hw()
        return torch.empty((x.shape[0], tasks * out_ch, *out_hw), dtype=x.dtype, device=x.device,
                           memory_format=torch.channels_last)

    @torch.library.register_fake("maml_fast::direct_conv2d_weight_grad")
    def _direct_conv2d_weight_grad_fake(x, grad_out, tasks, kernel_size, stride, padding):
        in_ch, out_ch = x.shape[1] // tasks, grad_out.shape[1] // tasks
        return x.new_empty((tasks, in_ch, *kernel_size, out_ch)).permute(0, 4, 1, 2, 3)


# ---------------------------------------------------------------- autograd of the ops called directly
# The ops are convolution primitives; `maml_fast.ops.conv2d`'s autograd Functions differentiate a
# convolution into convolutions again, to every order. Registered on the operators, the same
# derivatives make torch.ops.maml_fast.direct_conv2d{,_weight_grad} called directly differentiable to
# every order: y = conv(x, w) + b gives gx = dgrad(gy, w), gw = wgrad(x, gy), gb = sum(gy); the weight
# gradient gw = wgrad(x, g) is bilinear: gx = dgrad(g, ggw), g_g = conv(x, ggw). They run on the fused
# backend's convolution primitives (the direct ops again where those were measured faster).
if _OPS.registered:

    def _primitives():
        from maml_fast.backends.fused import FUSED  # (the backends import this module)
        return FUSED.conv

    def _geometry_of(tasks, stride, padding, input_hw, kernel_hw) -> ConvGeometry:
        """The geometry in plain ints (symbolic sizes while tracing are specialised: the primitives
        check their arguments as ints)."""
        ints = lambda values: tuple(int(v) for v in values)  # noqa: E731
        return ConvGeometry(int(tasks), ints(stride), ints(padding), ints(input_hw), ints(kernel_hw))

    def _conv_setup(ctx, inputs, output):
        x, weight, bias, stride, padding = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight)
        ctx.geo = _geometry_of(weight.shape[0], stride, padding, x.shape[2:], weight.shape[3:])
        ctx.has_bias = bias is not None

    def _conv_backward(ctx, grad_out):
        if grad_out is None:
            return None, None, None, None, None
        x, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_x = conv2d_input_grad(grad_out, weight, ctx.geo, _primitives()) if needs[0] else None
        grad_w = conv2d_weight_grad(x, grad_out, ctx.geo, _primitives()) if needs[1] else None
        grad_b = (grad_out.sum(dim=(0, 2, 3)).reshape(ctx.geo.tasks, -1)
                  if ctx.has_bias and len(needs) > 2 and needs[2] else None)
        return grad_x, grad_w, grad_b, None, None

    def _weight_grad_setup(ctx, inputs, output):
        x, grad_out, tasks, kernel_size, stride, padding = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, grad_out)
        ctx.geo = _geometry_of(tasks, stride, padding, x.shape[2:], kernel_size)

    def _weight_grad_backward(ctx, grad_grad_weight):
        if grad_grad_weight is None:
            return None, None, None, None, None, None
        x, grad_out = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_grad_weight = grad_grad_weight.contiguous()
        grad_x = conv2d_input_grad(grad_out, grad_grad_weight, ctx.geo, _primitives()) if needs[0] else None
        grad_grad_out = conv2d_forward(x, grad_grad_weight, ctx.geo, _primitives()) if needs[1] else None
        return grad_x, grad_grad_out, None, None, None, None

    torch.library.register_autograd("maml_fast::direct_conv2d", _conv_backward, setup_context=_conv_setup)
    torch.library.register_autograd("maml_fast::direct_conv2d_weight_grad", _weight_grad_backward,
                                    setup_context=_weight_grad_setup)
