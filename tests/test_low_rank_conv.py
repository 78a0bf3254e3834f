"""maml_fast/ops/low_rank_conv.py: a conv weight kept as θ and its inner-loop updates.

Its materialised weight (`LowRankFastWeight.dense`) is checked against autograd's weight gradient of the
plain per-task convolution; the products of the patches (`patch_products`) against F.unfold's patches; the
factored convolution (`low_rank_conv2d`) against the convolution with that weight, in float64, on awkward
geometries, to second order (gradcheck, gradgradcheck); and the tape: which layers record, and what."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from maml_fast.ops import conv2d as conv_ops
from maml_fast.ops import low_rank_conv
from maml_fast.ops.low_rank_conv import LowRankFastWeight, low_rank_conv2d, low_rank_conv2d_reference

# (tasks, in, out, kernel, stride, padding, input size, support batch, query batch)
GEOMETRIES = [
    (1, 2, 3, (3, 3), 1, 1, (5, 5), 2, 3),
    (3, 4, 5, (3, 3), 2, 1, (7, 6), 1, 2),
    (2, 3, 2, (1, 1), 1, 0, (4, 3), 3, 1),
    (2, 5, 3, (3, 2), 1, 0, (5, 7), 2, 2),
]


def make_weight(tasks, in_ch, out_ch, kernel, stride, padding, size, support, updates, dtype=torch.float64,
                requires_grad=False):
    """θ expanded over the tasks with `updates` random updates of the layer's shapes."""
    theta = torch.randn(out_ch, in_ch, *kernel, dtype=dtype, requires_grad=requires_grad)
    out_hw = conv_ops.ConvGeometry(tasks, (stride, stride), (padding, padding), size, kernel).output_hw()
    terms = tuple((torch.rand((), dtype=dtype) + 0.1, torch.randn(support, tasks * in_ch, *size, dtype=dtype),
                   torch.randn(support, tasks * out_ch, *out_hw, dtype=dtype)) for _ in range(updates))
    if requires_grad:
        terms = tuple(tuple(t.requires_grad_() for t in term) for term in terms)
    return LowRankFastWeight(theta, tasks, terms, expanded=None if updates else theta.expand(tasks, *theta.shape),
                             max_updates=max(updates, 1))


def unfolded_patches(x, geo):
    """The definition of P(x): ``[T, B*Ho*Wo, C*kh*kw]``, each task's kh x kw patches of x, a row per output
    pixel (F.unfold)."""
    batch, tasks = x.shape[0], geo.tasks
    columns = F.unfold(x, geo.kernel_hw, padding=geo.padding, stride=geo.stride)  # [B, T*C*kh*kw, Ho*Wo]
    return columns.view(batch, tasks, -1, columns.shape[-1]).permute(1, 0, 3, 2).reshape(
        tasks, batch * columns.shape[-1], -1)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("update_hw", [None, (6, 5)])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_patch_products_are_the_products_of_the_unfolded_patches(geometry, update_hw, channels_last):
    tasks, in_ch, _, kernel, stride, padding, size, support, query = geometry
    geo = conv_ops.ConvGeometry(tasks, (stride, stride), (padding, padding), size, kernel)
    update_geo = dataclasses.replace(geo, input_hw=update_hw or size)
    x = torch.randn(query, tasks * in_ch, *size, dtype=torch.float64)
    x_update = torch.randn(support, tasks * in_ch, *update_geo.input_hw, dtype=torch.float64)
    if channels_last:
        x, x_update = (t.contiguous(memory_format=torch.channels_last) for t in (x, x_update))
    expected = torch.bmm(unfolded_patches(x, geo), unfolded_patches(x_update, update_geo).transpose(1, 2))
    got = low_rank_conv.patch_products(x, x_update, geo, update_geo)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("geometry", GEOMETRIES[1:])
def test_patch_products_gradcheck_and_gradgradcheck(geometry):
    tasks, in_ch, _, kernel, stride, padding, size, support, query = geometry
    geo = conv_ops.ConvGeometry(tasks, (stride, stride), (padding, padding), size, kernel)
    inputs = (torch.randn(query, tasks * in_ch, *size, dtype=torch.float64, requires_grad=True),
              torch.randn(support, tasks * in_ch, *size, dtype=torch.float64, requires_grad=True))

    def products(x, x_update):
        return low_rank_conv.patch_products(x, x_update, geo, geo)
    assert torch.autograd.gradcheck(products, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(products, inputs, fast_mode=True)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_dense_weight_is_theta_minus_the_per_task_weight_gradients(geometry):
    tasks, in_ch, out_ch, kernel, stride, padding, size, support, _ = geometry
    weight = make_weight(tasks, in_ch, out_ch, kernel, stride, padding, size, support, updates=2)
    expected = weight.theta.expand(weight.shape)
    for lr, x, grad_y in weight.updates:
        w = torch.zeros(weight.shape, dtype=torch.float64, requires_grad=True)
        grad_w, = torch.autograd.grad((conv_ops.conv2d_reference(x, w, None, stride, padding) * grad_y).sum(), w)
        expected = expected - lr * grad_w
    torch.testing.assert_close(weight.dense(stride, padding), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("updates", [0, 1, 3])
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_factored_conv_is_the_conv_with_the_dense_weight(geometry, updates, bias, channels_last):
    tasks, in_ch, out_ch, kernel, stride, padding, size, support, query = geometry
    weight = make_weight(tasks, in_ch, out_ch, kernel, stride, padding, size, support, updates)
    x = torch.randn(query, tasks * in_ch, *size, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    b = torch.randn(tasks, out_ch, dtype=torch.float64) if bias else None
    y = low_rank_conv2d(x, weight, b, stride, padding)
    torch.testing.assert_close(y, low_rank_conv2d_reference(x, weight, b, stride, padding), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("geometry", GEOMETRIES[:3])
def test_factored_conv_gradcheck_and_gradgradcheck(geometry):
    tasks, in_ch, out_ch, kernel, stride, padding, size, support, query = geometry
    weight = make_weight(tasks, in_ch, out_ch, kernel, stride, padding, size, support, updates=2, requires_grad=True)
    x = torch.randn(query, tasks * in_ch, *size, dtype=torch.float64, requires_grad=True)
    leaves = [x, weight.theta, *(t for term in weight.updates for t in term)]

    def conv(x, theta, *flat):
        updates = tuple(tuple(flat[i:i + 3]) for i in range(0, len(flat), 3))
        return low_rank_conv2d(x, LowRankFastWeight(theta, tasks, updates), None, stride, padding)
    assert torch.autograd.gradcheck(conv, leaves, fast_mode=True)
    assert torch.autograd.gradgradcheck(conv, leaves, fast_mode=True)


class _Decides:
    """Conv primitives whose ``factors_updates`` answers `answer` and counts its calls."""

    def __init__(self, answer):
        self.answer, self.calls = answer, 0

    def factors_updates(self, x, geo, out_ch, steps):
        self.calls += 1
        return self.answer

    def __getattr__(self, name):
        return getattr(conv_ops.TORCH_CONV, name)


@pytest.mark.parametrize("answer", [False, True])
def test_the_first_use_decides_and_every_use_records(answer):
    tasks, in_ch, out_ch, kernel, stride, padding, size, support, query = GEOMETRIES[0]
    weight = make_weight(tasks, in_ch, out_ch, kernel, stride, padding, size, support, updates=0).recording()
    primitives = _Decides(answer)
    xs = [torch.randn(query, tasks * in_ch, *size, dtype=torch.float64) for _ in range(2)]
    ys = [low_rank_conv2d(x, weight, None, stride, padding, primitives) for x in xs]
    assert primitives.calls == 1 and weight.tape.factored is answer
    assert len(weight.tape.uses) == (2 if answer else 0)
    if answer:
        assert all(u[0] is x and u[1] is y for u, x, y in zip(weight.tape.uses, xs, ys))


def test_a_weight_with_updates_always_records_and_one_not_recording_never_does():
    tasks, in_ch, out_ch, kernel, stride, padding, size, support, query = GEOMETRIES[1]
    weight = make_weight(tasks, in_ch, out_ch, kernel, stride, padding, size, support, updates=1)
    x = torch.randn(query, tasks * in_ch, *size, dtype=torch.float64)
    primitives = _Decides(False)
    recording = weight.recording()
    low_rank_conv2d(x, recording, None, stride, padding, primitives)
    assert primitives.calls == 0 and recording.tape.factored and len(recording.tape.uses) == 1
    low_rank_conv2d(x, weight, None, stride, padding, primitives)
    assert weight.tape is None and primitives.calls == 0


def test_updated_adds_one_term_per_use_and_detaches_x_for_first_order():
    tasks, in_ch, out_ch, kernel, stride, padding, size, support, query = GEOMETRIES[0]
    weight = make_weight(tasks, in_ch, out_ch, kernel, stride, padding, size, support, updates=1)
    x = torch.randn(support, tasks * in_ch, *size, dtype=torch.float64, requires_grad=True)
    y = torch.randn(support, tasks * out_ch, *size, dtype=torch.float64)
    lr = torch.tensor(0.5, dtype=torch.float64)
    second = weight.updated(lr, [(x, y), (x, y)], [y, None])
    assert len(second.updates) == 2 and second.updates[1][1] is x and second.tape is None
    first = weight.updated(lr, [(x, y)], [y], keep_graph=False)
    assert not first.updates[1][1].requires_grad


def test_flatten_and_unflatten_round_trip():
    tasks, in_ch, out_ch, kernel, stride, padding, size, support, _ = GEOMETRIES[1]
    fresh = make_weight(tasks, in_ch, out_ch, kernel, stride, padding, size, support, updates=0)
    stepped = make_weight(tasks, in_ch, out_ch, kernel, stride, padding, size, support, updates=2)
    plain = torch.randn(tasks, 3)
    tensors, layouts = low_rank_conv.flatten([plain, fresh, stepped])
    assert len(tensors) == low_rank_conv.flat_size(layouts) == 1 + 2 + 1 + 3 * 2
    rebuilt = low_rank_conv.unflatten(tensors, layouts)
    assert rebuilt[0] is plain
    for original, copy in zip((fresh, stepped), rebuilt[1:]):
        assert copy.theta is original.theta and copy.expanded is original.expanded and copy.tasks == original.tasks
        assert copy.max_updates == original.max_updates
        assert all(a is b for u, v in zip(original.updates, copy.updates, strict=True) for a, b in zip(u, v))


# ResNet-12's per-task-weight convs on 32-px images, T=8, 5 support images: (in, out, kernel, input side)
RESNET12_32PX_CONVS = [(64, 64, 3, 32), (160, 160, 3, 16), (160, 320, 3, 8), (320, 320, 3, 8), (160, 320, 1, 8),
                       (320, 640, 3, 4), (640, 640, 3, 4), (320, 640, 1, 4)]


@pytest.mark.parametrize("steps,factored", [
    (1, {(320, 320, 3, 8), (320, 640, 3, 4), (640, 640, 3, 4), (320, 640, 1, 4)}),
    (2, {(320, 640, 3, 4), (640, 640, 3, 4), (320, 640, 1, 4)}),
    (5, {(320, 640, 3, 4), (640, 640, 3, 4)}),
    (9, set()),
])
def test_which_resnet12_convs_keep_their_updates_factored_on_the_cpu(steps, factored):
    """Wide layers (256 x 256 channels or more) whose updates' rank, 5 support images x output pixels x
    steps, is at most the weight's smaller side (the README's "most convs of ResNet-12's last two blocks")."""
    tasks, support = 8, 5
    decided = set()
    for in_ch, out_ch, kernel, side in RESNET12_32PX_CONVS:
        geo = conv_ops.ConvGeometry(tasks, (1, 1), (kernel // 2,) * 2, (side, side), (kernel, kernel))
        x = torch.empty(support, tasks * in_ch, side, side)
        if conv_ops.TORCH_CONV.factors_updates(x, geo, out_ch, steps):
            decided.add((in_ch, out_ch, kernel, side))
    assert decided == factored
