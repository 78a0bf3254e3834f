"""`Trainer`: the outer loop of meta-training.

    learner = mf.MAML(mf.models.conv4(1, 5), inner_lr=0.4, inner_steps=1)
    sampler = mf.data.EpisodeSampler(mf.data.Omniglot(split="train", rotations=True), 5, 1, 1, 32, seed=0)
    trainer = mf.Trainer(learner, sampler, iterations=60_000, logdir="runs/omniglot", resume=True)
    result = trainer.train()

Each iteration samples one meta-batch, computes the meta-loss and meta-gradient (all inner steps
per task, second order unless the learner says otherwise), clips it (by value or by global norm) and
takes one Adam step over every learner parameter (the network and any learned inner lrs), with an
optional cosine decay of the meta lr.

* Pretraining (the reference code's ``pretrain_iterations`` baseline): the first
  ``pretrain_iterations`` iterations train on the pre-update loss only — the support loss at θ, as
  the reference's ``pretrain_op`` — by running the learner with 0 inner steps; then ``iterations``
  meta-training iterations follow. ``iterations=0`` gives the pure pretrained baseline.
* Non-finite meta-loss or meta-gradient: the step is skipped (no parameter or optimizer-state
  change) and counted; more than ``max_bad_steps`` consecutive skips raise `NonFiniteLossError`
  without writing a checkpoint, so the last good one stays.
* Logging (``logdir``): every ``log_every`` iterations the means over the interval of the meta-loss
  and of the learner's per-step metrics (support loss/accuracy before each inner step, query
  loss/accuracy after 0..K steps) go to ``metrics.jsonl`` (one JSON object per line) and to
  TensorBoard event files (``tensorboard/``); a tqdm bar shows meta-steps/s and the ETA. Metrics are
  accumulated on the device and read once per interval; the skip decision is taken on the device too
  (fused Adam's ``found_inf``), and the consecutive-skip count is read at log and checkpoint boundaries
  (`NonFiniteLossError` is raised at the first boundary after the run passes ``max_bad_steps``), so no
  step between boundaries waits for the device. Label checks run once per batch signature for a source
  whose labels are right by construction (``source.labels_by_construction``), else every step.
* Checkpoints (``logdir/checkpoint.pt``, the one before it kept as ``checkpoint.prev.pt``) every
  ``checkpoint_every`` iterations, on a time-limit stop and at the end, written atomically (a
  temporary file, fsync, then ``os.replace``; `maml_fast.checkpoint_io`): learner state (network,
  learned inner lrs, ``meta_iteration``), optimizer, scheduler, sampler stream, RNG states (torch,
  CUDA, numpy, python) and counters. Resuming from one continues bit for bit as if the run had not
  stopped; a crash or kill loses at most the iterations since the last checkpoint. A corrupted or
  truncated checkpoint.pt is passed over with a `CheckpointWarning` for checkpoint.prev.pt; when
  neither loads, `CheckpointError` names both. A failed write (a full disk) stops training with
  `CheckpointWriteError` naming the file and the cause; the earlier checkpoints stay intact.
* Several processes (`maml_fast.distributed`): each rank runs its slice of the meta-batch's tasks
  and the meta-gradient is all-reduced, so the step equals a single process on the whole meta-batch.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint_io import (CHECKPOINT_FORMAT, LATEST_NAME, PREVIOUS_NAME, CheckpointError, CheckpointFiles,
                            CheckpointWarning, CheckpointWriteError, atomic_save, load_checkpoint,
                            read_latest_checkpoint)
from .checks import check_choice, check_int, check_number
from .distributed import DistributedContext
from .meta_step import MetaStep, host_checks
from .task_batch import TaskBatch

CHECKPOINT_NAME = LATEST_NAME
PREVIOUS_CHECKPOINT_NAME = PREVIOUS_NAME
METRICS_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
__all__ = ["Trainer", "TrainResult", "NonFiniteLossError", "CheckpointError", "CheckpointWarning",
           "CheckpointWriteError", "atomic_save", "load_checkpoint", "read_latest_checkpoint", "CHECKPOINT_NAME",
           "PREVIOUS_CHECKPOINT_NAME", "CHECKPOINT_FORMAT", "METRICS_NAME"]
METRIC_KEYS = ("support_loss", "support_accuracy", "query_loss", "query_accuracy")
CUDA_GRAPH_MODES = ("auto", "on", "off")
# "auto" turns graphs on for CUDA once a GPU run of benchmarks/gpu_check.sh has passed the graphed trainer
# step; record the torch versions it passed with here. None has yet.
GRAPHED_BY_DEFAULT_TORCH_VERSIONS: tuple[str, ...] = ()


def graph_mode(mode: str, device: torch.device, *, graph_backend=None, distributed: bool = False) -> tuple[bool, str]:
    """``--cuda-graph`` / ``cuda_graph=`` resolved for `device`: (run graphed?, why: the banner's words).
    The training step and the evaluation follow the same mode."""
    check_choice("cuda_graph", mode, CUDA_GRAPH_MODES)
    cuda = device.type == "cuda"
    if mode == "on":
        if not cuda and graph_backend is None:
            raise ValueError(f"cuda_graph='on' (--cuda-graph on) captures CUDA graphs but the learner is on "
                             f"{device}: use cuda_graph='off' or 'auto' (eager)")
        if distributed:
            raise ValueError("cuda_graph='on' (--cuda-graph on) does not support several processes yet: "
                             "use cuda_graph='off' or 'auto'")
        return True, "CUDA graphs (--cuda-graph on)"
    if mode == "off":
        return False, "eager (--cuda-graph off)"
    if not cuda:
        return False, f"eager (--cuda-graph auto: no CUDA graphs on {device.type})"
    if torch.__version__ in GRAPHED_BY_DEFAULT_TORCH_VERSIONS and not distributed:
        return True, f"CUDA graphs (--cuda-graph auto: proven on torch {torch.__version__})"
    return False, ("eager (--cuda-graph auto: the graphed step has not passed the GPU check with torch "
                   f"{torch.__version__} yet; --cuda-graph on opts in)")


class NonFiniteLossError(RuntimeError):
    """Raised when the meta-loss or meta-gradient stays NaN/inf for too many consecutive steps."""


@dataclass
class TrainResult:
    iteration: int  # iterations completed in total (pretraining included)
    iterations_run: int  # in this call
    stopped: str  # "completed" or "time_limit"
    wall_s: float  # this call
    steps_per_s: float  # this call
    skipped_steps: int  # in total
    last_record: dict | None
    checkpoint: Path | None


class _CosineFactor:
    """lr factor of a cosine decay from 1 to `min_ratio` over `total` scheduler steps (picklable)."""

    def __init__(self, total: int, min_ratio: float):
        self.total, self.min_ratio = max(int(total), 1), float(min_ratio)

    def __call__(self, step: int) -> float:
        progress = min(step, self.total) / self.total
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class _Constant:
    def __call__(self, step: int) -> float:
        return 1.0


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Meta-trains `learner` (a `MAML`-family module) on meta-batches from `source`.

    Args:
        learner: the meta-learner; ``learner(batch)`` returns a `MAMLOutput`.
        source: a task source with ``sample()``, ``state_dict()`` and ``load_state_dict()``
            (`EpisodeSampler`, `SinusoidTasks`). Under several processes every rank's source must
            draw the same meta-batches (same seed): each rank takes its slice of the tasks.
        iterations: meta-training iterations (the reference's metatrain_iterations).
        pretrain_iterations: iterations on the pre-update loss first (the reference's baseline).
        meta_lr: Adam's learning rate. cosine: decay it to ``min_lr_ratio * meta_lr`` over all
            iterations (cosine). clip_value / clip_norm: clip the meta-gradient elementwise to
            ±clip_value (the reference code, MiniImageNet: 10) and/or to a global norm.
        logdir: where metrics.jsonl, tensorboard/ and checkpoint.pt go (None: no files at all).
        log_every: iterations per logged record (and per device read). checkpoint_every: iterations
            per checkpoint. keep_checkpoints: also keep ``checkpoint_<iteration>.pt`` copies.
        max_bad_steps: consecutive non-finite steps tolerated before `NonFiniteLossError` (raised at the
            first log or checkpoint boundary after the run passes it).
        time_limit: seconds of training in this call after which it stops cleanly (checkpointed).
        resume: continue from ``logdir/checkpoint.pt`` if it exists (from ``checkpoint.prev.pt``, with
            a `CheckpointWarning`, when checkpoint.pt does not load). progress: show the tqdm bar.
        log: write metrics.jsonl and TensorBoard files (the reference's ``log`` flag).
        distributed: a `DistributedContext` (None: single process).
        config: a JSON-able dict stored in checkpoints (the CLI stores the experiment config).
        val_source, val_every, val_episodes, val_seed: optionally evaluate on fixed held-out
            episodes every `val_every` iterations (rank 0) and log it (``"kind": "val"`` records).
        cuda_graph: "on" runs each meta-training step as one captured graph (`GraphedMetaStep`; CUDA
            only, single process; pretraining steps run eagerly), "off" eagerly, "auto" (default) eagerly
            until a GPU run of benchmarks/gpu_check.sh has passed the graphed step with this torch version
            (`GRAPHED_BY_DEFAULT_TORCH_VERSIONS`, none yet). ``graph_reason`` says which and why (the
            CLI's banner). Graphed, a source that draws in place (`EpisodeSampler`, `SinusoidTasks`:
            ``sample(out=)``) writes each meta-batch straight into the graph's static inputs, and
            validation runs graphed too (`maml_fast.evaluation.GraphedEvaluation`). graph_backend: a
            `maml_fast.cuda_graph.CaptureBackend` for ``"on"`` (tests: `EmulatedGraphBackend` on the CPU);
            default CUDA graphs.
    """

    def __init__(self, learner, source, *, iterations: int, pretrain_iterations: int = 0, meta_lr: float = 1e-3,
                 cosine: bool = False, min_lr_ratio: float = 0.0, clip_value: float | None = None,
                 clip_norm: float | None = None, logdir: str | Path | None = None, log_every: int = 100,
                 checkpoint_every: int = 1000, keep_checkpoints: bool = False, max_bad_steps: int = 10,
                 time_limit: float | None = None, resume: bool = False, progress: bool = True, log: bool = True,
                 distributed: DistributedContext | None = None, config: dict | None = None, val_source=None,
                 val_every: int = 0, val_episodes: int = 100, val_seed: int = 0, cuda_graph: str = "auto",
                 graph_backend=None):
        check_int("iterations", iterations)
        check_int("pretrain_iterations", pretrain_iterations)
        check_int("log_every", log_every, 1)
        check_int("checkpoint_every", checkpoint_every, 1)
        check_int("max_bad_steps", max_bad_steps)
        check_int("val_every", val_every)
        check_number("meta_lr", meta_lr, positive=True, optional=True)
        check_number("clip_value", clip_value, positive=True, optional=True)
        check_number("clip_norm", clip_norm, positive=True, optional=True)
        check_number("time_limit", time_limit, positive=True, optional=True)
        for method in ("sample", "state_dict", "load_state_dict"):
            if not callable(getattr(source, method, None)):
                raise TypeError(f"source must have a {method}() method (an EpisodeSampler or SinusoidTasks), "
                                f"got {type(source).__name__}")
        params = [p for p in learner.parameters() if p.requires_grad]
        if not params:
            raise ValueError("learner has no trainable parameters")
        self.learner, self.source = learner, source
        self.iterations, self.pretrain_iterations = iterations, pretrain_iterations
        self.total_iterations = iterations + pretrain_iterations
        self.meta_lr, self.cosine, self.min_lr_ratio = float(meta_lr), bool(cosine), float(min_lr_ratio)
        self.clip_value, self.clip_norm = clip_value, clip_norm
        self.logdir = None if logdir is None else Path(logdir)
        self.log_every, self.checkpoint_every, self.keep_checkpoints = log_every, checkpoint_every, keep_checkpoints
        self.max_bad_steps, self.time_limit = max_bad_steps, time_limit
        self.progress, self.log = progress, log
        self.dist = distributed or DistributedContext(device=params[0].device)
        self.config = config
        self.val_source, self.val_every, self.val_episodes, self.val_seed = val_source, val_every, val_episodes, val_seed
        self.device = params[0].device
        self.params = params
        self.cuda_graph, self.graph_reason = graph_mode(cuda_graph, self.device, graph_backend=graph_backend,
                                                        distributed=self.dist.active)
        self.optimizer = self._make_optimizer(params)
        self.graphed_step = self.graphed_eval = None
        if self.cuda_graph:
            from .cuda_graph import GraphedMetaStep
            from .evaluation import GraphedEvaluation
            self.graphed_step = GraphedMetaStep(learner, self.optimizer, clip_value=clip_value, clip_norm=clip_norm,
                                                backend=graph_backend)
            # (validation: by default CUDA graphs in a memory pool of their own, apart from the step's)
            self.graphed_eval = GraphedEvaluation(learner, backend=graph_backend)
            self.meta_step = self.graphed_step._step  # one step, one set of counters
        else:
            self.meta_step = MetaStep(learner, self.optimizer, clip_value=clip_value, clip_norm=clip_norm,
                                      reduce=self.dist.all_reduce_sum_ if self.dist.active else None)
        factor = _CosineFactor(self.total_iterations, min_lr_ratio) if cosine else _Constant()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.iteration = 0
        self.elapsed_s = 0.0  # training time over all calls and resumes
        # The host reads the device (counters, metrics) only at log and checkpoint boundaries, on every
        # device: an iteration between them waits for nothing.
        self._check_every = log_every
        # Label checks read the labels on the host. A source whose labels are right by construction
        # (`EpisodeSampler`: 0..ways-1 in every episode) is checked once per batch signature (shapes,
        # dtypes: a wrong number of ways shows there); any other source's batches every step.
        self._labels_by_construction = bool(getattr(source, "labels_by_construction", False))
        self._draws_in_place = callable(getattr(source, "empty_batch", None))  # (`SeededTaskSource`: sample(out=))
        self._checked_signatures: set = set()
        self._reset_accumulators()
        self._writer = None
        self._bar = None
        self._files = None if self.logdir is None else CheckpointFiles(self.logdir)
        if resume and self.logdir is not None:
            found = read_latest_checkpoint(self.logdir, resume_flag="--no-resume (Trainer(resume=False))")
            if found is not None:
                self.load_checkpoint(*found)
        self.check_same_iteration()

    def check_same_iteration(self) -> None:
        """Under several processes: every rank continues from the same iteration (a collective call)."""
        if self.dist.active:
            bounds = torch.tensor([self.iteration, -self.iteration], dtype=torch.float64, device=self.dist.device)
            self.dist.all_reduce_max_(bounds, "comparing the ranks' starting iterations")
            if bounds[0].item() != -bounds[1].item():
                raise RuntimeError(
                    f"rank {self.dist.rank} starts at iteration {self.iteration} but another rank at "
                    f"{int(bounds[0].item()) if bounds[0].item() != self.iteration else int(-bounds[1].item())}: "
                    "resuming a multi-node run needs the logdir on a filesystem every node sees")

    # ------------------------------------------------------------------------------ optimizer
    def _make_optimizer(self, params):
        if self.device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in params):
            try:
                if self.cuda_graph and self.device.type == "cuda":
                    return torch.optim.Adam(params, lr=self.meta_lr, fused=True, capturable=True)
                return torch.optim.Adam(params, lr=self.meta_lr, fused=True)
            except (RuntimeError, ValueError, TypeError):
                pass
        return torch.optim.Adam(params, lr=self.meta_lr)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])  # (a device tensor for the graphed step)

    # ------------------------------------------------------------------------------ one step
    def _phase(self, iteration: int) -> str:
        return "pretrain" if iteration < self.pretrain_iterations else "metatrain"

    def _step_arguments(self, batch: TaskBatch, phase: str) -> tuple[TaskBatch, dict]:
        """This rank's part of `batch` (its share of the tasks weighs its meta-loss), and for pretraining
        the pre-update loss: the support loss at θ (the reference's pretrain_op)."""
        options = {}
        if self.dist.active:
            start, stop = self.dist.task_range(batch.num_tasks)
            options["loss_weight"] = (stop - start) / batch.num_tasks
            batch = batch.split_tasks(start, stop)
        if phase == "pretrain":
            batch = TaskBatch(batch.support_x, batch.support_y, batch.support_x, batch.support_y)
            options["steps"] = 0
        return batch, options

    def meta_gradient(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        """The (all-reduced) meta-gradient of `batch` by parameter name, without an optimizer step
        (for checks; it runs the learner's training forward, which counts as an iteration of it)."""
        batch, options = self._step_arguments(batch, "metatrain")
        self.meta_step.backward(batch, **options)
        grads = {n: p.grad.detach().clone() for n, p in self.learner.named_parameters() if p.grad is not None}
        self.optimizer.zero_grad(set_to_none=True)
        return grads

    def _sample(self) -> TaskBatch:
        """The next meta-batch. Graphed, from a source that draws in place (``sample(out=)``): written
        straight into the graph's static inputs (no copy, no allocation); the first one of a graph is
        drawn fresh and copied there once."""
        static = None if self.graphed_step is None else self.graphed_step.static_inputs()
        if static is not None and self._draws_in_place:
            return self.source.sample(out=static)
        return self.source.sample()

    def _step(self) -> None:
        phase = self._phase(self.iteration)
        batch, options = self._step_arguments(self._sample(), phase)
        signature = (phase, *((tuple(t.shape), t.dtype, t.device)
                              for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y)))
        check = not self._labels_by_construction or signature not in self._checked_signatures
        with host_checks(self.learner, check):
            if self.graphed_step is not None and not options:  # (pretraining runs eagerly: steps=0)
                metrics = dict(self.graphed_step(batch))  # (the graph's static outputs: not popped from)
            else:
                metrics = self.meta_step(batch, **options)
        self._checked_signatures.add(signature)
        self.scheduler.step()
        self._accumulate(phase, metrics, metrics.pop("found_inf"))
        self.iteration += 1

    def _check_bad_steps(self) -> None:
        counters = self.meta_step.counters()
        worst, skipped = (int(v) for v in torch.stack([counters["bad_run_max"], counters["skipped_steps"]]).tolist())
        counters["bad_run_max"].copy_(counters["bad_run"])
        if worst > self.max_bad_steps:
            raise NonFiniteLossError(
                f"the meta-loss or meta-gradient was NaN/inf for {worst} consecutive steps (more than "
                f"max_bad_steps={self.max_bad_steps}; {skipped} skipped in total) at iteration {self.iteration}. "
                "Training stopped without writing a checkpoint: the last good one is "
                + (str(self.logdir / CHECKPOINT_NAME) if self.logdir is not None else "(none: no logdir)")
                + ". Lower the learning rates, clip the meta-gradient (--clip-norm/--clip-value) or check the data.")

    def _in_bad_run(self) -> bool:
        return bool(self.meta_step.bad_run.item() > 0)

    # ------------------------------------------------------------------------------ metrics
    def _reset_accumulators(self):
        self._sums: dict[str, torch.Tensor] = {}
        self._count = torch.zeros((), device=self.device)
        self._acc_phase = None
        self._acc_steps = 0
        self._acc_start_time = time.monotonic()

    def _accumulate(self, phase, metrics, found_inf):
        if self._acc_phase is not None and phase != self._acc_phase:
            self._flush()
        self._acc_phase = phase
        good = 1.0 - found_inf
        for key, value in metrics.items():
            value = torch.where(found_inf > 0, torch.zeros_like(value), value)
            self._sums[key] = self._sums[key] + value if key in self._sums else value
        self._count = self._count + good
        self._acc_steps += 1

    def _flush(self) -> dict | None:
        """Read the interval's means from the device (one transfer) and log them."""
        if self._acc_steps == 0:
            return None
        keys = list(self._sums)
        sizes = [self._sums[k].numel() for k in keys]
        flat = torch.cat([self._sums[k].double().reshape(-1) for k in keys]
                         + [self._count.double().reshape(1), self.meta_step.skipped.double().reshape(1)]).cpu().tolist()
        count, skipped = flat[-2], int(flat[-1])
        values, offset = {}, 0
        for key, size in zip(keys, sizes):
            chunk = flat[offset:offset + size]
            offset += size
            values[key] = [None if count == 0 or not math.isfinite(v / count) else v / count for v in chunk]
        now = time.monotonic()
        record = {"kind": "train", "iteration": self.iteration, "phase": self._acc_phase,
                  "elapsed_s": round(self.elapsed_s + (now - self._run_start), 3),
                  "steps_per_s": self._acc_steps / max(now - self._acc_start_time, 1e-9), "lr": self.lr,
                  "meta_loss": values.pop("meta_loss")[0], "grad_norm": values.pop("grad_norm")[0],
                  **{k: values.get(k, []) for k in METRIC_KEYS},
                  "steps_in_record": self._acc_steps, "skipped_in_record": self._acc_steps - int(round(count)),
                  "skipped_steps": skipped}
        self._write_record(record)
        self._reset_accumulators()
        self.last_record = record
        return record

    def _write_record(self, record: dict) -> None:
        if self._bar is not None:
            post = {"loss": f"{record['meta_loss']:.3f}" if record["meta_loss"] is not None else "nan"}
            query, support = record.get("query_accuracy") or [], record.get("support_accuracy") or []
            if query and query[-1] is not None:
                # pre-update accuracy: on the query set if measured, else on the support set
                pre = query[0] if len(query) > 1 and query[0] is not None else (support[0] if support else None)
                post["acc"] = f"{query[-1]:.3f}" if pre is None else f"{pre:.3f}->{query[-1]:.3f}"
            if record.get("skipped_steps"):
                post["skipped"] = record["skipped_steps"]
            self._bar.set_postfix(post, refresh=False)
        if not (self.log and self.dist.is_main and self.logdir is not None):
            return
        with open(self.logdir / METRICS_NAME, "a") as file:
            file.write(json.dumps(record) + "\n")
        writer = self._tensorboard()
        if writer is None:
            return
        step = record["iteration"]
        if record["kind"] == "val":
            for name in ("accuracy_mean", "loss_mean"):
                for k, value in enumerate(record.get(name) or []):
                    writer.add_scalar(f"val/{name.replace('_mean', '')}_after_{k}_steps", value, step)
        else:
            phase = record["phase"]
            for name in ("meta_loss", "grad_norm", "lr", "steps_per_s"):
                if record.get(name) is not None:
                    writer.add_scalar(f"{phase}/{name}", record[name], step)
            for key in METRIC_KEYS:
                for k, value in enumerate(record.get(key) or []):
                    if value is None:
                        continue
                    # support metrics: before inner step k+1 (k = 0: pre-update); query: after k steps
                    tag = f"{key}_before_step_{k + 1}" if key.startswith("support") else f"{key}_after_{k}_steps"
                    writer.add_scalar(f"{phase}/{tag}", value, step)
        writer.flush()

    def _tensorboard(self):
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional; metrics.jsonl has everything
                self._writer = False
                return None
            self._writer = SummaryWriter(str(self.logdir / TENSORBOARD_DIR), purge_step=self.iteration + 1)
        return self._writer or None

    def _validate(self) -> None:
        from .evaluation import evaluate
        def validate_on_main():
            if self.val_source is not None:
                result = evaluate(self.learner, self.val_source, self.val_episodes, seed=self.val_seed,
                                  graphs=self.graphed_eval)
                self._write_record({"kind": "val", "iteration": self.iteration, **result.to_dict()})

        # (the other ranks wait; an error on rank 0 stops them all)
        self.dist.run_on_main(f"validating at iteration {self.iteration}", validate_on_main)

    # ------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "iteration": self.iteration,
            "elapsed_s": self.elapsed_s,
            "learner": self.learner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.source.state_dict(),
            "rng": rng_state(),
            "counters": {"skipped_steps": float(self.meta_step.skipped), "bad_run": float(self.meta_step.bad_run)},
            # the metrics of the iterations since the last logged record: a resumed run logs the
            # same means whether or not checkpoint_every is a multiple of log_every
            "metrics": {"sums": dict(self._sums), "count": self._count, "steps": self._acc_steps,
                        "phase": self._acc_phase},
            "trainer": {"iterations": self.iterations, "pretrain_iterations": self.pretrain_iterations,
                        "meta_lr": self.meta_lr, "cosine": self.cosine, "min_lr_ratio": self.min_lr_ratio,
                        "clip_value": self.clip_value, "clip_norm": self.clip_norm,
                        "world_size": self.dist.world_size},
            "config": self.config,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not a maml_fast Trainer checkpoint (format {CHECKPOINT_FORMAT})")
        self.learner.load_state_dict(state["learner"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.graphed_step is not None:  # the graphs point at the replaced optimizer state
            self.graphed_step.reset()
        self.scheduler.load_state_dict(state["scheduler"])
        self.source.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        self.iteration = int(state["iteration"])
        self.elapsed_s = float(state.get("elapsed_s", 0.0))
        counters = state.get("counters", {})
        self.meta_step.skipped.fill_(counters.get("skipped_steps", 0.0))
        self.meta_step.bad_run.fill_(counters.get("bad_run", 0.0))
        self.meta_step.bad_run_max.copy_(self.meta_step.bad_run)
        self._reset_accumulators()
        metrics = state.get("metrics")
        if metrics:
            self._sums = {key: value.to(self.device) for key, value in metrics["sums"].items()}
            self._count = metrics["count"].to(self.device)
            self._acc_steps, self._acc_phase = int(metrics["steps"]), metrics["phase"]

    def save_checkpoint(self, path: str | Path | None = None) -> Path | None:
        """Write the checkpoint atomically (rank 0; every rank waits for it). Returns its path.
        Without `path`: ``logdir/checkpoint.pt``, the one it replaces kept as ``checkpoint.prev.pt``
        (`CheckpointWriteError` when the write fails, both files left as they were)."""
        if path is None and self.logdir is None:
            return None
        path = self.logdir / CHECKPOINT_NAME if path is None else Path(path)

        def write_on_main():
            state = self.state_dict()
            if self._files is not None and path == self._files.latest:
                self._files.save(state)
            else:
                atomic_save(state, path)
            if self.keep_checkpoints:
                atomic_save(state, path.with_name(f"checkpoint_{self.iteration:07d}.pt"))

        # Every rank waits for rank 0's write; a CheckpointWriteError there stops every rank (the others
        # raise one that says rank 0 failed) instead of leaving them at a barrier.
        self.dist.run_on_main(f"writing the checkpoint {path} at iteration {self.iteration}", write_on_main,
                              CheckpointWriteError)
        return path

    def load_checkpoint(self, path: str | Path, checkpoint: dict | None = None) -> None:
        """Continue from a checkpoint (`checkpoint`: its contents, already read from `path`): the next
        iterations repeat those of the run that wrote it. Records of ``metrics.jsonl`` past the
        checkpoint (logged before a crash) are dropped."""
        self.load_state_dict(load_checkpoint(path) if checkpoint is None else checkpoint)
        if self._files is not None:
            self._files.mark_resumed(path)
        metrics = None if self.logdir is None else self.logdir / METRICS_NAME
        if metrics is not None and metrics.is_file() and self.dist.is_main:
            kept = []
            for line in metrics.read_text().splitlines():
                try:
                    if json.loads(line).get("iteration", 0) <= self.iteration:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue
            tmp = metrics.with_name(metrics.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, metrics)

    # ------------------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        """Run the remaining iterations (or until ``time_limit``); checkpoint; return a summary."""
        from tqdm.auto import tqdm

        self.learner.train()
        self.last_record = None
        if self.logdir is not None and self.dist.is_main:
            self.logdir.mkdir(parents=True, exist_ok=True)
            if self.iteration == 0:  # a fresh run: no records of an earlier one
                (self.logdir / METRICS_NAME).unlink(missing_ok=True)
            self._files.remove_stale_temporaries()  # left by a process killed mid-write
        start_iteration = self.iteration
        call_start = self._run_start = self._acc_start_time = time.monotonic()
        stopped = "completed"
        show = self.progress and self.dist.is_main and self.iteration < self.total_iterations
        self._bar = tqdm(total=self.total_iterations, initial=self.iteration, unit="step",
                         desc="pretrain" if self._phase(self.iteration) == "pretrain" else "meta-train",
                         dynamic_ncols=True, smoothing=0.05, mininterval=0.5) if show else None
        checkpoint = None
        try:
            while self.iteration < self.total_iterations:
                self._step()
                if self._bar is not None:
                    self._bar.update(1)
                    desc = "pretrain" if self._phase(self.iteration) == "pretrain" else "meta-train"
                    if desc != self._bar.desc:
                        self._bar.set_description(desc)
                done = self.iteration >= self.total_iterations
                boundary = self.iteration % self._check_every == 0 or done
                if boundary or self.iteration % self.checkpoint_every == 0:
                    self._check_bad_steps()
                if self.iteration % self.log_every == 0 or done:
                    self._flush()
                if self.val_every and (self.iteration % self.val_every == 0 or done):
                    self._validate()
                over_time = False
                if self.time_limit is not None and not done and (boundary or not self.dist.active):
                    over_time = time.monotonic() - call_start >= self.time_limit
                    over_time = self.dist.any(over_time) if self.dist.active else over_time
                if over_time:
                    stopped = "time_limit"
                    self._flush()
                if (self.iteration % self.checkpoint_every == 0 or done or over_time) and not self._in_bad_run():
                    # (during a run of skipped steps no checkpoint is written: the last good one stays)
                    self.elapsed_s += time.monotonic() - self._run_start
                    self._run_start = time.monotonic()
                    checkpoint = self.save_checkpoint()
                if over_time:
                    break
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            if self._writer:
                self._writer.flush()
        self.elapsed_s += time.monotonic() - self._run_start
        wall = time.monotonic() - call_start
        run = self.iteration - start_iteration
        return TrainResult(self.iteration, run, stopped, wall, run / max(wall, 1e-9), int(float(self.meta_step.skipped)),
                           self.last_record, checkpoint)

    def close(self) -> None:
        if self._writer:
            self._writer.close()
        self._writer = None
