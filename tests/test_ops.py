"""Every task-batched op against its per-task reference (values and autograd, float64 and float32),
and gradcheck / gradgradcheck on all differentiable inputs; the three conv primitives each with
gradcheck / gradgradcheck, and a third-order check of conv2d."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

from maml_fast.ops import conv2d as conv_ops
from maml_fast.ops import linear as linear_ops
from maml_fast.ops import losses as loss_ops
from maml_fast.ops import norm as norm_ops

# The op and its reference run in the same dtype; float64 should agree to rounding.
TOLERANCES = {torch.float64: dict(rtol=1e-11, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-5)}
DTYPES = [torch.float64, torch.float32]
FULL_CHECK_MAX_NUMEL = 40  # larger inputs use gradcheck's fast (random projection) mode


def rand(*shape, dtype=torch.float64, grad=True):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def check_grads(fn, inputs, second=True):
    """gradcheck (and gradgradcheck) of ``fn`` on all its inputs (all differentiable), float64."""
    fast = sum(t.numel() for t in inputs) > FULL_CHECK_MAX_NUMEL
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=fast)
    if second:
        assert gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=fast)


def assert_same_function(op, reference, inputs, dtype, orders=2):
    """Values and derivatives up to ``orders`` (first: VJP; second: a Hessian-vector-product style
    double backward) of ``op`` equal those of ``reference``."""
    tol = TOLERANCES[dtype]
    out, expected = op(*inputs), reference(*inputs)
    torch.testing.assert_close(out, expected, **tol)
    if orders < 1:
        return
    cotangent = torch.randn_like(expected)
    g_op = torch.autograd.grad(out, inputs, cotangent, create_graph=orders > 1)
    g_ref = torch.autograd.grad(expected, inputs, cotangent, create_graph=orders > 1)
    for a, b in zip(g_op, g_ref):
        torch.testing.assert_close(a, b, **tol)
    if orders < 2:
        return
    # second order: differentiate <grads, random directions> once more
    directions = [torch.randn_like(g) for g in g_ref]
    s_op = sum((g * d).sum() for g, d in zip(g_op, directions))
    s_ref = sum((g * d).sum() for g, d in zip(g_ref, directions))
    h_op = torch.autograd.grad(s_op, inputs, allow_unused=True)
    h_ref = torch.autograd.grad(s_ref, inputs, allow_unused=True)
    for a, b in zip(h_op, h_ref):
        if b is None:
            assert a is None or a.abs().max() <= tol["atol"]
        else:
            torch.testing.assert_close(a if a is not None else torch.zeros_like(b), b, **tol)


# --------------------------------------------------------------------------- conv2d
# (tasks, in_ch, out_ch, H, W, kernel, stride, padding, bias)
CONV_CASES = [
    (1, 1, 3, 6, 5, (3, 3), 1, 0, True),          # T=1, one input channel
    (5, 3, 2, 7, 6, (3, 3), 2, 1, True),          # T=5, stride 2, odd/even sizes, padding 1
    (2, 5, 7, 5, 5, (3, 3), 2, 0, False),         # prime channel counts, stride 2 odd size, padding 0
    (3, 2, 3, 8, 8, (3, 3), 2, 1, True),          # even size with stride 2 (needs output_padding)
    (2, 1, 2, 6, 5, (2, 3), (2, 1), (1, 0), True),  # rectangular kernel, per-dim stride/padding
    (5, 1, 1, 5, 5, (1, 1), 1, 0, True),          # 1x1 conv, T=5
]


# The torch primitives as one grouped call per primitive, and (every layer forced onto them) the per-task
# formulation the CPU uses for wide layers (with its batched-matmul weight gradient for small maps) and the
# dense one for a weight shared by the tasks.
PER_TASK_CONV = conv_ops.TorchConvPrimitives()
PER_TASK_CONV.per_task_min_channels = 1
SHARED_CONV = conv_ops.TorchConvPrimitives()
SHARED_CONV.shared_min_channels = 1
GEMM_WEIGHT_GRAD_CONV = conv_ops.TorchConvPrimitives()
GEMM_WEIGHT_GRAD_CONV.per_task_min_channels = 1
GEMM_WEIGHT_GRAD_CONV.gemm_weight_grad_max_pixels = float("inf")
PRIMITIVES = {"grouped": conv_ops.TORCH_CONV, "per task": PER_TASK_CONV, "shared": SHARED_CONV,
              "per task, batched-matmul weight gradient": GEMM_WEIGHT_GRAD_CONV}


def _conv_inputs(case, dtype=torch.float64, batch=2):
    tasks, cin, cout, h, w, k, stride, pad, bias = case
    x = rand(batch, tasks * cin, h, w, dtype=dtype)
    weight = rand(tasks, cout, cin, *k, dtype=dtype)
    b = rand(tasks, cout, dtype=dtype) if bias else None
    return x, weight, b, stride, pad


@pytest.mark.parametrize("primitives", PRIMITIVES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_matches_reference(case, dtype, primitives):
    x, weight, bias, stride, pad = _conv_inputs(case, dtype)
    inputs = (x, weight) if bias is None else (x, weight, bias)
    op = lambda *a: conv_ops.conv2d(*a[:2], a[2] if len(a) > 2 else None, stride, pad, PRIMITIVES[primitives])
    ref = lambda *a: conv_ops.conv2d_reference(*a[:2], a[2] if len(a) > 2 else None, stride, pad)
    assert_same_function(op, ref, inputs, dtype)


def test_conv2d_channels_last_and_contiguous_inputs_agree():
    x, weight, bias, stride, pad = _conv_inputs(CONV_CASES[1])
    a = conv_ops.conv2d(x, weight, bias, stride, pad)
    b = conv_ops.conv2d(x.contiguous(memory_format=torch.channels_last), weight, bias, stride, pad)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("primitives", PRIMITIVES)
@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[2], CONV_CASES[3], CONV_CASES[4]])
def test_conv2d_gradcheck_gradgradcheck(case, primitives):
    x, weight, bias, stride, pad = _conv_inputs(case)
    prims = PRIMITIVES[primitives]
    if bias is None:
        check_grads(lambda x, w: conv_ops.conv2d(x, w, None, stride, pad, prims), (x, weight))
    else:
        check_grads(lambda x, w, b: conv_ops.conv2d(x, w, b, stride, pad, prims), (x, weight, bias))


def _geometry(case, batch=2):
    tasks, cin, cout, h, w, k, stride, pad, _ = case
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)
    geo = conv_ops.ConvGeometry(tasks, pair(stride), pair(pad), (h, w), tuple(k))
    return geo, (batch, tasks * cin, h, w), (tasks, cout, cin, *k), (batch, tasks * cout, *geo.output_hw())


@pytest.mark.parametrize("primitives", PRIMITIVES)
@pytest.mark.parametrize("case", [CONV_CASES[1], CONV_CASES[3], CONV_CASES[4]])
def test_conv_primitives_match_their_definitions(case, primitives):
    """forward = conv, input_grad = d<conv(x, w), g>/dx, weight_grad = d<conv(x, w), g>/dw."""
    prims = PRIMITIVES[primitives]
    geo, xs, ws, ys = _geometry(case)
    x, w, g = rand(*xs), rand(*ws), rand(*ys)
    stride, pad = geo.stride, geo.padding
    y_ref = conv_ops.conv2d_reference(x, w, None, stride, pad)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, w), g)
    tol = TOLERANCES[torch.float64]
    torch.testing.assert_close(conv_ops.conv2d_forward(x, w, geo, prims), y_ref, **tol)
    torch.testing.assert_close(conv_ops.conv2d_input_grad(g, w, geo, prims), gx_ref, **tol)
    torch.testing.assert_close(conv_ops.conv2d_weight_grad(x, g, geo, prims), gw_ref, **tol)


@pytest.mark.parametrize("primitives", PRIMITIVES)
@pytest.mark.parametrize("primitive", ["forward", "input_grad", "weight_grad"])
@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[3], CONV_CASES[4]])
def test_conv_primitives_gradcheck_gradgradcheck(primitive, case, primitives):
    geo, xs, ws, ys = _geometry(case)
    prims = PRIMITIVES[primitives]
    if primitive == "forward":
        fn, inputs = (lambda x, w: conv_ops.conv2d_forward(x, w, geo, prims)), (rand(*xs), rand(*ws))
    elif primitive == "input_grad":
        fn, inputs = (lambda g, w: conv_ops.conv2d_input_grad(g, w, geo, prims)), (rand(*ys), rand(*ws))
    else:
        fn, inputs = (lambda x, g: conv_ops.conv2d_weight_grad(x, g, geo, prims)), (rand(*xs), rand(*ys))
    check_grads(fn, inputs)


def test_per_task_formulation_is_for_wide_layers_on_the_cpu():
    cpu, meta = torch.empty(1), torch.empty(1, device="meta")
    assert conv_ops.TORCH_CONV.per_task(cpu, 320, 320) and conv_ops.TORCH_CONV.per_task(cpu, 640, 640)
    assert not conv_ops.TORCH_CONV.per_task(cpu, 160, 160) and not conv_ops.TORCH_CONV.per_task(cpu, 64, 64)
    assert not conv_ops.TORCH_CONV.per_task(meta, 640, 640)  # (any other device: the grouped call)


def test_batched_matmul_weight_gradient_is_for_wide_layers_on_small_maps_on_the_cpu():
    prims = conv_ops.TORCH_CONV
    geo = lambda side, stride=1: conv_ops.ConvGeometry(8, (stride, stride), (1, 1), (side, side), (3, 3))  # noqa: E731
    cpu, meta = torch.empty(1), torch.empty(1, device="meta")
    assert prims.gemm_weight_grad(cpu, 640, 640, geo(4)) and prims.gemm_weight_grad(cpu, 320, 640, geo(8, 2))
    assert not prims.gemm_weight_grad(cpu, 320, 320, geo(8)) and not prims.gemm_weight_grad(cpu, 160, 160, geo(4))
    assert not prims.gemm_weight_grad(meta, 640, 640, geo(4))


@pytest.mark.parametrize("onednn", [True, False], ids=["oneDNN on", "oneDNN off"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CONV_CASES[1:])
def test_batched_matmul_weight_gradient_matches_the_grouped_call(case, dtype, onednn, monkeypatch):
    """The weight gradient as one product per task (oneDNN's matmul in float32/bfloat16 where oneDNN is on,
    else torch.bmm) equals the grouped call's, in the channels-last weight layout, 1x1 kernels included."""
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", onednn)
    geo, xs, ws, ys = _geometry(case, batch=3)
    x, g = rand(*xs, dtype=dtype, grad=False), rand(*ys, dtype=dtype, grad=False)
    expected = conv_ops.TORCH_CONV.weight_grad(x.double(), g.double(), geo)
    assert conv_ops._onednn_matmul_applies(x) == (
        onednn and dtype != torch.float64 and torch.backends.mkldnn.is_available())
    got = GEMM_WEIGHT_GRAD_CONV.weight_grad(x, g, geo)
    assert got.shape == expected.shape and got[0].is_contiguous(memory_format=torch.channels_last)
    tol = dict(rtol=2e-2, atol=5e-2) if dtype == torch.bfloat16 else TOLERANCES[dtype]
    torch.testing.assert_close(got.double(), expected, **tol)


def test_shared_formulation_is_for_a_weight_expanded_over_the_tasks_of_a_layer_of_64x64_channels_on_the_cpu():
    shares = conv_ops.TORCH_CONV.shares_weight
    theta = lambda out_ch, in_ch, tasks=4, device="cpu": torch.empty(out_ch, in_ch, 3, 3, device=device).expand(tasks, -1, -1, -1, -1)  # noqa: E731
    assert shares(theta(64, 64)) and shares(theta(640, 320)) and shares(theta(4096, 1))
    assert not shares(theta(32, 32)) and not shares(theta(64, 3))  # (measured slower there)
    assert not shares(theta(64, 64).clone())  # per-task weights
    assert not shares(theta(64, 64, tasks=1)) and not shares(theta(64, 64, device="meta"))


@pytest.mark.parametrize("primitives", PRIMITIVES)
@pytest.mark.parametrize("case", [CONV_CASES[1], CONV_CASES[2], CONV_CASES[4]])
def test_conv2d_of_theta_expanded_over_the_tasks(case, primitives):
    """θ shared by the tasks (stride 0 over them, as at MAML's first inner step): the per-task and the
    shared formulations read one channels-last copy of it, the grouped call T copies; all three equal
    the reference with θ's gradients summed over the tasks, to second order."""
    x, weight, bias, stride, pad = _conv_inputs(case)
    theta, theta_bias = weight[0].detach().requires_grad_(), None if bias is None else bias[0].detach().requires_grad_()
    tasks = weight.shape[0]
    prims = PRIMITIVES[primitives]
    shared = theta.expand(tasks, *theta.shape)
    prepared = prims.prepare_weight(shared)
    assert prims.shares_weight(prepared) == (primitives == "shared")
    if primitives == "grouped":  # the grouped call's [T*O, C, kh, kw]
        assert prepared.stride(0) != 0
    else:  # one channels-last copy of θ, expanded
        assert prepared.stride(0) == 0 and prepared[0].is_contiguous(memory_format=torch.channels_last)

    def through(conv):
        return lambda x, w, *b: conv(x, w.expand(tasks, *w.shape), b[0].expand(tasks, *b[0].shape) if b else None)

    op = through(lambda x, w, b: conv_ops.conv2d(x, w, b, stride, pad, prims))
    ref = through(lambda x, w, b: conv_ops.conv2d_reference(x, w, b, stride, pad))
    inputs = (x, theta) if theta_bias is None else (x, theta, theta_bias)
    assert_same_function(op, ref, inputs, torch.float64)
    check_grads(op, inputs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CONV_CASES[1:])
@pytest.mark.parametrize("threads", [1, 2])
def test_shared_weight_primitives_match_the_grouped_call(case, dtype, threads):
    """The forward (with a shared, a per-task and no bias) and the input gradient of a weight expanded over
    the tasks, run as one convolution with the tasks as depth, equal the grouped call on the same weight
    materialized per task, channels-last like it (on one thread PyTorch's 1x1 conv3d returns another
    layout); the weight gradient does not read the weight and stays the grouped call (per task: autograd
    sums it over the tasks)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_shared_weight_primitives(case, dtype)
    finally:
        torch.set_num_threads(previous)


def _check_shared_weight_primitives(case, dtype):
    prims = SHARED_CONV
    geo, xs, ws, ys = _geometry(case)
    x, g = rand(*xs, dtype=dtype, grad=False), rand(*ys, dtype=dtype, grad=False)
    theta = rand(*ws[1:], dtype=dtype, grad=False)
    shared = prims.prepare_weight(theta.expand(ws))
    per_task = theta.expand(ws).clone()
    assert prims.shares_weight(shared) and not prims.shares_weight(per_task)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else TOLERANCES[dtype]
    bias = rand(ys[1] // geo.tasks, dtype=dtype, grad=False)
    for b, b_shared in [(None, None), (bias.expand(geo.tasks, -1), bias.expand(geo.tasks, -1)),
                        (rand(geo.tasks, ys[1] // geo.tasks, dtype=dtype, grad=False),) * 2]:
        y = prims.forward(x, shared, geo, bias=b_shared)
        assert y.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y, prims.forward(x, per_task, geo, bias=b), **tol)
    grad_x = prims.input_grad(g, shared, geo)
    assert grad_x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(grad_x, prims.input_grad(g, per_task, geo), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_shared_weight_gradient_is_the_per_task_gradients_summed(case, dtype):
    geo, xs, ws, ys = _geometry(case)
    x, g = rand(*xs, dtype=dtype, grad=False), rand(*ys, dtype=dtype, grad=False)
    grad_theta = conv_ops.SHARED_WEIGHT.weight_grad(x, g, geo)
    assert grad_theta.shape == ws[1:]
    if dtype == torch.float32:  # oneDNN's layout (PyTorch's float64 fallback returns contiguous)
        assert grad_theta.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(grad_theta, conv_ops.TORCH_CONV.weight_grad(x, g, geo).sum(0), **TOLERANCES[dtype])


def _autograd_node_names(tensors) -> set[str]:
    """The names of every node in the autograd graph behind `tensors`."""
    names, seen, stack = set(), set(), [t.grad_fn for t in tensors if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[3], CONV_CASES[4]])
def test_shared_conv2d_differentiates_through_its_own_primitives_to_second_order(case):
    """`shared_conv2d` (θ shared by the tasks, as the factored fast weights read it) equals the per-task
    reference with θ expanded, to second order; its derivatives are the shared primitives again, not
    PyTorch's conv3d autograd (whose double backward computes weight gradients as slow convolutions)."""
    x, weight, _, stride, pad = _conv_inputs(case)
    theta, tasks = weight[0].detach().requires_grad_(), weight.shape[0]

    def op(x, theta):
        return conv_ops.shared_conv2d(x, theta, tasks, stride, pad)

    def ref(x, theta):
        return conv_ops.conv2d_reference(x, theta.expand(tasks, *theta.shape), None, stride, pad)
    assert_same_function(op, ref, (x, theta), torch.float64)
    check_grads(op, (x, theta))
    y = op(x, theta)
    grads = torch.autograd.grad((y * torch.randn_like(y)).sum(), (x, theta), create_graph=True)
    names = _autograd_node_names(grads)
    assert {"_ConvInputGradBackward", "_ConvWeightGradBackward"} <= names and "ConvolutionBackward0" not in names


@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[3]])
def test_conv2d_third_order(case):
    """gradgradcheck of the conv's own gradient: checks the third derivative of a non-linear
    function of conv2d (every order goes through the primitives' backwards)."""
    x, weight, bias, stride, pad = _conv_inputs(case, batch=1)
    v = rand(*conv_ops.conv2d(x, weight, bias, stride, pad).shape, grad=False)

    def first_derivative(x, w, b):
        y = torch.tanh(conv_ops.conv2d(x, w, b, stride, pad))
        return torch.autograd.grad((y * v).sum(), (x, w, b), create_graph=True)

    assert gradgradcheck(first_derivative, (x, weight, bias), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)

    # and the third derivative equals the reference's
    def third(conv):
        y = torch.tanh(conv(x, weight, bias, stride, pad))
        gx, gw, gb = torch.autograd.grad((y * v).sum(), (x, weight, bias), create_graph=True)
        hx, = torch.autograd.grad((gw * gw.detach()).sum() + (gb * gb.detach()).sum(), (x,), create_graph=True)
        return torch.autograd.grad((hx * hx.detach()).sum(), (weight, x, bias))
    for a, b in zip(third(conv_ops.conv2d), third(conv_ops.conv2d_reference)):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float64])


# --------------------------------------------------------------------------- linear
LINEAR_CASES = [(1, 3, 2, True), (5, 2, 3, True), (3, 7, 5, False)]  # tasks, in, out, bias


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LINEAR_CASES)
@pytest.mark.parametrize("matmul", [None, linear_ops.TorchBatchedMatmul()], ids=["autograd", "torch-batch-major"])
def test_linear_matches_reference_and_gradchecks(case, dtype, matmul):
    tasks, fin, fout, bias = case
    x, w = rand(3, tasks * fin, dtype=dtype), rand(tasks, fout, fin, dtype=dtype)
    inputs = (x, w, rand(tasks, fout, dtype=dtype)) if bias else (x, w)
    op = lambda *a: linear_ops.linear(*a[:2], a[2] if len(a) > 2 else None, matmul)
    ref = lambda *a: linear_ops.linear_reference(*a[:2], a[2] if len(a) > 2 else None)
    assert_same_function(op, ref, inputs, dtype)
    if matmul is not None:  # the product lands in the grouped layout: the output is a view of it, no copy
        y = op(*inputs)
        assert y.is_contiguous() and y._base is not None and y._base.data_ptr() == y.data_ptr()
    if dtype == torch.float64:
        check_grads(op, inputs)


# --------------------------------------------------------------------------- norms
# (shape of x, tasks, channels_last, affine)
BN_CASES = [
    ((4, 3 * 2), 3, False, True),          # 2D [B, T*C]
    ((3, 1 * 5), 1, False, False),         # 2D, T=1, no affine
    ((2, 5 * 3, 3, 3), 5, False, True),    # 4D contiguous, T=5
    ((2, 2 * 3, 3, 4), 2, True, True),     # 4D channels-last
    ((2, 3 * 2, 2, 3), 3, True, False),    # 4D channels-last, no affine
    ((3, 2 * 3, 4), 2, False, True),       # 3D [B, T*C, L]
]


def _bn_fns(shape, tasks, channels_last, affine):
    layout = (lambda x: x.contiguous(memory_format=torch.channels_last)) if channels_last else (lambda x: x)

    def op(x, *wb):
        return norm_ops.batch_norm(layout(x), *(wb if affine else (None, None)), tasks, 1e-5)

    def ref(x, *wb):
        return norm_ops.batch_norm_reference(x, *(wb if affine else (None, None)), tasks, 1e-5)
    return op, ref


def _affine_inputs(x_shape, tasks, param_shape, affine, dtype=torch.float64):
    x = rand(*x_shape, dtype=dtype)
    if not affine:
        return (x,)
    return x, (1 + 0.3 * torch.randn(tasks, *param_shape, dtype=dtype)).requires_grad_(), rand(tasks, *param_shape, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", BN_CASES)
def test_batch_norm_matches_reference(case, dtype):
    shape, tasks, channels_last, affine = case
    op, ref = _bn_fns(*case)
    inputs = _affine_inputs(shape, tasks, (shape[1] // tasks,), affine, dtype)
    assert_same_function(op, ref, inputs, dtype)


@pytest.mark.parametrize("case", [BN_CASES[0], BN_CASES[2], BN_CASES[3], BN_CASES[4]])
def test_batch_norm_gradcheck_gradgradcheck(case):
    shape, tasks, _, affine = case
    op, _ = _bn_fns(*case)
    check_grads(op, _affine_inputs(shape, tasks, (shape[1] // tasks,), affine))


# (shape of x, tasks, groups per task, affine, channels_last)
GN_CASES = [((2, 2 * 4, 3, 3), 2, 2, True, False), ((2, 3 * 3, 2, 2), 3, 1, True, True),
            ((3, 1 * 2, 3, 2), 1, 2, False, False)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GN_CASES)
def test_group_norm_matches_reference_and_gradchecks(case, dtype):
    shape, tasks, groups, affine, channels_last = case
    layout = (lambda x: x.contiguous(memory_format=torch.channels_last)) if channels_last else (lambda x: x)
    op = lambda x, *wb: norm_ops.group_norm(layout(x), groups, *(wb if affine else (None, None)), tasks, 1e-5)
    ref = lambda x, *wb: norm_ops.group_norm_reference(x, groups, *(wb if affine else (None, None)), tasks, 1e-5)
    inputs = _affine_inputs(shape, tasks, (shape[1] // tasks,), affine, dtype)
    assert_same_function(op, ref, inputs, dtype)
    if dtype == torch.float64:
        check_grads(op, inputs)


# (shape of x, tasks, normalized_shape, affine)
LN_CASES = [
    ((3, 2 * 4), 2, (4,), True),                 # 2D, the LayerNorm of a feature MLP
    ((2, 1 * 5), 1, (5,), False),                # 2D, T=1, no affine
    ((2, 2 * 2, 2, 2), 2, (2, 2, 2), True),      # 4D, normalise each task's (C, H, W)
    ((2, 3 * 2, 1, 3), 3, (1, 3), True),         # 4D, normalise (H, W) only
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LN_CASES)
def test_layer_norm_matches_reference_and_gradchecks(case, dtype):
    shape, tasks, normalized, affine = case
    op = lambda x, *wb: norm_ops.layer_norm(x, normalized, *(wb if affine else (None, None)), tasks, 1e-5)
    ref = lambda x, *wb: norm_ops.layer_norm_reference(x, normalized, *(wb if affine else (None, None)), tasks, 1e-5)
    inputs = _affine_inputs(shape, tasks, normalized, affine, dtype)
    assert_same_function(op, ref, inputs, dtype)
    if dtype == torch.float64:
        check_grads(op, inputs)


# --------------------------------------------------------------------------- losses
def _cross_entropy_loop(logits, labels):
    return torch.stack([F.cross_entropy(logits[t], labels[t]) for t in range(labels.shape[0])])


def _mse_loop(prediction, targets):
    return torch.stack([((prediction[t] - targets[t]) ** 2).mean() for t in range(targets.shape[0])])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tasks,batch,classes", [(1, 3, 2), (5, 4, 3)])
def test_cross_entropy_per_task(tasks, batch, classes, dtype):
    logits = rand(tasks, batch, classes, dtype=dtype)
    labels = torch.randint(0, classes, (tasks, batch))
    loss, accuracy = loss_ops.cross_entropy_per_task(logits, labels)
    assert loss.shape == (tasks,) and accuracy.shape == (tasks,) and not accuracy.requires_grad
    expected_acc = torch.stack([(logits[t].argmax(-1) == labels[t]).to(dtype).mean() for t in range(tasks)])
    torch.testing.assert_close(accuracy, expected_acc)
    assert_same_function(lambda z: loss_ops.cross_entropy_per_task(z, labels)[0],
                         lambda z: _cross_entropy_loop(z, labels), (logits,), dtype)
    if dtype == torch.float64:
        check_grads(lambda z: loss_ops.cross_entropy_per_task(z, labels)[0], (logits,))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tasks,batch,dims", [(1, 3, (1,)), (5, 4, (2,))])
def test_mse_per_task(tasks, batch, dims, dtype):
    prediction, targets = rand(tasks, batch, *dims, dtype=dtype), rand(tasks, batch, *dims, dtype=dtype)
    loss, accuracy = loss_ops.mse_per_task(prediction, targets)
    assert loss.shape == (tasks,) and accuracy is None
    op = lambda p, y: loss_ops.mse_per_task(p, y)[0]
    assert_same_function(op, _mse_loop, (prediction, targets), dtype)
    if dtype == torch.float64:
        check_grads(op, (prediction, targets))
