"""Backend "fused" (alias "cuda"): the task-batched program with the compiled operators of
`maml_fast._C`, C++ on the CPU and CUDA C++ on a GPU. Where an op's inputs do not fit its kernel (dtype,
layout), the same function runs as PyTorch ops.

What it runs, beyond the "torch" backend's program:

- BatchNorm with batch statistics, followed by ReLU or LeakyReLU (slope >= 0) or by neither: one
  ``maml_fast::batch_norm_relu`` op with closed-form backward and double backward
  (`maml_fast.ops.batch_norm_relu`; alone, with the identity as its activation); followed by ReLU and
  ``MaxPool2d(2)``: one ``maml_fast::batch_norm_relu_max_pool`` op (`maml_fast.ops.batch_norm_relu_pool`)
  (`fuse_batch_norm_relu`, its fusion rule);
- the per-task cross-entropy (with accuracy) and MSE: ``maml_fast::cross_entropy_per_task`` /
  ``mse_per_task`` (`maml_fast.ops.losses.FUSED_LOSSES`);
- the fast-weight update of all parameters in one ``maml_fast::fast_weight_update`` call;
- linear layers: torch.bmm / baddbmm writing the product straight into the grouped layout, in every
  derivative order (`maml_fast.ops.linear.TorchBatchedMatmul`); the classifier head
  ``AdaptiveAvgPool2d(1) -> Flatten -> Linear``: one ``maml_fast::pooled_linear`` op with compiled
  backward and double backward (`maml_fast.ops.pooled_linear`, `fuse_pooled_linear`, its fusion rule);
- convolutions: PyTorch's grouped convolutions with channels-last activations on every device (so that
  the BatchNorm input is a free ``[rows, channels]`` view) and the bias added by the convolution; the
  first layer's forward and weight gradient on the direct ops ``maml_fast::direct_conv2d{,_weight_grad}``
  (`maml_fast.ops.direct_conv`) for the shapes and devices where they were measured faster
  (`uses_direct_conv`; benchmarks/RESULTS.md); on a GPU, each primitive on the Triton kernels where
  `conv_choice`'s measured table says they were faster there (none measured yet: cuDNN everywhere).

``"auto"`` prefers it on the CPU, where it was measured faster than "torch" (benchmarks/RESULTS.md). On a
GPU "auto" stays on "torch" until the CUDA kernels' test run has passed there.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops import batch_norm_relu as bn_relu_ops
from ..ops import batch_norm_relu_pool as bn_relu_pool_ops
from ..ops import conv2d as conv_ops
from ..ops import direct_conv as direct_ops
from ..ops.fast_weight_update import fast_weight_update
from ..ops import linear as linear_ops
from ..ops import pooled_linear as pooled_linear_ops
from ..ops.linear import TorchBatchedMatmul
from ..ops.losses import FUSED_LOSSES
from . import conv_choice
from .base import ProgramBackend
from .triton import TritonConvPrimitives

#: Per primitive, the most input channels per task for which the direct ops run a convolution (a first
#: layer's input gradient is not needed by MAML), and the device types where they do: the shape
#: classes and devices where they were measured faster than oneDNN/cuDNN (benchmarks/RESULTS.md).
DIRECT_CONV_MAX_IN_CHANNELS = {"forward": 1, "weight_grad": 3}
DIRECT_CONV_DEVICE_TYPES = ("cpu",)


def uses_direct_conv(primitive: str, x: torch.Tensor, in_channels: int) -> bool:
    """Whether `primitive` ("forward" or "weight_grad") of a conv with `in_channels` input channels per
    task runs on x by the direct ops: a measured-faster shape class and device, a supported dtype, and
    the ops available there."""
    return (in_channels <= DIRECT_CONV_MAX_IN_CHANNELS[primitive] and x.device.type in DIRECT_CONV_DEVICE_TYPES
            and x.dtype in direct_ops.SUPPORTED_DTYPES and direct_ops.is_available(x.device))


class ChannelsLastConvPrimitives(conv_ops.TorchConvPrimitives):
    """PyTorch's grouped convolutions with channels-last activations on every device (the torch
    primitives keep them channels-last on the CPU only), the bias fused into the forward, the direct ops
    for layers with few input channels (`uses_direct_conv`), and the Triton kernels (channels-last
    outputs) for the primitives and shapes where they were measured faster on this GPU (`conv_choice`)."""

    fuses_bias = True
    triton = TritonConvPrimitives(torch.channels_last)

    @staticmethod
    def _layout(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous(memory_format=torch.channels_last)

    def prepare_weight(self, weight):
        # The direct ops read any weight layout (as [T, C, kh, kw, O], that of their own weight gradient,
        # so the fast weights the update makes from it need no copy): oneDNN's layout would be a copy.
        if uses_direct_conv("forward", weight, weight.shape[2]):
            return weight
        return super().prepare_weight(weight)

    def forward(self, x, weight, geo: conv_ops.ConvGeometry, bias=None):
        if conv_choice.implementation("forward", x, weight.shape[2], weight.shape[1], geo) == "triton":
            return self.triton.forward(x, weight, geo, bias=bias)
        if uses_direct_conv("forward", x, weight.shape[2]):
            return direct_ops.direct_conv2d(x, weight, bias, geo.stride, geo.padding)
        return super().forward(x, weight, geo, bias=bias)

    def input_grad(self, grad_out, weight, geo: conv_ops.ConvGeometry):
        if conv_choice.implementation("input_grad", grad_out, weight.shape[2], weight.shape[1], geo) == "triton":
            return self.triton.input_grad(grad_out, weight, geo)
        return super().input_grad(grad_out, weight, geo)

    def weight_grad(self, x, grad_out, geo: conv_ops.ConvGeometry):
        in_channels, out_channels = x.shape[1] // geo.tasks, grad_out.shape[1] // geo.tasks
        if conv_choice.implementation("weight_grad", x, in_channels, out_channels, geo) == "triton":
            return self.triton.weight_grad(x, grad_out, geo)
        if uses_direct_conv("weight_grad", x, in_channels):
            return direct_ops.direct_conv2d_weight_grad(x, grad_out, geo.tasks, geo.kernel_hw, geo.stride,
                                                        geo.padding)
        return super().weight_grad(x, grad_out, geo)


def _is_max_pool_2x2(module: nn.Module | None) -> bool:
    """Exactly nn.MaxPool2d(2) (stride 2, no padding, dilation 1, floor mode, no indices): the pool the
    fused BatchNorm+ReLU+max-pool op computes."""
    pair = lambda value: value if isinstance(value, tuple) else (value, value)  # noqa: E731
    return (type(module) is nn.MaxPool2d and pair(module.kernel_size) == (2, 2) and pair(module.stride) == (2, 2)
            and pair(module.padding) == (0, 0) and pair(module.dilation) == (1, 1) and not module.ceil_mode
            and not module.return_indices)


def _negative_slope(module: nn.Module | None) -> float | None:
    """The negative slope of a ReLU (0) or of a LeakyReLU whose slope the fused op takes (finite, >= 0: its
    derivative is read off y > 0); None for any other module."""
    if type(module) is nn.ReLU:
        return 0.0
    if type(module) is nn.LeakyReLU and 0 <= module.negative_slope < float("inf"):
        return float(module.negative_slope)
    return None


def fuse_batch_norm_relu(children, prefix: str, backend):
    """This backend's fusion rule: a BatchNorm with batch statistics directly followed by a ReLU or a
    LeakyReLU of slope >= 0 (and then, after a ReLU, optionally a 2x2 max-pool), siblings in one
    nn.Sequential or one chain of a traced model, as one fused op with closed-form derivatives; followed by
    anything else, the BatchNorm alone as the same op with the identity as its activation. With MAML++
    per-step running statistics (evaluation) the same layers run unfused."""
    from .. import program

    name, norm = children[0]
    if not program.is_batch_norm_with_batch_statistics(norm):
        return None
    slope = _negative_slope(children[1][1]) if len(children) > 1 else None
    layers = 2
    if slope is None:
        slope, layers = bn_relu_ops.IDENTITY_SLOPE, 1
    max_pool = slope == 0 and len(children) > 2 and _is_max_pool_2x2(children[2][1])
    norm_prefix = f"{prefix}{name}."
    weight = lambda params: program.parameter(params, norm_prefix, "weight", norm)  # noqa: E731
    bias = lambda params: program.parameter(params, norm_prefix, "bias", norm)  # noqa: E731

    def run(x, params, tasks):
        if norm_prefix + "running_mean" in params:
            y = bn_relu_ops.activation(program.batch_norm_with_statistics(x, params, norm_prefix, norm), slope)
            return nn.functional.max_pool2d(y, 2) if max_pool else y
        if max_pool:
            return bn_relu_pool_ops.batch_norm_relu_max_pool(x, weight(params), bias(params), tasks, norm.eps)
        return bn_relu_ops.batch_norm_relu(x, weight(params), bias(params), tasks, norm.eps, slope)
    return run, 3 if max_pool else layers


def fuse_pooled_linear(children, prefix: str, backend):
    """This backend's fusion rule for the classifier head ``AdaptiveAvgPool2d(1) -> Flatten() -> Linear``
    (siblings in one nn.Sequential): one ``maml_fast::pooled_linear`` op with its compiled derivatives
    (`maml_fast.ops.pooled_linear`), or the three layers where the op does not fit the inputs."""
    from .. import program

    kinds = [type(module) for _, module in children[:3]]
    if kinds != [nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear]:
        return None
    pool, flatten = children[0][1], children[1][1]
    if pool.output_size not in (1, (1, 1)) or (flatten.start_dim, flatten.end_dim) != (1, -1):
        return None
    name, head = children[2]
    weight_name, bias_name = f"{prefix}{name}.weight", f"{prefix}{name}.bias"

    def run(x, params, tasks):
        weight, bias = params[weight_name], params.get(bias_name) if head.bias is not None else None
        if x.dim() == 4 and pooled_linear_ops.fits(x, weight, bias):
            return pooled_linear_ops.pooled_linear(x, weight, bias)
        features = program.global_mean_pool(x).reshape(x.shape[0], -1)
        return linear_ops.linear(features, weight, bias, backend.matmul)
    return run, 3


class FusedBackend(ProgramBackend):
    name = "fused"
    aliases = ("cuda",)
    summary = "the task-batched program on the compiled C++ (CPU) and CUDA C++ (GPU) ops of maml_fast._C"
    auto_rank = {"cpu": 10}
    conv = ChannelsLastConvPrimitives()
    matmul = TorchBatchedMatmul()
    fusion_rules = (fuse_batch_norm_relu, fuse_pooled_linear)
    losses = FUSED_LOSSES

    def unavailable_reasons(self, device):
        return bn_relu_ops.unavailable_reasons(device)

    def fast_weight_update(self, params, grads, lrs):
        return fast_weight_update(params, grads, lrs)


FUSED = FusedBackend()

__all__ = ["FUSED", "FusedBackend", "ChannelsLastConvPrimitives", "uses_direct_conv", "fuse_batch_norm_relu",
           "fuse_pooled_linear",
           "DIRECT_CONV_MAX_IN_CHANNELS", "DIRECT_CONV_DEVICE_TYPES"]
