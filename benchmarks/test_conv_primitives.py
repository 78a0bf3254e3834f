"""pytest-benchmark suite: each task-batched conv primitive (forward, input grad, weight grad) on the
Triton kernels against cuDNN's grouped convolution (the "torch" backend's primitives), at every conv
layer of the benchmark configurations (`configs.CONFIGS`). GPU only.

    python -m pytest benchmarks/test_conv_primitives.py --benchmark-json=benchmarks/results/conv_primitives.json

One timed call runs the primitive ``REPEAT`` times and synchronises once (a single primitive is tens of
microseconds, about the cost of a synchronisation). Both implementations run under the same TF32
setting (PyTorch's cuDNN-conv flag, which the Triton kernels follow); it is recorded in extra_info.
Before timing, each Triton result is compared with cuDNN's.
"""
from __future__ import annotations

import pytest
import torch

from maml_fast.backends import get_backend
from maml_fast.backends import triton as triton_backend
from maml_fast.ops import conv2d as conv_ops

from .configs import CONFIGS

REPEAT = 10
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="the per-primitive conv benchmark compares Triton with cuDNN on a CUDA GPU")


def conv_layers(config):
    """(layer index, tasks, batch, in_ch, out_ch, size, stride) of each conv of conv4 on `config`;
    batch is the query set (the larger set of a meta-step)."""
    batch = config.ways * config.queries_per_class
    size, channels, layers = config.image_size, config.channels, []
    for index in range(4):
        stride = 2 if config.downsample == "stride" else 1
        layers.append((index, config.tasks, batch, channels, config.hidden, size, stride))
        size = (size + 2 - 3) // stride + 1
        if config.downsample == "maxpool":
            size //= 2
        channels = config.hidden
    return layers


CASES = [(name, layer) for name, config in CONFIGS.items() for layer in conv_layers(config)]


def _tf32() -> str:
    return triton_backend.load_kernels()._fp32_precision() if torch.cuda.is_available() else "n/a"


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("primitive", ["forward", "input_grad", "weight_grad"])
@pytest.mark.parametrize("case", CASES, ids=[f"{name}-conv{layer[0]}" for name, layer in CASES])
def test_conv_primitive(benchmark, case, primitive, impl):
    name, (index, tasks, batch, cin, cout, size, stride) = case
    geo = conv_ops.ConvGeometry(tasks, (stride, stride), (1, 1), (size, size), (3, 3))
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, tasks * cin, size, size, device="cuda", generator=gen)
    weight = torch.randn(cout, cin, 3, 3, device="cuda", generator=gen).expand(tasks, cout, cin, 3, 3)  # as θ.expand
    grad_out = torch.randn(batch, tasks * cout, *geo.output_hw(), device="cuda", generator=gen)
    args = {"forward": (x, weight), "input_grad": (grad_out, weight), "weight_grad": (x, grad_out)}[primitive]

    def call(implementation):
        return getattr(implementation, primitive)(*args, geo)

    ours, reference = call(get_backend(impl).conv), call(get_backend("torch").conv)
    error = ((ours.float() - reference.float()).norm() / reference.float().norm()).item()
    assert error < 1e-2, f"{impl} {primitive} differs from cuDNN: relative error {error:.2e}"

    implementation = get_backend(impl).conv

    def timed():
        for _ in range(REPEAT):
            getattr(implementation, primitive)(*args, geo)
        torch.cuda.synchronize()

    benchmark.group = f"{name}-conv{index}-{primitive}"
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), torch=torch.__version__, repeat=REPEAT,
                                fp32_precision=_tf32(), relative_error_vs_cudnn=error,
                                shape=dict(tasks=tasks, batch=batch, cin=cin, cout=cout, size=size, stride=stride))
    benchmark.pedantic(timed, rounds=15, warmup_rounds=2)
