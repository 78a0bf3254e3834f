"""`GraphedMetaStep`: static inputs, warm-up, capture, replay, re-capture, the eager switch, the
on-device non-finite skip and host-sync detection — on the CPU with a fake capture backend and with
`EmulatedGraphBackend` (recorded aten ops replayed without Python), and on CUDA when there is one.
(The eager vs graphed timing is a benchmark: the graphed peers of benchmarks/bench_table.py.)"""
from __future__ import annotations

import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import maml_fast as mf
from conftest import cuda_initialisations
from maml_fast.cuda_graph import (CaptureBackend, CudaGraphBackend, EmulatedGraphBackend, GraphedMetaStep,
                                  HostSyncError, Replayable, batch_signature, find_host_syncs)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


# ------------------------------------------------------------------------------------ helpers
class ToyMAML(nn.Module):
    """Second-order MAML of a tanh MLP on ``[T, B, F]`` inputs, task-batched with einsum and free of
    host reads (a capture-safe learner for the graph mechanics)."""

    def __init__(self, features=6, hidden=8, classes=3, inner_lr=0.5, inner_steps=1, host_sync=False):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(features, hidden) * 0.5)
        self.b1 = nn.Parameter(torch.zeros(hidden))
        self.w2 = nn.Parameter(torch.randn(hidden, classes) * 0.5)
        self.b2 = nn.Parameter(torch.zeros(classes))
        self.inner_lr, self.inner_steps, self.first_order, self.host_sync = inner_lr, inner_steps, False, host_sync

    @staticmethod
    def _net(params, x):
        w1, b1, w2, b2 = params
        hidden = torch.tanh(torch.einsum("tbf,tfh->tbh", x.to(w1.dtype), w1) + b1.unsqueeze(1))
        return torch.einsum("tbh,thc->tbc", hidden, w2) + b2.unsqueeze(1)

    @staticmethod
    def _loss(logits, labels):
        tasks = labels.shape[0]
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
        return losses.reshape(tasks, -1).mean(1)

    def forward(self, batch):
        tasks = batch.num_tasks
        fast = [p.expand(tasks, *p.shape) for p in (self.w1, self.b1, self.w2, self.b2)]
        support = []
        for _ in range(self.inner_steps):
            loss = self._loss(self._net(fast, batch.support_x), batch.support_y)
            grads = torch.autograd.grad(loss.sum(), fast, create_graph=not self.first_order)
            fast = [p - self.inner_lr * g for p, g in zip(fast, grads)]
            support.append(loss.detach().mean())
        query = self._loss(self._net(fast, batch.query_x), batch.query_y)
        if self.host_sync and query.mean() > 0:  # a Python branch on a device value
            query = query * 1.0
        return types.SimpleNamespace(loss=query.mean(), metrics={"support_loss": torch.stack(support),
                                                                 "query_loss": query.detach().mean().reshape(1)})


def toy_batch(seed=0, tasks=2, shots=2, queries=3, ways=3, features=6, device="cpu", dtype=torch.float32, nan=False):
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(tasks, ways * shots, features, generator=g, dtype=dtype)
    if nan:
        sx[0, 0, 0] = float("nan")
    qx = torch.randn(tasks, ways * queries, features, generator=g, dtype=dtype)
    sy = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)
    qy = torch.randint(0, ways, (tasks, ways * queries), generator=g)
    return mf.TaskBatch(sx, sy, qx, qy, check_values=False).to(device)


def image_batch(seed=0, tasks=2, shots=1, queries=2, ways=3, size=8, nan=False, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(tasks, ways * shots, 1, size, size, generator=g)
    if nan:
        sx[0, 0, 0, 0, 0] = float("nan")
    qx = torch.rand(tasks, ways * queries, 1, size, size, generator=g)
    sy = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)
    qy = torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1)
    return mf.TaskBatch(sx, sy, qx, qy, check_values=False).to(device)


def toy_pair(seed=0, lr=0.05, device="cpu", **kwargs):
    """Two identical (learner, optimizer) pairs: one for the graphed step, one for the eager one.
    The lr is a tensor in both, so both run the very same optimizer arithmetic."""
    pairs = []
    for _ in range(2):
        torch.manual_seed(seed)
        learner = ToyMAML(**kwargs).to(device)
        optimizer = torch.optim.Adam(learner.parameters(), lr=torch.tensor(lr, device=device), fused=True,
                                     **({"capturable": True} if device != "cpu" else {}))
        pairs.append((learner, optimizer))
    return pairs


class FakeGraph(Replayable):
    def __init__(self, backend, fn):
        self.backend, self.fn = backend, fn

    def replay(self):
        self.backend.calls.append("replay")
        self.outputs = self.fn()


class FakeBackend(CaptureBackend):
    """Records the calls; capture stores fn (a real capture does not run the step), replay runs it."""

    name = "fake"

    def __init__(self):
        self.calls = []

    def warmup(self, fn):
        self.calls.append("warmup")
        return fn()

    def capture(self, fn):
        self.calls.append("capture")
        return FakeGraph(self, fn)


def assert_same_state(learner_a, opt_a, learner_b, opt_b, **tol):
    tol = tol or {"rtol": 0.0, "atol": 0.0}
    for (name, a), b in zip(learner_a.named_parameters(), learner_b.parameters()):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}", **tol)
    for a, b in zip(learner_a.parameters(), learner_b.parameters()):
        for key, value in opt_a.state[a].items():
            torch.testing.assert_close(value, opt_b.state[b][key], msg=lambda m: f"state {key}: {m}", **tol)


# ------------------------------------------------------------------------------------ CPU: fake backend
def test_warmup_then_one_capture_then_replays():
    (learner, optimizer), _ = toy_pair()
    backend = FakeBackend()
    step = GraphedMetaStep(learner, optimizer, backend=backend, warmup=3)
    for i in range(7):
        out = step(toy_batch(i))
        assert set(out) >= {"meta_loss", "grad_norm", "found_inf", "support_loss", "query_loss"}
    assert backend.calls == ["warmup"] * 3 + ["capture"] + ["replay"] * 4
    assert (step.stats.warmup_steps, step.stats.captures, step.stats.replays) == (3, 1, 4)
    assert step.num_graphs == 1


def test_static_inputs_are_reused_in_place():
    (learner, optimizer), _ = toy_pair()
    step = GraphedMetaStep(learner, optimizer, backend=FakeBackend(), warmup=1)
    step(toy_batch(0))
    static = step.static_inputs()
    pointers = [getattr(static, f).data_ptr() for f in ("support_x", "support_y", "query_x", "query_y")]
    for i in range(1, 4):
        batch = toy_batch(i)
        step(batch)
        assert step.static_inputs() is static
        assert [getattr(static, f).data_ptr() for f in ("support_x", "support_y", "query_x", "query_y")] == pointers
        for field in ("support_x", "support_y", "query_x", "query_y"):
            assert torch.equal(getattr(static, field), getattr(batch, field))
            assert getattr(static, field).data_ptr() != getattr(batch, field).data_ptr()


def test_a_batch_drawn_into_the_static_inputs_is_not_copied():
    """A caller that writes each batch into `static_inputs()` in place (the trainer's sampler) passes
    that batch: no copy into the static inputs, and the replays read the new values there."""
    from torch.utils._python_dispatch import TorchDispatchMode

    (learner, optimizer), (eager_learner, eager_optimizer) = toy_pair()
    step = GraphedMetaStep(learner, optimizer, backend=EmulatedGraphBackend(), warmup=1)
    eager = GraphedMetaStep(eager_learner, eager_optimizer, enabled=False)
    fields = ("support_x", "support_y", "query_x", "query_y")
    step(toy_batch(0)), eager(toy_batch(0))  # a new signature: copied into new static inputs once
    static = step.static_inputs()
    pointers = {getattr(static, f).data_ptr() for f in fields}

    class StaticCopies(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.copy_.default and args[0].data_ptr() in pointers:
                StaticCopies.count += 1
            return func(*args, **(kwargs or {}))

    for i in range(1, 5):  # the capture, then replays
        batch = toy_batch(i)
        for f in fields:  # (what a sampler's sample(out=static) does)
            getattr(static, f).copy_(getattr(batch, f))
        with StaticCopies():
            out = step(static)
        torch.testing.assert_close(out["meta_loss"], eager(batch)["meta_loss"], rtol=0, atol=0)
    assert StaticCopies.count == 0 and step.static_inputs() is static
    assert (step.stats.captures, step.stats.replays) == (1, 4)
    assert_same_state(learner, optimizer, eager_learner, eager_optimizer)


def test_recapture_exactly_when_the_signature_changes():
    (learner, optimizer), _ = toy_pair()
    backend = FakeBackend()
    step = GraphedMetaStep(learner, optimizer, backend=backend, warmup=1, max_graphs=8)
    a, b = dict(queries=3), dict(queries=4)
    for kwargs in (a, a, a, b, b, a, b):
        step(toy_batch(**kwargs))
    assert backend.calls == ["warmup", "capture", "replay", "replay",  # a
                             "warmup", "capture", "replay",  # b
                             "replay", "replay"]  # a, b: replayed, not re-captured
    assert step.stats.captures == 2
    step(toy_batch(dtype=torch.float64, **a))  # dtype change: a new signature
    assert backend.calls[-1] == "warmup"
    learner.inner_steps = 2  # the learner's mode is part of the signature too
    step(toy_batch(**a))
    assert backend.calls[-1] == "warmup" and step.stats.warmup_steps == 4


def test_signature_covers_shapes_dtypes_and_device():
    batch = toy_batch()
    assert batch_signature(batch) == batch_signature(toy_batch(seed=5))
    assert batch_signature(batch) != batch_signature(toy_batch(queries=4))
    assert batch_signature(batch) != batch_signature(toy_batch(dtype=torch.float64))
    meta = mf.TaskBatch(*(torch.empty_like(getattr(batch, f), device="meta")
                          for f in ("support_x", "support_y", "query_x", "query_y")), check_values=False)
    assert batch_signature(batch) != batch_signature(meta)


def test_at_most_max_graphs_are_kept():
    (learner, optimizer), _ = toy_pair()
    backend = FakeBackend()
    step = GraphedMetaStep(learner, optimizer, backend=backend, warmup=1, max_graphs=2)
    for queries in (2, 2, 3, 3, 4, 4):
        step(toy_batch(queries=queries))
    assert step.num_graphs == 2 and step.stats.evictions == 1
    step(toy_batch(queries=2))  # evicted (least recently used): warms up again
    assert backend.calls[-1] == "warmup"
    step(toy_batch(queries=4))  # still there
    assert backend.calls[-1] == "replay"


def test_enabled_false_runs_the_same_step_eagerly():
    (l1, o1), (l2, o2) = toy_pair()
    graphed = GraphedMetaStep(l1, o1, backend=FakeBackend(), warmup=2)
    eager = GraphedMetaStep(l2, o2, enabled=False)  # CPU parameters: no backend needed
    for i in range(5):
        batch = toy_batch(i, queries=3 + (i == 3))
        out_g, out_e = graphed(batch), eager(batch)
        for key in out_e:
            torch.testing.assert_close(out_g[key], out_e[key], rtol=0, atol=0)
        assert_same_state(l1, o1, l2, o2)
    assert eager.stats.eager_steps == 5 and eager.static_inputs() is None and eager.num_graphs == 0


# ------------------------------------------------------------------------------------ CPU: emulated graphs
def test_emulated_graph_equals_the_eager_step_on_conv4():
    """The real learner (task-batched conv4, second order) with clipping and an LR schedule: the
    replayed recorded ops give exactly the eager step, across a shape change and a NaN batch."""
    pairs = []
    for _ in range(2):
        torch.manual_seed(0)
        learner = mf.MAML(mf.models.conv4(1, 3, hidden=4), inner_lr=0.4, inner_steps=1, backend="torch")
        optimizer = torch.optim.Adam(learner.parameters(), lr=torch.tensor(0.01), fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.8 ** i)
        pairs.append((learner, optimizer, scheduler))
    (l1, o1, s1), (l2, o2, s2) = pairs
    graphed = GraphedMetaStep(l1, o1, backend=EmulatedGraphBackend(), warmup=1, clip_norm=0.5,
                              check_host_syncs="raise")
    eager = GraphedMetaStep(l2, o2, enabled=False, clip_norm=0.5)
    batches = [image_batch(0), image_batch(1), image_batch(2), image_batch(3, queries=3), image_batch(4, queries=3),
               image_batch(5, queries=3, nan=True), image_batch(6)]
    for batch in batches:
        out_g, out_e = graphed(batch), eager(batch)
        s1.step(), s2.step()
        for key in out_e:
            torch.testing.assert_close(out_g[key], out_e[key], rtol=1e-6, atol=1e-7, equal_nan=True)
        assert_same_state(l1, o1, l2, o2, rtol=1e-6, atol=1e-7)
    assert graphed.stats.captures == 2 and graphed.stats.replays == 5
    assert float(graphed.counters()["skipped_steps"]) == 1.0 == float(eager.counters()["skipped_steps"])
    # p.grad is the graph's static gradient, equal to the eager meta-gradient of the last step
    for a, b in zip(l1.parameters(), l2.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


def test_emulated_graph_bakes_python_values_in():
    """As on a GPU: a Python float lr read during capture is fixed in the graph (the scheduler's
    later changes are lost), while the default tensor lr follows the scheduler."""
    results = {}
    for tensor_lr in (True, False):
        torch.manual_seed(0)
        learner = ToyMAML()
        optimizer = torch.optim.Adam(learner.parameters(), lr=0.05, fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0 if i < 2 else 0.0)
        step = GraphedMetaStep(learner, optimizer, backend=EmulatedGraphBackend(), warmup=1, tensor_lr=tensor_lr)
        for i in range(4):
            step(toy_batch(i))
            scheduler.step()
        before = [p.detach().clone() for p in learner.parameters()]
        step(toy_batch(9))  # lr is 0 now
        results[tensor_lr] = max(float((p.detach() - b).abs().max()) for p, b in zip(learner.parameters(), before))
    assert results[True] == 0.0  # the schedule reached the graph: no update
    assert results[False] > 1e-4  # the captured float lr is still used


def test_emulated_capture_does_not_take_a_step():
    (learner, optimizer), _ = toy_pair()
    step = GraphedMetaStep(learner, optimizer, backend=EmulatedGraphBackend(), warmup=1)
    step(toy_batch(0))
    before = [p.detach().clone() for p in learner.parameters()]
    steps_before = [optimizer.state[p]["step"].clone() for p in learner.parameters()]
    step(toy_batch(1))  # capture + exactly one replay
    assert step.stats.captures == 1 and step.stats.replays == 1
    assert all(float(optimizer.state[p]["step"]) == float(s) + 1 for p, s in zip(learner.parameters(), steps_before))
    assert any(not torch.equal(p, b) for p, b in zip(learner.parameters(), before))


def test_nonfinite_step_is_skipped_on_the_device():
    (l1, o1), (l2, o2) = toy_pair()
    step = GraphedMetaStep(l1, o1, backend=EmulatedGraphBackend(), warmup=1)
    eager = GraphedMetaStep(l2, o2, enabled=False)
    for i in range(3):
        step(toy_batch(i)), eager(toy_batch(i))
    params = [p.detach().clone() for p in l1.parameters()]
    state = {k: v.clone() for k, v in o1.state[l1.w1].items()}
    out = step(toy_batch(3, nan=True))
    eager(toy_batch(3, nan=True))
    assert float(out["found_inf"]) == 1.0 and torch.isnan(out["meta_loss"]).all()
    assert all(torch.equal(p, q) for p, q in zip(l1.parameters(), params))
    assert all(torch.equal(v, state[k]) for k, v in o1.state[l1.w1].items())
    counters = {k: float(v) for k, v in step.counters().items()}
    assert counters == {"skipped_steps": 1.0, "bad_run": 1.0, "bad_run_max": 1.0}
    out = step(toy_batch(4))
    eager(toy_batch(4))
    assert float(out["found_inf"]) == 0.0 and float(step.counters()["bad_run"]) == 0.0
    assert_same_state(l1, o1, l2, o2)


@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    lambda params: torch.optim.Adam(params, lr=0.01, foreach=True),
], ids=["sgd-momentum", "adam-foreach"])
def test_nonfinite_skip_without_a_fused_optimizer(make_optimizer):
    torch.manual_seed(0)
    learner = ToyMAML()
    optimizer = make_optimizer(learner.parameters())
    step = GraphedMetaStep(learner, optimizer, enabled=False)
    step(toy_batch(0, nan=True))  # the very first step: its new state must not be NaN
    assert all(torch.isfinite(t).all() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    step(toy_batch(1))
    params = [p.detach().clone() for p in learner.parameters()]
    state = {id(t): t.clone() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)}
    step(toy_batch(2, nan=True))
    assert all(torch.equal(p, q) for p, q in zip(learner.parameters(), params))
    assert all(torch.equal(t, state[id(t)]) for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    assert float(step.counters()["skipped_steps"]) == 2.0


def test_clip_value_and_clip_norm_are_applied():
    (l1, o1), (l2, o2) = toy_pair()
    step = GraphedMetaStep(l1, o1, enabled=False, clip_value=1e-3, clip_norm=1e-3)
    out = step(toy_batch(0))
    grads = torch.cat([p.grad.flatten() for p in l1.parameters()])
    assert float(grads.abs().max()) <= 1e-3 + 1e-9
    assert float(grads.norm()) <= 1e-3 * (1 + 1e-5)
    assert float(out["grad_norm"]) > 1e-3  # the norm before clipping is reported


class ProtocolToy(ToyMAML):
    """ToyMAML with the optional learner protocol of GraphedMetaStep."""

    def __init__(self):
        super().__init__()
        self.host_checks, self.seen_checks, self.replay_calls, self.phase = True, [], 0, 0

    def forward(self, batch):
        self.seen_checks.append(self.host_checks)
        return super().forward(batch)

    def on_graph_replay(self):
        self.replay_calls += 1

    def graph_key(self):
        return self.phase


def test_learner_protocol_host_checks_replay_hook_and_graph_key():
    torch.manual_seed(0)
    learner = ProtocolToy()
    optimizer = torch.optim.Adam(learner.parameters(), lr=0.01, fused=True)
    step = GraphedMetaStep(learner, optimizer, backend=EmulatedGraphBackend(), warmup=3)
    for i in range(6):
        step(toy_batch(i))
    # warm-ups: host checks in the first only; the capture ran the forward's Python once (no checks);
    # replays run no Python
    assert learner.seen_checks == [True, False, False, False]
    assert learner.host_checks is True
    assert step.stats.replays == 3 and learner.replay_calls == 2  # not for the capturing call's replay
    learner.phase = 1  # what the forward's Python branches read changed: a new graph
    step(toy_batch(7))
    assert step.stats.warmup_steps == 4 and learner.seen_checks[-1] is True


# ------------------------------------------------------------------------------------ host syncs
def test_host_sync_in_the_step_is_named_before_capture():
    torch.manual_seed(0)
    learner = ToyMAML(host_sync=True)
    optimizer = torch.optim.Adam(learner.parameters(), lr=0.01, fused=True)
    step = GraphedMetaStep(learner, optimizer, backend=EmulatedGraphBackend(), warmup=2)
    step(toy_batch(0))  # first warm-up: not checked
    with pytest.raises(HostSyncError, match=r"test_cuda_graph\.py:\d+ in forward"):
        step(toy_batch(1))
    assert step.stats.captures == 0


def test_host_sync_policy_eager_runs_that_signature_eagerly():
    torch.manual_seed(0)
    learner = ToyMAML(host_sync=True)
    optimizer = torch.optim.Adam(learner.parameters(), lr=0.01, fused=True)
    step = GraphedMetaStep(learner, optimizer, backend=FakeBackend(), warmup=1, check_host_syncs="eager")
    with pytest.warns(UserWarning, match="runs eagerly"):
        step(toy_batch(0))
    for i in range(3):
        step(toy_batch(i))
    assert step.stats.captures == 0 and step.stats.eager_steps == 3


def test_capture_safe_learner_passes_the_host_sync_check():
    (learner, optimizer), _ = toy_pair()
    step = GraphedMetaStep(learner, optimizer, backend=EmulatedGraphBackend(), warmup=2, check_host_syncs="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(4):
            step(toy_batch(i))
    assert step.stats.captures == 1


def _maml_host_syncs(host_checks: bool):
    torch.manual_seed(0)
    learner = mf.MAML(mf.models.conv4(1, 3, hidden=4), inner_lr=0.4, inner_steps=1, backend="torch")
    learner.host_checks = host_checks
    batch = image_batch(0)
    return find_host_syncs(lambda: learner(batch).loss.backward(), device_type="cpu")


def test_maml_learner_host_syncs_are_only_the_label_checks():
    """With its input checks on, mf.MAML reads the labels' range on the host (check_labels), nothing else."""
    syncs = _maml_host_syncs(host_checks=True)
    assert syncs and all("check_labels" in sync.where for sync in syncs), syncs


def test_maml_learner_is_capture_safe_without_host_checks():
    assert _maml_host_syncs(host_checks=False) == []


# ------------------------------------------------------------------------------------ arguments
def test_bad_arguments_fail_with_the_argument_name():
    (learner, optimizer), _ = toy_pair()
    with pytest.raises(ValueError, match="enabled"):
        GraphedMetaStep(learner, optimizer)  # CPU parameters, no backend
    for kwargs, name in (({"warmup": 0}, "warmup"), ({"max_graphs": 0}, "max_graphs"),
                         ({"clip_norm": -1.0}, "clip_norm"), ({"clip_value": float("nan")}, "clip_value"),
                         ({"precision": "fp16"}, "precision"), ({"check_host_syncs": "maybe"}, "check_host_syncs")):
        with pytest.raises(ValueError, match=name):
            GraphedMetaStep(learner, optimizer, enabled=False, **kwargs)
    with pytest.raises(TypeError, match="backend"):
        GraphedMetaStep(learner, optimizer, backend=object())
    with pytest.raises(TypeError, match="batch"):
        GraphedMetaStep(learner, optimizer, enabled=False)(toy_batch().support_x)
    assert CudaGraphBackend().name == "cuda"  # constructing it touches no CUDA


def test_import_and_backends_do_not_initialise_cuda():
    """Importing the module and constructing its capture backends calls no CUDA (recorded in a fresh
    process, so it can fail without a GPU); the recorder itself sees a CUDA call."""
    code = "import maml_fast.cuda_graph as m\nm.CudaGraphBackend()\nm.EmulatedGraphBackend()"
    assert cuda_initialisations(code) == []
    assert cuda_initialisations("try:\n    torch.cuda.current_stream()\nexcept Exception:\n    pass")


# ------------------------------------------------------------------------------------ CUDA
@cuda
def test_cuda_graph_matches_eager_toy():
    (l1, o1), (l2, o2) = toy_pair(device="cuda")
    graphed = GraphedMetaStep(l1, o1, warmup=2, clip_norm=5.0)
    eager = GraphedMetaStep(l2, o2, enabled=False, clip_norm=5.0)
    batches = [toy_batch(i, device="cuda") for i in range(4)] + [toy_batch(4, queries=4, device="cuda")] * 3
    batches += [toy_batch(7, nan=True, device="cuda"), toy_batch(8, device="cuda")]
    for batch in batches:
        out_g, out_e = graphed(batch), eager(batch)
        for key in out_e:
            torch.testing.assert_close(out_g[key], out_e[key], rtol=1e-5, atol=1e-6, equal_nan=True)
    assert_same_state(l1, o1, l2, o2, rtol=1e-5, atol=1e-6)
    assert graphed.stats.captures == 2 and graphed.stats.replays == 5
    assert float(graphed.counters()["skipped_steps"]) == 1.0


@cuda
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16-saved"])
def test_cuda_graph_in_each_precision_mode(precision):
    (l1, o1), (l2, o2) = toy_pair(device="cuda")
    options = {"min_numel": 0} if precision == "bf16-saved" else {}
    graphed = GraphedMetaStep(l1, o1, warmup=1, precision=precision, precision_options=options)
    eager = GraphedMetaStep(l2, o2, enabled=False, precision=precision, precision_options=options)
    for i in range(4):
        out_g, out_e = graphed(toy_batch(i, device="cuda")), eager(toy_batch(i, device="cuda"))
        torch.testing.assert_close(out_g["meta_loss"], out_e["meta_loss"], rtol=1e-4, atol=1e-6)
    assert graphed.stats.captures == 1


@cuda
def test_cuda_graph_with_the_maml_learner():
    """The real learner on CUDA (conv4, second order), graphed against eager. It has never run on a GPU:
    whether mf.MAML is capture-safe there is issue 15's work (on the CPU the same learner passes the
    host-sync check, test_emulated_graph_equals_the_eager_step_on_conv4). Should the warm-up's check
    find host reads, the test skips naming issue 15 and the reads; any other failure fails."""
    pairs = []
    for _ in range(2):
        torch.manual_seed(0)
        learner = mf.MAML(mf.models.conv4(1, 3, hidden=8), inner_lr=0.4, inner_steps=1).cuda()
        optimizer = torch.optim.Adam(learner.parameters(), lr=torch.tensor(1e-3, device="cuda"), fused=True,
                                     capturable=True)
        pairs.append((learner, optimizer))
    (l1, o1), (l2, o2) = pairs
    graphed = GraphedMetaStep(l1, o1, warmup=2)
    eager = GraphedMetaStep(l2, o2, enabled=False)
    for i in range(5):
        batch = image_batch(i, size=28, device="cuda")
        try:
            out_g = graphed(batch)
        except HostSyncError as error:
            pytest.skip(f"issue 15 (a capture-safe learner) is not done: mf.MAML reads the host on CUDA: {error}")
        out_e = eager(batch)
        torch.testing.assert_close(out_g["meta_loss"], out_e["meta_loss"], rtol=1e-4, atol=1e-5)
    assert graphed.stats.captures == 1 and graphed.stats.replays == 3


def test_host_sync_detector_sees_tolist_and_numpy_of_cpu_tensors():
    """On a CPU tensor .tolist() and .numpy() read memory without an aten op; the detector still sees
    them (and puts the methods back afterwards)."""
    values = torch.arange(3.0)
    original = torch.Tensor.tolist
    syncs = find_host_syncs(lambda: (values.tolist(), values.numpy()), device_type="cpu")
    assert [s.op for s in syncs] == ["Tensor.tolist", "Tensor.numpy"]
    assert all("test_cuda_graph.py" in s.where for s in syncs), syncs
    assert torch.Tensor.tolist is original
    assert find_host_syncs(lambda: values.tolist(), device_type="cuda") == []
