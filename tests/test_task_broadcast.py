"""maml_fast/ops/task_broadcast.py: θ broadcast over the tasks with one reduction for all gradients.
float64, fresh random inputs, awkward shapes (0-dim, 1, primes), gradients in other memory orders,
gradcheck and gradgradcheck, and the reduction against autograd's own backward of ``expand``; the
reduction both ways: the compiled ``maml_fast::sum_over_tasks`` (per device, skipped with the
extension's reason) and the concatenation used without the extension."""
from __future__ import annotations

import pytest
import torch

from maml_fast import _extension
from maml_fast.ops import task_broadcast
from maml_fast.ops.task_broadcast import (
    broadcast_over_tasks,
    broadcast_over_tasks_reference,
    sum_output_like,
    sum_over_tasks,
    sum_over_tasks_reference,
)
from conftest import count_op_calls, needs_cpu_extension, op_devices

DEVICES = op_devices(_extension.extension_unavailable_reasons)

SHAPES = [(), (1,), (7,), (5, 3), (2, 3, 1, 5)]


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(torch.seed())


@pytest.fixture(params=["compiled", "concatenated"])
def reduction(request, monkeypatch):
    """A test using this runs with each way of reducing: the compiled op (where the extension runs on the
    CPU) and the concatenation + one sum that serves without it."""
    if request.param == "compiled" and not _extension.is_available("cpu"):
        pytest.skip("; ".join(_extension.extension_unavailable_reasons("cpu")))
    if request.param == "concatenated":
        monkeypatch.setattr(task_broadcast, "_compiled_op_applies", lambda grads, pairs: False)
    return request.param


def _params(generator, shapes=SHAPES):
    return [torch.randn(s, generator=generator, dtype=torch.float64, requires_grad=True) for s in shapes]


@pytest.mark.usefixtures("reduction")
@pytest.mark.parametrize("tasks", [1, 3, 8])
def test_forward_is_the_expand_and_the_backward_its_sum(tasks, generator):
    params = _params(generator)
    outputs = broadcast_over_tasks(params, tasks)
    for out, ref in zip(outputs, broadcast_over_tasks_reference(params, tasks)):
        assert out.shape == ref.shape and torch.equal(out, ref)
    grads = [torch.randn(o.shape, generator=generator, dtype=torch.float64) for o in outputs]
    got = torch.autograd.grad(outputs, params, grads)
    want = torch.autograd.grad(broadcast_over_tasks_reference(params, tasks), params, grads)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)


@pytest.mark.usefixtures("reduction")
def test_gradients_in_any_memory_order(generator):
    """Channels-last, transposed and expanded gradients are summed right, each result in its own order."""
    grads = [torch.randn(4, 6, 5, 3, 3, generator=generator, dtype=torch.float64).permute(0, 1, 4, 2, 3),
             torch.randn(4, 7, 2, generator=generator, dtype=torch.float64).transpose(1, 2),
             torch.randn(1, 5, generator=generator, dtype=torch.float64).expand(4, 5),
             torch.randn(4, generator=generator, dtype=torch.float64)]
    for got, grad in zip(sum_over_tasks(grads), grads):
        assert got.shape == grad.shape[1:]
        torch.testing.assert_close(got, grad.sum(0), rtol=1e-14, atol=1e-14)


@pytest.mark.usefixtures("reduction")
def test_unused_outputs_and_parameters_without_grad(generator):
    params = _params(generator, [(3,), (2, 2)]) + [torch.randn(4, dtype=torch.float64)]
    outputs = broadcast_over_tasks(params, 5)
    grad_w, = torch.autograd.grad(outputs[1].sum(), [params[1]])
    torch.testing.assert_close(grad_w, torch.full((2, 2), 5.0, dtype=torch.float64))
    assert torch.autograd.grad(outputs[2].sum(), params[0], allow_unused=True) == (None,)


@pytest.mark.usefixtures("reduction")
@pytest.mark.parametrize("tasks", [1, 3])
def test_gradcheck_and_gradgradcheck(tasks, generator):
    params = _params(generator, [(), (3,), (2, 3)])
    fn = lambda *p: tuple(broadcast_over_tasks(p, tasks))  # noqa: E731
    assert torch.autograd.gradcheck(fn, params)
    assert torch.autograd.gradgradcheck(fn, params)


@pytest.mark.usefixtures("reduction")
def test_second_order_through_an_inner_step(generator):
    """A MAML-like step: the meta-gradient through broadcast_over_tasks equals the one through expand."""
    x = torch.randn(3, 4, 5, generator=generator, dtype=torch.float64)

    def meta_gradient(broadcast):
        w, b = _params(torch.Generator().manual_seed(0), [(5, 2), (2,)])
        fast = broadcast([w, b], 3)
        loss = torch.tanh(x @ fast[0] + fast[1][:, None]).pow(2).sum()
        g = torch.autograd.grad(loss, fast, create_graph=True)
        adapted = [p - 0.1 * d for p, d in zip(fast, g)]
        query = torch.tanh(x @ adapted[0] + adapted[1][:, None]).sum()
        return torch.autograd.grad(query, [w, b])

    for a, b in zip(meta_gradient(broadcast_over_tasks), meta_gradient(broadcast_over_tasks_reference)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_bad_arguments():
    with pytest.raises(ValueError, match="tasks must be a positive int"):
        broadcast_over_tasks([torch.zeros(2)], 0)
    with pytest.raises(TypeError, match=r"params\[1\] must be a torch.Tensor"):
        broadcast_over_tasks([torch.zeros(2), 3.0], 2)
    with pytest.raises(ValueError, match="uses must be 1 or 2"):
        broadcast_over_tasks([torch.zeros(2)], 2, uses=3)


@pytest.mark.usefixtures("reduction")
def test_vectors_of_one_length_are_copied_per_task_together(generator):
    """Vectors sharing a length come out contiguous per task (what the fused ops read without a copy);
    a vector of its own length and the matrices stay expanded views."""
    params = _params(generator, [(7,), (3,), (7,), (5, 3), (7,)])
    outputs = broadcast_over_tasks(params, 4)
    for out, param in zip(outputs, params):
        torch.testing.assert_close(out, param.expand(4, *param.shape), rtol=0, atol=0)
    assert all(outputs[i].is_contiguous() for i in (0, 2, 4))
    assert outputs[1].stride(0) == 0 and outputs[3].stride(0) == 0


@pytest.mark.usefixtures("reduction")
def test_pairs_are_summed_in_the_one_reduction(generator):
    """sum_over_tasks with pairs: g.sum(0) + pair.sum(0) whether the pair shares the gradient's memory
    order (the one reduction) or not (added apart), pairs absent, and singles mixed in."""
    grads = [torch.randn(4, 6, 5, 3, 3, generator=generator, dtype=torch.float64).permute(0, 1, 4, 2, 3),
             torch.randn(4, 7, 2, generator=generator, dtype=torch.float64),
             torch.randn(4, 3, generator=generator, dtype=torch.float64),
             torch.randn(4, generator=generator, dtype=torch.float64)]
    pairs = [torch.randn(4, 6, 5, 3, 3, generator=generator, dtype=torch.float64).permute(0, 1, 4, 2, 3),
             torch.randn(4, 2, 7, generator=generator, dtype=torch.float64).transpose(1, 2),  # another order
             None,
             torch.randn(4, generator=generator, dtype=torch.float64)]
    for selected in ([0, 1, 2, 3], [0, 3]):
        got = sum_over_tasks([grads[i] for i in selected], [pairs[i] for i in selected])
        for total, i in zip(got, selected):
            want = grads[i].sum(0) + (0 if pairs[i] is None else pairs[i].sum(0))
            torch.testing.assert_close(total, want, rtol=1e-14, atol=1e-14)
            assert total.stride() == torch.empty_like(grads[i][0]).stride()  # (the gradient's memory order)


@pytest.mark.usefixtures("reduction")
@pytest.mark.parametrize("tasks", [1, 3])
def test_second_use_shares_the_reduction(tasks, generator):
    """uses=2: two lists of the same values; the gradients through either, both or neither give the
    expand's; gradcheck and gradgradcheck; one use's gradient alone still reaches θ."""
    params = _params(generator, [(), (3,), (2, 3), (3,)])
    first, second = broadcast_over_tasks(params, tasks, uses=2)
    for a, b, param in zip(first, second, params):
        assert torch.equal(a, param.expand(tasks, *param.shape)) and torch.equal(b, a) and (b.stride(0) == 0 or tasks == 1)
    weights = [torch.randn(o.shape, generator=generator, dtype=torch.float64) for o in first]
    loss = sum((w * a).sum() + (w * w * b).sum() for w, a, b in zip(weights, first, second[:2] + first[2:]))
    got = torch.autograd.grad(loss, params)
    for g, w in zip(got, weights):  # (the last two read both terms through the first use)
        torch.testing.assert_close(g, w.sum(0) + (w * w).sum(0), rtol=1e-13, atol=1e-13)
    only_second, = torch.autograd.grad(second[2].sum(), params[2])
    torch.testing.assert_close(only_second, torch.full((2, 3), float(tasks), dtype=torch.float64))

    def fn(*p):
        first, second = broadcast_over_tasks(p, tasks, uses=2)
        return tuple(a * a + b for a, b in zip(first, second))
    assert torch.autograd.gradcheck(fn, params)
    assert torch.autograd.gradgradcheck(fn, params)


# The compiled op on its own: torch.ops.maml_fast.sum_over_tasks(grads, pairs, paired).

def _task_rows(tasks, shape, layout, generator, dtype=torch.float64, device="cpu"):
    """Random ``[tasks, *shape]`` values in a memory layout: "contiguous", "channels-last" (inside each
    task, for 4-d shapes), "transposed" (each task's dims reversed in memory), "expanded" (stride 0 over
    the tasks) or "task-inner" (the task dimension innermost: task blocks that are not dense)."""
    values = torch.randn((tasks, *shape), generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
    if layout == "contiguous":
        return values
    if layout == "channels-last" and len(shape) == 4:
        return values.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    if layout == "transposed":
        dims = list(range(values.dim()))
        reversed_inner = [0, *dims[:0:-1]]
        return values.permute(reversed_inner).contiguous().permute(reversed_inner)
    if layout == "expanded":
        return values[:1].expand_as(values)
    if layout == "task-inner":
        order = [*range(1, values.dim()), 0]
        return values.permute(order).contiguous().permute([values.dim() - 1, *range(values.dim() - 1)])
    return values


SHAPES_AND_LAYOUTS = [((), "contiguous"), ((1,), "expanded"), ((7,), "contiguous"), ((5, 3), "transposed"),
                      ((13, 3, 3, 3), "channels-last"), ((2, 3, 1, 5), "task-inner"), ((0, 4), "contiguous"),
                      ((101, 331), "contiguous")]


def _case(tasks, generator, dtype=torch.float64, device="cpu", pair_layouts=None):
    """(grads, pairs, paired): one gradient per SHAPES_AND_LAYOUTS entry; pairs for every other one, in
    their gradient's layout or in `pair_layouts` order."""
    grads = [_task_rows(tasks, shape, layout, generator, dtype, device) for shape, layout in SHAPES_AND_LAYOUTS]
    paired = list(range(0, len(grads), 2))
    layouts = pair_layouts or [SHAPES_AND_LAYOUTS[i][1] for i in paired]
    pairs = [_task_rows(tasks, SHAPES_AND_LAYOUTS[i][0], layout, generator, dtype, device)
             for i, layout in zip(paired, layouts)]
    return grads, pairs, paired


def _reference(grads, pairs, paired):
    full = [None] * len(grads)
    for k, i in enumerate(paired):
        full[i] = pairs[k]
    return sum_over_tasks_reference([g.double() for g in grads], [None if p is None else p.double() for p in full])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tasks", [1, 3, 32])
@pytest.mark.parametrize("pair_layouts", [None, "other"], ids=["pairs in the gradients' layout", "pairs in others"])
def test_compiled_op_matches_the_definition(device, tasks, pair_layouts, generator, poisoned_empty):
    """float64, outputs poisoned (NaN) before the kernel writes them; each output in its gradient's
    task-block layout where that is dense (sum_output_like), whatever the pairs' layouts."""
    others = ["task-inner", "transposed", "expanded", "contiguous"] if pair_layouts else None
    grads, pairs, paired = _case(tasks, generator, device=device, pair_layouts=others)
    outputs = torch.ops.maml_fast.sum_over_tasks(grads, pairs, paired)
    for out, grad, want in zip(outputs, grads, _reference(grads, pairs, paired)):
        assert out.shape == grad.shape[1:] and out.stride() == sum_output_like(grad).stride()
        assert not out.isnan().any()
        torch.testing.assert_close(out, want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("device", DEVICES)
def test_no_tasks_give_zeros(device, generator):
    grads, pairs, paired = _case(0, generator, device=device)
    for out, grad in zip(torch.ops.maml_fast.sum_over_tasks(grads, pairs, paired), grads):
        assert out.shape == grad.shape[1:] and not out.any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 2e-6), (torch.bfloat16, 2 ** -7), (torch.float16, 2 ** -10)])
def test_low_precision_against_float64(device, dtype, tolerance, generator):
    """Accumulated in float32 for every input dtype, one rounding at the end: relative to the float64 sum
    of the same (rounded) inputs, within the dtype's precision (float32: plus the sum's own rounding)."""
    grads, pairs, paired = _case(32, generator, dtype=dtype, device=device)
    outputs = torch.ops.maml_fast.sum_over_tasks(grads, pairs, paired)
    for out, want in zip(outputs, _reference(grads, pairs, paired)):
        assert out.dtype == dtype
        scale = want.abs().max().item() if want.numel() else 0.0
        torch.testing.assert_close(out.double(), want, rtol=tolerance, atol=tolerance * max(scale, 1.0))


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_op_gradcheck_and_gradgradcheck(device, generator):
    """Through `sum_over_tasks` (which must take the compiled op here) and the op called directly."""
    shapes = [(3,), (2, 3), ()]
    grads = [_task_rows(3, shape, "contiguous", generator, device=device).requires_grad_() for shape in shapes]
    pairs = [_task_rows(3, shape, "transposed", generator, device=device).requires_grad_() for shape in shapes[:2]]

    def through_function(*tensors):
        return tuple(sum_over_tasks(list(tensors[:3]), [*tensors[3:], None]))

    def direct(*tensors):
        return tuple(torch.ops.maml_fast.sum_over_tasks(list(tensors[:3]), [tensors[4]], [1]))

    inputs = (*grads, *pairs)
    assert all("maml_fast_sum_over_tasks" in type(out.grad_fn).__name__ for out in through_function(*inputs)), (
        "the compiled op was not taken")
    for function in (through_function, direct):
        assert torch.autograd.gradcheck(function, inputs)
        assert torch.autograd.gradgradcheck(function, inputs)


@needs_cpu_extension
def test_the_broadcast_reduces_with_one_compiled_call(monkeypatch, generator):
    """uses=2 on the extension's device: all gradients of both uses summed by one call of the op."""
    calls = count_op_calls(monkeypatch, "sum_over_tasks")
    params = _params(generator, [(3,), (2, 3), (5, 2, 3, 3)])
    first, second = broadcast_over_tasks(params, 4, uses=2)
    torch.autograd.grad(sum((a * b).sum() for a, b in zip(first, second)), params)
    assert calls == {"sum_over_tasks": 1}


@needs_cpu_extension
def test_fake_implementation_for_compile_and_meta(generator):
    grads, pairs, paired = _case(3, generator, dtype=torch.float32)
    torch.library.opcheck(torch.ops.maml_fast.sum_over_tasks.default, (grads[:6], pairs[:3], paired[:3]))
    meta = torch.ops.maml_fast.sum_over_tasks([g.to("meta") for g in grads], [p.to("meta") for p in pairs], paired)
    assert [(m.shape, m.stride()) for m in meta] == [(g.shape[1:], sum_output_like(g).stride()) for g in grads]

    def reduce(grads, pairs):
        return sum_over_tasks(grads, pairs)

    compiled = torch.compile(reduce, backend="aot_eager", fullgraph=True)
    full = [pairs[paired.index(i)] if i in paired else None for i in range(len(grads))]
    for out, want in zip(compiled(grads, full), _reference(grads, pairs, paired)):
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_graph_replay_sums_new_values(generator):
    """One kernel launch with its table in the kernel arguments: capturable, and a replay reads the
    inputs' current values."""
    if not _extension.is_available("cuda"):
        pytest.skip("; ".join(_extension.extension_unavailable_reasons("cuda")))
    grads, pairs, paired = _case(32, generator, dtype=torch.float32, device="cuda")
    torch.ops.maml_fast.sum_over_tasks(grads, pairs, paired)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = torch.ops.maml_fast.sum_over_tasks(grads, pairs, paired)
    for tensor in (*grads, *pairs):
        if tensor.stride(0) != 0:  # (an expanded one shares its memory between tasks: left as it is)
            tensor.copy_(torch.randn(tensor.shape, generator=generator).to(tensor))
    graph.replay()
    torch.cuda.synchronize()
    for out, want in zip(outputs, _reference(grads, pairs, paired)):
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-4)
