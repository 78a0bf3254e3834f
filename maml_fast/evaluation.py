"""The paper's evaluation protocol, and learning curves.

`evaluate` adapts a trained learner to ``num_episodes`` (default 600) fixed held-out tasks
(`fixed_episodes` of the held-out split's source: the same tasks every time for a given seed) and
reports, for every number of inner steps 0..K, the mean query accuracy (classification) and loss over
the episodes with a 95% confidence interval ``1.96 * std / sqrt(n)`` (``std`` over episodes, ``ddof=0``
as the reference code's ``np.std``)::

    result = evaluate(learner, test_source, num_episodes=600, steps=3)
    print(result.summary())               # "after 3 steps: accuracy 98.10% ± 0.45% (600 episodes)"
    result.write_json(logdir / "eval.json")

Graphed (`GraphedEvaluation`, what the trainer and the CLI use when they run graphed): each batch's
adapt + predict is captured once per input signature (shapes, steps, inner lr) with the capture machinery
of the training step (`maml_fast.cuda_graph`: CUDA graphs, or the CPU emulator in tests) and replayed
per batch; the numbers are the eager evaluation's. Either way the per-episode values stay on the device
until the last batch (one transfer).

`plot_learning_curve` draws the training metrics of a run's ``metrics.jsonl`` into a PNG.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checks import check_int
from .cuda_graph import CaptureBackend, GraphedBatchCall
from .ops.losses import cross_entropy_per_task, mse_per_task
from .task_batch import TaskBatch

CI95_Z = 1.96


def mean_std_ci95(values) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, standard deviation (ddof=0) and 95% confidence half-width ``1.96 * std / sqrt(n)`` over
    the first axis of `values` (one row per episode)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 0 or values.shape[0] == 0:
        raise ValueError("values must hold at least one episode (a non-empty first axis)")
    mean, std = values.mean(0), values.std(0)
    return mean, std, CI95_Z * std / math.sqrt(values.shape[0])


@dataclass
class EvaluationResult:
    """Per inner-step statistics over the episodes: entry k is after k inner steps (0 = pre-update)."""

    num_episodes: int
    steps: list[int]
    loss_mean: list[float]
    loss_std: list[float]
    loss_ci95: list[float]
    accuracy_mean: list[float] | None = None
    accuracy_std: list[float] | None = None
    accuracy_ci95: list[float] | None = None
    info: dict = field(default_factory=dict)

    @property
    def classification(self) -> bool:
        return self.accuracy_mean is not None

    @property
    def final_accuracy(self) -> tuple[float, float] | None:
        """(mean, ci95) of the accuracy after the last step."""
        return None if self.accuracy_mean is None else (self.accuracy_mean[-1], self.accuracy_ci95[-1])

    def line(self, k: int) -> str:
        if self.classification:
            return (f"after {self.steps[k]} steps: accuracy {100 * self.accuracy_mean[k]:.2f}% "
                    f"± {100 * self.accuracy_ci95[k]:.2f}%  (loss {self.loss_mean[k]:.4f})")
        return f"after {self.steps[k]} steps: loss {self.loss_mean[k]:.4f} ± {self.loss_ci95[k]:.4f}"

    def summary(self) -> str:
        return f"{self.line(len(self.steps) - 1)} ({self.num_episodes} episodes, 95% CI)"

    def table(self) -> str:
        return "\n".join(self.line(k) for k in range(len(self.steps)))

    def to_dict(self) -> dict:
        return asdict(self)

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)
        return path


def _per_task_metrics(learner, batch, steps: int, inner_lr: float | None):
    """Query loss and accuracy ``[steps + 1, T]`` (device tensors; accuracy None for regression) of
    every task after 0..steps inner steps."""
    classification = not batch.query_y.is_floating_point()
    if learner.step_metrics and steps == learner.eval_inner_steps:
        # One forward when the learner reports per-task metrics (``MAMLOutput.per_task_metrics``):
        # `steps` inner steps instead of steps * (steps + 1) / 2 with adapt() per step count.
        with torch.no_grad():
            out = learner(batch, inner_lr=inner_lr)
        return out.per_task_metrics["query_loss"], out.per_task_metrics["query_accuracy"] if classification else None
    losses, accuracies = [], []
    for k in range(steps + 1):
        fast = learner.adapt(batch.support_x, batch.support_y, steps=k, inner_lr=inner_lr)
        with torch.no_grad():
            output = learner.predict(fast, batch.query_x)
            if classification:
                loss, accuracy = cross_entropy_per_task(output, batch.query_y)
                accuracies.append(accuracy)
            else:
                loss, _ = mse_per_task(output, batch.query_y)
        losses.append(loss)
    return torch.stack(losses), (torch.stack(accuracies) if classification else None)


class GraphedEvaluation(GraphedBatchCall):
    """`evaluate`'s adapt + predict of one batch of episodes, captured once per input signature (the
    batch's shapes, the steps and the inner lr, the learner's mode) and replayed per batch: pass it to
    ``evaluate(..., graphs=)``. Keep one across evaluations (the trainer's validations) to reuse its
    graphs; they read the learner's parameters where they are, so training in between is seen.

    backend: a `maml_fast.cuda_graph.CaptureBackend` (default: CUDA graphs, own memory pool;
    `EmulatedGraphBackend` for CPU tests). warmup: eager batches of a signature before its capture.
    check_host_syncs: as `GraphedMetaStep`'s, but "eager" by default: ``learner.adapt`` (evaluating
    other step counts than the learner's ``eval_inner_steps``) checks its inputs on the host, so such
    a signature runs eagerly, with a warning, instead of failing. enabled=False: all eager.
    """

    _what = "the evaluation's adapt + predict"

    def __init__(self, learner: torch.nn.Module, *, backend: CaptureBackend | None = None, warmup: int = 2,
                 max_graphs: int = 4, check_host_syncs: str = "eager", enabled: bool = True):
        device = next(learner.parameters()).device
        super().__init__(learner, device, enabled=enabled, backend=backend, warmup=warmup, max_graphs=max_graphs,
                         check_host_syncs=check_host_syncs, key=None)
        self._call: tuple = ()

    def per_task_metrics(self, batch: TaskBatch, steps: int, inner_lr: float | None):
        """`_per_task_metrics` of `batch`, graphed: copies of the graph's outputs (the next replay
        overwrites them)."""
        # (a float inner lr is baked into the graph: it joins the signature)
        self._call = (steps, inner_lr, getattr(self.learner, "inner_lr", None))
        loss, accuracy = self._run(batch)
        return loss.clone(), None if accuracy is None else accuracy.clone()

    def _signature_extra(self):
        return self._call

    def _body(self, batch: TaskBatch):
        return _per_task_metrics(self.learner, batch, *self._call[:2])


def evaluate(learner, source, num_episodes: int = 600, steps: int | None = None, seed: int = 0,
             batch_size: int | None = None, inner_lr: float | None = None,
             graphs: GraphedEvaluation | None = None) -> EvaluationResult:
    """Adapt `learner` to `num_episodes` fixed episodes of `source` (``source.fixed_episodes``) and
    return the query loss/accuracy statistics for 0..`steps` inner steps (default: the learner's
    ``eval_inner_steps``). `inner_lr` overrides the learner's (fixed) inner step size for the
    evaluation (the reference code's update_lr at test vs train_update_lr). `graphs`: a
    `GraphedEvaluation` of this learner, to run each batch as a replayed graph (same numbers). The
    learner's training mode and inner lr are restored afterwards; no meta-parameter changes."""
    check_int("num_episodes", num_episodes, 1)
    steps = check_int("steps", learner.eval_inner_steps if steps is None else steps)
    if graphs is not None and (not isinstance(graphs, GraphedEvaluation) or graphs.learner is not learner):
        got = "one of another learner" if isinstance(graphs, GraphedEvaluation) else type(graphs).__name__
        raise ValueError(f"graphs must be a GraphedEvaluation of this learner (GraphedEvaluation(learner)), got {got}")
    per_task_metrics = (lambda batch: _per_task_metrics(learner, batch, steps, inner_lr)) if graphs is None else \
        (lambda batch: graphs.per_task_metrics(batch, steps, inner_lr))
    was_training = learner.training
    losses, accuracies = [], []
    try:
        learner.eval()
        for batch in source.fixed_episodes(num_episodes, seed=seed, meta_batch_size=batch_size):
            loss, accuracy = per_task_metrics(batch)
            losses.append(loss)
            if accuracy is not None:
                accuracies.append(accuracy)
    finally:
        learner.train(was_training)
    on_host = lambda parts: torch.cat(parts, 1).double().cpu().T.numpy()  # noqa: E731  [episodes, steps + 1]
    loss = on_host(losses)
    loss_stats = [s.tolist() for s in mean_std_ci95(loss)]
    result = EvaluationResult(loss.shape[0], list(range(steps + 1)), *loss_stats,
                              info={"seed": seed, "inner_lr": learner.inner_lr if inner_lr is None else inner_lr})
    if accuracies:
        accuracy_stats = mean_std_ci95(on_host(accuracies))
        result.accuracy_mean, result.accuracy_std, result.accuracy_ci95 = (s.tolist() for s in accuracy_stats)
    return result


# --------------------------------------------------------------------------------- learning curves
def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a metrics JSONL file (a torn last line, from a crash mid-write, is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _series(records, key, index):
    xs, ys = [], []
    for record in records:
        values = record.get(key)
        if isinstance(values, list) and index < len(values) and values[index] is not None:
            xs.append(record["iteration"])
            ys.append(values[index])
    return xs, ys


def plot_learning_curve(jsonl_path: str | Path, png_path: str | Path, title: str | None = None) -> Path:
    """Plot the training metrics of `jsonl_path` (`Trainer`'s ``metrics.jsonl``) to `png_path`: query
    loss and accuracy after every logged number of inner steps (0 = pre-update), the support-set
    pre-update values, and held-out validation accuracy when present."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(jsonl_path)
    train = [r for r in records if r.get("kind", "train") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    classification = any(any(v is not None for v in r.get("query_accuracy") or []) for r in train)
    panels = ["loss"] + (["accuracy"] if classification else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, metric in zip(axes[0], panels):
        steps = max((len(r.get(f"query_{metric}") or []) for r in train), default=0)
        for k in range(steps):
            xs, ys = _series(train, f"query_{metric}", k)
            if xs:
                ax.plot(xs, ys, label=f"query, {k} steps" + (" (pre-update)" if k == 0 else ""))
        xs, ys = _series(train, f"support_{metric}", 0)
        if xs:
            ax.plot(xs, ys, "--", color="gray", label="support, pre-update")
        if metric == "accuracy":
            for k in range(max((len(r.get("accuracy_mean") or []) for r in val), default=0)):
                xs, ys = _series(val, "accuracy_mean", k)
                if xs:
                    ax.plot(xs, ys, "o-", label=f"validation, {k} steps")
        ax.set_xlabel("meta-iteration")
        ax.set_ylabel(metric)
        if metric == "loss" and any(y > 0 for r in train for y in (r.get("query_loss") or []) if y is not None):
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or Path(jsonl_path).parent.name)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
