"""MAML++ per-step BatchNorm running statistics (`per_step_bn_statistics=True`): what every backend
records in training and how it normalises with them in evaluation, against their definition computed
independently by `reference_maml.per_step_statistics` and `reference_maml.meta_objective` (the
statistics are recorded by one code path shared by every backend, so comparing backends with each other
would not test it)."""
import pytest
import torch

import maml_fast as mf
import reference_maml as ref
from conftest import cpu_backend_param

BACKENDS = [cpu_backend_param(name) for name in ("loop", "vmap", "torch", "fused")]
NETWORKS = {"stride": (dict(downsample="stride"), 8), "maxpool": (dict(downsample="maxpool", image_size=16), 16)}


def _trained_learner(backend, batches, steps=2, network="stride"):
    torch.manual_seed(7)
    options, _ = NETWORKS[network]
    net = mf.models.conv4(1, 2, hidden=3, **options).double()
    learner = mf.MAML(net, inner_lr=0.3, inner_steps=steps, backend=backend, per_step_bn_statistics=True)
    for batch in batches:
        learner(batch).loss.backward()
    return learner


def assert_statistics_match_their_definition(backend, network, make_batch):
    """Two training meta-steps record each BN layer's per-step statistics as `ref.per_step_statistics`
    says; in eval mode the meta-loss is the reference's with those statistics in place of the batch's."""
    size = NETWORKS[network][1]
    batches = [make_batch(tasks=3, ways=2, shots=2, example_shape=(1, size, size)) for _ in range(3)]
    learner = _trained_learner(backend, batches[:2], network=network)
    net = learner.model
    theta = {n: p.detach() for n, p in net.named_parameters()}
    cfg = ref.Config(steps=2, inner_lr=0.3, second_order=False)
    expected = ref.per_step_statistics(net, {n: t.clone().requires_grad_() for n, t in theta.items()}, cfg, batches[:2])
    layers = [prefix for prefix, _ in ref.layer_plan(net) if prefix in expected[0]]
    assert len(layers) == 4
    for i, prefix in enumerate(layers):
        for k in range(3):
            mean, var = expected[k][prefix]
            torch.testing.assert_close(getattr(learner, f"bn_step_mean_{i}")[k], mean, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(getattr(learner, f"bn_step_var_{i}")[k], var, rtol=1e-10, atol=1e-12)
    assert all(not torch.allclose(expected[0][p][1], expected[2][p][1]) for p in layers[1:]), "steps alike"

    learner.eval()
    loss = learner(batches[2]).loss
    running = [{p: stats for p, stats in step.items()} for step in expected]
    eval_cfg = ref.Config(steps=2, inner_lr=0.3, second_order=False, running=running)
    theta = {n: t.clone().requires_grad_() for n, t in theta.items()}
    expected_loss, _, _ = ref.meta_objective(net, theta, eval_cfg, batches[2])
    torch.testing.assert_close(loss.detach(), expected_loss.detach(), rtol=1e-10, atol=0)
    batch_statistics_loss, _, _ = ref.meta_objective(net, theta, cfg, batches[2])
    assert not torch.allclose(loss.detach(), batch_statistics_loss.detach()), "eval used the batch statistics"


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_records_and_uses_the_statistics_of_the_definition(backend, make_batch):
    assert_statistics_match_their_definition(backend, "stride", make_batch)


def test_eval_normalises_with_the_running_statistics(make_batch):
    """In eval mode the statistics replace the batch statistics: the output changes when they change."""
    batches = [make_batch(tasks=2, ways=2, shots=2, example_shape=(1, 8, 8)) for _ in range(2)]
    learner = _trained_learner("torch", batches[:1])
    learner.eval()
    before = learner(batches[1]).loss
    with torch.no_grad():
        learner.bn_step_var_0.mul_(4.0)
    assert not torch.allclose(learner(batches[1]).loss, before)


def test_requires_a_batch_norm_layer():
    with pytest.raises(ValueError, match="per_step_bn_statistics"):
        mf.MAML(mf.models.conv4(1, 2, hidden=3, norm="layer"), per_step_bn_statistics=True)
