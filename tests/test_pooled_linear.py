"""maml_fast.ops.pooled_linear: the compiled classifier head (global mean pool + per-task linear) and its
backward and double backward against float64 autograd of the reference; awkward shapes and layouts
(channels-last x, weights expanded over the tasks, no bias), poisoned outputs, gradcheck/gradgradcheck,
the kernel in second order and the composite in third, bad input, fake kernels, and the "fused"
backend's lowering of the head with its second-order meta-gradient against the loop. Kernel tests run
per device and skip with the reason the ops cannot run there."""
from __future__ import annotations

import pytest
import torch

import maml_fast as mf
from maml_fast.backends import get_backend
from maml_fast.backends.fused import fuse_pooled_linear
from maml_fast.ops import pooled_linear as pl
from conftest import assert_rejected, count_op_calls, op_devices

DEVICES = op_devices(pl.unavailable_reasons)
# (batch, tasks, in, out, height, width): ones, primes, the Omniglot head (T=32, 64 -> 5 on 2x2) and a
# ResNet-like 5x5 map.
SHAPES = [(1, 1, 1, 1, 1, 1), (3, 2, 5, 7, 1, 1), (2, 3, 4, 5, 2, 3), (5, 32, 64, 5, 2, 2), (4, 2, 13, 3, 5, 5)]
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}
OPS = ("pooled_linear", "pooled_linear_backward", "pooled_linear_double_backward")


def _inputs(shape, dtype=torch.float64, device="cpu", channels_last=False, expanded=False, bias=True):
    batch, tasks, fin, fout, height, width = shape
    x = torch.randn(batch, tasks * fin, height, width, dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    weight = torch.randn(1 if expanded else tasks, fout, fin, dtype=torch.float64).expand(tasks, fout, fin)
    b = torch.randn(tasks, fout, dtype=torch.float64) if bias else None
    return [t if t is None else t.to(dtype=dtype, device=device) for t in (x, weight, b)]


def _grads(shape, x, weight, dtype, device):
    """grad_y and the three grad_grads (random, float64 then cast)."""
    batch, tasks, _, fout = shape[:4]
    make = lambda *s: torch.randn(s, dtype=torch.float64).to(dtype=dtype, device=device)  # noqa: E731
    return make(batch, tasks * fout), make(*x.shape), make(*weight.shape), make(tasks, fout)


def _reference_derivatives(x, weight, bias, grad_y, ggx, ggw, ggb):
    """y, (gx, gw, gb) and (d grad_y, d x, d weight) by float64 autograd of the reference."""
    x, weight, grad_y = (t.detach().cpu().double().requires_grad_() for t in (x, weight, grad_y))
    bias = torch.zeros(weight.shape[:2], dtype=torch.float64, requires_grad=True) if bias is None else \
        bias.detach().cpu().double().requires_grad_()
    y = pl.pooled_linear_reference(x, weight, bias)
    first = torch.autograd.grad(y, (x, weight, bias), grad_y, create_graph=True)
    total = sum((g * gg.cpu().double()).sum() for g, gg in zip(first, (ggx, ggw, ggb)))
    second = torch.autograd.grad(total, (grad_y, x, weight))
    return y.detach(), [g.detach() for g in first], second


def _assert_close(actual, expected, dtype, name):
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert actual.shape == expected.shape, name
    if expected.numel() == 0:
        return
    scale = max(1.0, expected.abs().max().item())
    error = (actual - expected).abs().max().item()
    assert error <= TOLERANCE[dtype] * scale, f"{name}: {error:.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
@pytest.mark.parametrize("layout", ["contiguous", "channels-last+expanded", "no bias"])
def test_ops_match_reference(device, dtype, shape, layout, poisoned_empty):
    x, weight, bias = _inputs(shape, dtype, device, channels_last=layout != "contiguous",
                              expanded=layout != "contiguous", bias=layout != "no bias")
    grad_y, ggx, ggw, ggb = _grads(shape, x, weight, dtype, device)
    y = torch.ops.maml_fast.pooled_linear(x, weight, bias)
    first = torch.ops.maml_fast.pooled_linear_backward(grad_y, x, weight)
    second = torch.ops.maml_fast.pooled_linear_double_backward(ggx, ggw, None if bias is None else ggb,
                                                               grad_y, x, weight)
    ref_y, ref_first, ref_second = _reference_derivatives(x, weight, bias, grad_y, ggx, ggw,
                                                          ggb if bias is not None else torch.zeros_like(ggb))
    # (the reference rounds nothing; the tolerance covers the op's arithmetic in its dtype)
    _assert_close(y, ref_y, dtype, "y")
    for name, out, ref in zip(("grad_x", "grad_weight", "grad_bias"), first, ref_first):
        _assert_close(out, ref, dtype, name)
    for name, out, ref in zip(("d grad_y", "d x", "d weight"), second, ref_second):
        _assert_close(out, ref, dtype, name)
    # x's gradients come out laid out as x (channels-last stays channels-last: no copy for the layer below)
    assert first[0].stride() == x.stride() and second[1].stride() == x.stride()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 2, 3, 4, 2, 2), (3, 2, 0, 4, 2, 2), (3, 2, 3, 0, 2, 2)],
                         ids=["no examples", "no features", "no outputs"])
def test_empty_sizes_write_every_output(device, shape, poisoned_empty):
    """Zero examples, features or outputs: the outputs are the empty sums (zeros) or the bias."""
    x, weight, bias = _inputs(shape, device=device)
    grad_y, ggx, ggw, ggb = _grads(shape, x, weight, torch.float64, device)
    ref_y, ref_first, ref_second = _reference_derivatives(x, weight, bias, grad_y, ggx, ggw, ggb)
    outputs = [torch.ops.maml_fast.pooled_linear(x, weight, bias),
               *torch.ops.maml_fast.pooled_linear_backward(grad_y, x, weight),
               *torch.ops.maml_fast.pooled_linear_double_backward(ggx, ggw, ggb, grad_y, x, weight)]
    for out, ref in zip(outputs, [ref_y, *ref_first, *ref_second]):
        _assert_close(out, ref, torch.float64, "output")


@pytest.mark.parametrize("device", DEVICES)
def test_absent_grad_grads_read_as_zeros(device):
    shape = (3, 2, 4, 5, 2, 2)
    x, weight, bias = _inputs(shape, device=device)
    grad_y, ggx, ggw, ggb = _grads(shape, x, weight, torch.float64, device)
    zeros = [torch.zeros_like(t) for t in (ggx, ggw, ggb)]
    for keep in range(3):
        given = [t if i == keep else None for i, t in enumerate((ggx, ggw, ggb))]
        padded = [t if i == keep else zeros[i] for i, t in enumerate((ggx, ggw, ggb))]
        got = torch.ops.maml_fast.pooled_linear_double_backward(*given, grad_y, x, weight)
        want = torch.ops.maml_fast.pooled_linear_double_backward(*padded, grad_y, x, weight)
        for a, b in zip(got, want):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
def test_gradcheck_gradgradcheck_and_third_order(device, bias):
    x, weight, b = _inputs((2, 2, 3, 2, 2, 1), device=device, channels_last=True, bias=bias)
    weight = weight.contiguous()
    inputs = [t.requires_grad_() for t in (x, weight, b) if t is not None]
    fn = (lambda x, w, b: pl.pooled_linear(x, w, b)) if bias else (lambda x, w: pl.pooled_linear(x, w))  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)

    def second(*args):  # the gradient's gradient, recorded: a third derivative (the composite) checks
        y = fn(*args)
        grads = torch.autograd.grad((y * y).sum(), args, create_graph=True)
        return sum((g * g).sum() for g in grads)
    assert torch.autograd.gradgradcheck(second, inputs)


@pytest.mark.skipif(not pl.is_available("cpu"), reason=str(pl.unavailable_reasons("cpu")))
def test_second_order_runs_the_kernels_and_third_order_the_composite(monkeypatch):
    x, weight, bias = (t.requires_grad_() for t in _inputs((2, 3, 4, 2, 2, 2)))
    calls = count_op_calls(monkeypatch, *OPS)
    y = pl.pooled_linear(x, weight, bias)
    grads = torch.autograd.grad((y * y).sum(), (x, weight, bias), create_graph=True)
    torch.autograd.grad(sum((g * g).sum() for g in grads), (x, weight, bias))
    # (the second backward also reaches the forward node again, through y in the loss's gradient 2y)
    assert calls == {"pooled_linear": 1, "pooled_linear_backward": 2, "pooled_linear_double_backward": 1}, calls
    grads = torch.autograd.grad((pl.pooled_linear(x, weight, bias) ** 2).sum(), (x, weight), create_graph=True)
    before = calls["pooled_linear_double_backward"]
    torch.autograd.grad(sum((g * g).sum() for g in grads), (x, weight), create_graph=True)
    assert calls["pooled_linear_double_backward"] == before, calls  # (recorded: the composite ran instead)


BAD = [
    ("x", TypeError, lambda x, w, b: (x.long(), w, b)),
    ("x", ValueError, lambda x, w, b: (x[0], w, b)),
    ("weight", ValueError, lambda x, w, b: (x, w[0], b)),
    ("x", ValueError, lambda x, w, b: (x[:, :-1], w, b)),
    ("weight", TypeError, lambda x, w, b: (x, w.float(), b)),
    ("bias", ValueError, lambda x, w, b: (x, w, b[:, :-1])),
    ("bias", TypeError, lambda x, w, b: (x, w, b.float())),
]


@pytest.mark.parametrize("argument,error,mutate", BAD)
def test_bad_inputs_name_the_argument(argument, error, mutate):
    args = mutate(*_inputs((2, 2, 3, 2, 2, 2)))
    assert_rejected(error, argument, pl.check_pooled_linear_inputs, torch.ops.maml_fast.pooled_linear, args,
                    pl.is_available("cpu"))


@pytest.mark.skipif(not pl.is_available("cpu"), reason=str(pl.unavailable_reasons("cpu")))
def test_bad_derivative_inputs_name_the_argument():
    x, weight, _ = _inputs((2, 2, 3, 2, 2, 2))
    grad_y = torch.zeros(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\bgrad_y\b"):
        torch.ops.maml_fast.pooled_linear_backward(grad_y[:, :-1], x, weight)
    for name, args in (("grad_grad_x", (x[:1], None, None)), ("grad_grad_weight", (None, weight[:1], None)),
                       ("grad_grad_bias", (None, None, torch.zeros(3, dtype=torch.float64)))):
        with pytest.raises(ValueError, match=rf"\b{name}\b"):
            torch.ops.maml_fast.pooled_linear_double_backward(*args, grad_y, x, weight)


@pytest.mark.skipif(not pl.is_available("cpu"), reason=str(pl.unavailable_reasons("cpu")))
def test_fake_kernels_give_the_ops_shapes_and_layouts():
    x, weight, bias = _inputs((2, 3, 4, 5, 2, 2), channels_last=True)
    grad_y = torch.zeros(2, 15, dtype=torch.float64)
    real = [torch.ops.maml_fast.pooled_linear(x, weight, bias),
            *torch.ops.maml_fast.pooled_linear_backward(grad_y, x, weight),
            *torch.ops.maml_fast.pooled_linear_double_backward(x, weight, bias, grad_y, x, weight)]
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fx, fw, fb, fg = (mode.from_tensor(t) for t in (x, weight, bias, grad_y))
        fake = [torch.ops.maml_fast.pooled_linear(fx, fw, fb),
                *torch.ops.maml_fast.pooled_linear_backward(fg, fx, fw),
                *torch.ops.maml_fast.pooled_linear_double_backward(fx, fw, fb, fg, fx, fw)]
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.stride() == f.stride()


def _conv4_head_learner(backend, dtype=torch.float64):
    torch.manual_seed(0)
    net = mf.models.conv4(1, 3, hidden=4, downsample="stride", norm="batch").to(dtype)
    return mf.MAML(net, inner_lr=0.4, inner_steps=2, backend=backend)


@pytest.mark.skipif(not pl.is_available("cpu"), reason=str(pl.unavailable_reasons("cpu")))
def test_fused_backend_lowers_the_head_to_the_op_and_matches_the_loop(monkeypatch, make_batch):
    """conv4's AdaptiveAvgPool2d(1) -> Flatten -> Linear is one pooled_linear op on "fused", and the
    second-order float64 meta-gradient equals the loop's (1e-9)."""
    batch = make_batch(tasks=3, ways=3, shots=1, queries=2, example_shape=(1, 10, 10), dtype=torch.float64)
    grads = {}
    for backend in ("loop", "fused"):
        calls = count_op_calls(monkeypatch, *OPS)
        learner = _conv4_head_learner(backend)
        learner(batch).loss.backward()
        grads[backend] = torch.cat([p.grad.reshape(-1) for p in learner.parameters()])
        if backend == "fused":  # 2 inner steps + the query after 0, 1, 2 steps; one double backward per step
            assert calls["pooled_linear"] == 5 and calls["pooled_linear_double_backward"] == 2, calls
        else:
            assert not any(calls.values()), calls
    relative = ((grads["fused"] - grads["loop"]).norm() / grads["loop"].norm()).item()
    assert relative <= 1e-9, relative


def test_fusion_rule_matches_only_the_pooled_head():
    fused = get_backend("fused")
    head = [("0", torch.nn.AdaptiveAvgPool2d(1)), ("1", torch.nn.Flatten()), ("2", torch.nn.Linear(4, 3))]
    assert fuse_pooled_linear(head, "", fused)[1] == 3
    for other in ([("0", torch.nn.AdaptiveAvgPool2d(2))] + head[1:], [head[0], ("1", torch.nn.Flatten(2)), head[2]],
                  head[1:], [head[0], head[1], ("2", torch.nn.ReLU())]):
        assert fuse_pooled_linear(other, "", fused) is None
