"""maml_fast/ops/task_broadcast.py: θ broadcast over the tasks with one reduction for all gradients.
float64, fresh random inputs, awkward shapes (0-dim, 1, primes), gradients in other memory orders,
gradcheck and gradgradcheck, and the reduction against autograd's own backward of ``expand``."""
from __future__ import annotations

import pytest
import torch

from maml_fast.ops.task_broadcast import broadcast_over_tasks, broadcast_over_tasks_reference, sum_over_tasks

SHAPES = [(), (1,), (7,), (5, 3), (2, 3, 1, 5)]


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(torch.seed())


def _params(generator, shapes=SHAPES):
    return [torch.randn(s, generator=generator, dtype=torch.float64, requires_grad=True) for s in shapes]


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


def test_gradients_in_any_memory_order(generator):
    """Channels-last, transposed and expanded gradients are summed right, each result in its own order."""
    grads = [torch.randn(4, 6, 5, 3, 3, generator=generator, dtype=torch.float64).permute(0, 1, 4, 2, 3),
             torch.randn(4, 7, 2, generator=generator, dtype=torch.float64).transpose(1, 2),
             torch.randn(1, 5, generator=generator, dtype=torch.float64).expand(4, 5),
             torch.randn(4, generator=generator, dtype=torch.float64)]
    for got, grad in zip(sum_over_tasks(grads), grads):
        assert got.shape == grad.shape[1:]
        torch.testing.assert_close(got, grad.sum(0), rtol=1e-14, atol=1e-14)


def test_unused_outputs_and_parameters_without_grad(generator):
    params = _params(generator, [(3,), (2, 2)]) + [torch.randn(4, dtype=torch.float64)]
    outputs = broadcast_over_tasks(params, 5)
    grad_w, = torch.autograd.grad(outputs[1].sum(), [params[1]])
    torch.testing.assert_close(grad_w, torch.full((2, 2), 5.0, dtype=torch.float64))
    assert torch.autograd.grad(outputs[2].sum(), params[0], allow_unused=True) == (None,)


@pytest.mark.parametrize("tasks", [1, 3])
def test_gradcheck_and_gradgradcheck(tasks, generator):
    params = _params(generator, [(), (3,), (2, 3)])
    fn = lambda *p: tuple(broadcast_over_tasks(p, tasks))  # noqa: E731
    assert torch.autograd.gradcheck(fn, params)
    assert torch.autograd.gradgradcheck(fn, params)


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


def test_vectors_of_one_length_are_copied_per_task_together(generator):
    """Vectors sharing a length come out contiguous per task (what the fused ops read without a copy);
    a vector of its own length and the matrices stay expanded views."""
    params = _params(generator, [(7,), (3,), (7,), (5, 3), (7,)])
    outputs = broadcast_over_tasks(params, 4)
    for out, param in zip(outputs, params):
        torch.testing.assert_close(out, param.expand(4, *param.shape), rtol=0, atol=0)
    assert all(outputs[i].is_contiguous() for i in (0, 2, 4))
    assert outputs[1].stride(0) == 0 and outputs[3].stride(0) == 0


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
