"""The "cuda" backend: the compiled C++/CUDA kernels of `maml_fast._C`, and where they replace torch ops.

Backend ``"cuda"`` runs the task-batched program with the extension's fused operators wherever the
extension has kernels for the device (CUDA kernels on a GPU; the C++ kernels on the CPU, so the
backend can be exercised on any machine), and PyTorch ops elsewhere:

- BatchNorm (``track_running_stats=False``) followed by ReLU lowers to one
  ``maml_fast::batch_norm_relu`` op with closed-form backward and double backward
  (`maml_fast.ops.batch_norm_relu`);
- convolutions use PyTorch's grouped convolution with channels-last activations on every device, so
  that the BatchNorm input is a free ``[rows, channels]`` view (another module may register faster
  conv primitives under ``CONV_IMPLEMENTATIONS["cuda"]``; this one only fills the slot if empty).

``"auto"`` picks this backend on the CPU when the extension is built: there the fused op makes the
whole meta-step faster (`CPU_OPS_MEASUREMENT`). On a GPU
"auto" stays on "torch" until the CUDA kernels are measured. ``"torch"`` itself stays pure PyTorch.

Availability is reported as reasons (`maml_fast._extension.extension_unavailable_reasons`), never by
catching a failed launch.
"""
from __future__ import annotations

import torch

from . import backends
from .ops import batch_norm_relu as _bn_relu
from .ops import conv2d as _conv

BACKEND = "cuda"

#: Why "auto" prefers this backend on the CPU: one second-order meta-step of omniglot_5w1s (conv4,
#: T=32, float32), pure-PyTorch vs fused BatchNorm+ReLU, rounds interleaved in one process, on a
#: shared 2-core AMD EPYC (Zen 4) VM, torch 2.14.1: 1.26-1.28x faster with the C++ ops (2 threads:
#: 200 -> 159 ms fastest round; 1 thread: 317 -> 252 ms). BatchNorm+ReLU itself went from ~117 to
#: ~28 ms of a ~340 ms single-thread step; convolutions are most of the rest. Re-measure with
#: ``python -m benchmarks.bench_table`` (peers "torch" and "cuda"); see benchmarks/RESULTS.md.
CPU_OPS_MEASUREMENT = "1.26-1.28x faster meta-step (omniglot_5w1s, 2-core Zen 4, see above)"


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


class ChannelsLastConvPrimitives(_conv.TorchConvPrimitives):
    """PyTorch's grouped convolutions with channels-last activations on every device (the torch
    primitives keep them channels-last on the CPU only): BatchNorm then sees a free
    ``[rows, channels]`` view on a GPU too."""

    @staticmethod
    def _layout(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous(memory_format=torch.channels_last)


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
]
