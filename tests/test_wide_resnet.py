"""Wide ResNet (Zagoruyko & Komodakis, 2016; WRN-28-10 as in learn2learn's model zoo) lowered through
torch.fx: WRN-28-10's layout and parameter count; a small WRN-10-1 lowers without falling back, and the
task-batched backends give the loop backend's meta-loss and meta-gradient in float64 (first and second
order, 1 and 2 inner steps); the op count does not grow with the number of tasks; bad arguments are named."""
from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

import maml_fast as mf
from benchmarks.op_counts import count_step
from maml_fast import backends
from maml_fast.presets import build_learner, get_preset
from test_resnet12 import assert_matches_the_loop

IMAGE = (1, 8, 8)  # WRN-10-1 (16-32-64 channels) on 8x8 images: 8, 4, 2 pixels a side through the groups


def _backend(name):
    reasons = backends.unavailable_reasons(name, "cpu")
    return pytest.param(name, marks=pytest.mark.skip(reason="; ".join(reasons))) if reasons else name


def _small(dropout=0.0):
    torch.manual_seed(0)
    return mf.models.wide_resnet(1, 5, depth=10, widen=1, dropout=dropout).double()


def _meta_gradient(backend, batch, steps, first_order):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to vmap
        learner = mf.MAML(_small(), inner_lr=0.3, inner_steps=steps, first_order=first_order, backend=backend)
        out = learner(batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in learner.named_parameters()}, learner


def _block_parameters(in_channels, channels):
    """BN(in) affine, 3x3 in->out, BN(out) affine, 3x3 out->out, and a 1x1 in->out shortcut if the width changes."""
    shortcut = in_channels * channels if in_channels != channels else 0
    return 2 * in_channels + 9 * in_channels * channels + 2 * channels + 9 * channels * channels + shortcut


def test_wrn28_10_layout():
    net = mf.models.wrn28_10(3, 5)
    blocks = [m for m in net if isinstance(m, mf.models.WideBlock)]
    assert len(blocks) == 12  # (28 - 4) / 6 = 4 blocks in each of the three groups
    assert [b.conv1.out_channels for b in blocks] == [160] * 4 + [320] * 4 + [640] * 4
    assert [b.conv1.stride for b in blocks] == [(1, 1)] * 4 + ([(2, 2)] + [(1, 1)] * 3) * 2
    # a 1x1 shortcut exactly where the shape changes: the first block of each group
    assert [b.shortcut is not None for b in blocks] == [True, False, False, False] * 3
    assert all(b.shortcut.kernel_size == (1, 1) for b in blocks if b.shortcut is not None)
    assert all(not m.bias for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert all(not m.track_running_stats for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert net[0].out_channels == 16 and net[0].kernel_size == (3, 3)
    assert net[-1].in_features == 640 and net(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    widths = [16] + [160] * 4 + [320] * 4 + [640] * 4
    expected = (9 * 3 * 16 + sum(_block_parameters(a, b) for a, b in zip(widths[:-1], widths[1:]))
                + 2 * 640 + 640 * 5 + 5)
    assert expected == 36_475_989  # WRN-28-10's 36.5M
    assert sum(p.numel() for p in net.parameters()) == expected


def test_wide_resnet_depth_and_widen():
    net = mf.models.wide_resnet(3, 4, depth=16, widen=2, dropout=0.3)
    blocks = [m for m in net if isinstance(m, mf.models.WideBlock)]
    assert [b.conv2.out_channels for b in blocks] == [32, 32, 64, 64, 128, 128]
    assert [b.shortcut is not None for b in blocks] == [True, False] * 3
    assert all(isinstance(b.drop, torch.nn.Dropout) and b.drop.p == 0.3 for b in blocks)
    # WRN-10-1 keeps 16 channels in its first block: an identity shortcut there, a 1x1 conv in the others
    small = [m for m in mf.models.wide_resnet(depth=10, widen=1) if isinstance(m, mf.models.WideBlock)]
    assert [b.shortcut is not None for b in small] == [False, True, True]
    assert all(isinstance(b.drop, torch.nn.Identity) for b in small)


@pytest.mark.parametrize("argument,value", [("depth", 27), ("depth", 4), ("depth", 28.0), ("widen", 0),
                                            ("dropout", 1.0), ("dropout", -0.1), ("in_channels", 0),
                                            ("num_classes", 0)])
def test_bad_arguments_are_named(argument, value):
    with pytest.raises(ValueError, match=rf"\b{argument}\b"):
        mf.models.wide_resnet(**{argument: value})


@pytest.mark.parametrize("backend", ["vmap", "torch", _backend("fused")])
@pytest.mark.parametrize("steps,first_order", [(1, False), (2, False), (1, True), (2, True)])
def test_meta_gradient_matches_the_loop(backend, steps, first_order, make_batch, one_thread):
    batch = make_batch(3, 5, 1, 5, IMAGE)  # 3 tasks, 5-way 1-shot, 5 queries
    assert_matches_the_loop(_meta_gradient, backend, batch, steps, first_order)


def test_second_order_differs_from_first_order(make_batch, one_thread):
    batch = make_batch(2, 5, 1, 5, IMAGE)
    _, second, _ = _meta_gradient("torch", batch, 1, False)
    _, first, _ = _meta_gradient("torch", batch, 1, True)
    difference = max((second[n] - first[n]).abs().max() / second[n].abs().max() for n in second)
    assert difference > 1e-3


@pytest.mark.parametrize("backend", ["torch", _backend("fused")])
def test_op_count_does_not_grow_with_tasks(backend, make_batch, one_thread):
    def config(tasks):
        return SimpleNamespace(make_net=_small, make_batch=lambda: make_batch(tasks, 5, 1, 5, IMAGE), inner_lr=0.3,
                               inner_steps=1)
    assert count_step(backend, config(2)).counts == count_step(backend, config(5)).counts


def test_dropout_network_lowers_and_follows_the_mode(make_batch, one_thread):
    batch = make_batch(2, 5, 1, 5, IMAGE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learner = mf.MAML(_small(dropout=0.3), inner_lr=0.3, inner_steps=1, backend="torch")
        loss = learner(batch).loss
    assert learner.fallback_reason is None and torch.isfinite(loss)
    learner.eval()  # no dropout in eval mode: the program equals the loop
    baseline = mf.MAML(_small(dropout=0.3), inner_lr=0.3, inner_steps=1, backend="loop").eval()
    baseline.load_state_dict(learner.state_dict())
    torch.testing.assert_close(learner(batch).loss, baseline(batch).loss, rtol=1e-10, atol=0)


@pytest.mark.parametrize("preset", ["miniimagenet-5w1s-wrn28_10", "miniimagenet-5w5s-wrn28_10"])
def test_wrn28_10_presets_build_a_task_batched_learner(preset):
    config = get_preset(preset)
    assert config.network == "wrn28_10" and config.datasource == "miniimagenet"
    learner = build_learner(config.replace(backend="torch"))
    assert isinstance(learner.model[1], mf.models.WideBlock) and learner.model[-1].out_features == 5
    for backend in ("torch", "fused"):
        if not backends.unavailable_reasons(backend, "cpu"):
            assert backends.get_backend(backend).execution(learner.model).fallback_reason is None, backend
    with pytest.raises(ValueError, match="network"):
        config.replace(datasource="sinusoid", conv=False)
