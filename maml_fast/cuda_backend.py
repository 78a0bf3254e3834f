"""The "cuda" backend: the compiled C++/CUDA kernels of `maml_fast._C`, and where they replace torch ops.

Backend ``"cuda"`` runs the task-batched program with the extension's fused operators wherever the
extension has kernels for the device (CUDA kernels on a GPU; the C++ kernels on the CPU, so the
backend can be exercised on any machine), and PyTorch ops elsewhere:

- BatchNorm (``track_running_stats=False``) followed by ReLU lowers to one
  ``maml_fast::batch_norm_relu`` op with closed-form backward and double backward
  (`maml_fast.ops.batch_norm_relu`), and followed by ReLU and ``MaxPool2d(2)`` to one
  ``maml_fast::batch_norm_relu_max_pool`` op (`maml_fast.ops.batch_norm_relu_pool`);
- the per-task cross-entropy (with accuracy) and MSE losses run as ``maml_fast::cross_entropy_per_task``
  / ``maml_fast::mse_per_task`` (`maml_fast.ops.losses`);
- the fast-weight update of all parameters is one ``maml_fast::fast_weight_update`` call;
- convolutions use PyTorch's grouped convolution with channels-last activations on every device, so
  that the BatchNorm input is a free ``[rows, channels]`` view, with the bias added by the
  convolution itself; layers with few input channels (the first layer) run their forward and
  weight gradient on the direct ops ``maml_fast::direct_conv2d{,_weight_grad}``
  (`maml_fast.ops.direct_conv`) where those were measured faster (`uses_direct_conv`). Another
  module may register faster conv primitives under ``CONV_IMPLEMENTATIONS["cuda"]``; this one only
  fills the slot if empty.

``"auto"`` picks this backend on the CPU when the extension is built: there the fused op makes the
whole meta-step faster (`CPU_OPS_MEASUREMENT`). On a GPU "auto" stays on "torch": the first H100 run
measured this backend 1.29x (Omniglot) and 1.32x (MiniImageNet) faster than "torch", but the CUDA
kernels' test run there did not complete (benchmarks/RESULTS.md). ``"torch"`` itself stays pure PyTorch.

Availability is reported as reasons (`maml_fast._extension.extension_unavailable_reasons`), never by
catching a failed launch.
"""
from __future__ import annotations

import torch

from . import backends
from .ops import batch_norm_relu as _bn_relu
from .ops import conv2d as _conv
from .ops import direct_conv as _direct

BACKEND = "cuda"

#: Why "auto" prefers this backend on the CPU: one second-order meta-step, pure-PyTorch program
#: ("torch") vs this backend, median of rounds interleaved in one process
#: (``python -m benchmarks.bench_table``), quiet 2-core AMD EPYC (Zen 4) VM, torch 2.14.1, float32,
#: commit 635de00: omniglot_5w1s (conv4, T=32) 162.4 -> 129.1 ms (1.26x); miniimagenet_5w1s (T=4, 5
#: inner steps, 75 queries) 2377 -> 1119 ms (2.12x). Convolutions (oneDNN, the same in both) are most of
#: what is left of the Omniglot step. See benchmarks/RESULTS.md.
CPU_OPS_MEASUREMENT = "1.26x (omniglot_5w1s) and 2.12x (miniimagenet_5w1s) faster meta-step on a 2-core Zen 4"


def unavailable_reasons(device: torch.device | str) -> list[str]:
    """Why backend "cuda" cannot run on `device` (empty when it can)."""
    return _bn_relu.unavailable_reasons(device)


def may_use_extension_ops(backend: str) -> bool:
    """Whether programs lowered for `backend` should contain the fused extension ops (each op still
    checks the device it meets at run time, see `uses_extension_ops`)."""
    return backend == BACKEND


def uses_extension_ops(backend: str, device: torch.device | str) -> bool:
    """Whether a program lowered for `backend` with the fused ops (`may_use_extension_ops`) runs them
    on `device`: wherever the extension has kernels for it."""
    return backend == BACKEND and _bn_relu.is_available(torch.device(device))


#: Per primitive, the most input channels per task for which the direct conv ops run it (the input
#: gradient of a first layer is not needed by MAML and stays oneDNN/cuDNN): the shape classes where
#: they were measured faster (`DIRECT_CONV_MEASUREMENT`).
DIRECT_CONV_MAX_IN_CHANNELS = {"forward": 1, "weight_grad": 3}
#: Device types on which the direct ops were measured faster than oneDNN/cuDNN.
DIRECT_CONV_DEVICE_TYPES = ("cpu",)

#: Why the direct ops run the first layer on the CPU. Op level, one process, alternating rounds,
#: fastest of 40 (5 for B=75), 1 thread (2-thread timings were swamped by other agents' load), on
#: the shared 2-core AMD EPYC (Zen 4) VM, torch 2.14.1, float32, 3x3 kernel, pad 1, NCHW input
#: images (the oneDNN time includes its channels-last copy of them), oneDNN -> direct:
#:   Omniglot x [5, 32*1, 28, 28], O=64, stride 2:  forward 1.59 -> 0.64 ms, weight grad 1.76 -> 0.73 ms
#:   MiniImageNet x [5, 4*3, 84, 84], O=32, stride 1: forward 3.01 -> 3.27 ms, weight grad 5.71 -> 3.58 ms
#:   MiniImageNet x [75, 4*3, 84, 84], O=32, stride 1: forward 168 -> 167 ms, weight grad 86 -> 60 ms
#: So the direct forward is used for one input channel only (oneDNN's forward is as fast for three).
#: Meta-step (bench_table, 1 thread, fastest round): omniglot_5w1s "cuda" ~246 -> ~215-229 ms,
#: miniimagenet_5w1s ~2670 -> ~2430 ms (with the fast-weight update's copies removed as well).
#: On a GPU the CUDA kernels are not measured yet, so cuDNN keeps the first layer there.
DIRECT_CONV_MEASUREMENT = "first layer on the CPU: forward 2.5x (C=1), weight grad 1.4-2.4x (C=1, 3); see above"


def uses_direct_conv(primitive: str, x: torch.Tensor, in_channels: int) -> bool:
    """Whether the "cuda" backend runs `primitive` ("forward" or "weight_grad") of a conv with
    `in_channels` input channels per task on x by the direct ops: a shape class and device where
    they were measured faster, a dtype they support, and the ops available there."""
    return (in_channels <= DIRECT_CONV_MAX_IN_CHANNELS[primitive] and x.device.type in DIRECT_CONV_DEVICE_TYPES
            and x.dtype in _direct.SUPPORTED_DTYPES and _direct.is_available(x.device))


class ChannelsLastConvPrimitives(_conv.TorchConvPrimitives):
    """PyTorch's grouped convolutions with channels-last activations on every device (the torch
    primitives keep them channels-last on the CPU only): BatchNorm then sees a free
    ``[rows, channels]`` view on a GPU too. The bias is fused into the forward; layers with few
    input channels take the direct ops (`uses_direct_conv`)."""

    fuses_bias = True

    @staticmethod
    def _layout(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous(memory_format=torch.channels_last)

    def forward(self, x, weight, geo: _conv.ConvGeometry, bias=None):
        if uses_direct_conv("forward", x, weight.shape[2]):
            return _direct.direct_conv2d(x, weight, bias, geo.stride, geo.padding)
        return super().forward(x, weight, geo, bias=bias)

    def weight_grad(self, x, grad_out, geo: _conv.ConvGeometry):
        if uses_direct_conv("weight_grad", x, x.shape[1] // geo.tasks):
            return _direct.direct_conv2d_weight_grad(x, grad_out, geo.tasks, geo.kernel_hw, geo.stride, geo.padding)
        return super().weight_grad(x, grad_out, geo)


_conv.CONV_IMPLEMENTATIONS.setdefault(BACKEND, ChannelsLastConvPrimitives())
# Preferred by backend="auto" on the CPU (measured faster there); on a GPU "auto" stays "torch" until
# the CUDA kernels are measured.
backends.register_backend(BACKEND, unavailable_reasons, prefer_on=("cpu",))

__all__ = [
    "BACKEND",
    "unavailable_reasons",
    "may_use_extension_ops",
    "uses_extension_ops",
    "ChannelsLastConvPrimitives",
    "uses_direct_conv",
]
