"""maml_fast.ops.batch_norm_relu: the compiled BatchNorm+ReLU ops (forward, backward, double backward;
ReLU and LeakyReLU slopes) against the pure-PyTorch reference and its autograd, gradcheck/gradgradcheck through the autograd
glue, awkward shapes, poisoned outputs, bad input, fake kernels, the lowering's fusion, and the full
second-order meta-gradient of a tiny conv4 against backend "loop". Kernel tests run per device and
skip with the reason the ops cannot run there ("no CUDA device" on a machine without a GPU)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import maml_fast as mf
from maml_fast import backends
from maml_fast.backends import get_backend
from maml_fast.ops.losses import LOSSES
from maml_fast.ops import batch_norm_relu as bnr
from maml_fast.ops import norm
from maml_fast.program import lower
from conftest import assert_rejected, count_op_calls, op_devices

EPS = 1e-5


DEVICES = op_devices(bnr.unavailable_reasons)
needs_cpu_ops = pytest.mark.skipif(not bnr.is_available("cpu"), reason="; ".join(bnr.unavailable_reasons("cpu")))

# (rows, channels): the smallest batch, single channels, primes, T*C not a power of two, widths
# around the kernels' 16-lane vectors, and enough rows for several 64-row groups and threads.
SHAPES = [(2, 1), (2, 16), (3, 7), (5, 17), (13, 1), (31, 33), (7, 3 * 37), (97, 13), (300, 40), (64, 48)]
# Negative slopes: ReLU, ResNet-12's LeakyReLU, the identity (BatchNorm alone) and one above 1 (the op
# allows any finite slope >= 0).
SLOPES = [0.0, 0.1, 1.0, 1.5]


@pytest.fixture
def generator() -> torch.Generator:
    generator = torch.Generator()
    print(f"seed: {generator.seed()}")
    return generator


def make_inputs(rows, channels, generator, dtype=torch.float64, device="cpu", scale=2.0, offset=0.5):
    """x (per-column offsets and scales, so the statistics matter), weight (both signs), bias."""
    def randn(*shape):
        return torch.randn(shape, generator=generator, dtype=torch.float64)

    x = randn(rows, channels) * (scale * randn(channels).abs() + 0.1) + offset * randn(channels)
    weight = randn(channels)
    bias = 0.5 * randn(channels)
    return [t.to(dtype=dtype, device=device) for t in (x, weight, bias)]


def reference_derivatives(x, weight, bias, grad_y, gg_x, gg_weight, gg_bias, mask=None, negative_slope=0.0):
    """(y, mean, rstd), (gx, g_weight, g_bias) and (d grad_y, d x, d weight) by autograd of the
    float64 reference: the second derivatives of L = <ggx, gx> + <gg_w, g_w> + <gg_b, g_b>.

    `mask` (bool, x's shape) replaces the reference's own z > 0: a low-precision op may round a
    z within an ulp of 0 to the other side, where the derivative jumps."""
    x, weight, bias, grad_y = (t.detach().double().requires_grad_() for t in (x, weight, bias, grad_y))
    y, mean, rstd = bnr.batch_norm_relu_rows_reference(x, weight, bias, EPS, negative_slope)
    if mask is not None:
        z = (x - mean) * rstd * weight + bias
        y = torch.where(mask.cpu().to(x.device), z, z * negative_slope)
    first = torch.autograd.grad(y, (x, weight, bias), grad_y, create_graph=True)
    outer = sum((g * gg.double()).sum() for g, gg in zip(first, (gg_x, gg_weight, gg_bias)) if gg is not None)
    if not isinstance(outer, torch.Tensor):  # nothing given: every second derivative is zero
        second = [None, None, None]
    else:
        second = torch.autograd.grad(outer, (grad_y, x, weight), allow_unused=True)
    second = [torch.zeros_like(t) if s is None else s for s, t in zip(second, (grad_y, x, weight))]
    return (y.detach(), mean.detach(), rstd.detach()), [g.detach() for g in first], second


def run_ops(x, weight, bias, grad_y, gg_x, gg_weight, gg_bias, negative_slope=0.0):
    y, mean, rstd = torch.ops.maml_fast.batch_norm_relu(x, weight, bias, EPS, negative_slope)
    first = torch.ops.maml_fast.batch_norm_relu_backward(grad_y, x, y, weight, mean, rstd, negative_slope)
    second = torch.ops.maml_fast.batch_norm_relu_double_backward(gg_x, gg_weight, gg_bias, grad_y, x, y, weight,
                                                                 mean, rstd, negative_slope)
    return (y, mean, rstd), list(first), list(second)


def _all_inputs(rows, channels, generator, dtype, device):
    x, weight, bias = make_inputs(rows, channels, generator, dtype, device)
    grad_y, gg_x = (torch.randn(rows, channels, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
                    for _ in range(2))
    gg_weight, gg_bias = (torch.randn(channels, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
                          for _ in range(2))
    return x, weight, bias, grad_y, gg_x, gg_weight, gg_bias


#: The float32 arithmetic's own error in the ops' outputs, relative to each tensor's scale: measured at
#: most 31 eps(float32) on the CPU (float32 inputs; BN+ReLU and the pooled op; forward, backward and
#: double backward; 340 seeds of the low-precision tests' shapes), allowed 4x that.
FLOAT32_ARITHMETIC_ERROR = 128 * torch.finfo(torch.float32).eps


def low_precision_tolerance(dtype: torch.dtype) -> float:
    """Error bound, relative to the tensor's scale, of an op that takes inputs of `dtype`, computes in
    float32 and rounds each output to `dtype` once: that rounding is at most eps(dtype)/2 of the value
    (measured at most 0.5 eps for float16 and bfloat16, same seeds), allowed twice, plus the float32
    arithmetic's error. The reference sees the same rounded inputs, so nothing else differs."""
    return torch.finfo(dtype).eps + FLOAT32_ARITHMETIC_ERROR


def _assert_close_scaled(actual, expected, rtol, name):
    """|actual - expected| <= rtol * max(1, max|expected|) elementwise: a tolerance relative to the
    tensor's scale, since single elements of a derivative may be ~0."""
    actual = actual.double().cpu()
    expected = expected.double().cpu()
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    error = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert error <= rtol * scale, f"{name}: max error {error:.3g} > {rtol:.1g} x scale {scale:.3g}"


# ------------------------------------------------------------------------------------- the ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{r}x{c}" for r, c in SHAPES])
@pytest.mark.parametrize("given", ["all", "no_ggx", "only_ggx", "none"])
@pytest.mark.parametrize("negative_slope", SLOPES)
def test_ops_match_reference_float64(device, shape, given, negative_slope, generator):
    x, weight, bias, grad_y, gg_x, gg_weight, gg_bias = _all_inputs(*shape, generator, torch.float64, device)
    if given == "no_ggx":
        gg_x = None
    elif given == "only_ggx":
        gg_weight = gg_bias = None
    elif given == "none":
        gg_x = gg_weight = gg_bias = None
    forward, first, second = run_ops(x, weight, bias, grad_y, gg_x, gg_weight, gg_bias, negative_slope)
    ref_forward, ref_first, ref_second = reference_derivatives(x, weight, bias, grad_y, gg_x, gg_weight, gg_bias,
                                                               negative_slope=negative_slope)
    for name, out, ref in zip(("y", "mean", "rstd"), forward, ref_forward):
        assert out.dtype == torch.float64 and out.device == x.device and out.shape == ref.shape
        _assert_close_scaled(out, ref, 1e-12, name)
    for name, out, ref in zip(("grad_x", "grad_weight", "grad_bias"), first, ref_first):
        assert out.shape == ref.shape and out.is_contiguous()
        _assert_close_scaled(out, ref, 1e-11, name)
    for name, out, ref in zip(("grad_grad_y", "grad_x", "grad_weight"), second, ref_second):
        assert out.shape == ref.shape and out.is_contiguous()
        _assert_close_scaled(out, ref, 1e-10, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 17), (97, 13), (300, 40)], ids=["5x17", "97x13", "300x40"])
@pytest.mark.parametrize("negative_slope", [0.0, 0.1])
def test_low_precision_against_float64(device, dtype, shape, negative_slope, generator):
    """Forward, backward and double backward in float32/float16/bfloat16 against the float64 reference
    on the same (rounded) inputs, within `low_precision_tolerance`."""
    tolerance = low_precision_tolerance(dtype)
    inputs = _all_inputs(*shape, generator, dtype, device)
    forward, first, second = run_ops(*inputs, negative_slope)
    ref_forward, ref_first, ref_second = reference_derivatives(*inputs, mask=forward[0] > 0,
                                                               negative_slope=negative_slope)
    assert forward[0].dtype == dtype and forward[1].dtype == torch.float32 and forward[2].dtype == torch.float32
    assert all(out.dtype == dtype for out in (*first, *second))
    for names, outs, refs in ((("y", "mean", "rstd"), forward, ref_forward),
                              (("grad_x", "grad_weight", "grad_bias"), first, ref_first),
                              (("grad_grad_y", "grad_x", "grad_weight"), second, ref_second)):
        for name, out, ref in zip(names, outs, refs):
            _assert_close_scaled(out, ref, tolerance, name)


@pytest.mark.parametrize("device", DEVICES)
def test_large_offset_keeps_variance_precision(device, generator):
    """|mean| = 1e4 std: the shifted one-pass statistics keep float32 precision (a naive
    E[x^2] - E[x]^2 would lose every digit)."""
    x = (1e4 + torch.randn(500, 24, generator=generator, dtype=torch.float64)).to(device)
    weight = torch.ones(24, dtype=torch.float64, device=device)
    bias = torch.zeros(24, dtype=torch.float64, device=device)
    _, mean, rstd = torch.ops.maml_fast.batch_norm_relu(x.float(), weight.float(), bias.float(), EPS)
    _, ref_mean, ref_rstd = bnr.batch_norm_relu_rows_reference(x, weight, bias, EPS)
    torch.testing.assert_close(rstd.double(), ref_rstd, rtol=1e-3, atol=0)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_relu_mask_and_nan(device):
    """y = relu(z) exactly: zero where z <= 0, and NaN propagates (ReLU semantics)."""
    x = torch.tensor([[-1.0, 0.0], [0.0, float("nan")], [4.0, 1.0]], dtype=torch.float64, device=device)
    weight = torch.tensor([1.0, 1.0], dtype=torch.float64, device=device)
    bias = torch.zeros(2, dtype=torch.float64, device=device)
    y, _, _ = torch.ops.maml_fast.batch_norm_relu(x, weight, bias, EPS)
    assert y[0, 0] == 0 and y[1, 0] == 0 and y[2, 0] > 0  # mean 1: only the last value is above it
    assert y[:, 1].isnan().all()  # a NaN in a column makes the column's statistics NaN


@pytest.mark.parametrize("device", DEVICES)
def test_leaky_relu_values_and_derivative(device):
    """y = z where z > 0, else slope z (z = 0 gives 0); the backward scales gy by 1 or the slope, read off
    y; NaN propagates."""
    x = torch.tensor([[-1.0, 0.0], [0.0, float("nan")], [4.0, 1.0]], dtype=torch.float64, device=device)
    weight = torch.tensor([1.0, 1.0], dtype=torch.float64, device=device)
    bias = torch.zeros(2, dtype=torch.float64, device=device)
    y, mean, rstd = torch.ops.maml_fast.batch_norm_relu(x, weight, bias, EPS, 0.25)
    z = (x[:, 0] - mean[0]) * rstd[0]
    assert torch.equal(y[:, 0], torch.where(z > 0, z, 0.25 * z)) and (y[:2, 0] < 0).all()
    assert y[:, 1].isnan().all()
    grad_y = torch.ones_like(x)
    grad_x, _, grad_bias = torch.ops.maml_fast.batch_norm_relu_backward(grad_y, x, y, weight, mean, rstd, 0.25)
    assert grad_bias[0] == 0.25 + 0.25 + 1  # g_beta = sum(m gy)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 7), (97, 13), (300, 40), (2, 33)], ids=["3x7", "97x13", "300x40", "2x33"])
@pytest.mark.parametrize("negative_slope", [0.0, 0.1])
def test_outputs_are_fully_written(device, shape, negative_slope, generator, poisoned_empty):
    inputs = _all_inputs(*shape, generator, torch.float32, device)
    forward, first, second = run_ops(*inputs, negative_slope)
    _, _, second_no_ggx = run_ops(inputs[0], inputs[1], inputs[2], inputs[3], None, None, None, negative_slope)
    for out in (*forward, *first, *second, *second_no_ggx):
        assert not out.isnan().any()


@needs_cpu_ops
@pytest.mark.parametrize("threads", [1, 3])
def test_several_row_chunks(threads, generator):
    """Enough elements for the CPU kernels to split the rows over several threads (and several
    64-row groups per thread); the result does not depend on it beyond rounding."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        inputs = _all_inputs(1000, 97, generator, torch.float64, "cpu")
        forward, first, second = run_ops(*inputs)
    finally:
        torch.set_num_threads(previous)
    ref_forward, ref_first, ref_second = reference_derivatives(*inputs)
    for out, ref in zip((*forward, *first, *second), (*ref_forward, *ref_first, *ref_second)):
        _assert_close_scaled(out, ref, 1e-10, "output")


@needs_cpu_ops
def test_deterministic_across_calls(generator):
    inputs = _all_inputs(300, 40, generator, torch.float32, "cpu")
    first_run = run_ops(*inputs)
    second_run = run_ops(*inputs)
    for a_group, b_group in zip(first_run, second_run):
        for a, b in zip(a_group, b_group):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------- autograd
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 1), (6, 5), (9, 17)], ids=["2x1", "6x5", "9x17"])
@pytest.mark.parametrize("negative_slope", SLOPES)
def test_gradcheck_and_gradgradcheck(device, shape, negative_slope, generator):
    x, weight, bias = (t.requires_grad_() for t in make_inputs(*shape, generator, device=device))
    function = lambda x, weight, bias: bnr.batch_norm_relu_rows(x, weight, bias, EPS, negative_slope)  # noqa: E731
    assert type(function(x, weight, bias).grad_fn).__name__ == "_BatchNormReluRowsBackward"
    assert torch.autograd.gradcheck(function, (x, weight, bias))
    assert torch.autograd.gradgradcheck(function, (x, weight, bias))


def _graph_has(node, name, depth=4):
    """Whether autograd node `name` is within `depth` steps of `node`."""
    if node is None:
        return False
    if type(node).__name__ == name:
        return True
    return depth > 0 and any(_graph_has(child, name, depth - 1) for child, _ in node.next_functions)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "matrix"])
@pytest.mark.parametrize("negative_slope", [0.0, 0.1])
def test_grouped_layout_gradgradcheck(device, layout, negative_slope, generator):
    """The grouped-layout entry point: [B, T*C, H, W] channels-last (or [B, T*C]), [T, C] affine."""
    tasks, channels = 2, 3
    shape = (2, tasks * channels, 2, 3) if layout == "channels_last" else (4, tasks * channels)
    x = torch.randn(shape, generator=generator, dtype=torch.float64).to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = torch.randn(tasks, channels, generator=generator, dtype=torch.float64).to(device).requires_grad_()
    bias = torch.randn(tasks, channels, generator=generator, dtype=torch.float64).to(device).requires_grad_()

    def function(x, weight, bias):
        if layout == "channels_last":  # gradcheck perturbs a contiguous copy; keep the fused layout
            x = x.contiguous(memory_format=torch.channels_last)
        return bnr.batch_norm_relu(x, weight, bias, tasks, EPS, negative_slope)

    out = function(x, weight, bias)
    assert _graph_has(out.grad_fn, "_BatchNormReluRowsBackward"), "the fused op was not used"
    reference = bnr.batch_norm_relu_reference(x, weight, bias, tasks, EPS, negative_slope)
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.autograd.gradcheck(function, (x, weight, bias))
    assert torch.autograd.gradgradcheck(function, (x, weight, bias))


@needs_cpu_ops
def test_affine_none_and_unsupported_layout_fall_back(generator):
    x = torch.randn(3, 4, 2, 2, generator=generator, dtype=torch.float64)  # contiguous NCHW: no free view
    out = bnr.batch_norm_relu(x, None, None, 2, EPS)
    torch.testing.assert_close(out, F.relu(norm.batch_norm_reference(x, None, None, 2, EPS)), rtol=1e-12, atol=1e-12)
    assert not _graph_has(out.grad_fn, "_BatchNormReluRowsBackward")
    cl = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(bnr.batch_norm_relu(cl, None, None, 2, EPS), out,
                               rtol=1e-12, atol=1e-12)


@needs_cpu_ops
@pytest.mark.parametrize("negative_slope", [0.0, 0.1])
def test_third_order_matches_reference(negative_slope, generator):
    """With a graph recorded around the second backward, the double backward runs as differentiable
    PyTorch ops: third derivatives are exact too (checked against autograd of the reference)."""
    def third(function, x, weight, bias):
        x, weight, bias = (t.detach().requires_grad_() for t in (x, weight, bias))
        y = function(x, weight, bias)
        gx, gw = torch.autograd.grad((y * y.detach().cos()).sum(), (x, weight), create_graph=True)
        ggx, ggw = torch.autograd.grad((gx * gx).sum() + (gw * gw.detach()).sum(), (x, weight), create_graph=True)
        return torch.autograd.grad((ggx.sin()).sum() + ggw.sum(), (x, weight, bias))

    inputs = make_inputs(7, 5, generator)
    fused = third(lambda x, w, b: bnr.batch_norm_relu_rows(x, w, b, EPS, negative_slope), *inputs)
    reference = third(lambda x, w, b: bnr.batch_norm_relu_rows_reference(x, w, b, EPS, negative_slope)[0], *inputs)
    for out, ref in zip(fused, reference):
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)

    x, weight, bias = (t.requires_grad_() for t in make_inputs(4, 3, generator))

    def second_order(x, weight, bias):
        y = bnr.batch_norm_relu_rows(x, weight, bias, EPS, negative_slope)
        return torch.autograd.grad((y * y).sum(), (x, weight), create_graph=True)

    assert torch.autograd.gradgradcheck(second_order, (x, weight, bias))


@needs_cpu_ops
def test_unused_outputs_skip_work(generator):
    """Only gamma's gradient asked for, second order: grad_grad_x is None inside (no zeros made)."""
    x, weight, bias = (t.requires_grad_() for t in make_inputs(6, 4, generator))
    y = bnr.batch_norm_relu_rows(x, weight, bias, EPS)
    (g_weight,) = torch.autograd.grad((y * y).sum(), weight, create_graph=True)
    (d_x,) = torch.autograd.grad(g_weight.sum(), x)
    x_ref, w_ref, b_ref = (t.detach().requires_grad_() for t in (x, weight, bias))
    y_ref, _, _ = bnr.batch_norm_relu_rows_reference(x_ref, w_ref, b_ref, EPS)
    (g_ref,) = torch.autograd.grad((y_ref * y_ref).sum(), w_ref, create_graph=True)
    (d_ref,) = torch.autograd.grad(g_ref.sum(), x_ref)
    torch.testing.assert_close(d_x, d_ref, rtol=1e-10, atol=1e-12)


# -------------------------------------------------------------------------------- bad input
def _valid(rows=4, channels=3):
    return torch.randn(rows, channels), torch.randn(channels), torch.randn(channels)


BAD_FORWARD = [
    ("x 1-D", lambda x, w, b: (x[0], w, b), ValueError, "x"),
    ("x 3-D", lambda x, w, b: (x[None], w, b), ValueError, "x"),
    ("one row", lambda x, w, b: (x[:1], w, b), ValueError, "x"),
    ("integer x", lambda x, w, b: (x.long(), w.long(), b.long()), TypeError, "x"),
    ("weight shape", lambda x, w, b: (x, w[:2], b), ValueError, "weight"),
    ("weight 2-D", lambda x, w, b: (x, w[None], b), ValueError, "weight"),
    ("weight dtype", lambda x, w, b: (x, w.double(), b), TypeError, "weight"),
    ("bias shape", lambda x, w, b: (x, w, b[:1]), ValueError, "bias"),
    ("bias dtype", lambda x, w, b: (x, w, b.double()), TypeError, "bias"),
]


@pytest.mark.parametrize(("case", "mutate", "error", "argument"), BAD_FORWARD, ids=[c[0] for c in BAD_FORWARD])
def test_bad_forward_inputs_name_the_argument(case, mutate, error, argument):
    assert_rejected(error, argument, bnr.check_batch_norm_relu_rows_inputs, torch.ops.maml_fast.batch_norm_relu, (*mutate(*_valid()), EPS),
                    bnr.is_available("cpu"))


@pytest.mark.parametrize("eps", [-1e-5, float("nan"), float("inf")])
def test_bad_eps(eps):
    assert_rejected(ValueError, "eps", bnr.check_batch_norm_relu_rows_inputs, torch.ops.maml_fast.batch_norm_relu, (*_valid(), eps),
                    bnr.is_available("cpu"))


@pytest.mark.parametrize(("negative_slope", "error"), [(-0.1, ValueError), (float("nan"), ValueError),
                                                     (float("inf"), ValueError), (True, TypeError)])
def test_bad_negative_slope(negative_slope, error):
    args = (*_valid(), EPS, negative_slope)
    # (the op's schema takes a float: True converts there, so only the Python check sees a bool)
    op_available = bnr.is_available("cpu") and error is ValueError
    assert_rejected(error, "negative_slope", bnr.check_batch_norm_relu_rows_inputs, torch.ops.maml_fast.batch_norm_relu,
                    args, op_available)
    with pytest.raises(error, match="negative_slope"):
        bnr.batch_norm_relu(torch.randn(4, 6), None, None, 2, EPS, negative_slope)
    if op_available:
        x, weight, bias = _valid()
        y, mean, rstd = torch.ops.maml_fast.batch_norm_relu(x, weight, bias, EPS)
        saved = (torch.randn_like(x), x, y, weight, mean, rstd, negative_slope)
        with pytest.raises(error, match="negative_slope"):
            torch.ops.maml_fast.batch_norm_relu_backward(*saved)
        with pytest.raises(error, match="negative_slope"):
            torch.ops.maml_fast.batch_norm_relu_double_backward(None, None, None, *saved)


def test_not_a_tensor():
    x, weight, bias = _valid()
    with pytest.raises(TypeError, match="weight"):
        bnr.check_batch_norm_relu_rows_inputs(x, [1.0, 2.0, 3.0], bias, EPS)


@needs_cpu_ops
@pytest.mark.parametrize(
    ("argument", "replace", "error"),
    [
        ("grad_y", lambda a: a.update(grad_y=a["grad_y"][:, :2]), ValueError),
        ("grad_y", lambda a: a.update(grad_y=a["grad_y"].double()), TypeError),
        ("y", lambda a: a.update(y=a["y"][:3]), ValueError),
        ("mean", lambda a: a.update(mean=a["mean"].double()), TypeError),
        ("rstd", lambda a: a.update(rstd=a["rstd"][:2]), ValueError),
        ("weight", lambda a: a.update(weight=a["weight"][None]), ValueError),
    ],
)
def test_bad_backward_inputs_name_the_argument(argument, replace, error):
    x, weight, bias = _valid()
    y, mean, rstd = torch.ops.maml_fast.batch_norm_relu(x, weight, bias, EPS)
    args = dict(grad_y=torch.randn_like(x), x=x, y=y, weight=weight, mean=mean, rstd=rstd)
    replace(args)
    with pytest.raises(error, match=rf"\b{argument}\b"):
        torch.ops.maml_fast.batch_norm_relu_backward(*args.values())
    with pytest.raises(error, match=rf"\b{argument}\b"):
        torch.ops.maml_fast.batch_norm_relu_double_backward(None, None, None, *args.values())


@needs_cpu_ops
@pytest.mark.parametrize(
    ("argument", "value", "error"),
    [("grad_grad_x", torch.randn(4, 2), ValueError), ("grad_grad_x", torch.randn(4, 3).double(), TypeError),
     ("grad_grad_weight", torch.randn(2), ValueError), ("grad_grad_bias", torch.randn(3).double(), TypeError)],
)
def test_bad_double_backward_inputs_name_the_argument(argument, value, error):
    x, weight, bias = _valid()
    y, mean, rstd = torch.ops.maml_fast.batch_norm_relu(x, weight, bias, EPS)
    given = {"grad_grad_x": None, "grad_grad_weight": None, "grad_grad_bias": None, argument: value}
    with pytest.raises(error, match=rf"\b{argument}\b"):
        torch.ops.maml_fast.batch_norm_relu_double_backward(*given.values(), torch.randn_like(x), x, y, weight, mean,
                                                            rstd)


@needs_cpu_ops
def test_grouped_entry_point_checks_like_batch_norm():
    x = torch.randn(3, 6, 2, 2).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="tasks"):
        bnr.batch_norm_relu(x, None, None, 4, EPS)
    with pytest.raises(ValueError, match="weight"):
        bnr.batch_norm_relu(x, torch.ones(2, 2), None, 2, EPS)
    with pytest.raises(ValueError, match="more than one value"):
        bnr.batch_norm_relu(torch.randn(1, 6), None, None, 2, EPS)


# ------------------------------------------------------------------------------ fake kernels
@needs_cpu_ops
def test_fake_kernels_for_compile_and_meta(generator):
    x, weight, bias, grad_y, gg_x, gg_weight, gg_bias = _all_inputs(6, 5, generator, torch.float32, "cpu")
    y, mean, rstd = torch.ops.maml_fast.batch_norm_relu(x, weight, bias, EPS)
    torch.library.opcheck(torch.ops.maml_fast.batch_norm_relu.default, (x, weight, bias, EPS))
    torch.library.opcheck(torch.ops.maml_fast.batch_norm_relu_backward.default, (grad_y, x, y, weight, mean, rstd))
    torch.library.opcheck(torch.ops.maml_fast.batch_norm_relu_double_backward.default,
                          (gg_x, gg_weight, None, grad_y, x, y, weight, mean, rstd))
    y_leaky, mean, rstd = torch.ops.maml_fast.batch_norm_relu(x, weight, bias, EPS, 0.1)
    torch.library.opcheck(torch.ops.maml_fast.batch_norm_relu.default, (x, weight, bias, EPS, 0.1))
    torch.library.opcheck(torch.ops.maml_fast.batch_norm_relu_backward.default,
                          (grad_y, x, y_leaky, weight, mean, rstd, 0.1))
    torch.library.opcheck(torch.ops.maml_fast.batch_norm_relu_double_backward.default,
                          (gg_x, None, gg_bias, grad_y, x, y_leaky, weight, mean, rstd, 0.1))
    meta = [t.to("meta") for t in (x, weight, bias)]
    y_meta, mean_meta, rstd_meta = torch.ops.maml_fast.batch_norm_relu(*meta, EPS)
    assert y_meta.shape == x.shape and mean_meta.shape == (5,) and rstd_meta.dtype == torch.float32

    def function(x, weight, bias):
        return bnr.batch_norm_relu_rows(x, weight, bias, EPS)

    compiled = torch.compile(function, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, weight, bias), y)


# ------------------------------------------------------------------------- lowering + backend
def test_fused_backend_is_registered_with_reasons():
    assert "fused" in backends.backend_names() and "fused" in backends.BACKENDS
    assert backends.unavailable_reasons("fused", torch.device("cpu")) == bnr.unavailable_reasons("cpu")
    if not torch.cuda.is_available():
        reasons = backends.unavailable_reasons("fused", torch.device("cuda"))
        assert reasons and all(isinstance(r, str) and r for r in reasons)


def test_cuda_alias_selects_the_fused_backend():
    """The former name "cuda" stays an alias of "fused" (the same backend object, not a registry key)."""
    assert "cuda" in backends.backend_names() and "cuda" not in backends.BACKENDS
    assert get_backend("cuda") is get_backend("fused")
    assert backends.unavailable_reasons("cuda", torch.device("cpu")) == backends.unavailable_reasons("fused", "cpu")


def _fused_layers(program):
    return sum("batch_norm_relu" in layer.__qualname__ for layer in program.layers)


@needs_cpu_ops
def test_lowering_fuses_batch_norm_relu_only_for_the_extension_backend():
    net = mf.models.conv4(1, 3, hidden=3)
    program, _ = lower(net, get_backend("torch"))  # "torch" stays pure PyTorch
    assert _fused_layers(program) == 0 and len(program.layers) == len(list(net.children()))
    program, _ = lower(net, get_backend("fused"))
    # (4 BatchNorm+ReLU pairs fused, and the head's pool, flatten and linear layer are one op)
    assert _fused_layers(program) == 4 and len(program.layers) == len(list(net.children())) - 4 - 2
    # BN followed by something other than an activation it takes: the op alone (the identity), the rest as
    # layers; not fused: running statistics.
    other = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Identity(), nn.ReLU())
    program = lower(other, get_backend("fused"))[0]
    assert _fused_layers(program) == 1 and len(program.layers) == 4
    tracked = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU())
    program, reason = lower(tracked, get_backend("fused"))
    assert program is None and "track_running_stats" in reason


@needs_cpu_ops
def test_lowering_fuses_batch_norm_leaky_relu():
    """BatchNorm + LeakyReLU of slope >= 0 is one fused op (a following max-pool stays a layer: the pooled
    op is ReLU only); before a negative slope the BatchNorm runs alone (the op with the identity: the slope's
    derivative cannot be read off y > 0). In a traced model too: each ResNet-12 block fuses its two
    BatchNorm+LeakyReLU pairs and runs its other two BatchNorms (before the sum) on the op alone."""
    def program_of(*layers):
        return lower(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, track_running_stats=False), *layers),
                     get_backend("fused"))[0]

    leaky = program_of(nn.LeakyReLU(0.1))
    assert _fused_layers(leaky) == 1 and len(leaky.layers) == 2
    pooled = program_of(nn.LeakyReLU(0.1), nn.MaxPool2d(2))
    assert _fused_layers(pooled) == 1 and len(pooled.layers) == 3
    negative = program_of(nn.LeakyReLU(-0.5))
    assert _fused_layers(negative) == 1 and len(negative.layers) == 3
    resnet = lower(mf.models.resnet12(3, 2, (2, 3, 4, 5)), get_backend("fused"))[0]
    assert _fused_layers(resnet) == 4 * 4


def _tiny_conv4_meta_gradient(backend, device="cpu", inner_steps=2, first_order=False, negative_slope=0.0):
    torch.manual_seed(0)
    net = mf.models.conv4(1, 2, hidden=3).double()
    if negative_slope:
        net = nn.Sequential(*(nn.LeakyReLU(negative_slope) if isinstance(m, nn.ReLU) else m for m in net))
    with torch.no_grad():  # BN affine away from 1/0 so that it matters
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                for p in module.parameters():
                    p.add_(0.2 * torch.randn_like(p))
    net = net.to(device)
    generator = torch.Generator().manual_seed(1)
    tasks, ways, shots, queries = 3, 2, 2, 3
    support_x = torch.randn(tasks, ways * shots, 1, 8, 8, generator=generator, dtype=torch.float64)
    query_x = torch.randn(tasks, ways * queries, 1, 8, 8, generator=generator, dtype=torch.float64)
    support_y = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).contiguous()
    query_y = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).contiguous()
    batch = mf.TaskBatch(*(t.to(device) for t in (support_x, support_y, query_x, query_y)))
    learner = mf.MAML(net, inner_lr=0.4, inner_steps=inner_steps, first_order=first_order, backend=backend)
    out = learner(batch)
    out.loss.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in net.parameters()]).cpu()
    return out.loss.detach().cpu(), grads, learner


def _count_op_calls(monkeypatch) -> dict[str, int]:
    return count_op_calls(monkeypatch, "batch_norm_relu", "batch_norm_relu_backward",
                          "batch_norm_relu_double_backward", "fast_weight_update")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("negative_slope", [0.0, 0.1])
def test_second_order_meta_gradient_matches_loop(device, negative_slope, monkeypatch):
    backend = "fused"
    calls = _count_op_calls(monkeypatch)
    loss, grads, learner = _tiny_conv4_meta_gradient(backend, device, negative_slope=negative_slope)
    assert _fused_layers(learner._executions[(backend, True)].forward) == 4
    # Forward, backward, (second order) double backward and the inner update all ran on the compiled ops.
    assert all(calls[name] > 0 for name in calls), calls
    ref_loss, ref_grads, _ = _tiny_conv4_meta_gradient("loop", negative_slope=negative_slope)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
    relative = ((grads - ref_grads).norm() / ref_grads.norm()).item()
    assert relative <= 1e-9, relative


@needs_cpu_ops
def test_cuda_alias_runs_the_fused_backend():
    """``backend="cuda"`` (the former name) still runs: the fused backend, with the same result."""
    loss, grads, learner = _tiny_conv4_meta_gradient("cuda", inner_steps=1)
    assert list(learner._executions) == [("fused", True)]
    assert _fused_layers(learner._executions[("fused", True)].forward) == 4
    fused_loss, fused_grads, _ = _tiny_conv4_meta_gradient("fused", inner_steps=1)
    torch.testing.assert_close(loss, fused_loss, rtol=0, atol=0)
    torch.testing.assert_close(grads, fused_grads, rtol=0, atol=0)


def assert_second_order_term_matches_loop(meta_gradient, double_backward_op, monkeypatch):
    """The second-order term of the meta-gradient, ``g(second order) - g(first order)`` from the same
    net and batch (only ``first_order`` differs), is the same on "fused" as on "loop" to 1e-9 of the
    term's own size, and is not small. A "fused" op whose backward were first-order only (not
    differentiated, or its double backward dropping terms) would lose part of that term. The op's
    double backward runs in the second-order step only."""
    calls = count_op_calls(monkeypatch, double_backward_op)
    fused_second = meta_gradient("fused", first_order=False)
    second_order_calls = calls[double_backward_op]
    fused_first = meta_gradient("fused", first_order=True)
    assert second_order_calls > 0 and calls[double_backward_op] == second_order_calls, calls
    loop_second, loop_first = meta_gradient("loop", first_order=False), meta_gradient("loop", first_order=True)
    expected, term = loop_second - loop_first, fused_second - fused_first
    assert expected.norm() > 1e-2 * loop_second.norm(), "the second-order term is too small to tell anything"
    relative = ((term - expected).norm() / expected.norm()).item()
    assert relative <= 1e-9, f"second-order term differs from the loop's by {relative:.3g} of its size"


@needs_cpu_ops
def test_second_order_is_real(monkeypatch):
    """The BatchNorm+ReLU op's double backward gives the exact second-order term (see the helper)."""
    assert_second_order_term_matches_loop(
        lambda backend, first_order: _tiny_conv4_meta_gradient(backend, inner_steps=1, first_order=first_order)[1],
        "batch_norm_relu_double_backward", monkeypatch)


@pytest.mark.parametrize("device", DEVICES)
def test_uses_extension_ops_per_device(device):
    """Backend "fused" runs the compiled ops wherever they are available; "torch" and "loop" never do
    (no fused layers in their lowering, the PyTorch losses and fast-weight update)."""
    fused, pytorch, loop = get_backend("fused"), get_backend("torch"), get_backend("loop")
    assert fused.is_available(device) == bnr.is_available(device)
    net = mf.models.conv4(1, 3, hidden=3)
    assert _fused_layers(lower(net, fused)[0]) == 4
    assert _fused_layers(lower(net, pytorch)[0]) == 0
    for backend in (pytorch, loop):
        assert backend.losses is LOSSES
        assert type(backend).fast_weight_update is backends.Backend.fast_weight_update
