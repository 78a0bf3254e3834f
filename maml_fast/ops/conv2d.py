"""Task-batched 2-d convolution with per-task weights, differentiable to any order.

Layout (the "grouped" layout of every task-batched op): activations are ``[B, T*C, H, W]`` with task
t's channels in block t; weights are ``[T, O, C, kh, kw]``. On the CPU the torch implementation keeps
activations channels-last, where oneDNN's grouped convolution is 2-4x faster than contiguous NCHW.

y = conv(x, w) is bilinear, so all its derivatives are convolutions again. Three primitives —
forward, input gradient (dgrad, a transposed conv) and weight gradient (wgrad, a correlation of x
with gy) — are autograd Functions whose backwards call each other:

    forward  y  = fwd(x, w)      ->  gx = dgrad(gy, w),        gw = wgrad(x, gy)
    dgrad    gx = dgrad(g, w)    ->  gg = fwd(ggx, w),          gw = wgrad(ggx, g)
    wgrad    gw = wgrad(x, g)    ->  gx = dgrad(g, ggw),        gg = fwd(x, ggw)

This replaces PyTorch's grouped-convolution double backward, which loops over the T groups.
Every function takes the ``primitives`` to run on: an object with the three methods (`TORCH_CONV`, the
default, or a backend's, see `maml_fast.backends`). Its forward may take ``bias=`` (it then sets
``fuses_bias``: `conv2d` with a bias is one call); one whose forward also takes ``relu=`` and that has
``forward_with_stats`` sets ``fuses_epilogue``: `conv2d_relu` and `conv2d_with_batch_stats` then run as
one kernel each too (`_ConvEpilogue`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ConvGeometry:
    tasks: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    input_hw: tuple[int, int]
    kernel_hw: tuple[int, int]

    def output_hw(self) -> tuple[int, int]:
        return tuple(
            (size + 2 * pad - k) // s + 1
            for size, pad, k, s in zip(self.input_hw, self.padding, self.kernel_hw, self.stride)
        )

    def output_padding(self) -> tuple[int, int]:
        """Rows/cols the transposed conv must add to give back exactly input_hw (stride > 1 loses them)."""
        return tuple(
            size - ((out - 1) * s - 2 * pad + k)
            for size, out, pad, k, s in zip(self.input_hw, self.output_hw(), self.padding, self.kernel_hw, self.stride)
        )


def _by_task(call, tasks: int, per_task: bool, out_dim: int, operands):
    """``call(*tensors, groups=tasks)`` on the grouped tensors, or (`per_task`) one ``groups=1`` call per
    task on each operand's block t, the results concatenated along `out_dim`. An operand is ``(tensor,
    dim)``: its tasks are `tasks` equal blocks along `dim`; or ``(tensor, None)``: a ``[T, n, ...]``
    parameter, passed whole as ``[T*n, ...]`` and per task as ``tensor[t]``, read where it lies (θ
    expanded over the tasks needs no per-task copy)."""
    if not per_task:
        return call(*(tensor if dim is not None else tensor.flatten(0, 1) for tensor, dim in operands),
                    groups=tasks)
    blocks = [tensor.chunk(tasks, dim) if dim is not None else tensor.unbind(0) for tensor, dim in operands]
    return torch.cat([call(*(b[t] for b in blocks), groups=1) for t in range(tasks)], dim=out_dim)


def _expanded_over_tasks(weight: torch.Tensor) -> bool:
    """Whether the ``[T, ...]`` weight is one tensor expanded over T > 1 tasks (stride 0): θ at MAML's first
    inner step."""
    return weight.shape[0] > 1 and weight.stride(0) == 0


def _tasks_as_depth(t: torch.Tensor, tasks: int) -> torch.Tensor:
    """A channels-last ``[B, T*C, H, W]`` as the channels-last-3d ``[B, C, H, W, T]`` (a view: both are
    laid out as B, H, W, T, C), for a convolution shared by the tasks with kernel size 1 along T."""
    batch, channels, height, width = t.shape
    return t.view(batch, tasks, channels // tasks, height, width).permute(0, 2, 3, 4, 1)


def _tasks_from_depth(t: torch.Tensor) -> torch.Tensor:
    """The inverse of `_tasks_as_depth`: ``[B, C, H, W, T]`` as the channels-last ``[B, T*C, H, W]``: a view
    of a channels-last-3d t (oneDNN's output), else one copy into that layout (PyTorch's 1x1x1 conv3d on one
    thread returns a contiguous output; the BatchNorm after it needs the channels-last view)."""
    batch, channels, height, width, tasks = t.shape
    t = t.contiguous(memory_format=torch.channels_last_3d)
    return t.permute(0, 4, 1, 2, 3).reshape(batch, tasks * channels, height, width)


class SharedWeightPrimitives:
    """The three primitives of one weight θ ``[O, C, kh, kw]`` that every task shares, each one dense
    convolution over all the tasks, the tasks a depth dimension of kernel size 1 (`_tasks_as_depth`, a
    view of channels-last activations): the weight gradient comes out summed over the tasks. Through
    `conv2d_forward` and its siblings they are differentiable to any order, the double backward's weight
    gradients being oneDNN's too (PyTorch's double backward of ``conv3d`` computes them as convolutions
    with batch and channels swapped, several times slower)."""

    @staticmethod
    def prepare_weight(theta: torch.Tensor) -> torch.Tensor:
        """θ channels-last on the CPU (oneDNN's dense convolutions are up to 2.7x slower with a contiguous
        weight, benchmarks/RESULTS.md), contiguous elsewhere."""
        layout = torch.channels_last if theta.device.type == "cpu" else torch.contiguous_format
        return theta.contiguous(memory_format=layout)

    @staticmethod
    def _as_depth(t: torch.Tensor, tasks: int) -> torch.Tensor:
        return _tasks_as_depth(t.contiguous(memory_format=torch.channels_last), tasks)

    def forward(self, x, theta, geo: ConvGeometry, bias=None):
        """Every task's block of x convolved with θ, plus the one ``bias [O]``."""
        return _tasks_from_depth(F.conv3d(self._as_depth(x, geo.tasks), theta.unsqueeze(-1), bias,
                                          stride=(*geo.stride, 1), padding=(*geo.padding, 0)))

    def input_grad(self, grad_out, theta, geo: ConvGeometry):
        return _tasks_from_depth(F.conv_transpose3d(
            self._as_depth(grad_out, geo.tasks), theta.unsqueeze(-1), stride=(*geo.stride, 1),
            padding=(*geo.padding, 0), output_padding=(*geo.output_padding(), 0)))

    def weight_grad(self, x, grad_out, geo: ConvGeometry):
        """``[O, C, kh, kw]``, summed over the tasks (channels-last where oneDNN computes it)."""
        out_ch, in_ch = grad_out.shape[1] // geo.tasks, x.shape[1] // geo.tasks
        layout = torch.channels_last_3d if x.device.type == "cpu" else torch.contiguous_format
        weight_shape = torch.empty((out_ch, in_ch, *geo.kernel_hw, 1), dtype=x.dtype, device=x.device,
                                   memory_format=layout)
        return torch.ops.aten.convolution_backward(
            self._as_depth(grad_out, geo.tasks), self._as_depth(x, geo.tasks), weight_shape, None,
            [*geo.stride, 1], [*geo.padding, 0], [1, 1, 1], False, [0, 0, 0], 1, [False, True, False])[1].squeeze(-1)


SHARED_WEIGHT = SharedWeightPrimitives()


def shared_conv2d(x: torch.Tensor, theta: torch.Tensor, tasks: int, stride, padding) -> torch.Tensor:
    """The convolution of every task's block of ``x [B, T*C, H, W]`` with the one weight ``theta [O, C, kh,
    kw]`` (`SharedWeightPrimitives`), differentiable to any order; θ's gradient is summed over the tasks."""
    geo = ConvGeometry(tasks, _pair(stride, "stride"), _pair(padding, "padding"), tuple(x.shape[2:]),
                       tuple(theta.shape[2:]))
    return conv2d_forward(x, SHARED_WEIGHT.prepare_weight(theta), geo, SHARED_WEIGHT)


class TorchConvPrimitives:
    """The three primitives as single grouped cuDNN/oneDNN calls (groups = T), except on the CPU for wide
    layers (`per_task`): one dense call per task there, and for a weight shared by the tasks
    (`shares_weight`): one dense call for all of them. Only activations are made channels-last: oneDNN
    then picks its channels-last kernels and reorders the (small) weights itself."""

    #: On the CPU, a layer whose channels per task multiply to at least this runs as one dense convolution
    #: per task: oneDNN's grouped convolution is slower there (up to 2x at 640 channels; benchmarks/RESULTS.md).
    per_task_min_channels = 256 * 256
    #: On the CPU, a layer whose channels per task multiply to at least this runs the convolutions of a
    #: weight shared by the tasks as one dense convolution: faster than the grouped and the per-task calls
    #: there, slower at 32 x 32 channels (benchmarks/RESULTS.md).
    shared_min_channels = 64 * 64
    #: A wide (`per_task`) layer whose output maps have at most this many pixels computes its weight
    #: gradient as one batched matrix product (benchmarks/RESULTS.md).
    gemm_weight_grad_max_pixels = 16
    #: A wide (`per_task`) layer keeps its inner-loop updates factored (`maml_fast.ops.low_rank_conv`) when
    #: the rank they reach, support pixels per task x inner steps, is at most this fraction of the
    #: weight's smaller side (benchmarks/RESULTS.md).
    low_rank_max_fraction = 1.0

    def per_task(self, t: torch.Tensor, in_ch: int, out_ch: int) -> bool:
        return t.device.type == "cpu" and in_ch * out_ch >= self.per_task_min_channels

    def factors_updates(self, x: torch.Tensor, geo: ConvGeometry, out_ch: int, steps: int) -> bool:
        """Whether the inner loop keeps the fast weight of a layer (input x, `out_ch` output channels per
        task) as θ and its low-rank updates over `steps` inner steps (`maml_fast.ops.low_rank_conv`)."""
        in_ch = x.shape[1] // geo.tasks
        rank = steps * x.shape[0] * math.prod(geo.output_hw())
        return (self.per_task(x, in_ch, out_ch)
                and rank <= self.low_rank_max_fraction * min(out_ch, in_ch * math.prod(geo.kernel_hw)))

    def gemm_weight_grad(self, x: torch.Tensor, in_ch: int, out_ch: int, geo: ConvGeometry) -> bool:
        """Whether the weight gradient runs as a matrix product per task (`_batched_gemm_weight_grad`): on
        the CPU, for wide layers on small maps, where the per-task convolutions' weight gradients are bound
        by writing (and copying, and concatenating) their large outputs."""
        return (self.per_task(x, in_ch, out_ch) and math.prod(geo.output_hw()) <= self.gemm_weight_grad_max_pixels)

    @staticmethod
    def _layout(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous(memory_format=torch.channels_last) if t.device.type == "cpu" else t

    def prepare_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``[T, O, C, kh, kw]`` whose 4-d view ``[T*O, C, kh, kw]`` is channels-last on the CPU
        (contiguous elsewhere): oneDNN would otherwise copy the weight in every primitive call. One
        differentiable copy, or the weight itself when it is laid out so already (the fast weights
        that the compiled update makes from channels-last weight gradients). θ expanded over the
        tasks on a layer run shared or per task takes one channels-last copy of θ, expanded again, not T
        copies."""
        if weight.device.type != "cpu":
            return weight.contiguous()
        if _expanded_over_tasks(weight) and (self.shares_weight(weight)
                                             or self.per_task(weight, weight.shape[2], weight.shape[1])):
            return _SharedChannelsLast.apply(weight)
        channels_last = weight.permute(0, 1, 3, 4, 2)
        if channels_last.is_contiguous():
            return weight
        return channels_last.contiguous().permute(0, 1, 4, 2, 3)

    def shares_weight(self, weight: torch.Tensor) -> bool:
        """Whether `weight` is one weight expanded over the tasks (θ at the first inner step: stride 0) of
        a layer with at least `shared_min_channels`, on the CPU: the tasks' convolutions with it then run
        as one dense convolution, the tasks a depth dimension of kernel size 1 (`_tasks_as_depth`). Only
        the forward and the input gradient read the weight; the weight gradient stays per task."""
        return (weight.device.type == "cpu" and _expanded_over_tasks(weight)
                and weight.shape[1] * weight.shape[2] >= self.shared_min_channels)

    def forward(self, x, weight, geo: ConvGeometry, bias=None):
        tasks, out_ch, in_ch = weight.shape[:3]
        if self.shares_weight(weight):
            shared_bias = bias is None or bias.stride(0) == 0
            y = SHARED_WEIGHT.forward(x, weight[0], geo, None if bias is None or not shared_bias else bias[0])
            return y if shared_bias else y + bias.reshape(1, -1, 1, 1)
        operands = [(self._layout(x), 1), (weight, None)]
        if bias is not None:
            operands.append((bias, None))

        def conv(x, w, b=None, *, groups):
            return F.conv2d(x, w, b, stride=geo.stride, padding=geo.padding, groups=groups)
        return _by_task(conv, tasks, self.per_task(x, in_ch, out_ch), 1, operands)

    def input_grad(self, grad_out, weight, geo: ConvGeometry):
        tasks, out_ch, in_ch = weight.shape[:3]
        if self.shares_weight(weight):
            return SHARED_WEIGHT.input_grad(grad_out, weight[0], geo)

        def dgrad(g, w, *, groups):
            return F.conv_transpose2d(g, w, stride=geo.stride, padding=geo.padding,
                                      output_padding=geo.output_padding(), groups=groups)
        return _by_task(dgrad, tasks, self.per_task(grad_out, in_ch, out_ch), 1,
                        [(self._layout(grad_out), 1), (weight, None)])

    def weight_grad(self, x, grad_out, geo: ConvGeometry):
        tasks = geo.tasks
        out_ch = grad_out.shape[1] // tasks
        in_ch = x.shape[1] // tasks
        if self.gemm_weight_grad(x, in_ch, out_ch, geo):
            return _batched_gemm_weight_grad(self._layout(x), self._layout(grad_out), geo)
        # Only the weight's shape and layout matter here: channels-last spares oneDNN a copy.
        layout = torch.channels_last if x.device.type == "cpu" else torch.contiguous_format

        def wgrad(g, x, *, groups):
            weight_shape = torch.empty((groups * out_ch, in_ch) + geo.kernel_hw, dtype=x.dtype, device=x.device,
                                       memory_format=layout)
            return torch.ops.aten.convolution_backward(
                g, x, weight_shape, None, list(geo.stride), list(geo.padding), [1, 1], False, [0, 0], groups,
                [False, True, False])[1]
        grad_weight = _by_task(wgrad, tasks, self.per_task(x, in_ch, out_ch), 0,
                               [(self._layout(grad_out), 1), (self._layout(x), 1)])
        return grad_weight.reshape(tasks, out_ch, in_ch, *geo.kernel_hw)


def _batched_gemm_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, geo: ConvGeometry) -> torch.Tensor:
    """The weight gradient ``[T, O, C, kh, kw]`` (channels-last blocks) of channels-last x and grad_out as one
    matrix product per task, ``gw[t] = gy[t]^T @ patches(x)[t]``: oneDNN's matmul per task where it applies,
    else one ``torch.bmm``. The patches are gathered from the padded x by strides (pixel-major, then kernel
    position, then channel) and copied once."""
    tasks, (kh, kw), (sh, sw), (ph, pw) = geo.tasks, geo.kernel_hw, geo.stride, geo.padding
    batch, (ho, wo) = x.shape[0], geo.output_hw()
    in_ch, out_ch = x.shape[1] // tasks, grad_out.shape[1] // tasks
    padded = F.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1).contiguous()  # [B, Hp, Wp, T*C] (a view if x is channels-last)
    sb, sy, sx, _ = padded.stride()
    patches = padded.as_strided((batch, ho, wo, kh, kw, tasks, in_ch), (sb, sy * sh, sx * sw, sy, sx, in_ch, 1))
    # (contiguous: a 1x1 kernel's reshape is a view with the tasks interleaved, where oneDNN's matmul is slow)
    patches = patches.permute(5, 0, 1, 2, 3, 4, 6).reshape(tasks, batch * ho * wo, kh * kw * in_ch).contiguous()
    grad_rows = grad_out.permute(0, 2, 3, 1).reshape(batch * ho * wo, tasks, out_ch).permute(1, 2, 0)
    if _onednn_matmul_applies(grad_rows):
        # (torch.bmm runs MKL, whose AVX-512 path AMD CPUs do not get; benchmarks/RESULTS.md)
        products = torch.stack([torch.ops.mkldnn._linear_pointwise(grad_rows[t], patches[t].t(), None, "none", [], "")
                                for t in range(tasks)])
    else:
        products = torch.bmm(grad_rows, patches)
    return products.view(tasks, out_ch, kh, kw, in_ch).permute(0, 1, 4, 2, 3)


def _onednn_matmul_applies(t: torch.Tensor) -> bool:
    """Whether oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, the op torch.compile's CPU backend
    emits) takes t: a CPU build with oneDNN, not switched off (``torch.backends.mkldnn.enabled``), and a
    dtype it computes in (no float64)."""
    return (t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


TORCH_CONV = TorchConvPrimitives()


class _SharedChannelsLast(torch.autograd.Function):
    """A ``[T, O, C, kh, kw]`` weight expanded over the tasks (stride 0), expanded from one channels-last
    copy of its block instead (oneDNN's dense convolutions are up to 2.7x slower with a contiguous
    weight, benchmarks/RESULTS.md). The values are the same, so the gradient passes through unchanged,
    to every order."""

    @staticmethod
    def forward(ctx, weight):
        return weight[0].contiguous(memory_format=torch.channels_last).expand_as(weight)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ConvForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, geo, primitives):
        ctx.save_for_backward(x, weight)
        ctx.geo, ctx.primitives = geo, primitives
        return primitives.forward(x, weight, geo)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = conv2d_input_grad(grad_out, weight, ctx.geo, ctx.primitives)
        if ctx.needs_input_grad[1]:
            grad_w = conv2d_weight_grad(x, grad_out, ctx.geo, ctx.primitives)
        return grad_x, grad_w, None, None


class _ConvInputGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad_out, weight, geo, primitives):
        ctx.save_for_backward(grad_out, weight)
        ctx.geo, ctx.primitives = geo, primitives
        return primitives.input_grad(grad_out, weight, geo)

    @staticmethod
    def backward(ctx, grad_grad_x):
        grad_out, weight = ctx.saved_tensors
        grad_grad_out = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_grad_out = conv2d_forward(grad_grad_x, weight, ctx.geo, ctx.primitives)
        if ctx.needs_input_grad[1]:
            grad_w = conv2d_weight_grad(grad_grad_x, grad_out, ctx.geo, ctx.primitives)
        return grad_grad_out, grad_w, None, None


class _ConvWeightGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, grad_out, geo, primitives):
        ctx.save_for_backward(x, grad_out)
        ctx.geo, ctx.primitives = geo, primitives
        return primitives.weight_grad(x, grad_out, geo)

    @staticmethod
    def backward(ctx, grad_grad_w):
        x, grad_out = ctx.saved_tensors
        grad_x = grad_grad_out = None
        grad_grad_w = _prepared_weight(grad_grad_w, ctx.primitives)
        if ctx.needs_input_grad[0]:
            grad_x = conv2d_input_grad(grad_out, grad_grad_w, ctx.geo, ctx.primitives)
        if ctx.needs_input_grad[1]:
            grad_grad_out = conv2d_forward(x, grad_grad_w, ctx.geo, ctx.primitives)
        return grad_x, grad_grad_out, None, None


class _ConvEpilogue(torch.autograd.Function):
    """y = conv(x, w) + b, optionally relu'd, and optionally with y's per-channel batch statistics
    (mean and biased variance over batch and pixels, ``[T*O]`` each), all from one forward kernel: for
    a backend whose forward fuses the epilogue (``fuses_epilogue``; the bias alone: ``fuses_bias``).

    The backward reduces to the conv's: the statistics' gradients are broadcast into gy
    (``gy + (g_mean + 2 (y - mean) g_var) / N``, N values per channel), the ReLU masks it by ``y > 0``
    (piecewise constant), and then dgrad, wgrad and a sum give gx, gw, gb. All of it is differentiable
    torch ops and primitives on the saved outputs y and mean, so every order of derivative exists."""

    @staticmethod
    def forward(ctx, x, weight, bias, geo, primitives, relu, with_stats):
        impl = primitives
        if with_stats:
            outputs = impl.forward_with_stats(x, weight, geo, bias=bias, relu=relu)
            y, mean = outputs[0], outputs[1]
        else:
            # relu= only when asked: a forward that fuses just the bias takes no relu argument.
            outputs = y = impl.forward(x, weight, geo, bias=bias, **({"relu": True} if relu else {}))
            mean = None
        ctx.save_for_backward(x, weight, y if relu or with_stats else None, mean)
        ctx.geo, ctx.primitives, ctx.relu, ctx.with_stats = geo, primitives, relu, with_stats
        return outputs

    @staticmethod
    def backward(ctx, grad_out, *grad_stats):
        x, weight, y, mean = ctx.saved_tensors
        if ctx.with_stats:
            count = y.numel() // y.shape[1]
            grad_mean, grad_var = (g.reshape(1, -1, 1, 1) for g in grad_stats)
            centred = y.to(mean.dtype) - mean.reshape(1, -1, 1, 1)
            grad_out = grad_out + ((grad_mean + 2 * centred * grad_var) / count).to(grad_out.dtype)
        if ctx.relu:
            grad_out = grad_out * (y > 0)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = conv2d_input_grad(grad_out, weight, ctx.geo, ctx.primitives)
        if ctx.needs_input_grad[1]:
            grad_w = conv2d_weight_grad(x, grad_out, ctx.geo, ctx.primitives)
        if ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(dim=(0, 2, 3)).reshape(ctx.geo.tasks, -1)
        return grad_x, grad_w, grad_b, None, None, None, None


def _prepared_weight(weight, primitives):
    prepare = getattr(primitives, "prepare_weight", torch.Tensor.contiguous)
    return prepare(weight)


def conv2d_forward(x, weight, geo: ConvGeometry, primitives):
    return _ConvForward.apply(x, weight, geo, primitives)


def conv2d_input_grad(grad_out, weight, geo: ConvGeometry, primitives):
    return _ConvInputGrad.apply(grad_out, weight, geo, primitives)


def conv2d_weight_grad(x, grad_out, geo: ConvGeometry, primitives):
    return _ConvWeightGrad.apply(x, grad_out, geo, primitives)


def _pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


def _fuses_epilogue(primitives) -> bool:
    """Whether the forward kernel of `primitives` adds the bias, applies a ReLU and computes BatchNorm's batch
    statistics in its epilogue (the Triton kernels do; see `_ConvEpilogue`)."""
    return getattr(primitives, "fuses_epilogue", False)


def _fuses_bias(primitives) -> bool:
    """Whether the forward of `primitives` takes the bias (added in the conv kernel, not by another pass)."""
    return getattr(primitives, "fuses_bias", False) or _fuses_epilogue(primitives)


def _prepare(x, weight, bias, stride, padding, primitives):
    """Checked arguments: (weight in the backend's preferred layout, geometry)."""
    if weight.dim() != 5:
        raise ValueError(f"weight must have shape [tasks, out, in, kh, kw], got {tuple(weight.shape)}")
    tasks, out_ch, in_ch, kh, kw = weight.shape
    if x.dim() != 4 or x.shape[1] != tasks * in_ch:
        raise ValueError(
            f"x must have shape [batch, tasks*in_channels={tasks * in_ch}, H, W] for weight "
            f"{tuple(weight.shape)}, got {tuple(x.shape)}"
        )
    if bias is not None and bias.shape != (tasks, out_ch):
        raise ValueError(f"bias must have shape {(tasks, out_ch)}, got {tuple(bias.shape)}")
    geo = ConvGeometry(tasks, _pair(stride, "stride"), _pair(padding, "padding"), tuple(x.shape[2:]), (kh, kw))
    if min(geo.output_hw()) < 1:
        raise ValueError(f"x's spatial size {tuple(x.shape[2:])} is too small for kernel {(kh, kw)} with padding {padding}")
    # θ expanded over the tasks (stride 0) would be copied by every primitive that reads it; one
    # differentiable copy in the implementation's preferred layout serves the forward and all
    # derivatives that save it.
    return _prepared_weight(weight, primitives), geo


def conv2d(x, weight, bias=None, stride=1, padding=0, primitives=TORCH_CONV):
    """Per-task conv2d: x ``[B, T*C, H, W]``, weight ``[T, O, C, kh, kw]``, bias ``[T, O]`` or None."""
    weight, geo = _prepare(x, weight, bias, stride, padding, primitives)
    if bias is not None and _fuses_bias(primitives):
        return _ConvEpilogue.apply(x, weight, bias, geo, primitives, False, False)
    y = conv2d_forward(x, weight, geo, primitives)
    if bias is not None:
        y = y + bias.reshape(1, -1, 1, 1)
    return y


def conv2d_relu(x, weight, bias=None, stride=1, padding=0, primitives=TORCH_CONV):
    """``relu(conv2d(x, weight, bias))``, one kernel where the backend fuses the epilogue."""
    if _fuses_epilogue(primitives):
        weight, geo = _prepare(x, weight, bias, stride, padding, primitives)
        return _ConvEpilogue.apply(x, weight, bias, geo, primitives, True, False)
    return torch.relu(conv2d(x, weight, bias, stride, padding, primitives))


def conv2d_with_batch_stats(x, weight, bias=None, stride=1, padding=0, primitives=TORCH_CONV):
    """``(y, mean, var)``: y = conv2d(x, weight, bias) and its per-channel mean and biased variance over
    batch and pixels (``[T*O]``; fp32 for fp16/bf16/fp32, fp64 for fp64), the input of
    `maml_fast.ops.norm.batch_norm_from_statistics`. Where the backend fuses the epilogue, the
    statistics come out of the conv kernel and y is not read again; all three outputs are
    differentiable to any order."""
    if _fuses_epilogue(primitives):
        weight, geo = _prepare(x, weight, bias, stride, padding, primitives)
        return _ConvEpilogue.apply(x, weight, bias, geo, primitives, False, True)
    return with_batch_stats(conv2d(x, weight, bias, stride, padding, primitives))


def with_batch_stats(y):
    """y with its per-channel mean and biased variance over batch and pixels, by torch reductions
    (two-pass; in fp32 for half-precision y)."""
    wide = y if y.dtype == torch.float64 else y.float()
    mean = wide.mean(dim=(0, 2, 3))
    centred = wide - mean.reshape(1, -1, 1, 1)
    return y, mean, (centred * centred).mean(dim=(0, 2, 3))


def conv2d_reference(x, weight, bias=None, stride=1, padding=0):
    """The definition: one plain F.conv2d per task (a Python loop; tests and the loop backend's peer)."""
    tasks, _, in_ch = weight.shape[:3]
    outputs = [
        F.conv2d(x[:, t * in_ch:(t + 1) * in_ch], weight[t], None if bias is None else bias[t], stride, padding)
        for t in range(tasks)
    ]
    return torch.cat(outputs, dim=1)
