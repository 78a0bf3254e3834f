"""A conv bias directly followed by a BatchNorm with batch statistics is cancelled by it: the lowered
programs leave it out and give it an exactly zero gradient (`program._BiasCancelledByBatchNorm`)."""
import pytest
import torch

import maml_fast as mf
from maml_fast import backends

CONV_BIASES = ("model.0.bias", "model.3.bias", "model.6.bias", "model.9.bias")


def _backend_param(name):
    reasons = backends.unavailable_reasons(name, torch.device("cpu"))
    return pytest.param(name, marks=pytest.mark.skipif(bool(reasons), reason="; ".join(reasons)))


def _meta_gradient(backend, net, batch):
    learner = mf.MAML(net, inner_lr=0.3, inner_steps=2, backend=backend, step_metrics=False)
    loss = learner(batch).loss
    names = [name for name, _ in learner.named_parameters()]
    return loss, dict(zip(names, torch.autograd.grad(loss, list(learner.parameters()))))


@pytest.mark.parametrize("backend", ["torch", _backend_param("fused")])
def test_cancelled_bias_gets_exactly_zero_gradient(backend, make_batch):
    torch.manual_seed(3)
    net = mf.models.conv4(1, 3, hidden=5).double()
    with torch.no_grad():   # large biases: cancelled or not is then visible in every output
        for name, param in net.named_parameters():
            if name.endswith("bias") and f"model.{name}" in CONV_BIASES:
                param.uniform_(-3, 3)
    batch = make_batch(tasks=3, ways=3, shots=2, queries=3, example_shape=(1, 12, 12))
    loop_loss, loop_grads = _meta_gradient("loop", net, batch)
    loss, grads = _meta_gradient(backend, net, batch)
    torch.testing.assert_close(loss, loop_loss, rtol=1e-12, atol=0)
    for name, grad in grads.items():
        if name in CONV_BIASES:
            assert torch.equal(grad, torch.zeros_like(grad)), name
            assert loop_grads[name].abs().max() < 1e-10        # the loop computes rounding noise
        else:
            torch.testing.assert_close(grad, loop_grads[name], rtol=1e-9, atol=1e-12)


def test_bias_without_a_following_batch_norm_is_kept(make_batch):
    torch.manual_seed(3)
    net = mf.models.conv4(1, 3, hidden=5, norm="none").double()
    batch = make_batch(tasks=2, ways=3, shots=1, queries=2, example_shape=(1, 12, 12))
    loop_loss, loop_grads = _meta_gradient("loop", net, batch)
    loss, grads = _meta_gradient("torch", net, batch)
    torch.testing.assert_close(loss, loop_loss, rtol=1e-12, atol=0)
    for name in ("model.0.bias", "model.3.bias"):
        assert grads[name].abs().max() > 1e-6
        torch.testing.assert_close(grads[name], loop_grads[name], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", _backend_param("fused")])
def test_cancelled_bias_does_not_adapt(backend, make_batch):
    """With no inner gradient the cancelled biases stay θ through every inner step (no update work);
    the other weights move."""
    torch.manual_seed(4)
    net = mf.models.conv4(1, 3, hidden=5).double()
    learner = mf.MAML(net, inner_lr=0.3, inner_steps=3, backend=backend)
    batch = make_batch(tasks=2, ways=3, shots=2, queries=3, example_shape=(1, 12, 12))
    fast = learner.adapt(batch.support_x, batch.support_y)
    theta = dict(learner.named_parameters())
    for name, weights in fast.params.items():
        initial = theta["model." + name].expand_as(weights)
        if "model." + name in CONV_BIASES:
            assert torch.equal(weights, initial), name
        elif name.endswith("weight"):
            assert not torch.equal(weights, initial), name
