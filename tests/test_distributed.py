"""Data-parallel meta-training: 2 gloo ranks on the CPU give the meta-gradient and the parameters of
one process on the whole meta-batch (float64, tight tolerance)."""
from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import maml_fast as mf
from maml_fast.data import EpisodeSampler
from maml_fast.distributed import DistributedContext, task_range
from maml_fast.trainer import Trainer

TASKS = 5  # odd: the ranks hold 3 and 2 tasks, so the T_r / T weighting matters
STEPS = 3


def setup(seed=0, inner_steps=2, tasks=TASKS):
    torch.manual_seed(seed)
    learner = mf.MAML(mf.models.conv4(1, 3, hidden=4).double(), inner_lr=0.1, inner_steps=inner_steps)
    g = torch.Generator().manual_seed(7)
    data = SimpleNamespace(images=torch.randint(0, 256, (10, 6, 1, 8, 8), generator=g, dtype=torch.uint8),
                           num_classes=10)
    source = EpisodeSampler(data, ways=3, shots=1, queries=2, meta_batch_size=tasks, seed=seed, dtype=torch.float64)
    return learner, source


def run(distributed=None):
    """The meta-gradient of one meta-batch, then the parameters after STEPS training iterations."""
    learner, source = setup()
    trainer = Trainer(learner, source, iterations=STEPS, progress=False, clip_norm=0.5, cosine=True,
                      distributed=distributed)
    grads = trainer.meta_gradient(source.sample())
    trainer.train()
    return grads, {n: p.detach().clone() for n, p in learner.named_parameters()}


def _worker(rank, world_size, port, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        grads, params = run(DistributedContext.from_process_group("cpu"))
        torch.save({"grads": grads, "params": params}, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_ranks_equal_one_process(tmp_path):
    torch.set_num_threads(1)
    expected_grads, expected_params = run()
    out = tmp_path / "rank"
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        assert got["grads"].keys() == expected_grads.keys()
        for name, grad in expected_grads.items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-10, atol=1e-13, msg=f"grad {name}")
        for name, param in expected_params.items():
            torch.testing.assert_close(got["params"][name], param, rtol=1e-10, atol=1e-13, msg=f"param {name}")
    a, b = (torch.load(f"{out}.{r}", weights_only=True)["params"] for r in range(2))
    assert all(torch.equal(a[n], b[n]) for n in a)  # the ranks stay identical


def test_task_range_partitions_the_meta_batch():
    for tasks in (2, 5, 8, 33):
        for world in (1, 2, 3):
            if tasks < world:
                continue
            ranges = [task_range(tasks, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == tasks
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [stop - start for start, stop in ranges]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    with pytest.raises(ValueError, match="every rank needs at least one task"):
        task_range(1, 0, 2)
    with pytest.raises(ValueError, match="rank"):
        task_range(4, 2, 2)


def test_single_process_context_from_environment(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = DistributedContext.from_environment(device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.active, ctx.is_main) == (0, 1, False, True)
    tensors = [torch.ones(2)]
    ctx.all_reduce_sum_(tensors)  # a no-op
    assert torch.equal(tensors[0], torch.ones(2))
