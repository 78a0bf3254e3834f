"""maml_fast.ops.batch_norm_relu_pool: the compiled BatchNorm+ReLU+2x2-max-pool ops (forward, backward,
double backward) against the float64 reference max_pool2d(relu(batch_norm)), even and odd H/W, ties
routed like PyTorch's max_pool2d, gradcheck/gradgradcheck through the autograd glue, third order,
poisoned outputs, bad input, fake kernels, the lowering of BatchNorm2d -> ReLU -> MaxPool2d(2), and
the full second-order meta-gradient of a small MiniImageNet-style conv4 against backend "loop".
Kernel tests run per device and skip with the reason the ops cannot run there."""
from __future__ import annotations

import pytest
import test_batch_norm_relu as bn_relu_tests
import torch
import torch.nn.functional as F
from torch import nn

import maml_fast as mf
from maml_fast.backends import get_backend
from maml_fast.ops import batch_norm_relu as bnr
from maml_fast.ops import batch_norm_relu_pool as bnrp
from maml_fast.program import lower
from conftest import assert_rejected, count_op_calls, op_devices
from test_per_step_bn_statistics import assert_statistics_match_their_definition

EPS = 1e-5
_assert_close_scaled = bn_relu_tests._assert_close_scaled
_graph_has = bn_relu_tests._graph_has


DEVICES = op_devices(bnrp.unavailable_reasons)
needs_cpu_ops = pytest.mark.skipif(not bnrp.is_available("cpu"), reason="; ".join(bnrp.unavailable_reasons("cpu")))

# (batch, height, width, channels): the smallest window, odd heights / widths (an uncovered last row
# and / or column), one channel, primes, widths around the CPU kernels' 16-lane vectors, T*C = 4*32.
SHAPES = [(1, 2, 2, 1), (2, 2, 2, 3), (3, 5, 7, 5), (1, 3, 3, 17), (2, 4, 5, 16), (5, 7, 2, 13), (2, 6, 6, 33),
          (4, 9, 11, 7), (2, 8, 8, 128)]


@pytest.fixture
def generator() -> torch.Generator:
    generator = torch.Generator()
    print(f"seed: {generator.seed()}")
    return generator


def make_inputs(shape, generator, dtype=torch.float64, device="cpu"):
    """x [B, H, W, C] (per-channel offsets and scales), weight (both signs), bias."""
    channels = shape[-1]

    def randn(*size):
        return torch.randn(size, generator=generator, dtype=torch.float64)

    x = randn(*shape) * (2 * randn(channels).abs() + 0.1) + 0.5 * randn(channels)
    return [t.to(dtype=dtype, device=device) for t in (x, randn(channels), 0.5 * randn(channels))]


def all_inputs(shape, generator, dtype=torch.float64, device="cpu"):
    """x, weight, bias, grad_y (pooled), grad_grad_x, grad_grad_weight, grad_grad_bias."""
    x, weight, bias = make_inputs(shape, generator, dtype, device)

    def randn(*size):
        return torch.randn(size, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)

    return x, weight, bias, randn(*bnrp.pooled_shape(x)), randn(*shape), randn(shape[-1]), randn(shape[-1])


def run_ops(x, weight, bias, grad_y, gg_x, gg_weight, gg_bias):
    y, mean, rstd = torch.ops.maml_fast.batch_norm_relu_max_pool(x, weight, bias, EPS)
    first = torch.ops.maml_fast.batch_norm_relu_max_pool_backward(grad_y, x, weight, bias, mean, rstd)
    second = torch.ops.maml_fast.batch_norm_relu_max_pool_double_backward(
        gg_x, gg_weight, gg_bias, grad_y, x, weight, bias, mean, rstd)
    return (y, mean, rstd), list(first), list(second)


def reference_derivatives(x, weight, bias, grad_y, gg_x, gg_weight, gg_bias):
    """Forward, first and second derivatives (of <ggx, gx> + <gg_w, g_w> + <gg_b, g_b> with respect to
    grad_y, x, weight) by autograd of the float64 reference (PyTorch's max_pool2d routing)."""
    x, weight, bias, grad_y = (t.detach().double().cpu().requires_grad_() for t in (x, weight, bias, grad_y))
    y, mean, rstd = bnrp.batch_norm_relu_max_pool_reference(x, weight, bias, EPS)
    first = torch.autograd.grad(y, (x, weight, bias), grad_y, create_graph=True)
    given = [(g, gg.double().cpu()) for g, gg in zip(first, (gg_x, gg_weight, gg_bias)) if gg is not None]
    if given:
        outer = sum((g * gg).sum() for g, gg in given)
        second = torch.autograd.grad(outer, (grad_y, x, weight), allow_unused=True)
    else:
        second = (None, None, None)
    second = [torch.zeros_like(t) if s is None else s for s, t in zip(second, (grad_y, x, weight))]
    return (y.detach(), mean.detach(), rstd.detach()), [g.detach() for g in first], second


def assert_matches_reference(inputs, forward_rtol, first_rtol, second_rtol):
    forward, first, second = run_ops(*inputs)
    ref_forward, ref_first, ref_second = reference_derivatives(*inputs)
    x = inputs[0]
    for name, out, ref in zip(("y", "mean", "rstd"), forward, ref_forward):
        assert out.device == x.device and out.shape == ref.shape and out.is_contiguous(), name
        _assert_close_scaled(out, ref, forward_rtol, name)
    for name, out, ref in zip(("grad_x", "grad_weight", "grad_bias"), first, ref_first):
        assert out.shape == ref.shape and out.dtype == x.dtype and out.is_contiguous(), name
        _assert_close_scaled(out, ref, first_rtol, name)
    for name, out, ref in zip(("grad_grad_y", "grad_x", "grad_weight"), second, ref_second):
        assert out.shape == ref.shape and out.dtype == x.dtype and out.is_contiguous(), name
        _assert_close_scaled(out, ref, second_rtol, name)


# ------------------------------------------------------------------------------------- the ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
@pytest.mark.parametrize("given", ["all", "no_ggx", "only_ggx", "none"])
def test_ops_match_reference_float64(device, shape, given, generator):
    x, weight, bias, grad_y, gg_x, gg_weight, gg_bias = all_inputs(shape, generator, device=device)
    if given in ("no_ggx", "none"):
        gg_x = None
    if given in ("only_ggx", "none"):
        gg_weight = gg_bias = None
    assert_matches_reference((x, weight, bias, grad_y, gg_x, gg_weight, gg_bias), 1e-12, 1e-11, 1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 5, 7, 17), (4, 8, 8, 40)], ids=["2x5x7x17", "4x8x8x40"])
def test_float32_against_float64(device, shape, generator):
    """float32 in, float32 statistics: close to the float64 reference. (The inputs are float64 values
    rounded to float32, so the reference sees the same numbers; random data has no near-ties.)"""
    inputs = all_inputs(shape, generator, torch.float32, device)
    forward, _, _ = run_ops(*inputs)
    assert forward[0].dtype == torch.float32 and forward[1].dtype == torch.float32
    tolerance = bn_relu_tests.low_precision_tolerance(torch.float32)
    assert_matches_reference(inputs, tolerance, tolerance, tolerance)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 6, 9), (4, 8, 8, 40)], ids=["2x5x6x9", "4x8x8x40"])
def test_half_precisions_against_float64(device, dtype, shape, generator):
    """float16 / bfloat16: float32 statistics, outputs in the input dtype; forward, backward and double
    backward against the float64 reference on the same rounded inputs, within
    `test_batch_norm_relu.low_precision_tolerance` (one rounding to the dtype plus float32 arithmetic)."""
    inputs = all_inputs(shape, generator, dtype, device)
    forward, first, second = run_ops(*inputs)
    assert forward[0].dtype == dtype and forward[1].dtype == torch.float32
    assert all(out.dtype == dtype for out in (*first, *second))
    tolerance = bn_relu_tests.low_precision_tolerance(dtype)
    assert_matches_reference(inputs, tolerance, tolerance, tolerance)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 4, 4, 3), (3, 5, 7, 5)], ids=["even", "odd"])
def test_ties_route_like_max_pool2d(device, shape, generator):
    """Windows with repeated values (two, three or four equal maxima, and all-equal windows below
    zero): the gradient goes to the first maximum in row-major order, as PyTorch's max_pool2d does."""
    x, weight, bias, grad_y, gg_x, gg_weight, gg_bias = all_inputs(shape, generator, device=device)
    levels = torch.randint(0, 3, shape, generator=generator).double().to(device)  # few distinct values
    x = levels * (1 + torch.arange(shape[-1], dtype=torch.float64, device=device))
    weight = weight.abs() + 0.1  # monotone z(x): the ties of x are the ties of z
    assert_matches_reference((x, weight, bias, grad_y, gg_x, gg_weight, gg_bias), 1e-12, 1e-11, 1e-10)
    # A window of four equal positive values sends everything to its top-left position.
    x = torch.zeros(shape, dtype=torch.float64, device=device)
    x[:, :2, :2, :] = 1.0
    gx, _, _ = torch.ops.maml_fast.batch_norm_relu_max_pool_backward(
        grad_y, x, weight.abs(), torch.zeros_like(bias), *torch.ops.maml_fast.batch_norm_relu_max_pool(
            x, weight.abs(), torch.zeros_like(bias), EPS)[1:])
    _, ref_first, _ = reference_derivatives(x, weight.abs(), torch.zeros_like(bias), grad_y, None, None, None)
    _assert_close_scaled(gx, ref_first[0], 1e-11, "grad_x")


@pytest.mark.parametrize("device", DEVICES)
def test_window_max_and_relu_are_exact(device):
    """y is exactly relu of the window's max of z (here z = x: unit statistics, gamma 1, beta 0), and
    NaN propagates."""
    x = torch.tensor([[[[-2.0], [1.0]], [[-1.0], [0.0]]], [[[2.0], [-3.0]], [[3.0], [0.0]]]], dtype=torch.float64)
    mean, std = x.mean(), x.std(correction=0)
    x = ((x - mean) / std).to(device)
    weight = torch.ones(1, dtype=torch.float64, device=device)
    y, _, _ = torch.ops.maml_fast.batch_norm_relu_max_pool(x, weight, torch.zeros_like(weight), 0.0)
    expected = torch.relu(x.amax(dim=(1, 2), keepdim=True))
    torch.testing.assert_close(y, expected, rtol=1e-15, atol=1e-15)
    x[0, 0, 0, 0] = float("nan")
    y, _, _ = torch.ops.maml_fast.batch_norm_relu_max_pool(x, weight, torch.zeros_like(weight), 0.0)
    assert y.isnan().all()  # a NaN makes its channel's statistics NaN


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 5, 7, 5), (3, 8, 8, 40), (1, 2, 3, 33)], ids=["odd", "8x8x40", "2x3"])
def test_outputs_are_fully_written(device, shape, generator):
    inputs = all_inputs(shape, generator, torch.float32, device)
    forward, first, second = run_ops(*inputs)
    _, _, second_none = run_ops(*inputs[:4], None, None, None)
    for out in (*forward, *first, *second, *second_none):
        assert not out.isnan().any()


@needs_cpu_ops
@pytest.mark.parametrize("threads", [1, 3])
def test_several_chunks(threads, generator):
    """Enough cells for the CPU kernels to split them over several threads and 16-cell groups."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        inputs = all_inputs((8, 17, 15, 37), generator)
        assert_matches_reference(inputs, 1e-12, 1e-10, 1e-10)
    finally:
        torch.set_num_threads(previous)


@needs_cpu_ops
def test_deterministic_across_calls(generator):
    inputs = all_inputs((4, 9, 10, 40), generator, torch.float32)
    for a_group, b_group in zip(run_ops(*inputs), run_ops(*inputs)):
        assert all(torch.equal(a, b) for a, b in zip(a_group, b_group))


# ---------------------------------------------------------------------------------- autograd
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 2, 2, 2), (2, 3, 5, 3), (2, 4, 4, 2)], ids=["2x2", "3x5", "4x4"])
def test_gradcheck_and_gradgradcheck(device, shape, generator):
    """First and second derivatives in x, weight and bias; gradgradcheck also differentiates with
    respect to grad_y."""
    x, weight, bias = (t.requires_grad_() for t in make_inputs(shape, generator, device=device))

    def function(x, weight, bias):
        return bnrp.batch_norm_relu_max_pool_nhwc(x, weight, bias, EPS)

    assert type(function(x, weight, bias).grad_fn).__name__ == "_BatchNormReluMaxPoolBackward"
    assert torch.autograd.gradcheck(function, (x, weight, bias))
    assert torch.autograd.gradgradcheck(function, (x, weight, bias))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("tasks", "channels"), [(1, 3), (3, 2)], ids=["T1", "T3"])
def test_grouped_layout_gradgradcheck(device, tasks, channels, generator):
    """The grouped-layout entry point: channels-last [B, T*C, H, W] in and out, [T, C] affine."""
    x = torch.randn(2, tasks * channels, 5, 4, generator=generator, dtype=torch.float64).to(device)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(tasks, channels, generator=generator, dtype=torch.float64).to(device).requires_grad_()
    bias = torch.randn(tasks, channels, generator=generator, dtype=torch.float64).to(device).requires_grad_()

    def function(x, weight, bias):  # gradcheck perturbs a contiguous copy; keep the fused layout
        return bnrp.batch_norm_relu_max_pool(x.contiguous(memory_format=torch.channels_last), weight, bias, tasks,
                                             EPS)

    out = function(x, weight, bias)
    assert _graph_has(out.grad_fn, "_BatchNormReluMaxPoolBackward"), "the fused op was not used"
    assert out.is_contiguous(memory_format=torch.channels_last)
    reference = bnrp.batch_norm_relu_max_pool_grouped_reference(x, weight, bias, tasks, EPS)
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(function, (x, weight, bias))
    assert torch.autograd.gradgradcheck(function, (x, weight, bias))


@needs_cpu_ops
def test_unfused_fallbacks(generator):
    """NCHW-contiguous x, or no extension: the BatchNorm+ReLU path and F.max_pool2d, same values."""
    x = torch.randn(3, 4, 5, 5, generator=generator, dtype=torch.float64)
    reference = bnrp.batch_norm_relu_max_pool_grouped_reference(x, None, None, 2, EPS)
    unfused = (bnrp.batch_norm_relu_max_pool(x, None, None, 2, EPS),
               F.max_pool2d(bnr.batch_norm_relu_unfused(x.contiguous(memory_format=torch.channels_last), None, None, 2,
                                                        EPS), 2))
    for out in unfused:
        assert not _graph_has(out.grad_fn, "_BatchNormReluMaxPoolBackward")
        torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    fused = bnrp.batch_norm_relu_max_pool(x.contiguous(memory_format=torch.channels_last), None, None, 2, EPS)
    torch.testing.assert_close(fused, reference, rtol=1e-12, atol=1e-12)


@needs_cpu_ops
def test_third_order_matches_reference(generator):
    """With a graph recorded around the second backward, the double backward runs as the
    differentiable composite: third derivatives match autograd of the reference."""
    def third(function, x, weight, bias):
        x, weight, bias = (t.detach().requires_grad_() for t in (x, weight, bias))
        y = function(x, weight, bias)
        gx, gw = torch.autograd.grad((y * y.detach().cos()).sum(), (x, weight), create_graph=True)
        ggx, ggw = torch.autograd.grad((gx * gx).sum() + (gw * gw.detach()).sum(), (x, weight), create_graph=True)
        # bias enters the second derivatives only through the ReLU mask and the argmax (no derivative)
        return torch.autograd.grad(ggx.sin().sum() + ggw.sum(), (x, weight, bias), materialize_grads=True)

    inputs = make_inputs((2, 5, 4, 3), generator)
    fused = third(lambda x, w, b: bnrp.batch_norm_relu_max_pool_nhwc(x, w, b, EPS), *inputs)
    reference = third(lambda x, w, b: bnrp.batch_norm_relu_max_pool_reference(x, w, b, EPS)[0], *inputs)
    for out, ref in zip(fused, reference):
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)

    x, weight, bias = (t.requires_grad_() for t in make_inputs((1, 3, 4, 2), generator))

    def second_order(x, weight, bias):
        y = bnrp.batch_norm_relu_max_pool_nhwc(x, weight, bias, EPS)
        return torch.autograd.grad((y * y).sum(), (x, weight), create_graph=True)

    assert torch.autograd.gradgradcheck(second_order, (x, weight, bias))


# -------------------------------------------------------------------------------- bad input
def _valid(shape=(2, 4, 5, 3)):
    return torch.randn(shape), torch.randn(shape[-1]), torch.randn(shape[-1])


BAD_FORWARD = [
    ("x 2-D", lambda x, w, b: (x[0, 0], w, b), ValueError, "x"),
    ("x 5-D", lambda x, w, b: (x[None], w, b), ValueError, "x"),
    ("height 1", lambda x, w, b: (x[:, :1], w, b), ValueError, "x"),
    ("width 1", lambda x, w, b: (x[:, :, :1], w, b), ValueError, "x"),
    ("empty batch", lambda x, w, b: (x[:0], w, b), ValueError, "x"),
    ("integer x", lambda x, w, b: (x.long(), w.long(), b.long()), TypeError, "x"),
    ("weight shape", lambda x, w, b: (x, w[:2], b), ValueError, "weight"),
    ("weight dtype", lambda x, w, b: (x, w.double(), b), TypeError, "weight"),
    ("bias shape", lambda x, w, b: (x, w, b[None]), ValueError, "bias"),
    ("bias dtype", lambda x, w, b: (x, w, b.double()), TypeError, "bias"),
]


@pytest.mark.parametrize(("case", "mutate", "error", "argument"), BAD_FORWARD, ids=[c[0] for c in BAD_FORWARD])
def test_bad_forward_inputs_name_the_argument(case, mutate, error, argument):
    assert_rejected(error, argument, bnrp.check_batch_norm_relu_max_pool_inputs, torch.ops.maml_fast.batch_norm_relu_max_pool, (*mutate(*_valid()), EPS),
                    bnrp.is_available("cpu"))


@pytest.mark.parametrize("eps", [-1e-5, float("nan"), float("inf")])
def test_bad_eps(eps):
    assert_rejected(ValueError, "eps", bnrp.check_batch_norm_relu_max_pool_inputs, torch.ops.maml_fast.batch_norm_relu_max_pool, (*_valid(), eps),
                    bnrp.is_available("cpu"))


@needs_cpu_ops
@pytest.mark.parametrize(
    ("argument", "replace", "error"),
    [
        ("grad_y", lambda a: a.update(grad_y=torch.randn(a["x"].shape)), ValueError),  # x's shape, not pooled
        ("grad_y", lambda a: a.update(grad_y=a["grad_y"].double()), TypeError),
        ("bias", lambda a: a.update(bias=a["bias"][:2]), ValueError),
        ("mean", lambda a: a.update(mean=a["mean"].double()), TypeError),
        ("rstd", lambda a: a.update(rstd=a["rstd"][:2]), ValueError),
        ("weight", lambda a: a.update(weight=a["weight"][None]), ValueError),
        ("x", lambda a: a.update(x=a["x"][:, :1]), ValueError),
    ],
)
def test_bad_backward_inputs_name_the_argument(argument, replace, error):
    x, weight, bias = _valid()
    _, mean, rstd = torch.ops.maml_fast.batch_norm_relu_max_pool(x, weight, bias, EPS)
    args = dict(grad_y=torch.randn(bnrp.pooled_shape(x)), x=x, weight=weight, bias=bias, mean=mean, rstd=rstd)
    replace(args)
    with pytest.raises(error, match=rf"\b{argument}\b"):
        torch.ops.maml_fast.batch_norm_relu_max_pool_backward(*args.values())
    with pytest.raises(error, match=rf"\b{argument}\b"):
        torch.ops.maml_fast.batch_norm_relu_max_pool_double_backward(None, None, None, *args.values())


@needs_cpu_ops
@pytest.mark.parametrize(
    ("argument", "value", "error"),
    [("grad_grad_x", torch.randn(2, 2, 2, 3), ValueError), ("grad_grad_x", torch.randn(2, 4, 5, 3).double(), TypeError),
     ("grad_grad_weight", torch.randn(2), ValueError), ("grad_grad_bias", torch.randn(3).double(), TypeError)],
)
def test_bad_double_backward_inputs_name_the_argument(argument, value, error):
    x, weight, bias = _valid()
    _, mean, rstd = torch.ops.maml_fast.batch_norm_relu_max_pool(x, weight, bias, EPS)
    given = {"grad_grad_x": None, "grad_grad_weight": None, "grad_grad_bias": None, argument: value}
    with pytest.raises(error, match=rf"\b{argument}\b"):
        torch.ops.maml_fast.batch_norm_relu_max_pool_double_backward(
            *given.values(), torch.randn(bnrp.pooled_shape(x)), x, weight, bias, mean, rstd)


# ------------------------------------------------------------------------------ fake kernels
@needs_cpu_ops
def test_fake_kernels_for_compile_and_meta(generator):
    x, weight, bias, grad_y, gg_x, gg_weight, _ = all_inputs((2, 5, 4, 3), generator, torch.float32)
    y, mean, rstd = torch.ops.maml_fast.batch_norm_relu_max_pool(x, weight, bias, EPS)
    torch.library.opcheck(torch.ops.maml_fast.batch_norm_relu_max_pool.default, (x, weight, bias, EPS))
    torch.library.opcheck(torch.ops.maml_fast.batch_norm_relu_max_pool_backward.default,
                          (grad_y, x, weight, bias, mean, rstd))
    torch.library.opcheck(torch.ops.maml_fast.batch_norm_relu_max_pool_double_backward.default,
                          (gg_x, gg_weight, None, grad_y, x, weight, bias, mean, rstd))
    y_meta, mean_meta, _ = torch.ops.maml_fast.batch_norm_relu_max_pool(*(t.to("meta") for t in (x, weight, bias)), EPS)
    assert y_meta.shape == (2, 2, 2, 3) and mean_meta.shape == (3,) and mean_meta.dtype == torch.float32

    compiled = torch.compile(lambda x, w, b: bnrp.batch_norm_relu_max_pool_nhwc(x, w, b, EPS), backend="aot_eager",
                             fullgraph=True)
    torch.testing.assert_close(compiled(x, weight, bias), y)


# ------------------------------------------------------------------------- lowering + backend
@needs_cpu_ops
def test_lowering_fuses_the_pool_only_when_exactly_max_pool_2x2():
    """BatchNorm2d -> ReLU -> MaxPool2d(2) becomes one layer for backend "fused" (the op calls are
    counted in the meta-gradient tests); any other pool stays a layer of its own after the pair."""
    net = mf.models.conv4(3, 5, hidden=4, downsample="maxpool", image_size=16)
    program, _ = lower(net, get_backend("torch"))
    assert len(program.layers) == len(list(net.children())) == 4 * 4 + 2
    program, _ = lower(net, get_backend("fused"))
    assert len(program.layers) == 4 * 2 + 2  # conv, BN+ReLU+pool (x 4), flatten, linear
    for pool, exact in ((nn.MaxPool2d(2), True), (nn.MaxPool2d((2, 2), stride=(2, 2)), True),
                        (nn.MaxPool2d(2, stride=1), False), (nn.MaxPool2d(3), False), (nn.MaxPool2d(2, padding=1), False),
                        (nn.MaxPool2d(2, ceil_mode=True), False), (nn.AvgPool2d(2), False)):
        block = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False), nn.ReLU(), pool)
        program, reason = lower(block, get_backend("fused"))
        assert reason is None and len(program.layers) == (2 if exact else 3), pool


def _maxpool_conv4_meta_gradient(backend, device="cpu", inner_steps=2, image_size=20, first_order=False):
    torch.manual_seed(0)
    net = mf.models.conv4(1, 2, hidden=3, downsample="maxpool", image_size=image_size).double()
    with torch.no_grad():  # BN affine away from 1/0 so that it matters
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                for p in module.parameters():
                    p.add_(0.2 * torch.randn_like(p))
    net = net.to(device)
    generator = torch.Generator().manual_seed(1)
    tasks, ways, shots, queries = 2, 2, 2, 2
    shape = (1, image_size, image_size)
    support_x = torch.randn(tasks, ways * shots, *shape, generator=generator, dtype=torch.float64)
    query_x = torch.randn(tasks, ways * queries, *shape, generator=generator, dtype=torch.float64)
    support_y = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).contiguous()
    query_y = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).contiguous()
    batch = mf.TaskBatch(*(t.to(device) for t in (support_x, support_y, query_x, query_y)))
    learner = mf.MAML(net, inner_lr=0.4, inner_steps=inner_steps, first_order=first_order, backend=backend)
    out = learner(batch)
    out.loss.backward()
    return out.loss.detach().cpu(), torch.cat([p.grad.reshape(-1) for p in net.parameters()]).cpu()


def _count_op_calls(monkeypatch) -> dict[str, int]:
    return count_op_calls(monkeypatch, "batch_norm_relu", "batch_norm_relu_max_pool",
                          "batch_norm_relu_max_pool_backward", "batch_norm_relu_max_pool_double_backward")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("image_size", [16, 20])
def test_second_order_meta_gradient_matches_loop(device, image_size, monkeypatch):
    """conv4(downsample="maxpool"): 16 -> 8 -> 4 -> 2 -> 1 (even) and 20 -> 10 -> 5 -> 2 -> 1 (an odd
    5x5 map whose last row and column no window covers)."""
    calls = _count_op_calls(monkeypatch)
    loss, grads = _maxpool_conv4_meta_gradient("fused", device, image_size=image_size)
    # Forward, backward and (second order) double backward ran on the pooled ops, a multiple of the
    # 4 blocks each; no BN+ReLU pair op.
    assert calls.pop("batch_norm_relu") == 0, calls
    assert all(count > 0 and count % 4 == 0 for count in calls.values()), calls
    ref_loss, ref_grads = _maxpool_conv4_meta_gradient("loop", image_size=image_size)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
    relative = ((grads - ref_grads).norm() / ref_grads.norm()).item()
    assert relative <= 1e-9, relative


@needs_cpu_ops
def test_second_order_is_real(monkeypatch):
    """The pooled op's double backward gives the exact second-order term (second minus first order,
    same net and batch) of the meta-gradient: `assert_second_order_term_matches_loop`."""
    bn_relu_tests.assert_second_order_term_matches_loop(
        lambda backend, first_order: _maxpool_conv4_meta_gradient(backend, inner_steps=1, image_size=16,
                                                                  first_order=first_order)[1],
        "batch_norm_relu_max_pool_double_backward", monkeypatch)


@needs_cpu_ops
def test_per_step_bn_statistics_match_their_definition(make_batch):
    """MAML++ per-step running statistics through the pooled layers: recorded in training as their
    definition says, and used in eval (BatchNorm with the statistics, ReLU, then the pool) with the
    reference's loss (`test_per_step_bn_statistics.assert_statistics_match_their_definition`)."""
    assert_statistics_match_their_definition("fused", "maxpool", make_batch)
