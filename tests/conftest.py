"""Shared fixtures: deterministic seeding and small random TaskBatch builders."""
from __future__ import annotations

import pytest
import torch

import maml_fast as mf


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state (and leaves the default dtype alone)."""
    torch.manual_seed(1234)
    yield


def random_task_batch(tasks=2, ways=2, shots=1, queries=2, example_shape=(1, 8, 8), *,
                      regression=False, dtype=torch.float64, generator=None):
    """A random TaskBatch. Classification: every class appears ``shots`` times in each support set
    (shuffled per task); query labels are random in [0, ways). Regression: ``ways`` is ignored,
    ``shots`` support and ``queries`` query examples with targets ``[T, n, 1]``."""
    g = generator
    if regression:
        sx = torch.randn(tasks, shots, *example_shape, dtype=dtype, generator=g)
        qx = torch.randn(tasks, queries, *example_shape, dtype=dtype, generator=g)
        sy = torch.randn(tasks, shots, 1, dtype=dtype, generator=g)
        qy = torch.randn(tasks, queries, 1, dtype=dtype, generator=g)
        return mf.TaskBatch(sx, sy, qx, qy)
    support = ways * shots
    sx = torch.randn(tasks, support, *example_shape, dtype=dtype, generator=g)
    base = torch.arange(ways).repeat_interleave(shots)
    sy = torch.stack([base[torch.randperm(support, generator=g)] for _ in range(tasks)])
    qx = torch.randn(tasks, queries, *example_shape, dtype=dtype, generator=g)
    qy = torch.randint(0, ways, (tasks, queries), generator=g)
    return mf.TaskBatch(sx, sy, qx, qy)


@pytest.fixture
def make_batch():
    """``make_batch(tasks=, ways=, shots=, queries=, example_shape=, regression=, dtype=)``."""
    return random_task_batch
