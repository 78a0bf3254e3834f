"""ResNet-12 (MetaOptNet / learn2learn layout) lowered through torch.fx: the task-batched backends give the
loop backend's meta-loss and meta-gradient in float64 (first and second order, 1 and 3 inner steps), the
op count does not grow with the number of tasks, and DropBlock rescales every task by its own count."""
from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import maml_fast as mf
from maml_fast import backends
from maml_fast.presets import build_learner, get_preset

SMALL = (3, 4, 5, 6)   # block widths of the small ResNet-12 the exactness tests use (16x16 images)


def _backend(name):
    reasons = backends.unavailable_reasons(name, "cpu")
    return pytest.param(name, marks=pytest.mark.skip(reason="; ".join(reasons))) if reasons else name


def _meta_gradient(backend, batch, steps, first_order, drop_prob=0.0, checkpoint=False):
    torch.manual_seed(0)
    net = mf.models.resnet12(1, 2, SMALL, drop_prob=drop_prob, block_size=2).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to vmap
        learner = mf.MAML(net, inner_lr=0.3, inner_steps=steps, first_order=first_order, backend=backend,
                          checkpoint_inner_steps=checkpoint)
        out = learner(batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in learner.named_parameters()}, learner


def test_layout_matches_metaoptnet():
    net = mf.models.resnet12(3, 5)
    blocks = [m for m in net if isinstance(m, mf.models.ResidualBlock)]
    assert [b.conv1.out_channels for b in blocks] == [64, 160, 320, 640]
    assert all(b.conv1.kernel_size == (3, 3) and b.shortcut[0].kernel_size == (1, 1) for b in blocks)
    assert all(not conv.bias for b in blocks for conv in (b.conv1, b.conv2, b.conv3, b.shortcut[0]))
    assert net[-1].in_features == 640 and net(torch.randn(2, 3, 84, 84)).shape == (2, 5)
    # 3x3 convs 3->64->64->64, ..., 1x1 shortcuts, BN affine, head: the 12.4M parameters of ResNet-12.
    assert 12.3e6 < sum(p.numel() for p in net.parameters()) < 12.5e6


def assert_matches_the_loop(meta_gradient, backend, batch, *args):
    """``meta_gradient(backend, batch, *args)`` -> (loss, {name: grad}, learner) runs task-batched (no vmap
    fallback) and equals the loop backend's in float64, to 1e-9."""
    loss, grads, learner = meta_gradient(backend, batch, *args)
    assert learner.fallback_reason is None
    base_loss, base_grads, _ = meta_gradient("loop", batch, *args)
    torch.testing.assert_close(loss, base_loss, rtol=1e-9, atol=0)
    for name, grad in base_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("backend", ["vmap", "torch", _backend("fused")])
@pytest.mark.parametrize("steps,first_order", [(1, False), (3, False), (1, True), (3, True)])
def test_meta_gradient_matches_the_loop(backend, steps, first_order, make_batch):
    assert_matches_the_loop(_meta_gradient, backend, make_batch(3, 2, 1, 2, (1, 16, 16)), steps, first_order)


@pytest.mark.parametrize("backend", ["torch", _backend("fused")])
@pytest.mark.parametrize("shared", [False, True], ids=["grouped theta", "shared theta"])
def test_per_task_convolutions_give_the_loop_meta_gradient(backend, shared, make_batch, monkeypatch):
    """Every conv on the CPU's per-task formulation (the one its wide layers take; on 16x16 images the last
    two blocks' maps are small enough for the batched-matmul weight gradient), with θ's convolutions at the
    first step grouped or shared: the same second-order meta-gradient as the loop."""
    from maml_fast.ops import conv2d as conv_ops
    monkeypatch.setattr(conv_ops.TorchConvPrimitives, "per_task_min_channels", 1)
    if shared:
        monkeypatch.setattr(conv_ops.TorchConvPrimitives, "shared_min_channels", 1)
    gemm_calls = []
    gemm = conv_ops._batched_gemm_weight_grad
    monkeypatch.setattr(conv_ops, "_batched_gemm_weight_grad", lambda *a: gemm_calls.append(1) or gemm(*a))
    assert_matches_the_loop(_meta_gradient, backend, make_batch(3, 2, 1, 2, (1, 16, 16)), 2, False)
    assert gemm_calls


@pytest.mark.parametrize("backend", ["torch", _backend("fused")])
@pytest.mark.parametrize("steps,first_order,checkpoint", [(1, False, False), (3, False, False), (2, True, False),
                                                          (3, False, True)])
def test_factored_conv_updates_give_the_loop_meta_gradient(backend, steps, first_order, checkpoint, make_batch,
                                                           monkeypatch):
    """The last block's convs (2x2 maps on 16x16 images: rank 8 per step) keep their updates factored
    (`maml_fast.ops.low_rank_conv`, which the full-size network's 4x4 blocks do on the CPU), the other
    blocks' do not: the same meta-gradient as the loop, first and second order, 1 to 3 steps, with
    checkpointed steps too."""
    from maml_fast.ops import conv2d as conv_ops
    monkeypatch.setattr(conv_ops.TorchConvPrimitives, "per_task_min_channels", 1)
    monkeypatch.setattr(conv_ops.TorchConvPrimitives, "low_rank_max_fraction", 4.0)
    decisions = []
    decide = conv_ops.TorchConvPrimitives.factors_updates

    def recorded(self, x, geo, *args):
        decisions.append((geo.input_hw, decide(self, x, geo, *args)))
        return decisions[-1][1]
    monkeypatch.setattr(conv_ops.TorchConvPrimitives, "factors_updates", recorded)
    def meta_gradient(name, *args):  # (the loop's steps are not checkpointed: an independent reference)
        return _meta_gradient(name, *args, checkpoint=checkpoint and name != "loop")
    assert_matches_the_loop(meta_gradient, backend, make_batch(3, 2, 1, 2, (1, 16, 16)), steps, first_order)
    assert {hw for hw, factored in decisions if factored} == {(2, 2)}
    assert {hw for hw, factored in decisions if not factored} >= {(16, 16), (8, 8), (4, 4)}


def test_second_order_differs_from_first_order(make_batch):
    batch = make_batch(2, 2, 1, 2, (1, 16, 16))
    _, second, _ = _meta_gradient("torch", batch, 1, False)
    _, first, _ = _meta_gradient("torch", batch, 1, True)
    difference = max((second[n] - first[n]).abs().max() / second[n].abs().max() for n in second)
    assert difference > 1e-3


class _KernelOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def test_op_count_does_not_grow_with_tasks(make_batch):
    totals = []
    for tasks in (2, 5):
        torch.manual_seed(0)
        learner = mf.MAML(mf.models.resnet12(1, 2, SMALL).double(), inner_lr=0.3, inner_steps=1, backend="torch")
        batch = make_batch(tasks, 2, 1, 2, (1, 16, 16))
        learner(batch).loss.backward()
        learner.zero_grad(set_to_none=True)
        with _KernelOps() as counter:
            learner(batch).loss.backward()
        totals.append(counter.counts)
    assert totals[0] == totals[1]


def test_dropblock_rescales_each_task_by_its_own_count():
    block = mf.models.DropBlock(0.3, block_size=2).train()
    x = torch.ones(4, 3 * 5, 8, 8, dtype=torch.float64)
    y = block(x, tasks=3)
    per_task = y.reshape(4, 3, 5, 8, 8).mean(dim=(0, 2, 3, 4))
    torch.testing.assert_close(per_task, torch.ones(3, dtype=torch.float64), rtol=1e-12, atol=0)
    dropped = (y == 0).double().mean().item()
    assert 0.1 < dropped < 0.5
    # The count over all tasks at once would not keep every task's mean (the check above can fail).
    assert not torch.allclose(block(x, tasks=1).reshape(4, 3, 5, 8, 8).mean(dim=(0, 2, 3, 4)), per_task)
    assert torch.equal(block.eval()(x, tasks=3), x)


def test_dropblock_network_lowers_and_runs(make_batch):
    batch = make_batch(3, 2, 1, 2, (1, 16, 16))
    loss, grads, learner = _meta_gradient("torch", batch, 1, False, drop_prob=0.2)
    assert learner.fallback_reason is None and torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in grads.values())
    learner.eval()  # no dropping in eval mode: the program equals the loop
    torch.manual_seed(0)
    baseline = mf.MAML(mf.models.resnet12(1, 2, SMALL, drop_prob=0.2, block_size=2).double(), inner_lr=0.3,
                       inner_steps=1, backend="loop").eval()
    baseline.load_state_dict(learner.state_dict())
    torch.testing.assert_close(learner(batch).loss, baseline(batch).loss, rtol=1e-10, atol=0)


@pytest.mark.parametrize("preset", ["miniimagenet-5w1s-resnet12", "miniimagenet-5w5s-resnet12"])
def test_resnet12_presets_build_a_task_batched_learner(preset):
    config = get_preset(preset)
    learner = build_learner(config.replace(backend="torch"))
    assert isinstance(learner.model[0], mf.models.ResidualBlock) and learner.model[-1].out_features == 5
    assert backends.get_backend("torch").execution(learner.model).fallback_reason is None
    with pytest.raises(ValueError, match="network"):
        config.replace(network="resnet50")
