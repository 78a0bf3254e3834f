"""maml_fast.ops.losses: the compiled per-task cross-entropy (with accuracy) and MSE ops (forward,
backward, double backward) against the pure-PyTorch references and their autograd, gradcheck and
gradgradcheck through the autograd glue, third order, awkward shapes, accuracy ties, poisoned
outputs, bad input, fake kernels, and the full second-order meta-gradient of backend "fused" against
backend "loop" (classification and sinusoid regression). Kernel tests run per device and skip with
the reason the ops cannot run there ("no CUDA device" on a machine without a GPU)."""
from __future__ import annotations

import pytest
import torch

import maml_fast as mf
from maml_fast.backends import get_backend
from maml_fast.ops import losses
from conftest import op_devices

# (tasks, examples, classes): single task / example / class, primes, few-shot sizes (5-way 1-shot
# with 32 tasks, 5-way 15-query), and a wide row.
CE_SHAPES = [(1, 1, 1), (1, 1, 5), (3, 1, 2), (7, 3, 5), (2, 5, 13), (5, 17, 1), (32, 5, 5), (4, 75, 5), (3, 4, 257)]
# (tasks, values per task)
MSE_SHAPES = [(1, 1), (1, 10), (7, 3), (5, 13), (32, 10), (4, 1000)]
# Max error relative to the tensor's scale, by dtype (float16's 11-bit mantissa, bfloat16's 8).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _skip_reason(device: str) -> str | None:
    """Why the ops cannot run on `device` (None when they can)."""
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    return "; ".join(losses.unavailable_reasons(device)) or None


DEVICES = op_devices(losses.unavailable_reasons)
needs_cpu_ops = pytest.mark.skipif(_skip_reason("cpu") is not None, reason=str(_skip_reason("cpu")))
needs_cuda_ops = pytest.mark.skipif(_skip_reason("cuda") is not None, reason=str(_skip_reason("cuda")))


@pytest.fixture
def generator() -> torch.Generator:
    generator = torch.Generator()
    print(f"seed: {generator.seed()}")
    return generator


def _randn(generator, *shape, dtype=torch.float64, device="cpu", scale=1.0):
    return (scale * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype=dtype, device=device)


def ce_inputs(shape, generator, dtype=torch.float64, device="cpu"):
    """logits (spread out, so that the softmax is not flat), labels, grad_loss, grad_grad_logits."""
    tasks, batch, classes = shape
    logits = _randn(generator, *shape, dtype=dtype, device=device, scale=2.0)
    labels = torch.randint(0, classes, (tasks, batch), generator=generator).to(device)
    return logits, labels, _randn(generator, tasks, dtype=dtype, device=device), _randn(generator, *shape, dtype=dtype, device=device)


def mse_inputs(shape, generator, dtype=torch.float64, device="cpu"):
    """prediction, target, grad_loss."""
    return (_randn(generator, *shape, dtype=dtype, device=device), _randn(generator, *shape, dtype=dtype, device=device),
            _randn(generator, shape[0], dtype=dtype, device=device))


def ce_reference(logits, labels, grad_loss, grad_grad_logits):
    """(loss, accuracy, logsumexp), grad_logits and (d grad_loss, d logits) by float64 autograd of
    the reference: the second derivatives of L = <gg, grad_logits>."""
    logits, grad_loss = (t.detach().cpu().double().requires_grad_() for t in (logits, grad_loss))
    labels = labels.cpu()
    loss, accuracy = losses.cross_entropy_per_task(logits, labels)
    (grad_logits,) = torch.autograd.grad(loss, logits, grad_loss, create_graph=True)
    second = torch.autograd.grad((grad_logits * grad_grad_logits.cpu().double()).sum(), (grad_loss, logits))
    forward = (loss.detach(), accuracy, torch.logsumexp(logits.detach(), -1))
    return forward, grad_logits.detach(), second


def run_ce_ops(logits, labels, grad_loss, grad_grad_logits):
    loss, accuracy, logsumexp = torch.ops.maml_fast.cross_entropy_per_task(logits, labels)
    grad_logits = torch.ops.maml_fast.cross_entropy_per_task_backward(grad_loss, logits, labels, logsumexp)
    second = torch.ops.maml_fast.cross_entropy_per_task_double_backward(grad_grad_logits, grad_loss, logits, labels,
                                                                        logsumexp)
    return (loss, accuracy, logsumexp), grad_logits, second


def mse_reference(prediction, target, grad_loss):
    prediction, target = (t.detach().cpu().double().requires_grad_() for t in (prediction, target))
    loss, _ = losses.mse_per_task(prediction, target)
    (grad_prediction,) = torch.autograd.grad(loss, prediction, grad_loss.cpu().double())
    return loss.detach(), grad_prediction


def assert_close_scaled(actual, expected, rtol, name):
    """|actual - expected| <= rtol * max(1, max|expected|): a tolerance relative to the tensor's
    scale, since single elements of a derivative may be ~0."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    scale = max(1.0, expected.abs().max().item())
    error = (actual - expected).abs().max().item()
    assert error <= rtol * scale, f"{name}: max error {error:.3g} > {rtol:.1g} x scale {scale:.3g}"


# ------------------------------------------------------------------------------------- the ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=["float64", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", CE_SHAPES, ids=["x".join(map(str, s)) for s in CE_SHAPES])
def test_cross_entropy_ops_match_reference(device, dtype, shape, generator):
    inputs = ce_inputs(shape, generator, dtype, device)
    (loss, accuracy, logsumexp), grad_logits, (d_grad_loss, d_logits) = run_ce_ops(*inputs)
    assert loss.dtype == accuracy.dtype == grad_logits.dtype == d_logits.dtype == d_grad_loss.dtype == dtype
    assert logsumexp.dtype == losses.acc_dtype(dtype) and loss.device == inputs[0].device
    # Reference on the op's own (rounded) inputs: the tolerance then covers the op's arithmetic only.
    (ref_loss, ref_accuracy, ref_lse), ref_grad, (ref_d_grad_loss, ref_d_logits) = ce_reference(*inputs)
    rtol = TOLERANCE[dtype]
    for name, out, ref in (("loss", loss, ref_loss), ("logsumexp", logsumexp, ref_lse), ("grad_logits", grad_logits, ref_grad),
                           ("d grad_loss", d_grad_loss, ref_d_grad_loss), ("d logits", d_logits, ref_d_logits)):
        assert_close_scaled(out, ref, rtol, name)
    # Accuracy: argmax of the rounded logits, counts / B (exact in float32/64, rounded in half types).
    assert_close_scaled(accuracy, ref_accuracy, rtol, "accuracy")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=["float64", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", MSE_SHAPES, ids=["x".join(map(str, s)) for s in MSE_SHAPES])
def test_mse_ops_match_reference(device, dtype, shape, generator):
    prediction, target, grad_loss = mse_inputs(shape, generator, dtype, device)
    loss = torch.ops.maml_fast.mse_per_task(prediction, target)
    grad_prediction = torch.ops.maml_fast.mse_per_task_backward(grad_loss, prediction, target)
    assert loss.dtype == grad_prediction.dtype == dtype and loss.shape == (shape[0],)
    ref_loss, ref_grad = mse_reference(prediction, target, grad_loss)
    assert_close_scaled(loss, ref_loss, TOLERANCE[dtype], "loss")
    assert_close_scaled(grad_prediction, ref_grad, TOLERANCE[dtype], "grad_prediction")


@pytest.mark.parametrize("device", DEVICES)
def test_accuracy_ties_take_the_first_maximum(device):
    """torch.argmax's rule: the first of equal maxima wins; a NaN counts as the maximum."""
    nan = float("nan")
    logits = torch.tensor([[[1.0, 3.0, 3.0], [1.0, 3.0, 3.0], [2.0, 2.0, 2.0], [2.0, 2.0, 2.0]],
                           [[0.0, nan, 5.0], [-1.0, 4.0, 4.0], [7.0, 7.0, 1.0], [7.0, 7.0, 1.0]]],
                          dtype=torch.float64, device=device)
    labels = torch.tensor([[1, 2, 0, 1], [1, 2, 0, 1]], device=device)
    loss, accuracy, _ = torch.ops.maml_fast.cross_entropy_per_task(logits, labels)
    _, ref_accuracy = losses.cross_entropy_per_task(logits, labels)
    assert accuracy.tolist() == [0.5, 0.5] == ref_accuracy.tolist()
    assert not loss[0].isnan() and loss[1].isnan()  # a NaN logit makes its task's loss NaN


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_logits(device):
    """Large logits do not overflow (the row maximum is subtracted); an infinite logit makes its row's
    logsumexp and its task's loss NaN, as in F.cross_entropy."""
    logits = torch.tensor([[[1000.0, 990.0, -1000.0]], [[float("inf"), 0.0, 1.0]]], dtype=torch.float32, device=device)
    labels = torch.tensor([[1], [2]], device=device)
    loss, accuracy, logsumexp = torch.ops.maml_fast.cross_entropy_per_task(logits, labels)
    ref_loss, _ = losses.cross_entropy_per_task(logits.cpu(), labels.cpu())
    torch.testing.assert_close(loss.cpu(), ref_loss, rtol=1e-6, atol=1e-4, equal_nan=True)
    assert ref_loss[1].isnan() and logsumexp[1, 0].isnan() and accuracy.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 3, 5), (4, 75, 5), (3, 130, 2)], ids=["1x1x1", "7x3x5", "4x75x5", "3x130x2"])
def test_outputs_are_fully_written(device, shape, generator, poisoned_empty):
    logits, labels, grad_loss, grad_grad_logits = ce_inputs(shape, generator, torch.float32, device)
    forward, grad_logits, second = run_ce_ops(logits, labels, grad_loss, grad_grad_logits)
    prediction, target, grad_mse = mse_inputs((shape[0], shape[1] * shape[2]), generator, torch.float32, device)
    mse = (torch.ops.maml_fast.mse_per_task(prediction, target),
           torch.ops.maml_fast.mse_per_task_backward(grad_mse, prediction, target))
    for out in (*forward, grad_logits, *second, *mse):
        assert not out.isnan().any()


def _sized_strides(t):
    """t's strides along its dims of more than one element (the others' strides mean nothing)."""
    return tuple(stride for size, stride in zip(t.shape, t.stride()) if size > 1)


def _laid_out(logits, layout):
    """logits (same values) in `layout`: "grouped" (the [T, B, N] view of [B, T*N] a task-batched linear
    layer writes), "padded" (rows contiguous, tensor not dense), "strided classes" (rows not contiguous)."""
    tasks, batch, classes = logits.shape
    if layout == "grouped":
        out = logits.new_empty(batch, tasks, classes).transpose(0, 1)
    elif layout == "padded":
        out = logits.new_empty(tasks, batch, classes + 3)[..., :classes]
    else:
        out = logits.new_empty(tasks, classes, batch).transpose(1, 2)
    return out.copy_(logits)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["grouped", "padded", "strided classes"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 3, 5), (32, 5, 5), (3, 17, 2)], ids=["1x1x1", "7x3x5", "32x5x5", "3x17x2"])
def test_cross_entropy_ops_take_logits_in_any_layout(device, layout, shape, generator, poisoned_empty):
    """Rows read at their strides give the contiguous inputs' results exactly; a dense layout with
    contiguous rows (the grouped one) gets its gradients in the same layout, any other contiguous ones."""
    logits, labels, grad_loss, grad_grad_logits = ce_inputs(shape, generator, torch.float32, device)
    strided = _laid_out(logits, layout)
    for grad_grad in (grad_grad_logits, _laid_out(grad_grad_logits, layout)):
        expected = run_ce_ops(logits, labels, grad_loss, grad_grad)
        actual = run_ce_ops(strided, labels, grad_loss, grad_grad)
        flat = lambda group: [t for item in group for t in (item if isinstance(item, tuple) else (item,))]  # noqa: E731
        for a, b in zip(flat(actual), flat(expected)):
            assert torch.equal(a, b)
        expected_layout = strided if layout == "grouped" else strided.contiguous()
        for grad in (actual[1], actual[2][1]):
            assert _sized_strides(grad) == _sized_strides(expected_layout)
        with torch._subclasses.fake_tensor.FakeTensorMode():
            fake_logits = torch.empty_strided(strided.shape, strided.stride(), device=device)
            fake_grad = torch.ops.maml_fast.cross_entropy_per_task_backward(
                torch.empty(shape[0], device=device), fake_logits, torch.zeros(shape[:2], dtype=torch.int64, device=device),
                torch.empty(shape[:2], device=device))
        assert _sized_strides(fake_grad) == _sized_strides(actual[1])


@needs_cpu_ops
@pytest.mark.parametrize("threads", [1, 3])
def test_results_do_not_depend_on_threads(threads, generator):
    """Enough rows for the CPU kernels to split the tasks / rows over threads: identical results."""
    inputs = ce_inputs((64, 300, 5), generator)
    mse = mse_inputs((64, 3000), generator)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = (*run_ce_ops(*inputs), torch.ops.maml_fast.mse_per_task(*mse[:2]),
                   torch.ops.maml_fast.mse_per_task_backward(mse[2], *mse[:2]))
    finally:
        torch.set_num_threads(previous)
    torch.set_num_threads(1)
    try:
        serial = (*run_ce_ops(*inputs), torch.ops.maml_fast.mse_per_task(*mse[:2]),
                  torch.ops.maml_fast.mse_per_task_backward(mse[2], *mse[:2]))
    finally:
        torch.set_num_threads(previous)
    flat = lambda group: [t for item in group for t in (item if isinstance(item, (tuple, list)) else (item,))]  # noqa: E731
    for a, b in zip(flat(results), flat(serial)):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------- autograd
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 1, 3), (3, 2, 5), (2, 3, 13)], ids=["1x1x1", "1x1x3", "3x2x5", "2x3x13"])
@pytest.mark.parametrize("layout", ["contiguous", "grouped"])
def test_cross_entropy_gradcheck_and_gradgradcheck(device, shape, layout, generator):
    logits, labels, grad_loss, _ = ce_inputs(shape, generator, device=device)
    logits = logits if layout == "contiguous" else _laid_out(logits, layout)
    logits.requires_grad_()
    grad_loss.requires_grad_()
    loss_fn = lambda logits: losses.fused_cross_entropy_per_task(logits, labels)[0]  # noqa: E731
    assert type(loss_fn(logits).grad_fn).__name__ == "_CrossEntropyBackward"
    assert torch.autograd.gradcheck(loss_fn, (logits,))
    assert torch.autograd.gradgradcheck(loss_fn, (logits,))

    def gradient(logits, grad_loss):  # the backward, differentiated in logits and in grad_loss
        return torch.autograd.grad(loss_fn(logits), logits, grad_loss, create_graph=True)[0]

    assert torch.autograd.gradcheck(gradient, (logits, grad_loss))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (2, 13)], ids=["1x1", "3x5", "2x13"])
def test_mse_gradcheck_and_gradgradcheck(device, shape, generator):
    prediction, target, grad_loss = (t.requires_grad_() for t in mse_inputs(shape, generator, device=device))
    assert type(losses.fused_mse_per_task(prediction, target).grad_fn).__name__ == "_MseBackward"
    assert torch.autograd.gradcheck(losses.fused_mse_per_task, (prediction, target))
    assert torch.autograd.gradgradcheck(losses.fused_mse_per_task, (prediction, target))

    def gradient(prediction, target, grad_loss):
        return torch.autograd.grad(losses.fused_mse_per_task(prediction, target), (prediction, target), grad_loss,
                                   create_graph=True)

    assert torch.autograd.gradcheck(gradient, (prediction, target, grad_loss))
    assert torch.autograd.gradgradcheck(gradient, (prediction, target, grad_loss))


def _count_calls(monkeypatch, owner, names, calls=None) -> dict[str, int]:
    """Counts the calls of `owner.<name>` from here on, into `calls` (the glue looks them up per call)."""
    calls = {} if calls is None else calls
    for name in names:
        function = getattr(owner, name)
        calls[name] = 0

        def counting(*args, _function=function, _name=name):
            calls[_name] += 1
            return _function(*args)

        monkeypatch.setattr(owner, name, counting)
    return calls


@needs_cpu_ops
def test_second_order_runs_the_kernel_and_third_order_the_composite(monkeypatch, generator):
    """Second derivatives come from the double-backward op; with a graph recorded around the second
    backward, the composite runs instead and third derivatives match autograd of the reference."""
    calls = _count_calls(monkeypatch, torch.ops.maml_fast, ["cross_entropy_per_task_double_backward"])
    _count_calls(monkeypatch, losses, ["_cross_entropy_double_backward_composite"], calls)
    logits, labels, _, _ = ce_inputs((3, 4, 5), generator)

    def derivatives(loss_fn, order):
        x = logits.detach().requires_grad_()
        (g,) = torch.autograd.grad((loss_fn(x, labels)[0] * torch.arange(1.0, 4.0, dtype=x.dtype)).sum(), x,
                                   create_graph=True)
        (gg,) = torch.autograd.grad((g * g.detach().cos()).sum() + (g * g).sum(), x, create_graph=order == 3)
        return gg if order == 2 else torch.autograd.grad(gg.sin().sum(), x)[0]

    second = derivatives(losses.fused_cross_entropy_per_task, 2)
    assert calls == {"cross_entropy_per_task_double_backward": 1, "_cross_entropy_double_backward_composite": 0}
    torch.testing.assert_close(second, derivatives(losses.cross_entropy_per_task, 2), rtol=1e-10, atol=1e-12)
    third = derivatives(losses.fused_cross_entropy_per_task, 3)
    assert calls["_cross_entropy_double_backward_composite"] == 1
    torch.testing.assert_close(third, derivatives(losses.cross_entropy_per_task, 3), rtol=1e-10, atol=1e-12)

    x = logits.detach().requires_grad_()

    def second_order(x):
        return torch.autograd.grad((losses.fused_cross_entropy_per_task(x, labels)[0] ** 2).sum(), x, create_graph=True)

    assert torch.autograd.gradgradcheck(second_order, (x,))


@needs_cpu_ops
def test_mse_third_order_matches_reference(generator):
    prediction, target, _ = mse_inputs((3, 4), generator)

    def third(loss_fn):
        p, t = (v.detach().requires_grad_() for v in (prediction, target))
        (g,) = torch.autograd.grad((loss_fn(p, t) ** 3).sum(), p, create_graph=True)
        (gg,) = torch.autograd.grad((g * g).sum(), p, create_graph=True)
        return torch.autograd.grad(gg.sin().sum(), (p, t))

    fused = third(losses.fused_mse_per_task)
    reference = third(lambda p, t: losses.mse_per_task(p, t)[0])
    for out, ref in zip(fused, reference):
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


# -------------------------------------------------------------------------------- bad input
def _valid_ce():
    return torch.randn(2, 3, 4), torch.randint(0, 4, (2, 3))


BAD_CE = [
    ("integer logits", lambda x, y: (x.long(), y), TypeError, "logits"),
    ("logits 2-D", lambda x, y: (x[0], y), ValueError, "logits"),
    ("no classes", lambda x, y: (x[..., :0], y), ValueError, "logits"),
    ("no examples", lambda x, y: (x[:, :0], y[:, :0]), ValueError, "logits"),
    ("int32 labels", lambda x, y: (x, y.int()), TypeError, "labels"),
    ("labels shape", lambda x, y: (x, y[:, :2]), ValueError, "labels"),
    ("labels 1-D", lambda x, y: (x, y.reshape(-1)), ValueError, "labels"),
]


@pytest.mark.parametrize(("case", "mutate", "error", "argument"), BAD_CE, ids=[c[0] for c in BAD_CE])
def test_bad_cross_entropy_inputs_name_the_argument(case, mutate, error, argument):
    args = mutate(*_valid_ce())
    with pytest.raises(error, match=rf"\b{argument}\b"):
        losses.check_cross_entropy_inputs(*args)
    if losses.is_available("cpu"):
        with pytest.raises(error, match=rf"\b{argument}\b"):
            losses.fused_cross_entropy_per_task(*args)
        with pytest.raises(error, match=rf"\b{argument}\b"):
            torch.ops.maml_fast.cross_entropy_per_task(*args)


@needs_cpu_ops
@pytest.mark.parametrize("label", [-1, 4])
def test_cpu_rejects_labels_out_of_range(label):
    logits, labels = _valid_ce()
    labels[1, 2] = label
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        torch.ops.maml_fast.cross_entropy_per_task(logits, labels)
    with pytest.raises(ValueError, match=r"\blabels\b"):
        losses.fused_cross_entropy_per_task(logits, labels)


def test_device_mismatch_and_unavailable_device():
    logits, labels = _valid_ce()
    with pytest.raises(ValueError, match=r"labels is on meta"):
        losses.check_cross_entropy_inputs(logits, labels.to("meta"))
    with pytest.raises(ValueError, match=r"target is on meta"):
        losses.check_mse_inputs(logits[0], logits[0].to("meta"))
    with pytest.raises(RuntimeError, match="cross_entropy_per_task cannot run"):
        losses.fused_cross_entropy_per_task(logits.to("meta"), labels.to("meta"))
    with pytest.raises(TypeError, match="labels"):
        losses.check_cross_entropy_inputs(logits, [0, 1])


@needs_cuda_ops
def test_cuda_device_mismatch_and_bad_label():
    device = "cuda"
    logits, labels = _valid_ce()
    with pytest.raises(ValueError, match=r"\blabels\b"):
        torch.ops.maml_fast.cross_entropy_per_task(logits.to(device), labels)
    # No device assert: an out-of-range label reads nothing out of bounds and makes its task's loss NaN.
    labels[1, 0] = 4
    loss, _, _ = torch.ops.maml_fast.cross_entropy_per_task(logits.to(device), labels.to(device))
    assert not loss[0].isnan() and loss[1].isnan()


BAD_MSE = [
    ("integer prediction", lambda p, t: (p.long(), t.long()), TypeError, "prediction"),
    ("prediction 1-D", lambda p, t: (p[0], t[0]), ValueError, "prediction"),
    ("no values", lambda p, t: (p[:, :0], t[:, :0]), ValueError, "prediction"),
    ("target dtype", lambda p, t: (p, t.double()), TypeError, "target"),
    ("target shape", lambda p, t: (p, t[:, :2]), ValueError, "target"),
]


@pytest.mark.parametrize(("case", "mutate", "error", "argument"), BAD_MSE, ids=[c[0] for c in BAD_MSE])
def test_bad_mse_inputs_name_the_argument(case, mutate, error, argument):
    args = mutate(torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(error, match=rf"\b{argument}\b"):
        losses.check_mse_inputs(*args)
    if losses.is_available("cpu"):
        with pytest.raises(error, match=rf"\b{argument}\b"):
            torch.ops.maml_fast.mse_per_task(*args)


@needs_cpu_ops
@pytest.mark.parametrize(
    ("argument", "replace", "error"),
    [("grad_loss", lambda a: a.update(grad_loss=a["grad_loss"][:1]), ValueError),
     ("grad_loss", lambda a: a.update(grad_loss=a["grad_loss"].double()), TypeError),
     ("logsumexp", lambda a: a.update(logsumexp=a["logsumexp"].double()), TypeError),
     ("logsumexp", lambda a: a.update(logsumexp=a["logsumexp"][:, :2]), ValueError),
     ("labels", lambda a: a.update(labels=a["labels"].float()), TypeError)],
)
def test_bad_backward_inputs_name_the_argument(argument, replace, error):
    logits, labels = _valid_ce()
    _, _, logsumexp = torch.ops.maml_fast.cross_entropy_per_task(logits, labels)
    args = dict(grad_loss=torch.randn(2), logits=logits, labels=labels, logsumexp=logsumexp)
    replace(args)
    with pytest.raises(error, match=rf"\b{argument}\b"):
        torch.ops.maml_fast.cross_entropy_per_task_backward(*args.values())
    with pytest.raises(error, match=rf"\b{argument}\b"):
        torch.ops.maml_fast.cross_entropy_per_task_double_backward(torch.randn_like(logits), *args.values())


@needs_cpu_ops
def test_bad_double_backward_and_mse_backward_inputs_name_the_argument():
    logits, labels = _valid_ce()
    _, _, logsumexp = torch.ops.maml_fast.cross_entropy_per_task(logits, labels)
    for bad, error in ((logits[..., :3], ValueError), (logits.double(), TypeError)):
        with pytest.raises(error, match=r"\bgrad_grad_logits\b"):
            torch.ops.maml_fast.cross_entropy_per_task_double_backward(bad, torch.randn(2), logits, labels, logsumexp)
    prediction = torch.randn(2, 3)
    for bad, error in ((torch.randn(3), ValueError), (torch.randn(2).double(), TypeError)):
        with pytest.raises(error, match=r"\bgrad_loss\b"):
            torch.ops.maml_fast.mse_per_task_backward(bad, prediction, prediction)


# ------------------------------------------------------------------------------ fake kernels
@needs_cpu_ops
def test_fake_kernels_for_compile_and_meta(generator):
    logits, labels, grad_loss, grad_grad_logits = ce_inputs((3, 4, 5), generator, torch.float32)
    _, _, logsumexp = torch.ops.maml_fast.cross_entropy_per_task(logits, labels)
    prediction, target, grad_mse = mse_inputs((3, 7), generator, torch.float32)
    ops = torch.ops.maml_fast
    torch.library.opcheck(ops.cross_entropy_per_task.default, (logits, labels))
    torch.library.opcheck(ops.cross_entropy_per_task_backward.default, (grad_loss, logits, labels, logsumexp))
    torch.library.opcheck(ops.cross_entropy_per_task_double_backward.default,
                          (grad_grad_logits, grad_loss, logits, labels, logsumexp))
    torch.library.opcheck(ops.mse_per_task.default, (prediction, target))
    torch.library.opcheck(ops.mse_per_task_backward.default, (grad_mse, prediction, target))
    loss, accuracy, lse = ops.cross_entropy_per_task(logits.to("meta").half(), labels.to("meta"))
    assert loss.shape == accuracy.shape == (3,) and lse.shape == (3, 4) and lse.dtype == torch.float32

    compiled = torch.compile(losses.fused_cross_entropy_per_task, backend="aot_eager", fullgraph=True)
    for out, ref in zip(compiled(logits, labels), losses.fused_cross_entropy_per_task(logits, labels)):
        torch.testing.assert_close(out, ref)


# ------------------------------------------------------------------------------ wiring + MAML
@needs_cpu_ops
def test_per_task_loss_falls_back_where_the_op_does_not_fit(monkeypatch, generator):
    calls = _count_calls(monkeypatch, torch.ops.maml_fast, ["cross_entropy_per_task", "mse_per_task"])
    assert losses.LOSSES["cross_entropy"] is losses.cross_entropy_per_task
    assert losses.LOSSES["mse"] is losses.mse_per_task
    fused_ce, fused_mse = losses.FUSED_LOSSES["cross_entropy"], losses.FUSED_LOSSES["mse"]
    logits, labels, _, _ = ce_inputs((2, 3, 4), generator)
    for out, ref in zip(fused_ce(logits, labels), losses.cross_entropy_per_task(logits, labels)):
        torch.testing.assert_close(out, ref, rtol=1e-14, atol=1e-15)
    prediction, target = torch.randn(2, 3, 1, dtype=torch.float64), torch.randn(2, 3, 1, dtype=torch.float64)
    loss, accuracy = fused_mse(prediction.reshape(2, 3), target)  # prediction reshaped to the targets' shape
    assert accuracy is None
    torch.testing.assert_close(loss, losses.mse_per_task(prediction, target)[0], rtol=1e-14, atol=1e-15)
    assert calls == {"cross_entropy_per_task": 1, "mse_per_task": 1}
    fused_ce(logits, labels.to(torch.uint8))  # uint8 labels: the reference
    fused_mse(prediction.float(), target)  # mixed dtypes: the reference (which promotes)
    assert calls == {"cross_entropy_per_task": 1, "mse_per_task": 1}


LOSS_OPS = ["cross_entropy_per_task", "cross_entropy_per_task_backward", "cross_entropy_per_task_double_backward",
            "mse_per_task", "mse_per_task_backward"]


def _meta_gradient(backend, regression, device="cpu"):
    """Loss and meta-gradient of one second-order MAML step (2 inner steps, float64)."""
    torch.manual_seed(0)
    net = (mf.models.sinusoid_mlp(hidden=5) if regression else mf.models.conv4(1, 3, hidden=3)).double().to(device)
    generator = torch.Generator().manual_seed(1)
    tasks = 3
    if regression:
        sx, qx = (torch.rand(tasks, n, 1, generator=generator, dtype=torch.float64) * 10 - 5 for n in (5, 7))
        sy, qy = sx.sin() * 2, (qx + 0.5).sin() * 2
    else:
        ways, shots, queries = 3, 2, 3
        sx = torch.randn(tasks, ways * shots, 1, 8, 8, generator=generator, dtype=torch.float64)
        qx = torch.randn(tasks, ways * queries, 1, 8, 8, generator=generator, dtype=torch.float64)
        sy = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).contiguous()
        qy = torch.randint(0, ways, (tasks, ways * queries), generator=generator)
    batch = mf.TaskBatch(*(t.to(device) for t in (sx, sy, qx, qy)))
    learner = mf.MAML(net, inner_lr=0.1 if regression else 0.4, inner_steps=2, backend=backend)
    out = learner(batch)
    out.loss.backward()
    return out, torch.cat([p.grad.reshape(-1) for p in net.parameters()]).cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("regression", [False, True], ids=["conv4_classification", "sinusoid_regression"])
def test_fused_backend_meta_gradient_matches_loop_and_uses_the_fused_losses(device, regression, monkeypatch):
    calls = _count_calls(monkeypatch, torch.ops.maml_fast, LOSS_OPS)
    assert get_backend("fused").losses is losses.FUSED_LOSSES
    out, grads = _meta_gradient("fused", regression, device)
    if regression:  # the MSE double backward is PyTorch ops
        assert calls["mse_per_task"] > 0 and calls["mse_per_task_backward"] > 0, calls
    else:  # second order: the inner gradients' backward ran the double-backward kernel
        assert all(calls[name] > 0 for name in LOSS_OPS[:3]), calls
    ref_out, ref_grads = _meta_gradient("loop", regression)
    torch.testing.assert_close(out.loss.detach().cpu(), ref_out.loss.detach(), rtol=1e-12, atol=1e-14)
    for key, value in ref_out.per_task_metrics.items():
        torch.testing.assert_close(out.per_task_metrics[key].cpu(), value, rtol=1e-12, atol=1e-14)
    relative = ((grads - ref_grads).norm() / ref_grads.norm()).item()
    assert relative <= 1e-9, relative


@needs_cpu_ops
def test_other_backends_keep_the_reference_losses(monkeypatch):
    calls = _count_calls(monkeypatch, torch.ops.maml_fast, LOSS_OPS)
    for backend in ("torch", "loop"):
        assert get_backend(backend).losses is losses.LOSSES
        _meta_gradient(backend, regression=False)
        _meta_gradient(backend, regression=True)
    assert not any(calls.values()), calls
