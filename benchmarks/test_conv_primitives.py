"""pytest-benchmark suite: each task-batched conv primitive (forward, input grad, weight grad) of the
"fused" backend on its two implementations — cuDNN's grouped convolution and the Triton kernels (tiles
autotuned) — at every conv layer of the conv4 benchmark configurations (Omniglot, MiniImageNet), in
each precision: "fp32" (IEEE products), "tf32" (`maml_fast.precision.tf32`, the switch both follow) and
"bf16" (bfloat16 inputs and outputs, fp32 accumulation). GPU only.

    python -m pytest benchmarks/test_conv_primitives.py --benchmark-json=benchmarks/results/conv_primitives.json
    python -m maml_fast.backends.conv_choice benchmarks/results/conv_primitives.json   # record the winners

Both run in the fused backend's layout (channels-last activations in and out, contiguous per-task
weights, as after `ops.conv2d`'s weight preparation), the cuDNN side with an empty choices table so
that it is cuDNN whatever the committed table says. Before timing, each result's error against a
float64 cuDNN evaluation of the same (float32) inputs is measured and recorded in extra_info
(``relative_error_vs_float64``: norm-wise; ``max_error_vs_float64``: max |error| / max |reference|);
a result beyond its precision's bound fails the test and is not timed (so it cannot be chosen). One
timed call runs the primitive ``REPEAT`` times and synchronises once.
"""
from __future__ import annotations

import importlib.metadata

import pytest
import torch

from maml_fast.backends import conv_choice
from maml_fast.backends.fused import FUSED
from maml_fast.backends.triton import TRITON
from maml_fast.ops import conv2d as conv_ops
from maml_fast.precision import conv_fp32_precision, tf32

from .configs import CONFIGS

REPEAT = 10
# Norm-wise relative error bounds (sanity, not the measurement): fp32 sums of up to 5e5 products;
# TF32 (10-bit mantissa) and bf16 (8-bit, inputs and outputs rounded) products.
ERROR_BOUND = {"fp32": 1e-4, "tf32": 1e-2, "bf16": 2e-2}
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="the per-primitive conv benchmark times Triton against cuDNN on a CUDA GPU")


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


CASES = [(name, layer) for name, config in CONFIGS.items() if config.network == "conv4" for layer in conv_layers(config)]


def _implementation(impl: str):
    """The fused backend's primitives of `impl`: its cuDNN path, or the Triton kernels it would call."""
    return FUSED.conv if impl == "cudnn" else FUSED.conv.triton


def _errors(result: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    diff = result.double() - reference
    return (float(diff.norm() / reference.norm()), float(diff.abs().max() / reference.abs().max()))


@pytest.mark.parametrize("impl", conv_choice.IMPLEMENTATIONS)
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
@pytest.mark.parametrize("primitive", conv_choice.PRIMITIVES)
@pytest.mark.parametrize("case", CASES, ids=[f"{name}-conv{layer[0]}" for name, layer in CASES])
def test_conv_primitive(benchmark, case, primitive, precision, impl):
    if impl == "triton" and TRITON.unavailable_reasons(torch.device("cuda")):
        pytest.skip("; ".join(TRITON.unavailable_reasons(torch.device("cuda"))))
    name, (index, tasks, batch, cin, cout, size, stride) = case
    geo = conv_ops.ConvGeometry(tasks, (stride, stride), (1, 1), (size, size), (3, 3))
    gen = torch.Generator(device="cuda").manual_seed(0)
    channels_last = dict(memory_format=torch.channels_last)
    x = torch.randn(batch, tasks * cin, size, size, device="cuda", generator=gen).contiguous(**channels_last)
    weight = torch.randn(tasks, cout, cin, 3, 3, device="cuda", generator=gen)   # per task, as fast weights
    grad_out = torch.randn(batch, tasks * cout, *geo.output_hw(), device="cuda", generator=gen).contiguous(**channels_last)
    args = {"forward": (x, weight), "input_grad": (grad_out, weight), "weight_grad": (x, grad_out)}[primitive]
    with tf32(False):
        reference = getattr(conv_ops.TORCH_CONV, primitive)(*(a.double() for a in args), geo)
    if precision == "bf16":
        args = tuple(a.to(torch.bfloat16) for a in args)
    implementation = getattr(_implementation(impl), primitive)

    with tf32(precision == "tf32"), conv_choice.using({}):
        relative, largest = _errors(implementation(*args, geo), reference)
        assert relative < ERROR_BOUND[precision], f"{impl} {primitive} {precision}: relative error {relative:.2e}"

        def timed():
            for _ in range(REPEAT):
                implementation(*args, geo)
            torch.cuda.synchronize()

        benchmark.group = f"{name}-conv{index}-{primitive}-{precision}"
        benchmark.extra_info.update(
            device=torch.cuda.get_device_name(), torch=torch.__version__, triton=importlib.metadata.version("triton"), repeat=REPEAT,
            primitive=primitive, precision=precision, fp32_precision=conv_fp32_precision(),
            shape_key=conv_choice.shape_key(tasks, batch, cin, cout, geo),
            relative_error_vs_float64=relative, max_error_vs_float64=largest,
            shape=dict(tasks=tasks, batch=batch, cin=cin, cout=cout, size=size, stride=stride))
        benchmark.pedantic(timed, rounds=15, warmup_rounds=2)
