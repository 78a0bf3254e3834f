"""The "triton" backend: task-batched conv primitives as Triton implicit-GEMM kernels (`kernels.conv2d`)
and the task-batched linear layer's products as one Triton batched-matmul kernel (`kernels.linear`).

Importing this module registers the backend name and puts lazy implementations into
`maml_fast.ops.conv2d.CONV_IMPLEMENTATIONS["triton"]` and `maml_fast.ops.linear.LINEAR_IMPLEMENTATIONS
["triton"]`; it neither imports Triton nor touches a GPU. The kernels modules (and with them Triton)
are loaded on the first conv or linear call.

Where it runs (`unavailable_reasons`): CUDA devices of compute capability >= 8.0 with Triton >= 3.0
installed; on the CPU only when ``TRITON_INTERPRET=1`` is set (Triton's interpreter, for tests; it is
slow). It is not preferred by ``backend="auto"``: in the first H100 measurement (benchmarks/RESULTS.md,
3 rounds) its meta-step was slower than "torch" (Omniglot 24.4 vs 17.5 ms, MiniImageNet 142.7 vs
105.8 ms), so "auto" keeps "torch" on CUDA.

The convolutions and the linear layers (forward, input and weight gradients, every derivative order)
run on Triton; every other op (norms, pooling, losses) is the "torch" backend's. The conv's bias is fused into the forward kernel's epilogue (`fuses_epilogue`, see
ops/conv2d.py), and `fuse_conv_epilogue` (a `program.FUSION_RULES` entry) lowers a Conv2d followed by a
ReLU, or by a BatchNorm2d with batch statistics, to one conv kernel with that epilogue.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path

import torch
from torch import nn

from . import program
from .backends import register_backend
from .ops import conv2d as conv_ops
from .ops import linear as linear_ops
from .ops import norm as norm_ops

NAME = "triton"
MIN_TRITON = (3, 0)
MIN_CAPABILITY = (8, 0)
_KERNELS_FILE = Path(__file__).resolve().parent.parent / "kernels" / "conv2d.py"
_kernels = None


def interpreter_enabled() -> bool:
    """TRITON_INTERPRET as Triton reads it."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on", "y")


def _triton_version() -> tuple[int, ...] | None:
    try:
        text = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _kernels_location() -> str | None:
    """Where the kernels module would be loaded from (without importing it or Triton)."""
    loaded = sys.modules.get("kernels.conv2d")
    if loaded is not None and hasattr(loaded, "conv2d_weight_grad"):
        return loaded.__file__
    spec = importlib.util.find_spec("kernels")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            if Path(folder, "conv2d.py").is_file() and "_conv_wgrad_kernel" in Path(folder, "conv2d.py").read_text():
                return str(Path(folder, "conv2d.py"))
    return str(_KERNELS_FILE) if _KERNELS_FILE.is_file() else None


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
    if _kernels_location() is None:
        reasons.append("the Triton kernels package `kernels` (kernels/conv2d.py) is not importable")
    return tuple(reasons)


def unavailable_reasons(device: torch.device) -> list[str]:
    """Why the Triton backend cannot run on `device` ([] = it can). Imports neither Triton nor the kernels."""
    device = torch.device(device)
    reasons = list(_installation_reasons())
    interpreting = interpreter_enabled()
    if _kernels is not None and _kernels.INTERPRETED != interpreting:
        reasons.append("the Triton kernels were loaded with TRITON_INTERPRET=" + ("1" if _kernels.INTERPRETED else "0")
                       + " and the setting changed since (restart the process)")
    if device.type == "cuda":
        if not interpreting:
            if not torch.cuda.is_available():
                reasons.append("CUDA is not available")
            else:
                capability = torch.cuda.get_device_capability(device)
                if capability < MIN_CAPABILITY:
                    reasons.append(f"{device} has compute capability {capability[0]}.{capability[1]}; the Triton "
                                   f"conv kernels need >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}")
    elif device.type == "cpu":
        if not interpreting:
            reasons.append("Triton kernels run on CUDA devices; on the CPU only through Triton's interpreter "
                           "(set TRITON_INTERPRET=1 before the first use; for tests, it is slow)")
    else:
        reasons.append(f"Triton kernels do not run on device type {device.type!r}")
    return reasons


def load_kernels():
    """The kernels module (imports Triton on the first call)."""
    global _kernels
    if _kernels is None:
        try:
            module = importlib.import_module("kernels.conv2d")
            if not hasattr(module, "conv2d_weight_grad"):
                raise ImportError("an unrelated package named `kernels` shadows maml_fast's")
        except ImportError:
            if not _KERNELS_FILE.is_file():
                raise
            # Source checkout whose `kernels` package is not on sys.path: load the file directly.
            spec = importlib.util.spec_from_file_location("maml_fast._triton_conv_kernels", _KERNELS_FILE)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        _kernels = module
    return _kernels


def load_linear_kernels():
    """The batched-matmul kernel module (loads the conv kernels first: it shares their helpers)."""
    load_kernels()
    return importlib.import_module("kernels.linear")


class TritonBatchedMatmul:
    """`maml_fast.ops.linear`'s batched product on Triton; loads the kernel lazily."""

    def matmul(self, a, b, bias, batch_major):
        return load_linear_kernels().batched_matmul(a, b, bias, batch_major)


class TritonConvPrimitives:
    """The three conv primitives of `maml_fast.ops.conv2d` on Triton; loads the kernels lazily."""

    fuses_epilogue = True

    def forward(self, x, weight, geo, bias=None, relu=False):
        return load_kernels().conv2d_forward(x, weight, geo.stride, geo.padding, bias=bias, relu=relu)

    def forward_with_stats(self, x, weight, geo, bias=None, relu=False):
        return load_kernels().conv2d_forward_with_stats(x, weight, geo.stride, geo.padding, bias=bias, relu=relu)

    def input_grad(self, grad_out, weight, geo):
        return load_kernels().conv2d_input_grad(grad_out, weight, geo.input_hw, geo.stride, geo.padding)

    def weight_grad(self, x, grad_out, geo):
        return load_kernels().conv2d_weight_grad(x, grad_out, geo.kernel_hw, geo.tasks, geo.stride, geo.padding)


def fuse_conv_epilogue(children, prefix: str, backend: str):
    """The fusion rule of this backend (see `program.FUSION_RULES`): a Conv2d followed by

    - nn.ReLU -> `conv_ops.conv2d_relu` (bias and ReLU in the conv's epilogue);
    - nn.BatchNorm2d with batch statistics -> `conv_ops.conv2d_with_batch_stats` (y's per-channel mean
      and variance from the conv's epilogue) feeding `norm_ops.batch_norm_from_statistics`, which then
      does not read y to get them. The ReLU (and pooling) after the BatchNorm stay separate layers.

    nn.Identity layers in between are skipped (conv4 with ``norm="none"`` puts one there). A conv the
    per-layer lowering rejects is left to it, so that it reports the reason."""
    name, conv = children[0]
    if backend != NAME or type(conv) is not nn.Conv2d:
        return None
    conv_prefix = f"{prefix}{name}."
    conv_layer, reason = program._lower_conv2d(conv, conv_prefix, backend)
    if reason:
        return None
    after = 1
    while after < len(children) and type(children[after][1]) is nn.Identity:
        after += 1
    if after == len(children):
        return None
    following_name, following = children[after]
    bias = lambda params: program._param(params, conv_prefix, "bias", conv)

    if type(following) is nn.ReLU:
        def conv_relu(x, params, tasks):
            return conv_ops.conv2d_relu(x, params[conv_prefix + "weight"], bias(params), conv.stride, conv.padding,
                                        backend)
        return conv_relu, after + 1

    if type(following) is nn.BatchNorm2d and not following.track_running_stats:
        bn_prefix = f"{prefix}{following_name}."
        bn_layer, _ = program._lower_batch_norm(following, bn_prefix, backend)

        def conv_batch_norm(x, params, tasks):
            if bn_prefix + "running_mean" in params:   # evaluation with MAML++ per-step running statistics
                return bn_layer(conv_layer(x, params, tasks), params, tasks)
            # The BatchNorm cancels the conv's bias: left out, with its exactly zero gradient.
            y, mean, var = conv_ops.conv2d_with_batch_stats(x, params[conv_prefix + "weight"], None,
                                                            conv.stride, conv.padding, backend)
            if bias(params) is not None:
                y = program.cancel_bias_before_batch_norm(y, bias(params))
            return norm_ops.batch_norm_from_statistics(
                y, mean, var, program._param(params, bn_prefix, "weight", following),
                program._param(params, bn_prefix, "bias", following), tasks, following.eps)
        return conv_batch_norm, after + 1
    return None


register_backend(NAME, unavailable_reasons, prefer_on=())
program.FUSION_RULES.append(fuse_conv_epilogue)
conv_ops.CONV_IMPLEMENTATIONS.setdefault(NAME, TritonConvPrimitives())
linear_ops.LINEAR_IMPLEMENTATIONS.setdefault(NAME, TritonBatchedMatmul())
