"""Issue 15, item 1 on the CPU: the real learner (`mf.MAML`, task-batched conv4, second order) is
capture-safe on every task-batched backend the CPU runs, for K = 1 and 5, plain and with the MAML++
options or checkpointed inner steps:

(a) `HostSyncDetector(device_type="cpu")` (which also flags tensors made from host data) sees no host
    read in a whole `GraphedMetaStep` step once the first warm-up (the one that checks the labels) is done;
(b) `GraphedMetaStep` on `EmulatedGraphBackend` (recorded aten ops replayed without Python) gives the
    same outputs, parameters and optimizer state as the eager step of a twin learner over 8 iterations
    (float64 to 1e-12, float32 to 1e-6).

Backends: "torch", "fused" and "vmap" ("loop" is not task-batched). "triton" is left out: under
TRITON_INTERPRET its conv kernels' statistics (kernels/conv2d.py, ``_combine_tile_statistics``:
``counts[-1] = rows - ...``) make a tensor from host data, which the detector flags, and one interpreted
second-order step takes seconds."""
from __future__ import annotations

import pytest
import torch

import maml_fast as mf
from maml_fast.cuda_graph import EmulatedGraphBackend, GraphedMetaStep, HostSyncDetector

BACKENDS = ("torch", "fused", "vmap")
MAML_PLUS_PLUS = {"inner_lr_mode": "per_layer_per_step", "per_step_bn": True, "per_step_bn_statistics": True}
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6}
ITERATIONS = 8


def image_batch(seed, dtype, tasks=2, ways=3, shots=1, queries=2, size=8):
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(tasks, ways * shots, 1, size, size, generator=g, dtype=dtype)
    qx = torch.rand(tasks, ways * queries, 1, size, size, generator=g, dtype=dtype)
    sy = torch.stack([torch.randperm(ways, generator=g).repeat_interleave(shots) for _ in range(tasks)])
    qy = torch.randint(0, ways, (tasks, ways * queries), generator=g)
    return mf.TaskBatch(sx, sy, qx, qy)


def learner_and_optimizer(backend, inner_steps, dtype, options):
    torch.manual_seed(0)
    learner = mf.MAML(mf.models.conv4(1, 3, hidden=4), inner_lr=0.4, inner_steps=inner_steps, backend=backend,
                      **options).to(dtype)
    optimizer = torch.optim.Adam(learner.parameters(), lr=torch.tensor(0.01), fused=True)
    return learner, optimizer


def _cases():
    cases = [pytest.param(b, k, d, {}, id=f"{b}-K{k}-{str(d)[6:]}")
             for b in BACKENDS for k in (1, 5) for d in (torch.float64, torch.float32)]
    for backend, steps in (("torch", 5), ("fused", 1)):
        cases.append(pytest.param(backend, steps, torch.float64, MAML_PLUS_PLUS, id=f"{backend}-K{steps}-maml++"))
        cases.append(pytest.param(backend, steps, torch.float64, {"checkpoint_inner_steps": True},
                                  id=f"{backend}-K{steps}-checkpointed"))
    return cases


@pytest.mark.parametrize("backend,inner_steps,dtype,options", _cases())
def test_graphed_step_has_no_host_read_and_replays_the_eager_step(backend, inner_steps, dtype, options, one_thread):
    graphed_pair = learner_and_optimizer(backend, inner_steps, dtype, options)
    eager_pair = learner_and_optimizer(backend, inner_steps, dtype, options)
    graphed = GraphedMetaStep(*graphed_pair, backend=EmulatedGraphBackend(), warmup=2, clip_norm=1.0)
    eager = GraphedMetaStep(*eager_pair, enabled=False, clip_norm=1.0)
    tol = TOLERANCE[dtype]
    for i in range(ITERATIONS):
        batch = image_batch(i, dtype)
        if i == 0:  # the first warm-up checks the labels' range: the one host read there is
            out_g = graphed(batch)
        else:  # the second warm-up, the capture (+ its replay) and the replays
            with HostSyncDetector(device_type="cpu") as detector:
                out_g = graphed(batch)
            assert detector.found == [], f"iteration {i}: " + "\n".join(map(str, detector.found))
        out_e = eager(batch)
        assert out_g.keys() == out_e.keys()
        for key in out_e:
            torch.testing.assert_close(out_g[key], out_e[key], rtol=tol, atol=tol, equal_nan=True,
                                       msg=lambda m: f"iteration {i}, {key}: {m}")
        for (name, a), b in zip(graphed_pair[0].named_parameters(), eager_pair[0].parameters()):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"iteration {i}, {name}: {m}")
        for a, b in zip(graphed_pair[0].parameters(), eager_pair[0].parameters()):
            for key, value in graphed_pair[1].state[a].items():
                torch.testing.assert_close(value, eager_pair[1].state[b][key], rtol=tol, atol=tol)
    stats = graphed.stats
    assert (stats.warmup_steps, stats.captures, stats.replays) == (2, 1, ITERATIONS - 2)
    # the learner's host iteration count followed the replays (what its schedule reads)
    assert graphed_pair[0]._iteration == eager_pair[0]._iteration == ITERATIONS
    assert int(graphed_pair[0].meta_iteration) == ITERATIONS


def test_first_warmup_still_checks_the_labels(one_thread):
    """Capture safety does not drop the label check: a bad batch still gets a clear error."""
    learner, optimizer = learner_and_optimizer("fused", 1, torch.float64, {})
    step = GraphedMetaStep(learner, optimizer, backend=EmulatedGraphBackend(), warmup=2)
    bad = image_batch(0, torch.float64)
    bad = mf.TaskBatch(bad.support_x, bad.support_y, bad.query_x, bad.query_y + 3, check_values=False)
    with pytest.raises(ValueError, match="query_y"):
        step(bad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_multi_step_loss_annealing_is_captured_once(dtype, one_thread):
    """MAML++'s annealed multi-step loss weights change every iteration: they are computed on the device
    from the iteration counter, so one graph follows them (and the replays equal eager steps) until the
    annealing ends, when the weights are fixed and one new graph is captured."""
    options = {"multi_step_loss_iterations": 6, **MAML_PLUS_PLUS}
    graphed_pair = learner_and_optimizer("fused", 3, dtype, options)
    eager_pair = learner_and_optimizer("fused", 3, dtype, options)
    graphed = GraphedMetaStep(*graphed_pair, backend=EmulatedGraphBackend(), warmup=2, max_graphs=2)
    eager = GraphedMetaStep(*eager_pair, enabled=False)
    tol = TOLERANCE[dtype]
    for i in range(10):
        batch = image_batch(i, dtype)
        out_g, out_e = graphed(batch), eager(batch)
        torch.testing.assert_close(out_g["meta_loss"], out_e["meta_loss"], rtol=tol, atol=tol)
        for a, b in zip(graphed_pair[0].parameters(), eager_pair[0].parameters()):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    # iterations 0-5 anneal (2 warm-ups, a capture, 3 replays), 6-9 do not (2 warm-ups, a capture, 1 replay)
    assert (graphed.stats.warmup_steps, graphed.stats.captures, graphed.stats.replays) == (4, 2, 6)


@pytest.mark.parametrize("steps", [1, 3])
def test_adapt_and_predict_read_nothing_without_host_checks(steps, one_thread):
    """`adapt` (any step count) + `predict` with the host checks off read no device value (a graph can
    capture them); with them on, the checks still run and a bad value still gets a clear error."""
    learner, _ = learner_and_optimizer("fused", 1, torch.float64, {})
    batch = image_batch(0, torch.float64)
    with mf.meta_step.host_checks(learner, False), HostSyncDetector(device_type="cpu") as detector:
        learner.predict(learner.adapt(batch.support_x, batch.support_y, steps=steps), batch.query_x)
    assert detector.found == [], "\n".join(map(str, detector.found))
    bad_x = batch.support_x.clone()
    bad_x[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="support_x"):
        learner.adapt(bad_x, batch.support_y, steps=steps)
