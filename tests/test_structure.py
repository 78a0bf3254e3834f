"""Structure: the "torch" backend dispatches the same aten ops for any number of tasks (no per-task
loop), the "loop" backend does not (the counter can tell), and unsupported layers fall back to
torch.func.vmap with one warning naming the layer and the same numbers as "loop"."""
from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import maml_fast as mf
import reference_maml as ref


class AtenCounter(TorchDispatchMode):
    """Counts every aten op dispatched (forward and autograd backward)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def count_meta_step(backend, tasks, make_batch, norm="layer", **options):
    torch.manual_seed(0)
    net = mf.models.conv4(1, 2, hidden=3, downsample="stride", norm=norm)
    learner = mf.MAML(net, inner_lr=0.4, inner_steps=2, backend=backend, **options)
    batch = make_batch(tasks, 2, 1, 2, (1, 8, 8), dtype=torch.float32)
    learner(batch).loss.backward()  # warm-up (lowering, caches) outside the counter
    learner.zero_grad(set_to_none=True)
    with AtenCounter() as counter:
        learner(batch).loss.backward()
    assert all(p.grad is not None for p in net.parameters())
    return counter


@pytest.mark.parametrize("options", [{}, {"norm": "batch"}, {"inner_lr_mode": "per_layer_per_step"},
                                     {"first_order": True}])
def test_torch_backend_op_count_does_not_grow_with_tasks(options, make_batch):
    small, large = count_meta_step("torch", 2, make_batch, **options), count_meta_step("torch", 16, make_batch, **options)
    # the counter sees the backward too: the conv primitives' grouped convolutions of the inner and outer backward
    assert any("convolution" in name for name in small.counts)
    assert small.total > 50
    assert small.counts == large.counts, {k: (small.counts[k], large.counts[k])
                                          for k in set(small.counts) | set(large.counts)
                                          if small.counts[k] != large.counts[k]}


def test_loop_backend_op_count_grows_with_tasks(make_batch):
    """The same counter on the per-task baseline: it must grow (about linearly) with T."""
    small, large = count_meta_step("loop", 2, make_batch), count_meta_step("loop", 6, make_batch)
    assert large.total > 2.5 * small.total


# --------------------------------------------------------------------------- fallback to vmap
class ChannelScale(nn.Module):
    """A custom layer with a parameter (no task-batched lowering): y = x * scale[c] + shift[c]."""

    def __init__(self, channels):
        super().__init__()
        self.scale = nn.Parameter(1 + 0.3 * torch.randn(channels))
        self.shift = nn.Parameter(0.1 * torch.randn(channels))

    def forward(self, x):
        return x * self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)

    @staticmethod
    def reference_forward(prefix, params, x):
        return x * params[prefix + "scale"].view(1, -1, 1, 1) + params[prefix + "shift"].view(1, -1, 1, 1)


def _net_with(layer):
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Sequential(layer, nn.ReLU()),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)).double()


def _meta_step(learner, batch):
    learner.zero_grad(set_to_none=True)
    out = learner(batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in learner.named_parameters()}


def _assert_close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layer,layer_name,type_name,train", [
    (lambda: ChannelScale(3), "2.0", "ChannelScale", True),
    (lambda: nn.Softmax(dim=1), "2.0", "Softmax", True),  # mixes channels: not per task in the grouped layout
], ids=["custom_layer", "channel_softmax"])
def test_unsupported_layer_falls_back_to_vmap_with_one_warning(layer, layer_name, type_name, train, make_batch):
    torch.manual_seed(0)
    net = _net_with(layer())
    baseline_net = _net_with(layer())
    baseline_net.load_state_dict(net.state_dict())
    batch = make_batch(3, 2, 2, 3, (1, 6, 6))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        learner = mf.MAML(net, inner_lr=0.4, inner_steps=2, backend="torch").train(train)
        loss, grads = _meta_step(learner, batch)
        _meta_step(learner, batch)                              # a second step does not warn again
        fast = learner.adapt(batch.support_x, batch.support_y, steps=2)
        logits = learner.predict(fast, batch.query_x)
    messages = [str(w.message) for w in caught if "maml_fast" in str(w.message)]
    assert len(messages) == 1, messages
    assert repr(layer_name) in messages[0] and type_name in messages[0] and "vmap" in messages[0]
    assert learner.fallback_reason is not None
    assert repr(layer_name) in learner.fallback_reason and type_name in learner.fallback_reason

    baseline = mf.MAML(baseline_net, inner_lr=0.4, inner_steps=2, backend="loop").train(train)
    assert baseline.fallback_reason is None
    base_loss, base_grads = _meta_step(baseline, batch)
    _assert_close(loss, base_loss)
    for name in grads:
        _assert_close(grads[name], base_grads[name])
    base_fast = baseline.adapt(batch.support_x, batch.support_y, steps=2)
    _assert_close(logits, baseline.predict(base_fast, batch.query_x))

    if isinstance(net[2][0], ChannelScale):  # and the independent reference agrees
        theta = {n: p.detach().clone().requires_grad_() for n, p in net.named_parameters()}
        expected, _, _ = ref.meta_objective(net, theta, ref.Config(steps=2, inner_lr=0.4), batch)
        _assert_close(loss, expected.detach())


def test_supported_network_does_not_fall_back(make_batch):
    net = mf.models.conv4(1, 2, hidden=3, downsample="stride", norm="layer").double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learner = mf.MAML(net, inner_lr=0.4, inner_steps=1, backend="torch")
        learner(make_batch(2, 2, 1, 2, (1, 8, 8))).loss.backward()
    assert learner.fallback_reason is None


class _Residual(nn.Module):
    """A custom root module with a residual add, functional ops and a view: lowers through torch.fx."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.body(x)) + x
        return self.head(h.view(h.size(0), -1) * 0.5)


class _Branching(_Residual):
    """A forward with a Python branch on the input's shape: torch.fx cannot trace it (vmap can)."""

    def forward(self, x):
        h = self.body(x)
        return self.head(torch.relu(h)) if x.shape[-1] > 2 else self.head(h)


@pytest.mark.parametrize("module,fallback", [(_Residual, None), (_Branching, "_Branching cannot be traced by torch.fx")],
                         ids=["residual_lowers", "branch_falls_back"])
def test_custom_module_lowers_or_falls_back_naming_it(module, fallback, make_batch):
    """A custom root module that torch.fx can trace lowers (no warning); one it cannot runs through vmap
    with one warning naming it. Either way the numbers are the loop's."""
    net = module().double()
    batch = make_batch(2, 2, 2, 2, (4,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        learner = mf.MAML(net, inner_lr=0.4, inner_steps=1, backend="torch")
        loss, grads = _meta_step(learner, batch)
    messages = [str(w.message) for w in caught if "maml_fast" in str(w.message)]
    if fallback is None:
        assert not messages and learner.fallback_reason is None
    else:
        assert len(messages) == 1 and fallback in messages[0] and fallback in learner.fallback_reason
    baseline = mf.MAML(net, inner_lr=0.4, inner_steps=1, backend="loop")
    base_loss, base_grads = _meta_step(baseline, batch)
    _assert_close(loss, base_loss)
    for name in grads:
        _assert_close(grads[name], base_grads[name])


@pytest.mark.parametrize("backend", ["torch", "vmap"])
def test_dropout_draws_a_mask_per_task(backend, make_batch):
    """nn.Dropout runs in the task-batched program (and under vmap with ``randomness="different"``): in
    training every task draws its own mask, so tasks that are identical copies get different losses; in eval
    mode it is the identity, every copy gives the same loss and the program equals the loop."""
    torch.manual_seed(0)
    net = _net_with(nn.Dropout(0.5))
    one = make_batch(1, 2, 2, 2, (1, 6, 6))
    copies = mf.TaskBatch(*(t.expand(4, *t.shape[1:]).contiguous() for t in
                            (one.support_x, one.support_y, one.query_x, one.query_y)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learner = mf.MAML(net, inner_lr=0.4, inner_steps=1, backend=backend)
        out = learner(copies)
    out.loss.backward()
    assert learner.fallback_reason is None
    per_task = out.query_loss_per_task
    assert torch.isfinite(per_task).all() and len(set(per_task.tolist())) == 4, per_task
    learner.eval()
    evaluated = learner(copies).query_loss_per_task
    torch.testing.assert_close(evaluated, evaluated[:1].expand(4), rtol=1e-12, atol=0)
    baseline = mf.MAML(net, inner_lr=0.4, inner_steps=1, backend="loop").eval()
    _assert_close(evaluated, baseline(copies).query_loss_per_task)
