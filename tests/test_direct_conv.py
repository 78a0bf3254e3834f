"""maml_fast.ops.direct_conv: the compiled direct convolution ops (forward with fused bias, weight
gradient) against the float64 reference, awkward shapes and input layouts, poisoned outputs, bad
input, fake kernels; gradcheck/gradgradcheck of the conv2d op with backend "fused" (whose first-layer
primitives are these ops); the full second-order meta-gradient of conv4 against backend "loop";
and that backend "fused" does call them for the first layer. Kernel tests run per device and skip
with the reason the ops cannot run there ("no CUDA device" on a machine without a GPU)."""
from __future__ import annotations

import pytest
import torch

import maml_fast as mf
from maml_fast.backends import fused
from maml_fast.ops import conv2d as conv_ops
from maml_fast.ops import direct_conv as dc
from conftest import count_op_calls, op_devices


DEVICES = op_devices(dc.unavailable_reasons)
needs_cpu_ops = pytest.mark.skipif(not dc.is_available("cpu"), reason="; ".join(dc.unavailable_reasons("cpu")))


@pytest.fixture
def generator() -> torch.Generator:
    """A freshly seeded generator; the seed is printed, so a failure can be replayed."""
    generator = torch.Generator()
    print(f"seed: {generator.seed()}")
    return generator


# (batch, tasks, in, out, H, W, kernel, stride, padding): the first layers of Omniglot (C=1,
# stride 2) and MiniImageNet (C=3, stride 1), one task, primes, odd sizes, output channels around
# the CPU kernels' 32-float / 16-double chunks, more input channels than the backend sends here,
# non-square kernels, strides and paddings, padding wider than the kernel reaches, a 1x1 output.
CASES = {
    "omniglot": (2, 3, 1, 64, 28, 28, (3, 3), (2, 2), (1, 1)),
    "miniimagenet": (2, 2, 3, 32, 17, 19, (3, 3), (1, 1), (1, 1)),
    "one task": (3, 1, 1, 5, 7, 9, (3, 3), (1, 1), (1, 1)),
    "primes": (3, 5, 3, 37, 13, 11, (3, 3), (2, 2), (1, 1)),
    "odd chunk tails": (1, 2, 1, 70, 6, 5, (3, 3), (1, 1), (0, 0)),
    "two input channels": (2, 3, 2, 17, 8, 7, (3, 3), (2, 1), (1, 1)),
    "five input channels": (1, 2, 5, 7, 6, 6, (3, 3), (1, 1), (1, 1)),
    "non-square": (2, 2, 3, 11, 9, 10, (2, 3), (1, 2), (0, 2)),
    "wide padding": (1, 2, 1, 3, 4, 5, (3, 3), (3, 2), (3, 2)),
    "5x5 kernel": (2, 2, 1, 33, 12, 12, (5, 5), (2, 2), (2, 2)),
    "1x1 output": (2, 3, 3, 9, 3, 3, (3, 3), (1, 1), (0, 0)),
}


def _x_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as x ([B, T*C, H, W]) in another memory layout (the ops read any strides)."""
    if layout == "contiguous":
        return x
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a wider tensor, batch innermost
        wide = torch.zeros(x.shape[1], x.shape[2], 2 * x.shape[3], x.shape[0], dtype=x.dtype, device=x.device)
        view = wide.permute(3, 0, 1, 2)[..., ::2]
        view.copy_(x)
        return view
    raise ValueError(layout)


def make_inputs(case: str, generator, dtype=torch.float64, device="cpu", x_layout="contiguous"):
    """x, weight, bias, stride, padding and a channels-last grad_out of the case."""
    batch, tasks, in_ch, out_ch, height, width, kernel, stride, padding = CASES[case]

    def randn(*shape):
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)

    x = _x_layout(randn(batch, tasks * in_ch, height, width), x_layout)
    weight = randn(tasks, out_ch, in_ch, *kernel)
    bias = randn(tasks, out_ch)
    out_hw = conv_ops.ConvGeometry(tasks, stride, padding, (height, width), kernel).output_hw()
    grad_out = randn(batch, tasks * out_ch, *out_hw).contiguous(memory_format=torch.channels_last)
    return x, weight, bias, stride, padding, grad_out


def _exact(*tensors):
    return [t.detach().double().cpu() for t in tensors]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last", "strided"])
def test_ops_match_reference_float64(device, case, x_layout, generator):
    x, weight, bias, stride, padding, grad_out = make_inputs(case, generator, device=device, x_layout=x_layout)
    tasks, kernel = weight.shape[0], tuple(weight.shape[3:])
    for given_bias in (bias, None):
        out = torch.ops.maml_fast.direct_conv2d(x, weight, given_bias, list(stride), list(padding))
        expected = dc.direct_conv2d_reference(*_exact(x, weight), None if given_bias is None else _exact(given_bias)[0],
                                              stride, padding)
        assert out.shape == expected.shape and out.dtype == x.dtype and out.device == x.device
        assert out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out.cpu(), expected, rtol=1e-12, atol=1e-12)
    grad_weight = torch.ops.maml_fast.direct_conv2d_weight_grad(x, grad_out, tasks, list(kernel), list(stride),
                                                                list(padding))
    expected = dc.direct_conv2d_weight_grad_reference(*_exact(x, grad_out), tasks, kernel, stride, padding)
    assert grad_weight.shape == weight.shape and grad_weight.dtype == x.dtype
    torch.testing.assert_close(grad_weight.cpu(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["omniglot", "miniimagenet", "primes", "odd chunk tails"])
def test_float32_against_float64(device, case, generator):
    """float32 accumulates in float32: a few units of the last place of the sums' magnitude."""
    x, weight, bias, stride, padding, grad_out = make_inputs(case, generator, dtype=torch.float32, device=device)
    tasks, kernel = weight.shape[0], tuple(weight.shape[3:])
    out = dc.direct_conv2d(x, weight, bias, stride, padding)
    expected = dc.direct_conv2d_reference(*_exact(x, weight, bias), stride, padding)
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-5, atol=2e-5)
    grad_weight = dc.direct_conv2d_weight_grad(x, grad_out, tasks, kernel, stride, padding)
    expected = dc.direct_conv2d_weight_grad_reference(*_exact(x, grad_out), tasks, kernel, stride, padding)
    # Sums over batch * Ho * Wo pixels: the error grows with their count (and their magnitude).
    torch.testing.assert_close(grad_weight.double().cpu(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["omniglot", "odd chunk tails", "non-square", "1x1 output"])
def test_outputs_are_fully_written(device, case, generator, poisoned_empty):
    x, weight, bias, stride, padding, grad_out = make_inputs(case, generator, dtype=torch.float32, device=device)
    tasks, kernel = weight.shape[0], tuple(weight.shape[3:])
    assert not dc.direct_conv2d(x, weight, bias, stride, padding).isnan().any()
    assert not dc.direct_conv2d(x, weight, None, stride, padding).isnan().any()
    assert not dc.direct_conv2d_weight_grad(x, grad_out, tasks, kernel, stride, padding).isnan().any()


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_gives_zero_weight_grad(device, generator):
    x, weight, bias, stride, padding, grad_out = make_inputs("primes", generator, device=device)
    tasks, kernel = weight.shape[0], tuple(weight.shape[3:])
    assert dc.direct_conv2d(x[:0], weight, bias, stride, padding).shape[0] == 0
    grad_weight = dc.direct_conv2d_weight_grad(x[:0], grad_out[:0], tasks, kernel, stride, padding)
    torch.testing.assert_close(grad_weight, torch.zeros_like(weight))


@needs_cpu_ops
@pytest.mark.parametrize("threads", [1, 3])
def test_results_do_not_depend_on_threads(threads, generator):
    x, weight, bias, stride, padding, grad_out = make_inputs("primes", generator, dtype=torch.float32)
    tasks, kernel = weight.shape[0], tuple(weight.shape[3:])
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = dc.direct_conv2d_weight_grad(x, grad_out, tasks, kernel, stride, padding)
        torch.set_num_threads(threads)
        several = dc.direct_conv2d_weight_grad(x, grad_out, tasks, kernel, stride, padding)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(single, several)


# ------------------------------------------------------------- through conv2d with backend "fused"
def _count_direct_calls(monkeypatch) -> dict[str, int]:
    return count_op_calls(monkeypatch, "direct_conv2d", "direct_conv2d_weight_grad")


@needs_cpu_ops
@pytest.mark.parametrize(
    ("tasks", "in_ch", "out_ch", "size", "stride"),
    [(1, 1, 3, (5, 6), 1), (2, 1, 4, (7, 5), 2), (3, 3, 2, (5, 7), 1), (2, 3, 5, (6, 5), 2)],
    ids=["T=1 C=1", "C=1 stride 2", "T=3 C=3", "C=3 stride 2 prime O"],
)
def test_gradcheck_and_gradgradcheck_through_conv2d(tasks, in_ch, out_ch, size, stride, generator, monkeypatch):
    calls = _count_direct_calls(monkeypatch)
    x = torch.randn(2, tasks * in_ch, *size, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(tasks, out_ch, in_ch, 3, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(tasks, out_ch, generator=generator, dtype=torch.float64, requires_grad=True)

    def conv(x, weight, bias):
        return conv_ops.conv2d(x, weight, bias, stride=stride, padding=1, primitives=fused.FUSED.conv)

    torch.testing.assert_close(conv(x, weight, bias), conv_ops.conv2d_reference(x, weight, bias, stride, 1),
                               rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(conv, (x, weight, bias))
    assert torch.autograd.gradgradcheck(conv, (x, weight, bias))
    assert {name: count > 0 for name, count in calls.items()} == _expected_direct_calls(in_ch), calls


@needs_cpu_ops
def test_wider_layers_keep_onednn(generator, monkeypatch):
    calls = _count_direct_calls(monkeypatch)
    x = torch.randn(2, 2 * 4, 6, 6, generator=generator, dtype=torch.float64)
    weight = torch.randn(2, 3, 4, 3, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    conv_ops.conv2d(x, weight, padding=1, primitives=fused.FUSED.conv).sum().backward()
    assert calls == {"direct_conv2d": 0, "direct_conv2d_weight_grad": 0}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("primitive", ["forward", "weight_grad"])
def test_direct_conv_used_only_where_measured(device, primitive):
    x = torch.zeros(1, 1, 4, 4, device=device)
    most = fused.DIRECT_CONV_MAX_IN_CHANNELS[primitive]
    assert 1 <= most <= 3  # only first layers: 1 (Omniglot) or 3 (RGB) input channels
    assert fused.uses_direct_conv(primitive, x, most) == (device in fused.DIRECT_CONV_DEVICE_TYPES)
    assert not fused.uses_direct_conv(primitive, x, most + 1)
    assert not fused.uses_direct_conv(primitive, x.half(), 1)


def _expected_direct_calls(in_channels: int) -> dict[str, bool]:
    """Which direct ops backend "fused" runs for a layer with `in_channels` input channels on the CPU."""
    most = fused.DIRECT_CONV_MAX_IN_CHANNELS
    return {"direct_conv2d": in_channels <= most["forward"],
            "direct_conv2d_weight_grad": in_channels <= most["weight_grad"]}


def _conv4_meta_gradient(backend, in_channels, downsample, size):
    """Loss and meta-gradient of one second-order MAML step (2 inner steps) of a small conv4, float64."""
    torch.manual_seed(0)
    net = mf.models.conv4(in_channels, 3, hidden=5, downsample=downsample, image_size=size).double()
    learner = mf.MAML(net, inner_lr=0.3, inner_steps=2, backend=backend)
    generator = torch.Generator().manual_seed(1)
    tasks = 3
    sx = torch.randn(tasks, 3, in_channels, size, size, generator=generator, dtype=torch.float64)
    qx = torch.randn(tasks, 4, in_channels, size, size, generator=generator, dtype=torch.float64)
    sy = torch.arange(3).expand(tasks, -1).contiguous()
    qy = torch.tensor([0, 1, 2, 1]).expand(tasks, -1).contiguous()
    out = learner(mf.TaskBatch(sx, sy, qx, qy))
    out.loss.backward()
    return out.loss.detach(), torch.cat([p.grad.reshape(-1) for p in net.parameters()])


@needs_cpu_ops
@pytest.mark.parametrize(("in_channels", "downsample", "size"), [(1, "stride", 11), (3, "maxpool", 16)],
                         ids=["C=1 stride", "C=3 maxpool"])
def test_second_order_meta_gradient_matches_loop(in_channels, downsample, size, monkeypatch):
    calls = _count_direct_calls(monkeypatch)
    loss, grads = _conv4_meta_gradient("fused", in_channels, downsample, size)
    # The first layer ran on the direct ops where the backend uses them: forward (support and query
    # of every step, and the second-order re-forwards of the weight gradient's backward: at least
    # 2 * 2 + 1 with 2 inner steps) and weight gradient (inner steps and the outer backward).
    minimum = {"direct_conv2d": 5, "direct_conv2d_weight_grad": 3}
    for name, used in _expected_direct_calls(in_channels).items():
        assert calls[name] >= minimum[name] if used else calls[name] == 0, calls
    ref_loss, ref_grads = _conv4_meta_gradient("loop", in_channels, downsample, size)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
    relative = ((grads - ref_grads).norm() / ref_grads.norm()).item()
    assert relative <= 1e-9, relative


# --------------------------------------------------------------------------------- bad input
def _valid():
    x = torch.randn(2, 2 * 3, 6, 6)
    weight = torch.randn(2, 4, 3, 3, 3)
    bias = torch.randn(2, 4)
    return x, weight, bias


BAD_FORWARD = [
    ("x 3-D", lambda x, w, b, s, p: (x[0], w, b, s, p), ValueError, "x"),
    ("integer x", lambda x, w, b, s, p: (x.long(), w.long(), b.long(), s, p), TypeError, "x"),
    ("half x", lambda x, w, b, s, p: (x.half(), w.half(), b.half(), s, p), TypeError, "x"),
    ("weight 4-D", lambda x, w, b, s, p: (x, w[0], b, s, p), ValueError, "weight"),
    ("weight dtype", lambda x, w, b, s, p: (x, w.double(), b, s, p), TypeError, "weight"),
    ("channels mismatch", lambda x, w, b, s, p: (x[:, :5], w, b, s, p), ValueError, "x"),
    ("bias shape", lambda x, w, b, s, p: (x, w, b[:, :3], s, p), ValueError, "bias"),
    ("bias dtype", lambda x, w, b, s, p: (x, w, b.double(), s, p), TypeError, "bias"),
    ("zero stride", lambda x, w, b, s, p: (x, w, b, [0, 1], p), ValueError, "stride"),
    ("one stride value", lambda x, w, b, s, p: (x, w, b, [1], p), ValueError, "stride"),
    ("negative padding", lambda x, w, b, s, p: (x, w, b, s, [1, -1]), ValueError, "padding"),
    ("image too small", lambda x, w, b, s, p: (x[..., :2, :2], w, b, s, [0, 0]), ValueError, "x"),
]


@pytest.mark.parametrize(("case", "mutate", "error", "argument"), BAD_FORWARD, ids=[c[0] for c in BAD_FORWARD])
def test_bad_forward_inputs_name_the_argument(case, mutate, error, argument):
    x, weight, bias, stride, padding = mutate(*_valid(), [1, 1], [1, 1])
    with pytest.raises(error, match=rf"\b{argument}\b"):
        dc.check_direct_conv2d_inputs(x, weight, bias, stride, padding)
    if dc.is_available("cpu"):
        with pytest.raises(error, match=rf"\b{argument}\b"):
            torch.ops.maml_fast.direct_conv2d(x, weight, bias, stride, padding)


def _valid_weight_grad():
    x, weight, _ = _valid()
    grad_out = torch.randn(2, 2 * 4, 6, 6)
    return x, grad_out, 2, [3, 3], [1, 1], [1, 1]


BAD_WEIGHT_GRAD = [
    ("integer x", lambda x, g, t, k, s, p: (x.long(), g.long(), t, k, s, p), TypeError, "x"),
    ("grad_out 3-D", lambda x, g, t, k, s, p: (x, g[0], t, k, s, p), ValueError, "grad_out"),
    ("grad_out dtype", lambda x, g, t, k, s, p: (x, g.double(), t, k, s, p), TypeError, "grad_out"),
    ("grad_out size", lambda x, g, t, k, s, p: (x, g[..., :5], t, k, s, p), ValueError, "grad_out"),
    ("grad_out batch", lambda x, g, t, k, s, p: (x, g[:1], t, k, s, p), ValueError, "grad_out"),
    ("grad_out channels", lambda x, g, t, k, s, p: (x, g[:, :7], t, k, s, p), ValueError, "grad_out"),
    ("x channels", lambda x, g, t, k, s, p: (x[:, :5], g, t, k, s, p), ValueError, "x"),
    ("zero tasks", lambda x, g, t, k, s, p: (x, g, 0, k, s, p), ValueError, "tasks"),
    ("zero kernel", lambda x, g, t, k, s, p: (x, g, t, [0, 3], s, p), ValueError, "kernel_size"),
    ("zero stride", lambda x, g, t, k, s, p: (x, g, t, k, [1, 0], p), ValueError, "stride"),
    ("negative padding", lambda x, g, t, k, s, p: (x, g, t, k, s, [-1, 0]), ValueError, "padding"),
]


@pytest.mark.parametrize(("case", "mutate", "error", "argument"), BAD_WEIGHT_GRAD, ids=[c[0] for c in BAD_WEIGHT_GRAD])
def test_bad_weight_grad_inputs_name_the_argument(case, mutate, error, argument):
    args = mutate(*_valid_weight_grad())
    with pytest.raises(error, match=rf"\b{argument}\b"):
        dc.check_direct_conv2d_weight_grad_inputs(*args)
    if dc.is_available("cpu"):
        with pytest.raises(error, match=rf"\b{argument}\b"):
            torch.ops.maml_fast.direct_conv2d_weight_grad(*args)


def test_not_a_tensor_and_bad_pairs():
    x, weight, bias = _valid()
    with pytest.raises(TypeError, match=r"\bweight\b"):
        dc.check_direct_conv2d_inputs(x, weight.tolist(), bias, (1, 1), (1, 1))
    with pytest.raises(TypeError, match=r"\bstride\b"):
        dc.check_direct_conv2d_inputs(x, weight, bias, 1, (1, 1))
    with pytest.raises(TypeError, match=r"\btasks\b"):
        dc.check_direct_conv2d_weight_grad_inputs(x, torch.randn(2, 8, 6, 6), 2.0, (3, 3), (1, 1), (1, 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_mixed_devices_name_the_argument():
    x, weight, bias = _valid()
    with pytest.raises(ValueError, match=r"\bweight\b"):
        dc.check_direct_conv2d_inputs(x, weight.cuda(), bias, (1, 1), (1, 1))


# ---------------------------------------------------------------------------- fake kernels
@needs_cpu_ops
def test_fake_kernels_for_compile_and_meta(generator):
    x, weight, bias, stride, padding, grad_out = make_inputs("primes", generator, dtype=torch.float32)
    tasks, kernel = weight.shape[0], list(weight.shape[3:])
    torch.library.opcheck(torch.ops.maml_fast.direct_conv2d.default, (x, weight, bias, list(stride), list(padding)))
    torch.library.opcheck(torch.ops.maml_fast.direct_conv2d_weight_grad.default,
                          (x, grad_out, tasks, kernel, list(stride), list(padding)))
    meta = torch.ops.maml_fast.direct_conv2d(x.to("meta"), weight.to("meta"), None, list(stride), list(padding))
    assert meta.shape == grad_out.shape and meta.is_contiguous(memory_format=torch.channels_last)
