"""Backend "triton": the task-batched program with its convolutions as Triton implicit-GEMM kernels
(`maml_fast.kernels.conv2d`, the repository's kernels/conv2d.py) and its linear layers' products as one
Triton batched-matmul kernel (`maml_fast.kernels.linear`); every other op (norms, pooling, losses,
update) is the "torch" backend's.

- Every derivative order of a conv or linear layer runs on the same kernels (ops/conv2d.py,
  ops/linear.py). The conv's bias is fused into the forward kernel's epilogue (``fuses_epilogue``).
- Fusion (`fuse_conv_epilogue`): a Conv2d followed by a ReLU, or by a BatchNorm2d with batch statistics,
  lowers to one conv kernel with that epilogue (bias and ReLU, or BatchNorm's batch statistics).
- Where it runs (`TritonBackend.unavailable_reasons`): CUDA devices of compute capability >= 8.0 with
  Triton >= 3.0; on the CPU only with ``TRITON_INTERPRET=1`` (Triton's interpreter: for tests, slow).
  Checking this imports neither Triton nor the kernels; they are loaded on the first conv or linear call.
- ``"auto"`` does not prefer it: on the first H100 measurement its meta-step was slower than "torch"
  (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os
import sys

import torch
from torch import nn

from ..ops import conv2d as conv_ops
from ..ops import norm as norm_ops
from .base import ProgramBackend

MIN_TRITON = (3, 0)
MIN_CAPABILITY = (8, 0)
KERNELS_PACKAGE = "maml_fast.kernels"


def interpreter_enabled() -> bool:
    """TRITON_INTERPRET as Triton reads it."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on", "y")


def _triton_version() -> tuple[int, ...] | None:
    try:
        text = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None
    return tuple(int("".join(ch for ch in piece if ch.isdigit()) or 0) for piece in text.split(".")[:2])


@functools.cache
def _installation_reasons() -> tuple[str, ...]:
    """What the installation lacks (checked once: the learner asks at every meta-step)."""
    reasons = []
    if importlib.util.find_spec("triton") is None:
        reasons.append("triton is not installed")
    else:
        version = _triton_version()
        if version is not None and version < MIN_TRITON:
            reasons.append(f"triton {'.'.join(map(str, version))} is too old (>= {'.'.join(map(str, MIN_TRITON))} needed)")
    if importlib.util.find_spec(KERNELS_PACKAGE) is None:
        reasons.append(f"the Triton kernels ({KERNELS_PACKAGE}, the repository's kernels/) are not installed: "
                       "install maml_fast with `pip install -e . --no-build-isolation`")
    return tuple(reasons)


def load_kernels():
    """The conv kernels module (imports Triton on the first call)."""
    return importlib.import_module(f"{KERNELS_PACKAGE}.conv2d")


def load_linear_kernels():
    """The batched-matmul kernel module (imports Triton on the first call)."""
    return importlib.import_module(f"{KERNELS_PACKAGE}.linear")


class TritonConvPrimitives:
    """The three conv primitives of `maml_fast.ops.conv2d` on Triton, with the bias/ReLU/BatchNorm
    statistics epilogue; loads the kernels lazily. Activations (y, gx) are allocated in `memory_format`
    (the "fused" backend's channels-last where it runs a primitive here)."""

    fuses_epilogue = True

    def __init__(self, memory_format=torch.contiguous_format):
        self.memory_format = memory_format

    def forward(self, x, weight, geo, bias=None, relu=False):
        return load_kernels().conv2d_forward(x, weight, geo.stride, geo.padding, bias=bias, relu=relu,
                                             memory_format=self.memory_format)

    def forward_with_stats(self, x, weight, geo, bias=None, relu=False):
        return load_kernels().conv2d_forward_with_stats(x, weight, geo.stride, geo.padding, bias=bias, relu=relu,
                                                        memory_format=self.memory_format)

    def input_grad(self, grad_out, weight, geo):
        return load_kernels().conv2d_input_grad(grad_out, weight, geo.input_hw, geo.stride, geo.padding,
                                                memory_format=self.memory_format)

    def weight_grad(self, x, grad_out, geo):
        return load_kernels().conv2d_weight_grad(x, grad_out, geo.kernel_hw, geo.tasks, geo.stride, geo.padding)


class TritonBatchedMatmul:
    """`maml_fast.ops.linear`'s batched product on Triton; loads the kernel lazily."""

    def matmul(self, a, b, bias, batch_major):
        return load_linear_kernels().batched_matmul(a, b, bias, batch_major)


def fuse_conv_epilogue(children, prefix: str, backend):
    """This backend's fusion rule: a Conv2d followed by

    - nn.ReLU -> `conv_ops.conv2d_relu` (bias and ReLU in the conv's epilogue);
    - nn.BatchNorm2d with batch statistics -> `conv_ops.conv2d_with_batch_stats` (y's per-channel mean
      and variance from the conv's epilogue) feeding `norm_ops.batch_norm_from_statistics`, which then
      does not read y to get them. The ReLU (and pooling) after the BatchNorm stay separate layers.

    nn.Identity layers in between are skipped (conv4 with ``norm="none"`` puts one there). A conv the
    per-layer lowering rejects is left to it, so that it reports the reason."""
    from .. import program

    name, conv = children[0]
    if type(conv) is not nn.Conv2d:
        return None
    conv_prefix = f"{prefix}{name}."
    conv_layer, reason = program.lower_conv2d(conv, conv_prefix, backend)
    if reason:
        return None
    after = 1
    while after < len(children) and type(children[after][1]) is nn.Identity:
        after += 1
    if after == len(children):
        return None
    following_name, following = children[after]
    bias = lambda params: program.parameter(params, conv_prefix, "bias", conv)  # noqa: E731

    if type(following) is nn.ReLU:
        def conv_relu(x, params, tasks):
            return conv_ops.conv2d_relu(x, params[conv_prefix + "weight"], bias(params), conv.stride, conv.padding,
                                        backend.conv)
        return conv_relu, after + 1

    if program.is_batch_norm_with_batch_statistics(following) and type(following) is nn.BatchNorm2d:
        bn_prefix = f"{prefix}{following_name}."
        bn_layer, _ = program.lower_batch_norm(following, bn_prefix, backend)

        def conv_batch_norm(x, params, tasks):
            if bn_prefix + "running_mean" in params:   # evaluation with MAML++ per-step running statistics
                return bn_layer(conv_layer(x, params, tasks), params, tasks)
            # The BatchNorm cancels the conv's bias: left out, with its exactly zero gradient.
            y, mean, var = conv_ops.conv2d_with_batch_stats(x, params[conv_prefix + "weight"], None,
                                                            conv.stride, conv.padding, backend.conv)
            if bias(params) is not None:
                y = program.cancel_bias_before_batch_norm(y, bias(params))
            return norm_ops.batch_norm_from_statistics(
                y, mean, var, program.parameter(params, bn_prefix, "weight", following),
                program.parameter(params, bn_prefix, "bias", following), tasks, following.eps)
        return conv_batch_norm, after + 1
    return None


class TritonBackend(ProgramBackend):
    name = "triton"
    summary = "the task-batched program with Triton conv and batched-matmul kernels"
    conv = TritonConvPrimitives()
    matmul = TritonBatchedMatmul()
    fusion_rules = (fuse_conv_epilogue,)

    def unavailable_reasons(self, device):
        device = torch.device(device)
        reasons = list(_installation_reasons())
        interpreting = interpreter_enabled()
        loaded = sys.modules.get(f"{KERNELS_PACKAGE}.conv2d")
        if loaded is not None and loaded.INTERPRETED != interpreting:
            reasons.append("the Triton kernels were loaded with TRITON_INTERPRET=" + ("1" if loaded.INTERPRETED else "0")
                           + " and the setting changed since (restart the process)")
        if device.type == "cuda":
            if not interpreting:
                if not torch.cuda.is_available():
                    reasons.append("CUDA is not available")
                else:
                    capability = torch.cuda.get_device_capability(device)
                    if capability < MIN_CAPABILITY:
                        reasons.append(f"{device} has compute capability {capability[0]}.{capability[1]}; the "
                                       f"Triton kernels need >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}")
        elif device.type == "cpu":
            if not interpreting:
                reasons.append("Triton kernels run on CUDA devices; on the CPU only through Triton's interpreter "
                               "(set TRITON_INTERPRET=1 before the first use; for tests, it is slow)")
        else:
            reasons.append(f"Triton kernels do not run on device type {device.type!r}")
        return reasons


TRITON = TritonBackend()
