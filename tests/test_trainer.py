"""Trainer: exact resume, NaN skip and stop, gradient clipping, atomic checkpoints, log files,
pretraining, time limit; evaluation: the confidence-interval math, and both ways it computes the
per-step metrics against the independent per-task reference (`reference_maml`)."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import maml_fast as mf
import reference_maml as ref
from maml_fast import trainer as trainer_module
from maml_fast.data import EpisodeSampler, SinusoidTasks
from maml_fast.evaluation import EvaluationResult, evaluate, mean_std_ci95, plot_learning_curve, read_jsonl
from maml_fast.trainer import NonFiniteLossError, Trainer, load_checkpoint


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one CPU thread (conftest's `one_thread`)."""


def sinusoid_setup(seed=0, **maml_options):
    torch.manual_seed(seed)
    net = mf.models.mlp((1, 16, 16, 1)).double()
    options = dict(inner_lr=0.01, inner_steps=2, eval_inner_steps=3)
    options.update(maml_options)
    learner = mf.MAML(net, **options)
    source = SinusoidTasks(5, 5, seed=seed, meta_batch_size=4, dtype=torch.float64)
    return learner, source


def tiny_images(seed=0, classes=12, examples=6, size=8):
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(images=torch.randint(0, 256, (classes, examples, 1, size, size), generator=g,
                                                dtype=torch.uint8), num_classes=classes)


def episode_setup(seed=0, **maml_options):
    torch.manual_seed(seed)
    net = mf.models.conv4(1, 3, hidden=4).double()
    options = dict(inner_lr=0.1, inner_steps=1, eval_inner_steps=2)
    options.update(maml_options)
    learner = mf.MAML(net, **options)
    source = EpisodeSampler(tiny_images(), ways=3, shots=1, queries=2, meta_batch_size=3, seed=seed,
                            dtype=torch.float64)
    return learner, source


def trainer_for(setup, logdir, iterations, **options):
    learner, source = setup()
    defaults = dict(iterations=iterations, logdir=logdir, log_every=2, checkpoint_every=3, progress=False)
    defaults.update(options)
    return Trainer(learner, source, **defaults)


def assert_same_state(a: Trainer, b: Trainer, buffers=True):
    sa, sb = a.learner.state_dict(), b.learner.state_dict()
    if not buffers:  # parameters only (meta_iteration counts every forward, skipped or not)
        sa, sb = dict(a.learner.named_parameters()), dict(b.learner.named_parameters())
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    oa, ob = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    for index in oa:
        for key in oa[index]:
            assert torch.equal(torch.as_tensor(oa[index][key]), torch.as_tensor(ob[index][key])), (index, key)


# ------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("setup", [
    lambda: sinusoid_setup(inner_lr_mode="per_layer_per_step"),  # learned inner lrs are checkpointed too
    lambda: episode_setup(),
], ids=["sinusoid-learned-lrs", "omniglot-like-episodes"])
def test_resume_is_bitwise_exact(setup, tmp_path):
    n = 4
    options = dict(cosine=True, clip_norm=1.0, pretrain_iterations=1)
    straight = trainer_for(setup, tmp_path / "straight", 2 * n - 1, checkpoint_every=n, **options)
    straight.train()

    first = trainer_for(setup, tmp_path / "resumed", 2 * n - 1, checkpoint_every=n, **options)
    first.total_iterations = n  # stop after n iterations (the checkpoint at n is written)
    first.train()
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["iteration"] == n

    # A new process would build everything again; the global RNG is perturbed to show it is restored.
    torch.manual_seed(999)
    second = trainer_for(setup, tmp_path / "resumed", 2 * n - 1, checkpoint_every=n, resume=True, **options)
    assert second.iteration == n
    assert int(second.learner.meta_iteration) == n
    second.train()
    assert second.iteration == straight.iteration == 2 * n
    assert_same_state(straight, second)
    assert second.lr == straight.lr
    # metrics.jsonl of the resumed run lists every logged iteration once, as the straight run
    iterations = lambda d: [r["iteration"] for r in read_jsonl(d / "metrics.jsonl")]  # noqa: E731
    assert iterations(tmp_path / "resumed") == iterations(tmp_path / "straight")


def test_resume_drops_records_logged_after_the_checkpoint(tmp_path):
    trainer = trainer_for(sinusoid_setup, tmp_path, 6, log_every=1, checkpoint_every=4)
    trainer.train()
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    assert checkpoint["iteration"] == 6
    # simulate a crash after iteration 6 of a longer run: a checkpoint at 4 and records up to 6
    trainer.iteration = 4
    trainer.save_checkpoint()
    resumed = trainer_for(sinusoid_setup, tmp_path, 6, log_every=1, checkpoint_every=4, resume=True)
    assert resumed.iteration == 4
    assert [r["iteration"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------ NaN handling
class NaNAt(mf.MAML):
    """A MAML whose meta-loss is NaN on the training forwards whose index is in `bad`."""

    def __init__(self, *args, bad=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.bad, self.calls = set(bad), 0

    def forward(self, batch):
        out = super().forward(batch)
        if self.training:
            if self.calls in self.bad or ("from" in self.bad and self.calls >= self.bad_from):
                out.loss = out.loss * float("nan")
            self.calls += 1
        return out


def nan_setup(bad=(), bad_from=None):
    torch.manual_seed(0)
    learner = NaNAt(mf.models.mlp((1, 16, 16, 1)).double(), inner_lr=0.01, inner_steps=1,
                    bad=set(bad) | ({"from"} if bad_from is not None else set()))
    learner.bad_from = bad_from
    return learner, SinusoidTasks(5, 5, seed=0, meta_batch_size=4, dtype=torch.float64)


def test_nan_step_is_skipped_and_counted(tmp_path):
    clean = trainer_for(lambda: nan_setup(), None, 3)
    clean.train()
    bad = trainer_for(lambda: nan_setup(bad=[3]), tmp_path, 4, log_every=4)
    result = bad.train()
    assert result.skipped_steps == 1 and result.stopped == "completed"
    # the skipped step changed neither the parameters nor Adam's state (its step count included)
    assert_same_state(clean, bad, buffers=False)
    assert all(float(s["step"]) == 3 for s in bad.optimizer.state.values())
    record = read_jsonl(tmp_path / "metrics.jsonl")[-1]
    assert record["skipped_steps"] == 1 and record["skipped_in_record"] == 1
    assert math.isfinite(record["meta_loss"])  # the mean is over the good steps only
    # training goes on after a skipped step
    more = trainer_for(lambda: nan_setup(bad=[1]), None, 4)
    assert more.train().skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in more.learner.parameters())


@pytest.mark.parametrize("log_every,stop,run", [(1, 9, 4), (2, 10, 5)], ids=["log-every-1", "log-every-2"])
def test_repeated_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path, log_every, stop, run):
    """The consecutive-skip count is read at log and checkpoint boundaries: with a boundary after every
    step the 4th bad step in a row (steps 5-8) stops training; with one every 2 steps, the boundary
    after step 9 (5 in a row)."""
    trainer = trainer_for(lambda: nan_setup(bad_from=5), tmp_path, 20, checkpoint_every=2, max_bad_steps=3,
                          log_every=log_every)
    with pytest.raises(NonFiniteLossError, match=rf"NaN/inf for {run} consecutive steps.*checkpoint\.pt"):
        trainer.train()
    assert trainer.iteration == stop
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    assert checkpoint["iteration"] == 4  # not 6 or 8: no checkpoint is written during a bad run
    assert all(torch.isfinite(v).all() for v in checkpoint["learner"].values() if v.is_floating_point())


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("clip", [{}, {"clip_value": 1e-4}, {"clip_norm": 1e-4}], ids=["none", "value", "norm"])
def test_gradient_clipping(clip, monkeypatch):
    """The Trainer's own clip_value / clip_norm reach the gradients the optimizer steps with (and
    without them they are larger, so the check can fail)."""
    trainer = trainer_for(sinusoid_setup, None, 1, **clip)
    largest, norms = [], []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        grads = [p.grad for p in trainer.params if p.grad is not None]
        largest.append(max(g.abs().max().item() for g in grads))
        norms.append(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item())
        return step(*args, **kwargs)

    monkeypatch.setattr(trainer.optimizer, "step", recording_step)
    trainer.train()
    assert len(largest) == 1
    if not clip:
        assert largest[0] > 1e-3 and norms[0] > 1e-3
    if "clip_value" in clip:
        assert largest[0] <= clip["clip_value"]
    if "clip_norm" in clip:
        assert norms[0] <= clip["clip_norm"] * (1 + 1e-6)


# ------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    trainer = trainer_for(sinusoid_setup, tmp_path, 3, checkpoint_every=3)
    trainer.train()
    path = tmp_path / "checkpoint.pt"
    good = path.read_bytes()

    real_save = torch.save

    def crash_midway(obj, file, *args, **kwargs):
        real_save({"partial": torch.zeros(10)}, file)  # some bytes reach the temporary file ...
        raise OSError("disk full")  # ... then the write dies

    monkeypatch.setattr(trainer_module.torch, "save", crash_midway)
    trainer.iteration = 99
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint()
    monkeypatch.setattr(trainer_module.torch, "save", real_save)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # temp file removed
    assert load_checkpoint(path)["iteration"] == 3

    # a temp file left by a kill -9 mid-write does not disturb resuming
    (tmp_path / ".checkpoint.pt.tmp-12345").write_bytes(b"\x80garbage")
    resumed = trainer_for(sinusoid_setup, tmp_path, 3, resume=True)
    assert resumed.iteration == 3


def test_checkpoint_contents(tmp_path):
    trainer = trainer_for(lambda: sinusoid_setup(inner_lr_mode="per_layer_per_step"), tmp_path, 2,
                          checkpoint_every=2, config={"name": "x"}, keep_checkpoints=True)
    trainer.train()
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    assert checkpoint["iteration"] == 2 and checkpoint["config"] == {"name": "x"}
    assert int(checkpoint["learner"]["meta_iteration"]) == 2
    assert any(k.startswith("inner_lrs.") for k in checkpoint["learner"])
    assert {"optimizer", "scheduler", "sampler", "rng", "counters"} <= set(checkpoint)
    assert {"torch", "numpy", "python"} <= set(checkpoint["rng"])
    assert (tmp_path / "checkpoint_0000002.pt").is_file()
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "other.pt").write_bytes(b"")
    torch.save({"a": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a maml_fast Trainer checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


# ------------------------------------------------------------------------------------ logging
def test_jsonl_and_tensorboard_files(tmp_path):
    trainer = trainer_for(episode_setup, tmp_path, 4, log_every=2, pretrain_iterations=2)
    trainer.train()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in records] == [2, 4, 6]
    assert [r["phase"] for r in records] == ["pretrain", "metatrain", "metatrain"]
    pre, meta = records[0], records[-1]
    assert len(pre["query_loss"]) == 1 and pre["support_loss"] == []  # pretraining: 0 inner steps
    assert len(meta["query_loss"]) == 2 and len(meta["query_accuracy"]) == 2  # after 0 and 1 steps
    assert len(meta["support_loss"]) == 1 and 0 <= meta["support_accuracy"][0] <= 1
    for key in ("meta_loss", "grad_norm", "lr", "steps_per_s", "elapsed_s", "skipped_steps"):
        assert key in meta
    assert meta["meta_loss"] == pytest.approx(meta["query_loss"][-1])
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = EventAccumulator(str(tmp_path / "tensorboard")).Reload().Tags()["scalars"]
    assert {"metatrain/meta_loss", "metatrain/query_accuracy_after_0_steps", "metatrain/query_accuracy_after_1_steps",
            "metatrain/support_loss_before_step_1", "pretrain/query_loss_after_0_steps"} <= set(tags)
    png = plot_learning_curve(tmp_path / "metrics.jsonl", tmp_path / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pretraining_trains_on_the_pre_update_support_loss():
    trainer = trainer_for(sinusoid_setup, None, 0, pretrain_iterations=1, log_every=1)
    learner, source = sinusoid_setup()
    batch = source.sample()
    learner.inner_steps = 0
    expected = learner(mf.TaskBatch(batch.support_x, batch.support_y, batch.support_x, batch.support_y)).loss
    result = trainer.train()
    assert result.last_record["phase"] == "pretrain"
    assert result.last_record["meta_loss"] == pytest.approx(expected.item(), rel=1e-12)
    assert trainer.learner.inner_steps == 2  # restored


def test_time_limit_stops_cleanly_with_a_checkpoint(tmp_path):
    trainer = trainer_for(sinusoid_setup, tmp_path, 1000, time_limit=1e-6, checkpoint_every=500)
    result = trainer.train()
    assert result.stopped == "time_limit" and result.iteration == 1
    assert load_checkpoint(tmp_path / "checkpoint.pt")["iteration"] == 1
    # the limit counts from the start of train(), whatever checkpoints happen on the way
    trainer = trainer_for(sinusoid_setup, tmp_path / "b", 10**6, time_limit=0.5, checkpoint_every=1, log_every=10)
    result = trainer.train()
    assert result.stopped == "time_limit" and 0.5 <= result.wall_s < 10
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["iteration"] == result.iteration


def test_bad_arguments():
    learner, source = sinusoid_setup()
    with pytest.raises(ValueError, match="iterations"):
        Trainer(learner, source, iterations=-1)
    with pytest.raises(ValueError, match="clip_norm"):
        Trainer(learner, source, iterations=1, clip_norm=0)
    with pytest.raises(TypeError, match="sample"):
        Trainer(learner, object(), iterations=1)


# ------------------------------------------------------------------------------------ evaluation
def test_confidence_interval_math():
    mean, std, ci = mean_std_ci95([[0.0, 1.0], [1.0, 1.0], [0.0, 1.0], [1.0, 1.0]])
    np.testing.assert_allclose(mean, [0.5, 1.0])
    np.testing.assert_allclose(std, [0.5, 0.0])  # ddof=0, as the reference's np.std
    np.testing.assert_allclose(ci, [1.96 * 0.5 / 2, 0.0])
    values = np.random.default_rng(0).random(600)
    _, _, ci = mean_std_ci95(values)
    assert ci == pytest.approx(1.96 * values.std() / math.sqrt(600))
    with pytest.raises(ValueError):
        mean_std_ci95([])


def reference_evaluation(net, episodes, steps, inner_lr):
    """Per-task query loss and accuracy ``[tasks, steps + 1]`` over `episodes` after 0..steps inner steps,
    by the independent per-task reference (`reference_maml`)."""
    theta = {n: p.detach().clone().requires_grad_() for n, p in net.named_parameters()}
    cfg = ref.Config(steps=steps, inner_lr=inner_lr, second_order=False)
    plan = ref.layer_plan(net)
    losses, accuracies = [], []
    for batch in episodes:
        for t in range(batch.num_tasks):
            history = ref.adapt_one_task(plan, theta, cfg, batch.support_x[t], batch.support_y[t])
            outputs = [ref.predict_one_task(net, theta, cfg, history[k], k, batch.query_x[t]).detach()
                       for k in range(steps + 1)]
            losses.append([ref.task_loss(out, batch.query_y[t]).item() for out in outputs])
            accuracies.append([(out.argmax(-1) == batch.query_y[t]).double().mean().item() for out in outputs])
    return np.array(losses), np.array(accuracies)


@pytest.mark.parametrize("branch", ["learner_forward", "adapt_predict"])
def test_evaluate_matches_the_reference(branch, monkeypatch):
    """Both ways evaluate() computes the per-step metrics (one forward of the learner, when it reports
    them for these steps; adapt() and predict() per step count otherwise) against the reference's
    per-task adaptation, over the same fixed episodes; the branch taken is checked."""
    learner, _ = episode_setup()
    held_out = EpisodeSampler(tiny_images(seed=5), ways=3, shots=1, queries=2, meta_batch_size=4, seed=1,
                              dtype=torch.float64)
    if branch == "adapt_predict":
        learner.step_metrics = False
    adapt_calls = []
    adapt = learner.adapt
    monkeypatch.setattr(learner, "adapt", lambda *args, **kwargs: adapt_calls.append(1) or adapt(*args, **kwargs))
    result = evaluate(learner, held_out, num_episodes=10, steps=2, seed=3)
    assert bool(adapt_calls) == (branch == "adapt_predict")
    assert isinstance(result, EvaluationResult) and result.num_episodes == 10 and result.steps == [0, 1, 2]
    assert learner.training  # restored
    losses, accuracies = reference_evaluation(learner.model, held_out.fixed_episodes(10, seed=3), 2, learner.inner_lr)
    assert losses.shape == (10, 3)
    np.testing.assert_allclose(result.loss_mean, losses.mean(0), rtol=1e-10)
    np.testing.assert_allclose(result.loss_std, losses.std(0), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(result.accuracy_mean, accuracies.mean(0), rtol=1e-12)
    np.testing.assert_allclose(result.accuracy_ci95, 1.96 * accuracies.std(0) / math.sqrt(10), rtol=1e-10, atol=1e-12)
    assert len(set(result.loss_mean)) == 3, "adaptation changed nothing: the comparison would be weak"
    again = evaluate(learner, held_out, num_episodes=10, steps=2, seed=3)
    assert again.to_dict() == result.to_dict()  # fixed episodes
    assert "after 2 steps: accuracy" in result.summary()


@pytest.mark.parametrize("branch", ["learner_forward", "adapt_predict"])
def test_graphed_evaluation_equals_the_eager_one(branch):
    """Issue 15, item 3: evaluation's batches as captured adapt + predict (the CPU graph emulator: recorded
    ops replayed without Python), one capture per input signature, replayed per batch, across three
    evaluations: the same result as the eager evaluation, number for number. 18 episodes in batches of 4
    give two signatures (4 tasks, and 2 for the last batch), in both branches (adapt() reads nothing
    with the host checks off)."""
    from maml_fast.cuda_graph import EmulatedGraphBackend, HostSyncDetector
    from maml_fast.evaluation import GraphedEvaluation

    learner, _ = episode_setup()
    learner.step_metrics = branch == "learner_forward"
    held_out = EpisodeSampler(tiny_images(seed=5), ways=3, shots=1, queries=2, meta_batch_size=4, seed=1,
                              dtype=torch.float64)
    eager = evaluate(learner, held_out, num_episodes=18, steps=2, seed=3)
    assert len(set(eager.accuracy_mean)) > 1 and len(set(eager.loss_mean)) == 3  # adaptation changes them
    graphs = GraphedEvaluation(learner, backend=EmulatedGraphBackend(), check_host_syncs="raise")
    for i in range(3):
        with HostSyncDetector(device_type="cpu") as detector:
            graphed = evaluate(learner, held_out, num_episodes=18, steps=2, seed=3, graphs=graphs)
        # host reads: the value checks of a signature's first warm-up (so in the first evaluation only:
        # the labels', and adapt()'s finite-input scan), and the one transfer of the tables at the end
        checks = {"check_labels"} | ({"check_finite"} if branch == "adapt_predict" else set())
        reads = [next((c for c in checks if c in sync.where), sync.op) for sync in detector.found]
        assert reads.count("Tensor.numpy") == 2
        assert set(reads) == {"Tensor.numpy"} | (checks if i == 0 else set())
        assert graphed.to_dict() == eager.to_dict()
    # 4 tasks: warm-up, warm-up, capture (+ replay), 9 replays; 2 tasks: warm-up, warm-up, capture (+ replay)
    stats = graphs.stats
    assert (stats.warmup_steps, stats.captures, stats.replays, stats.eager_steps) == (4, 2, 11, 0)
    assert learner.training


def test_graphed_evaluation_bad_arguments():
    from maml_fast.cuda_graph import EmulatedGraphBackend
    from maml_fast.evaluation import GraphedEvaluation

    learner, source = episode_setup()
    other, _ = episode_setup()
    with pytest.raises(ValueError, match="graphs must be a GraphedEvaluation of this learner"):
        evaluate(learner, source, num_episodes=2, graphs=GraphedEvaluation(other, backend=EmulatedGraphBackend()))
    with pytest.raises(ValueError, match="graphs must be"):
        evaluate(learner, source, num_episodes=2, graphs=object())
    with pytest.raises(ValueError, match="enabled=True captures CUDA graphs but the parameters are on cpu"):
        GraphedEvaluation(learner)
    with pytest.raises(ValueError, match="warmup"):
        GraphedEvaluation(learner, backend=EmulatedGraphBackend(), warmup=0)


def test_evaluate_regression_and_result_json(tmp_path):
    learner, source = sinusoid_setup()
    result = evaluate(learner, source, num_episodes=7, inner_lr=0.0)
    assert result.accuracy_mean is None and len(result.loss_mean) == 4
    assert result.loss_mean[0] == pytest.approx(result.loss_mean[-1])  # inner lr 0: no adaptation
    assert learner.inner_lr == 0.01  # restored
    path = result.write_json(tmp_path / "eval.json")
    assert json.loads(path.read_text())["num_episodes"] == 7


# ------------------------------------------------------------------------------------ host reads
def test_no_host_read_between_log_boundaries():
    """Issue 15: an iteration between log boundaries reads nothing back from the device (on the CPU
    too; `HostSyncDetector(device_type="cpu")` flags every host read of a CPU tensor). Reads happen in
    the first step (the label check, once per batch signature of an EpisodeSampler) and after the
    steps that end on a boundary (counters and metrics), nowhere else."""
    from maml_fast.cuda_graph import HostSyncDetector

    trainer = trainer_for(episode_setup, None, 12, log_every=4, checkpoint_every=100)
    where = {"in_step": False}
    reads = []

    class Found(list):  # the detector's list of reads, each noted with where the loop was
        def append(self, sync):
            reads.append((where["in_step"], trainer.iteration, str(sync)))
            super().append(sync)

    step = trainer._step

    def marked_step():
        where["in_step"] = True
        try:
            step()
        finally:
            where["in_step"] = False

    trainer._step = marked_step
    detector = HostSyncDetector(device_type="cpu")
    detector.found = Found()
    with detector:
        trainer.train()
    assert trainer.iteration == 12
    in_steps = [r for r in reads if r[0]]
    between = [r for r in reads if not r[0]]
    assert in_steps and all(iteration == 0 and "check_labels" in sync for _, iteration, sync in in_steps), in_steps
    assert between and {iteration for _, iteration, _ in between} <= {4, 8, 12}, between


def test_label_check_runs_every_step_for_other_sources():
    """A source that does not promise valid labels gets the learner's label check at every step: a bad
    batch after good ones still stops with the error naming the labels."""
    learner, source = episode_setup()
    good = source.sample()

    class Source:
        calls = 0

        def sample(self):
            Source.calls += 1
            if Source.calls < 3:
                return good
            return mf.TaskBatch(good.support_x, good.support_y, good.query_x, good.query_y + 3, check_values=False)

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    trainer = Trainer(learner, Source(), iterations=5, log_every=10, progress=False)
    with pytest.raises(ValueError, match="query_y holds labels"):
        trainer.train()
    assert trainer.iteration == 2


# ------------------------------------------------------------------------------------ cuda_graph
def test_cuda_graph_mode_is_checked_and_on_is_refused_on_the_cpu():
    learner, source = episode_setup()
    with pytest.raises(ValueError, match="cuda_graph"):
        Trainer(learner, source, iterations=1, progress=False, cuda_graph="yes")
    with pytest.raises(ValueError, match=r"cuda_graph='on'.*on cpu"):
        Trainer(learner, source, iterations=1, progress=False, cuda_graph="on")
    for mode in ("auto", "off"):
        trainer = Trainer(learner, source, iterations=1, progress=False, cuda_graph=mode)
        assert trainer.graphed_step is None and f"--cuda-graph {mode}" in trainer.graph_reason


def _graphed_trainer(logdir, iterations, **options):
    from maml_fast.cuda_graph import EmulatedGraphBackend
    return trainer_for(episode_setup, logdir, iterations, cuda_graph="on", graph_backend=EmulatedGraphBackend(),
                       **options)


def test_graphed_trainer_matches_the_eager_one(tmp_path):
    """cuda_graph='on' through the CPU graph emulator: the same records and parameters as the eager
    trainer. (Not bit for bit: the graphed step's lr is a float32 device tensor, the eager one a Python
    float, so the Adam updates differ in the lr's 8th digit.)"""
    options = dict(log_every=4, checkpoint_every=100, cosine=True)
    eager = trainer_for(episode_setup, tmp_path / "eager", 12, cuda_graph="off", **options)
    eager.train()
    graphed = _graphed_trainer(tmp_path / "graphed", 12, **options)
    graphed.train()
    assert graphed.graphed_step.stats.captures == 1 and graphed.graphed_step.stats.replays == 9
    records = [read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("eager", "graphed")]
    assert [r["iteration"] for r in records[0]] == [r["iteration"] for r in records[1]] == [4, 8, 12]
    for a, b in zip(*records):
        for key in ("meta_loss", "grad_norm", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-7, abs=1e-12), key
    initial, _ = episode_setup()
    for a, b in zip(eager.learner.parameters(), graphed.learner.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)
    assert any(not torch.equal(a, c) for a, c in zip(graphed.learner.parameters(), initial.parameters()))


def test_graphed_trainer_draws_into_the_graph_and_repeats_the_eager_losses(tmp_path):
    """Issue 15, item 3: an eager and a graphed (emulated) trainer of the same seed log the same loss at
    every iteration (float64, to 1e-12), the graphed one drawing every meta-batch after its first
    straight into the graph's static inputs (``sample(out=)``: no copy), and the same validations, the
    graphed one validating through `GraphedEvaluation`. meta_lr = 2**-10 is exact in float32, so the
    graphed step's float32 device lr equals the eager one's Python float."""
    val_source = EpisodeSampler(tiny_images(seed=5), ways=3, shots=1, queries=2, meta_batch_size=4, seed=1,
                                dtype=torch.float64)
    options = dict(log_every=1, checkpoint_every=100, meta_lr=2.0 ** -10, val_source=val_source, val_every=2,
                   val_episodes=10)
    eager = trainer_for(episode_setup, tmp_path / "eager", 8, cuda_graph="off", **options)
    eager.train()
    graphed = _graphed_trainer(tmp_path / "graphed", 8, **options)
    into_static = []
    sample = graphed.source.sample

    def watched_sample(*args, out=None, **kwargs):
        into_static.append(out is not None and out is graphed.graphed_step.static_inputs())
        return sample(*args, out=out, **kwargs)

    graphed.source.sample = watched_sample
    graphed.train()
    assert into_static == [False] + [True] * 7
    stats = graphed.graphed_step.stats
    assert (stats.warmup_steps, stats.captures, stats.replays) == (3, 1, 5)
    logs = [read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("eager", "graphed")]
    records = [[r for r in log if r["kind"] == "train"] for log in logs]
    assert [r["iteration"] for r in records[0]] == [r["iteration"] for r in records[1]] == list(range(1, 9))
    validations = [[r for r in log if r["kind"] == "val"] for log in logs]
    assert [r["iteration"] for r in validations[0]] == [r["iteration"] for r in validations[1]] == [2, 4, 6, 8]
    for a, b in zip(*validations):
        for key in ("accuracy_mean", "accuracy_ci95", "loss_mean", "loss_ci95"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-12, atol=1e-12, err_msg=key)
    assert graphed.graphed_eval.stats.replays > 0  # (10 episodes in batches of 4, 4 times: 2 signatures)
    for key in ("meta_loss", "grad_norm", "query_loss", "query_accuracy", "support_loss"):
        np.testing.assert_allclose(np.array([r[key] for r in records[1]], dtype=float),
                                   np.array([r[key] for r in records[0]], dtype=float), rtol=1e-12, atol=1e-12,
                                   err_msg=key)
    assert len({r["meta_loss"] for r in records[0]}) == 8  # the losses do change (the comparison is not vacuous)
    for a, b in zip(eager.learner.parameters(), graphed.learner.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_graphed_trainer_resumes_exactly(tmp_path):
    whole = _graphed_trainer(tmp_path / "whole", 8, log_every=2, checkpoint_every=4)
    whole.train()
    first = _graphed_trainer(tmp_path / "split", 4, log_every=2, checkpoint_every=4)
    first.train()
    second = _graphed_trainer(tmp_path / "split", 8, log_every=2, checkpoint_every=4, resume=True)
    assert second.iteration == 4
    second.train()
    assert_same_state(whole, second)
    assert read_jsonl(tmp_path / "whole" / "metrics.jsonl") == [
        {**r, "elapsed_s": a["elapsed_s"], "steps_per_s": a["steps_per_s"]}
        for r, a in zip(read_jsonl(tmp_path / "split" / "metrics.jsonl"), read_jsonl(tmp_path / "whole" / "metrics.jsonl"))]
