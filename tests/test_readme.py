"""The README's "Coming from learn2learn or torch.func" examples run as written; the torch.func recipe and
maml_fast compute the same meta-gradient on the same meta-batch for a network without BatchNorm, and with
BatchNorm (training mode) the recipe's vmap-of-grad is off while maml_fast matches finite differences, as
the README says (learn2learn is not a dependency: its version is shown for comparison only)."""
from __future__ import annotations

import functools
import re
import types
from pathlib import Path

import torch
import torch.nn.functional as F

import maml_fast as mf

README = Path(__file__).resolve().parent.parent / "README.md"


def _examples() -> list[str]:
    section = README.read_text().split("### Coming from learn2learn or torch.func", 1)[1].split("\n### ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def _run(code: str, net, sampler) -> list[list[torch.Tensor]]:
    """Run an example for one iteration; returns the gradients each optimizer step saw."""
    seen = []

    class RecordingAdam(torch.optim.Adam):
        def step(self, *args, **kwargs):
            seen.append([p.grad.detach().clone() for group in self.param_groups for p in group["params"]])
            return super().step(*args, **kwargs)

    fake_torch = types.SimpleNamespace(optim=types.SimpleNamespace(Adam=RecordingAdam))
    exec(code, {"torch": fake_torch, "F": F, "mf": mf, "net": net, "sampler": sampler, "iterations": 1})
    return seen


@functools.cache
def _omniglot():
    return mf.data.Omniglot(split="train", rotations=True)


def _setup(norm="layer", dtype=torch.float32):
    torch.manual_seed(0)
    net = mf.models.conv4(1, 5, hidden=8, norm=norm).to(dtype)
    return net, mf.data.EpisodeSampler(_omniglot(), ways=5, shots=1, queries=1, meta_batch_size=4, seed=3, dtype=dtype)


def test_the_readme_shows_three_versions():
    learn2learn, functorch, maml_fast = _examples()
    assert "l2l.algorithms.MAML" in learn2learn and "vmap(query_loss)" in functorch and "mf.MetaStep" in maml_fast


def test_torch_func_and_maml_fast_versions_give_the_same_meta_gradient():
    _, functorch, maml_fast = _examples()
    (reference,) = _run(functorch, *_setup())
    (ours,) = _run(maml_fast, *_setup())
    assert len(reference) == len(ours)
    largest = max(g.abs().max() for g in reference)
    for expected, actual in zip(reference, ours):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * largest)


def test_torch_func_recipe_is_inexact_with_batch_norm_and_maml_fast_is_exact():
    """float64, BatchNorm with batch statistics: the recipe's vmap(grad(...)) meta-gradient differs from the
    finite-difference derivative of the very loss it computes (about 1% here, on torch 2.14), maml_fast's
    does not. If this starts failing because torch.func got exact, update the README's statement."""
    _, functorch, maml_fast = _examples()
    (reference,) = _run(functorch, *_setup("batch", torch.float64))
    net, sampler = _setup("batch", torch.float64)
    (ours,) = _run(maml_fast, net, sampler)
    # the meta-loss of the first meta-batch as a function of one weight of the first conv
    batch = _setup("batch", torch.float64)[1].sample()
    torch.manual_seed(0)
    probe = mf.models.conv4(1, 5, hidden=8, norm="batch").double()
    learner = mf.MAML(probe, inner_lr=0.4, inner_steps=1, inner_loss="mean", backend="loop")
    weight, index, eps = probe[0].weight, (3, 0, 1, 1), 1e-6
    with torch.no_grad():
        weight[index] += eps
        up = learner(batch).loss.item()
        weight[index] -= 2 * eps
        down = learner(batch).loss.item()
    finite_difference = (up - down) / (2 * eps)
    assert abs(ours[0][index].item() - finite_difference) < 1e-7 * max(1.0, abs(finite_difference))
    assert abs(reference[0][index].item() - finite_difference) > 1e-4 * abs(finite_difference)
    relative = max(((r - o).abs().max() / o.abs().max()).item() for r, o in zip(reference, ours)
                   if o.abs().max() > 1e-6)
    assert relative > 1e-3
