"""Lowering through torch.fx: custom modules built from layers, functions and methods lower to the
task-batched program and give the loop backend's meta-loss and meta-gradient (float64); what cannot lower
falls back to vmap with the node and its layer named."""
from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import maml_fast as mf
from maml_fast import backends
from maml_fast.program import global_mean_pool, lower


class TwoPaths(nn.Module):
    """Two conv branches concatenated along channels (and along width), functional activations and pooling,
    a residual add, a functional dropout that follows the mode, a spatial mean and two ways of flattening."""

    def __init__(self, classes=3):
        super().__init__()
        self.left = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3, track_running_stats=False))
        self.right = nn.Conv2d(1, 2, 1)
        self.mix = nn.Conv2d(5, 5, 3, padding=1)
        self.head = nn.Linear(5 * 2 * 2 + 5, classes)

    def forward(self, x):
        h = torch.cat([F.leaky_relu(self.left(x), 0.1), torch.relu(self.right(x))], dim=1)
        h = h + 0.5 * self.mix(h)
        h = F.dropout(F.max_pool2d(h, 2), p=0.3, training=self.training)
        pooled = F.adaptive_avg_pool2d(h, 2)
        wide = torch.cat([pooled, pooled], dim=3)[..., :2]
        h = h.contiguous()
        features = torch.cat([wide.reshape(wide.size(0), -1), torch.flatten(h.mean(dim=(2, 3), keepdim=True), 1)], 1)
        return self.head(features)


def _backend(name):
    reasons = backends.unavailable_reasons(name, "cpu")
    return pytest.param(name, marks=pytest.mark.skip(reason="; ".join(reasons))) if reasons else name


def _meta_step(backend, batch, train):
    torch.manual_seed(0)
    net = TwoPaths().double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learner = mf.MAML(net, inner_lr=0.3, inner_steps=2, backend=backend).train(train)
        out = learner(batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in learner.named_parameters()}, learner


@pytest.mark.parametrize("backend", ["torch", _backend("fused")])
def test_custom_module_matches_the_loop(backend, make_batch):
    batch = make_batch(3, 3, 1, 2, (1, 8, 8))
    loss, grads, learner = _meta_step(backend, batch, train=False)  # eval: the functional dropout is off
    assert learner.fallback_reason is None
    base_loss, base_grads, _ = _meta_step("loop", batch, train=False)
    torch.testing.assert_close(loss, base_loss, rtol=1e-10, atol=0)
    for name, grad in base_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-9, atol=1e-13, msg=name)


def test_the_program_follows_the_mode(make_batch):
    """A traced F.dropout keeps the training flag it saw: the learner lowers once per mode."""
    batch = make_batch(2, 3, 1, 2, (1, 8, 8))
    _, _, learner = _meta_step("torch", batch, train=True)
    torch.manual_seed(1)
    first = learner(batch).loss
    torch.manual_seed(2)
    assert not torch.equal(first, learner(batch).loss)  # training: dropout masks differ per draw
    learner.eval()
    torch.manual_seed(1)
    evaluated = learner(batch).loss
    torch.manual_seed(2)
    assert torch.equal(evaluated, learner(batch).loss)  # eval: no dropout
    assert set(learner._executions) == {("torch", True), ("torch", False)}


def test_channel_concatenation_keeps_each_task_block():
    class Cat(nn.Module):
        def forward(self, x):
            return torch.cat([x, -2 * x[:, :, :, :]], dim=1)

    program, reason = lower(Cat(), backends.get_backend("torch"))
    assert reason is None
    x = torch.randn(4, 2, 3, 2, 1, dtype=torch.float64)        # task-major [T=4, B=2, C=3, H, W]
    expected = torch.cat([x, -2 * x], dim=2)                    # per task: its 3 channels, then 3 more
    torch.testing.assert_close(program({}, x), expected, rtol=0, atol=0)


class _ChannelMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        return self.conv(x).mean(1)


class _UsesShape(_ChannelMean):
    def forward(self, x):
        h = self.conv(x)
        return h.reshape(h.shape[0], -1)


class _FirstChannels(_ChannelMean):
    def forward(self, x):
        return self.conv(x)[:, :1]


class _ChannelCount(_ChannelMean):
    def forward(self, x):
        h = self.conv(x)
        return h.reshape(h.size(0), h.size(1), -1).mean(2)


class _FlattenAll(_ChannelMean):
    def forward(self, x):
        return torch.flatten(self.conv(x))


class _TwoInputs(nn.Module):
    def forward(self, x, y):
        return x + y


@pytest.mark.parametrize("module,expected", [
    (_ChannelMean(), r"node 'mean' \(call_method mean\) of layer '' \(_ChannelMean\) reduces over the channels"),
    (_UsesShape(), r"reads an activation's \.shape"),
    (_TwoInputs(), r"takes 2 inputs"),
    (_ChannelCount(), r"node 'size_1' \(call_method size\) .* reads an activation's channel count"),
    (_FlattenAll(), r"flattens other dims than 1"),
    (_FirstChannels(), r"node 'getitem' \(call_function _index\)|indexes an activation along its batch or channel"),
    (nn.Sequential(nn.Conv2d(1, 2, 3, dilation=2)), r"layer '0' \(Conv2d\): only groups=1, dilation=1"),
])
def test_what_cannot_lower_is_named(module, expected):
    program, reason = lower(module, backends.get_backend("torch"))
    assert program is None
    assert reason is not None and re.search(expected, reason), reason


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels-last", "contiguous"])
def test_global_mean_pool_keeps_the_layout_in_its_gradient(channels_last):
    """AdaptiveAvgPool2d(1)'s lowering: x.mean over the map, with the gradient in x's own layout (a
    channels-last activation gets a channels-last gradient, the layer below's layout, without a copy);
    gradcheck and gradgradcheck."""
    x = torch.randn(3, 6, 5, 2, dtype=torch.float64)
    x = (x.contiguous(memory_format=torch.channels_last) if channels_last else x).requires_grad_()
    torch.testing.assert_close(global_mean_pool(x), x.mean(dim=(2, 3), keepdim=True), rtol=1e-15, atol=1e-15)
    (grad,) = torch.autograd.grad(global_mean_pool(x), x, torch.randn(3, 6, 1, 1, dtype=torch.float64))
    assert grad.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert torch.autograd.gradcheck(global_mean_pool, (x,))
    assert torch.autograd.gradgradcheck(global_mean_pool, (x,))
