"""MAML++ per-step BatchNorm running statistics (`per_step_bn_statistics=True`)."""
import pytest
import torch
import torch.nn.functional as F

import maml_fast as mf

BACKENDS = ("loop", "vmap", "torch", "cuda")


def _trained_learner(backend, batches, steps=2):
    torch.manual_seed(7)
    net = mf.models.conv4(1, 2, hidden=3).double()
    learner = mf.MAML(net, inner_lr=0.3, inner_steps=steps, backend=backend, per_step_bn_statistics=True)
    for batch in batches:
        learner(batch).loss.backward()
    return learner


def test_statistics_after_one_step_equal_their_definition(make_batch):
    """After one training meta-step from (mean 0, var 1), the step-0 statistics of the first BN layer
    are momentum x the task-average of the batch mean/variance of conv1(support_x) at θ."""
    batch = make_batch(tasks=3, ways=2, shots=2, example_shape=(1, 8, 8))
    learner = _trained_learner("torch", [batch])
    conv = learner.model[0]
    with torch.no_grad():
        pre_bn = torch.stack([F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding) for x in batch.support_x])
    means = pre_bn.mean(dim=(1, 3, 4)).mean(0)
    variances = pre_bn.var(dim=(1, 3, 4), correction=1).mean(0)
    torch.testing.assert_close(learner.bn_step_mean_0[0], 0.1 * means, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(learner.bn_step_var_0[0], 0.9 + 0.1 * variances, rtol=1e-12, atol=1e-12)


def test_every_backend_records_and_uses_the_same_statistics(make_batch):
    batches = [make_batch(tasks=3, ways=2, shots=2, example_shape=(1, 8, 8)) for _ in range(3)]
    learners = {b: _trained_learner(b, batches[:2]) for b in BACKENDS}
    reference = learners["loop"]
    for backend, learner in learners.items():
        for name, buffer in reference.named_buffers():
            torch.testing.assert_close(dict(learner.named_buffers())[name], buffer, rtol=1e-12, atol=1e-14)
    losses = {}
    for backend, learner in learners.items():
        learner.eval()
        losses[backend] = learner(batches[2]).loss
    for backend in BACKENDS:
        torch.testing.assert_close(losses[backend], losses["loop"], rtol=1e-10, atol=0)


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
