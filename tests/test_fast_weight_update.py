"""maml_fast.ops.fast_weight_update: the compiled kernels against the reference, autograd to second
order, and input checks. Kernel tests run per device and skip with the extension's reason."""
from __future__ import annotations

import pytest
import torch

from maml_fast import _extension
from maml_fast.ops.conv2d import TorchConvPrimitives
from maml_fast.ops.fast_weight_update import (
    check_fast_weight_update_inputs,
    fast_weight_update,
    fast_weight_update_reference,
)
from conftest import needs_cpu_extension, op_devices


DEVICES = op_devices(_extension.extension_unavailable_reasons)


@pytest.fixture
def generator() -> torch.Generator:
    """A freshly seeded generator; the seed is printed, so a failure can be replayed."""
    generator = torch.Generator()
    print(f"seed: {generator.seed()}")
    return generator


def _layout(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as `tensor` ([T, *s]) in another memory layout."""
    if layout == "contiguous":
        return tensor
    if layout == "expanded":  # task 0 broadcast to every task, stride 0 (θ before its first update)
        return tensor[:1].expand_as(tensor)
    if layout == "single value":  # one value broadcast everywhere, every stride 0 (the zero of the backward)
        return tensor.reshape(-1)[:1].reshape([1] * tensor.dim()).expand_as(tensor) if tensor.numel() else tensor
    if layout == "transposed":  # same values, permuted strides
        return tensor.transpose(0, -1).contiguous().transpose(0, -1)
    raise ValueError(layout)


def make_inputs(
    tasks: int,
    shapes: list[tuple[int, ...]],
    lr_form: str,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
    param_layout: str = "contiguous",
    grad_layout: str = "contiguous",
):
    """Random (params, grads, lrs) with lrs of form "scalar" ([]), "element" (s) or "task" ([T, *s])."""

    def randn(*shape):
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)

    params, grads, lrs = [], [], []
    for shape in shapes:
        params.append(_layout(randn(tasks, *shape), param_layout))
        grads.append(_layout(randn(tasks, *shape), grad_layout))
        lr_shape = {"scalar": (), "element": shape, "task": (tasks, *shape)}[lr_form]
        lrs.append(randn(*lr_shape).abs())
    return params, grads, lrs


SHAPE_CASES = {
    "one task": (1, [(7,), (5, 3)]),
    "primes": (3, [(7,), (5, 11), (13, 1, 3), (2, 3, 5, 7)]),
    "per-task scalars": (5, [()]),
    "empty tensor among others": (3, [(4,), (0, 6), (2, 2)]),
    "no tasks": (0, [(4,), (2, 3)]),
    "several parallel chunks": (3, [(101, 331), (17,)]),
    "more tensors than one launch holds": (2, [(i % 5 + 1, 3) for i in range(70)]),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(SHAPE_CASES))
@pytest.mark.parametrize("lr_form", ["scalar", "element", "task"])
@pytest.mark.parametrize("param_layout", ["contiguous", "expanded", "single value", "transposed"])
def test_matches_reference_float64(device, case, lr_form, param_layout, generator):
    tasks, shapes = SHAPE_CASES[case]
    params, grads, lrs = make_inputs(tasks, shapes, lr_form, generator, device=device, param_layout=param_layout)
    expected = fast_weight_update_reference(params, grads, lrs)
    actual = torch.ops.maml_fast.fast_weight_update(params, grads, lrs)
    assert len(actual) == len(expected)
    for out, ref in zip(actual, expected):
        assert out.shape == ref.shape and out.dtype == ref.dtype and out.device == ref.device
        assert out.is_contiguous()
        torch.testing.assert_close(out, ref, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_layout", ["expanded", "single value", "transposed"])
@pytest.mark.parametrize("lr_layout", ["expanded", "single value", "transposed"])
def test_strided_grads_and_per_task_lrs(device, grad_layout, lr_layout, generator):
    params, grads, _ = make_inputs(4, [(3, 5), (6,)], "scalar", generator, device=device, grad_layout=grad_layout)
    lrs = [_layout(torch.rand(p.shape, generator=generator, dtype=p.dtype).to(device), lr_layout) for p in params]
    actual = torch.ops.maml_fast.fast_weight_update(params, grads, lrs)
    for out, ref in zip(actual, fast_weight_update_reference(params, grads, lrs)):
        torch.testing.assert_close(out, ref, rtol=1e-14, atol=1e-14)


def _channels_last_inside_tasks(tensor: torch.Tensor) -> torch.Tensor:
    """[T, O, C, kh, kw] with the memory of [T, O, kh, kw, C] (a channels-last conv weight per task)."""
    return tensor.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lr_form", ["scalar", "element", "task"])
@pytest.mark.parametrize("param_layout", ["contiguous", "expanded", "transposed"])
def test_output_is_laid_out_like_task_major_grads(device, lr_form, param_layout, generator):
    """Conv weight gradients come channels-last inside each task; the fast weights keep that layout
    (so the next conv reads them without a copy), whatever the layout of θ and the rates."""
    shapes = [(7, 3, 3, 2), (5, 1, 2, 3)]
    params, grads, lrs = make_inputs(3, shapes, lr_form, generator, device=device, param_layout=param_layout)
    grads = [_channels_last_inside_tasks(grad) for grad in grads]
    lrs = [_channels_last_inside_tasks(lr) if lr.dim() == 5 else lr for lr in lrs]
    actual = torch.ops.maml_fast.fast_weight_update(params, grads, lrs)
    for out, grad, ref in zip(actual, grads, fast_weight_update_reference(params, grads, lrs)):
        assert out.stride() == grad.stride()
        torch.testing.assert_close(out, ref, rtol=1e-14, atol=1e-14)
    # The layout oneDNN wants for the next conv: preparing the weight is then free.
    if device == "cpu":
        assert TorchConvPrimitives().prepare_weight(actual[0]) is actual[0]


@pytest.mark.parametrize("device", DEVICES)
def test_grads_without_task_major_layout_give_contiguous_output(device, generator):
    params, grads, lrs = make_inputs(3, [(4, 5)], "scalar", generator, device=device, grad_layout="transposed")
    (out,) = torch.ops.maml_fast.fast_weight_update(params, grads, lrs)
    assert out.is_contiguous()
    torch.testing.assert_close(out, fast_weight_update_reference(params, grads, lrs)[0], rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    [(torch.float32, 2e-6), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)],
)
def test_low_precision_against_float64(device, dtype, tolerance, generator):
    params, grads, lrs = make_inputs(3, [(7, 5), (11,)], "element", generator, dtype=dtype, device=device)
    actual = torch.ops.maml_fast.fast_weight_update(params, grads, lrs)
    exact = fast_weight_update_reference(
        [p.double() for p in params], [g.double() for g in grads], [lr.double() for lr in lrs]
    )
    for out, ref in zip(actual, exact):
        assert out.dtype == dtype
        # One rounding of the result, computed in float32: within a unit or two of the last place.
        torch.testing.assert_close(out.double(), ref, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lr_form", ["scalar", "element", "task"])
def test_outputs_are_fully_written(device, lr_form, generator, poisoned_empty):
    params, grads, lrs = make_inputs(3, [(101, 331), (5, 11), (1,), ()], lr_form, generator, device=device,
                                     param_layout="expanded")
    actual = torch.ops.maml_fast.fast_weight_update(params, grads, lrs)
    for out, ref in zip(actual, fast_weight_update_reference(params, grads, lrs)):
        assert not out.isnan().any()
        torch.testing.assert_close(out, ref, rtol=1e-14, atol=1e-14)


def _differentiable_inputs(device, lr_form, generator, expanded: bool):
    """Leaves: θ (s-shaped, expanded to T inside the function) or per-task params, grads and lrs."""
    params, grads, lrs = make_inputs(2, [(3,), (2, 3), ()], lr_form, generator, device=device)
    if expanded:
        params = [p[0] for p in params]
    return [t.detach().requires_grad_() for t in (*params, *grads, *lrs)]


def _update_function(count: int, tasks: int, expanded: bool):
    def update(*tensors):
        params, grads, lrs = tensors[:count], tensors[count : 2 * count], tensors[2 * count :]
        if expanded:
            params = [p.expand(tasks, *p.shape) for p in params]
        return tuple(fast_weight_update(params, grads, lrs))

    return update


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lr_form", ["scalar", "element", "task"])
@pytest.mark.parametrize("expanded", [False, True], ids=["per-task params", "expanded params"])
def test_gradcheck_and_gradgradcheck(device, lr_form, expanded, generator):
    inputs = _differentiable_inputs(device, lr_form, generator, expanded)
    update = _update_function(3, 2, expanded)
    outputs = update(*inputs)
    assert all(type(out.grad_fn).__name__ == "_FastWeightUpdateBackward" for out in outputs), (
        "the extension path was not taken"
    )
    assert torch.autograd.gradcheck(update, inputs)
    assert torch.autograd.gradgradcheck(update, inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lr_form", ["scalar", "element"])
def test_second_order_meta_gradient_matches_reference(device, lr_form, generator):
    """A MAML step: adapt θ on a support loss, differentiate the query loss of the adapted weights
    with respect to θ and the learning rates, through the inner gradient."""
    tasks = 3
    support = torch.randn(tasks, 6, 4, generator=generator, dtype=torch.float64).to(device)
    query = torch.randn(tasks, 5, 4, generator=generator, dtype=torch.float64).to(device)
    weight = torch.randn(4, 3, generator=generator, dtype=torch.float64).to(device)
    bias = torch.randn(3, generator=generator, dtype=torch.float64).to(device)
    lr_shapes = {"scalar": [(), ()], "element": [weight.shape, bias.shape]}[lr_form]
    lr_values = [torch.full(shape, 0.3, dtype=torch.float64, device=device) for shape in lr_shapes]

    def meta_gradient(update):
        theta = [weight.clone().requires_grad_(), bias.clone().requires_grad_()]
        lrs = [lr.clone().requires_grad_() for lr in lr_values]
        fast = [p.expand(tasks, *p.shape) for p in theta]

        def loss(params, x):
            hidden = torch.tanh(torch.einsum("tsi,tio->tso", x, params[0]) + params[1][:, None])
            return (hidden**2).sum()

        inner_grads = torch.autograd.grad(loss(fast, support), fast, create_graph=True)
        adapted = update(fast, inner_grads, lrs)
        return torch.autograd.grad(loss(adapted, query), [*theta, *lrs])

    for ext, ref in zip(meta_gradient(fast_weight_update), meta_gradient(fast_weight_update_reference)):
        torch.testing.assert_close(ext, ref, rtol=1e-12, atol=1e-12)


@needs_cpu_extension
def test_unused_outputs_get_no_gradient():
    params = [torch.randn(2, 3, requires_grad=True), torch.randn(2, 4, requires_grad=True)]
    grads = [torch.randn(2, 3), torch.randn(2, 4)]
    lrs = [torch.tensor(0.1), torch.tensor(0.1)]
    first, _ = fast_weight_update(params, grads, lrs)
    first.sum().backward()
    torch.testing.assert_close(params[0].grad, torch.ones(2, 3))
    assert params[1].grad is None


@needs_cpu_extension
def test_fake_implementation_for_compile_and_meta(generator):
    params, grads, lrs = make_inputs(2, [(3, 4), (5,)], "element", generator, dtype=torch.float32)
    torch.library.opcheck(torch.ops.maml_fast.fast_weight_update.default, (params, grads, lrs))
    # The fake output follows the kernel's layout rule (task-major grads: their strides).
    conv_params, conv_grads, conv_lrs = make_inputs(2, [(3, 2, 3, 3)], "scalar", generator, dtype=torch.float32)
    conv_grads = [_channels_last_inside_tasks(grad) for grad in conv_grads]
    torch.library.opcheck(torch.ops.maml_fast.fast_weight_update.default, (conv_params, conv_grads, conv_lrs))

    meta_out = torch.ops.maml_fast.fast_weight_update(
        [p.to("meta") for p in params], [g.to("meta") for g in grads], [lr.to("meta") for lr in lrs]
    )
    assert [out.shape for out in meta_out] == [p.shape for p in params]

    def update(params, grads, lrs):
        return fast_weight_update(params, grads, lrs)

    compiled = torch.compile(update, backend="aot_eager", fullgraph=True)
    for out, ref in zip(compiled(params, grads, lrs), fast_weight_update_reference(params, grads, lrs)):
        torch.testing.assert_close(out, ref)


def test_empty_lists_give_empty_result():
    assert fast_weight_update([], [], []) == []
    assert fast_weight_update_reference([], [], []) == []


def _bad_inputs():
    """(description, mutation of valid (params, grads, lrs) lists, exception, argument named)."""

    def valid():
        params = [torch.randn(3, 4, 5), torch.randn(3, 2)]
        grads = [torch.randn(3, 4, 5), torch.randn(3, 2)]
        lrs = [torch.tensor(0.1), torch.full((2,), 0.1)]
        return params, grads, lrs

    def case(name, mutate, error, argument):
        params, grads, lrs = valid()
        mutate(params, grads, lrs)
        return pytest.param(params, grads, lrs, error, argument, id=name)

    return [
        case("fewer grads", lambda p, g, l: g.pop(), ValueError, "grads"),
        case("more lrs", lambda p, g, l: l.append(torch.tensor(0.1)), ValueError, "lrs"),
        case("grad shape", lambda p, g, l: g.__setitem__(1, torch.randn(3, 3)), ValueError, r"grads\[1\]"),
        case("task count", lambda p, g, l: p.__setitem__(1, torch.randn(4, 2)), ValueError, r"params\[1\]"),
        case("0-dim param", lambda p, g, l: p.__setitem__(0, torch.tensor(1.0)), ValueError, r"params\[0\]"),
        case("lr shape", lambda p, g, l: l.__setitem__(0, torch.randn(3, 1, 1)), ValueError, r"lrs\[0\]"),
        case("lr dtype", lambda p, g, l: l.__setitem__(1, l[1].double()), TypeError, r"lrs\[1\]"),
        case("grad dtype", lambda p, g, l: g.__setitem__(0, g[0].half()), TypeError, r"grads\[0\]"),
        case(
            "integer params",
            lambda p, g, l: (p.__setitem__(0, p[0].long()), g.__setitem__(0, g[0].long())),
            TypeError,
            r"params\[0\]",
        ),
    ]


@pytest.mark.parametrize(("params", "grads", "lrs", "error", "argument"), _bad_inputs())
@pytest.mark.parametrize("update", [fast_weight_update_reference, fast_weight_update],
                         ids=["reference", "fast_weight_update"])
def test_bad_inputs_raise_naming_the_argument(params, grads, lrs, error, argument, update):
    with pytest.raises(error, match=argument):
        update(params, grads, lrs)


@needs_cpu_extension
@pytest.mark.parametrize(("params", "grads", "lrs", "error", "argument"), _bad_inputs())
def test_compiled_op_checks_inputs_itself(params, grads, lrs, error, argument):
    with pytest.raises(error, match=argument):
        torch.ops.maml_fast.fast_weight_update(params, grads, lrs)


def test_non_tensor_is_a_type_error():
    with pytest.raises(TypeError, match=r"lrs\[0\]"):
        check_fast_weight_update_inputs([torch.zeros(2, 3)], [torch.zeros(2, 3)], [0.1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_mixed_devices_raise_naming_the_argument():
    params, grads = [torch.randn(2, 3, device="cuda")], [torch.randn(2, 3, device="cuda")]
    lrs = [torch.tensor(0.1)]  # on the CPU
    with pytest.raises(ValueError, match=r"lrs\[0\]"):
        fast_weight_update(params, grads, lrs)
    if _extension.is_available("cuda"):
        with pytest.raises(ValueError, match=r"lrs\[0\]"):
            torch.ops.maml_fast.fast_weight_update(params, grads, lrs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_graph_replay_updates_new_values(generator):
    if not _extension.is_available("cuda"):
        pytest.skip("; ".join(_extension.extension_unavailable_reasons("cuda")))
    params, grads, lrs = make_inputs(4, [(64, 3), (7,)], "element", generator, dtype=torch.float32, device="cuda",
                                     param_layout="expanded")
    torch.ops.maml_fast.fast_weight_update(params, grads, lrs)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = torch.ops.maml_fast.fast_weight_update(params, grads, lrs)
    for grad in grads:
        grad.copy_(torch.randn(grad.shape, generator=generator).to(grad))
    graph.replay()
    torch.cuda.synchronize()
    for out, ref in zip(outputs, fast_weight_update_reference(params, grads, lrs)):
        torch.testing.assert_close(out, ref)
