"""Issue 15, item 3 on CUDA (the GPU check's tests stage): real CUDA graphs give the eager numbers.

* `mf.Trainer(cuda_graph="on")` and an eager trainer of the same seed log the same meta-loss at every
  iteration (float64 to 1e-12; meta_lr = 2**-10 is exact in the graphed step's float32 lr), the graphed
  one drawing each meta-batch after its first into the graph's static inputs;
* `evaluate(..., graphs=GraphedEvaluation(...))` gives the eager evaluation's result, number for number.

The same comparisons run on the CPU through the graph emulator in tests/test_trainer.py; here the
capture is CUDA's own (`CudaGraphBackend`)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from maml_fast.data import EpisodeSampler
from maml_fast.evaluation import GraphedEvaluation, evaluate, read_jsonl
from test_trainer import episode_setup, tiny_images

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def cuda_setup(seed=0):
    learner, _ = episode_setup(seed)
    source = EpisodeSampler(tiny_images(), ways=3, shots=1, queries=2, meta_batch_size=3, seed=seed,
                            dtype=torch.float64, device="cuda")
    return learner.cuda(), source


def cuda_trainer(logdir, cuda_graph, **options):
    from maml_fast.trainer import Trainer
    learner, source = cuda_setup()
    return Trainer(learner, source, iterations=8, logdir=logdir, log_every=1, checkpoint_every=100,
                   progress=False, meta_lr=2.0 ** -10, cuda_graph=cuda_graph, **options)


def test_graphed_trainer_on_cuda_repeats_the_eager_losses(tmp_path):
    eager = cuda_trainer(tmp_path / "eager", "off")
    eager.train()
    graphed = cuda_trainer(tmp_path / "graphed", "on")
    graphed.train()
    assert graphed.graphed_step is not None and graphed.graphed_step.stats.captures == 1
    logs = [[r for r in read_jsonl(tmp_path / name / "metrics.jsonl") if r["kind"] == "train"]
            for name in ("eager", "graphed")]
    assert [r["iteration"] for r in logs[0]] == [r["iteration"] for r in logs[1]] == list(range(1, 9))
    for a, b in zip(*logs):
        assert b["meta_loss"] == pytest.approx(a["meta_loss"], rel=1e-12, abs=1e-12), a["iteration"]
    for a, b in zip(eager.learner.parameters(), graphed.learner.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_graphed_evaluation_on_cuda_equals_the_eager_one():
    learner, _ = cuda_setup()
    held_out = EpisodeSampler(tiny_images(seed=5), ways=3, shots=1, queries=2, meta_batch_size=4, seed=1,
                              dtype=torch.float64, device="cuda")
    eager = evaluate(learner, held_out, num_episodes=18, steps=2, seed=3)
    graphs = GraphedEvaluation(learner)
    for _ in range(2):
        graphed = evaluate(learner, held_out, num_episodes=18, steps=2, seed=3, graphs=graphs)
        for key in ("accuracy_mean", "loss_mean"):
            np.testing.assert_allclose(getattr(graphed, key), getattr(eager, key), rtol=1e-12, atol=1e-12)
    assert graphs.stats.captures >= 1 and graphs.stats.replays >= 1
