"""The meta-learner: MAML and its family (FOMAML, ANIL, Meta-SGD, MAML++) over one inner loop.

``learner(batch)`` runs the inner loop of every task (`maml_fast.inner_loop`) on the chosen backend
(`maml_fast.backends`) and returns the meta-loss, the mean over tasks of the query loss after K steps
(MAML++'s multi-step loss: a weighted sum over the steps, `maml_fast.maml_plus_plus`).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import backends
from .checks import check_choice, check_int, check_number
from .inner_loop import CheckedLoss, InnerLoop, MetaTensors, ParameterLayout
from .maml_plus_plus import (INNER_LR_MODES, PerStepBatchNormStatistics, annealed_loss_weights, learned_inner_lrs,
                             per_step_batch_norm_weights)
from .ops.losses import LOSSES
from .ops.task_broadcast import broadcast_over_tasks
from .task_batch import TaskBatch

INNER_LOSS_CONVENTIONS = ("mean", "reference")


@dataclass
class MAMLOutput:
    """``loss``: the meta-loss (scalar, differentiable in the meta-parameters).
    ``metrics``: detached tensors on the batch's device, means over tasks —
    ``support_loss`` / ``support_accuracy`` ``[K]`` (before each inner step) and ``query_loss`` /
    ``query_accuracy`` ``[K+1]`` (after 0..K steps; entries not computed are NaN). Accuracies only
    for classification. ``query_loss_per_task``: ``[T]`` after the last step, detached.
    ``per_task_metrics``: the same keys as ``metrics`` before the mean over tasks (``[K, T]`` /
    ``[K+1, T]``)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    query_loss_per_task: torch.Tensor
    per_task_metrics: dict[str, torch.Tensor]


@dataclass
class FastWeights:
    """Per-task adapted parameters ``{name: [T, ...]}`` of every network parameter, after ``steps``."""

    params: dict[str, torch.Tensor]
    steps: int
    example_shape: tuple[int, ...]
    num_tasks: int = field(init=False)

    def __post_init__(self):
        self.num_tasks = next(iter(self.params.values())).shape[0]


class MAML(nn.Module):
    """Model-Agnostic Meta-Learning over a whole meta-batch at once.

    Args:
        model: the network (any `nn.Module`; `nn.Sequential`s of supported layers run task-batched).
            BatchNorm layers are switched to per-task batch statistics (``track_running_stats=False``).
        inner_lr: α, the inner-loop step size (initial value when learned).
        inner_steps: K, inner steps in training; ``eval_inner_steps`` (default K) in eval mode.
        first_order: FOMAML (the inner gradient is treated as a constant).
        first_order_iterations: MAML++ derivative-order annealing: first order for the first N
            training iterations, then second order.
        backend: "auto" or a name of `maml_fast.backends.backend_names()` ("loop", "vmap", "torch",
            "fused", "triton").
        adapt: which parameters adapt in the inner loop: None (all), an iterable of parameter names,
            or a predicate ``name -> bool`` (ANIL: the head only).
        adapt_bn_affine: adapt BatchNorm/LayerNorm/GroupNorm weights and biases (the reference code
            does not: pass False).
        inner_lr_mode: "fixed"; "per_layer_per_step" (MAML++ LSLR: a learned α per parameter tensor and
            step); "per_element" (Meta-SGD: a learned α of each parameter's shape).
        multi_step_loss_iterations: MAML++ multi-step loss: for the first N training iterations the
            meta-loss weights the query loss after every step (`multi_step_loss_weights`).
        per_step_bn: MAML++ per-step BatchNorm weights and biases (meta-learned, never adapted).
        per_step_bn_statistics: MAML++ per-step BatchNorm running statistics, recorded in training and
            used in eval mode instead of the batch statistics (`PerStepBatchNormStatistics`).
        inner_loss: "mean" (mean over the support examples, default) or "reference" — the paper code's
            sum(CE)/K, which for N-way classification is N x the mean: α_reference = α_mean / N.
        loss: "cross_entropy" | "mse" | None (chosen by the label dtype).
        checkpoint_inner_steps: recompute each inner step in the backward instead of storing its graph.
        step_metrics: also evaluate the query loss after each intermediate step (no grad) for metrics.
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.4, inner_steps: int = 1, *,
                 eval_inner_steps: int | None = None, first_order: bool = False, first_order_iterations: int = 0,
                 backend: str = "auto", adapt: Iterable[str] | Callable[[str], bool] | None = None,
                 adapt_bn_affine: bool = True, inner_lr_mode: str = "fixed", multi_step_loss_iterations: int = 0,
                 per_step_bn: bool = False, per_step_bn_statistics: bool = False, inner_loss: str = "mean",
                 loss: str | None = None, checkpoint_inner_steps: bool = False, step_metrics: bool = True):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.inner_lr = check_number("inner_lr", inner_lr)
        self.inner_steps = check_int("inner_steps", inner_steps)
        self.eval_inner_steps = check_int("eval_inner_steps", inner_steps if eval_inner_steps is None else eval_inner_steps)
        self.first_order_iterations = check_int("first_order_iterations", first_order_iterations)
        self.multi_step_loss_iterations = check_int("multi_step_loss_iterations", multi_step_loss_iterations)
        check_choice("inner_lr_mode", inner_lr_mode, INNER_LR_MODES)
        check_choice("inner_loss", inner_loss, INNER_LOSS_CONVENTIONS)
        check_choice("loss", loss, (None, *LOSSES))
        if backend != "auto":
            backends.get_backend(backend)
        max_steps = max(self.inner_steps, self.eval_inner_steps)
        if inner_lr_mode == "per_layer_per_step" and max_steps == 0:
            raise ValueError("inner_lr_mode='per_layer_per_step' needs inner_steps >= 1")

        self.model = model
        _use_batch_statistics(model)
        self.first_order, self.backend = bool(first_order), backend
        self.inner_loss, self.loss_name = inner_loss, loss
        self.checkpoint_inner_steps, self.step_metrics = bool(checkpoint_inner_steps), bool(step_metrics)
        self.register_buffer("meta_iteration", torch.zeros((), dtype=torch.long))
        # A host mirror of meta_iteration: reading the buffer would synchronise with the device in
        # every step (and freeze inside a CUDA graph).
        self._iteration = 0
        # Label-range checks read the labels back to the host; a graph-captured step turns them off.
        self.host_checks = True

        named = dict(model.named_parameters())
        norm_params = _norm_parameter_names(model)
        # Per-step BN weights are meta-parameters indexed by step, never adapted (as in MAML++).
        bn_params = _norm_parameter_names(model, batch_norm_only=True) if per_step_bn else set()
        if per_step_bn and not bn_params:
            raise ValueError("per_step_bn=True but the model has no BatchNorm affine parameters")
        self.adapted_names = [n for n in named if _selected(n, adapt, named) and n not in bn_params
                              and (adapt_bn_affine or n not in norm_params)]
        if not self.adapted_names and max_steps > 0:
            raise ValueError("adapt selects no parameter of the model: nothing would adapt in the inner loop")
        self.per_step_bn_names = [n for n in named if n in bn_params]
        if inner_lr_mode != "fixed":
            self.inner_lrs = learned_inner_lrs(inner_lr_mode, [named[n] for n in self.adapted_names],
                                               self.inner_steps, self.inner_lr)
        if per_step_bn:
            self.per_step_bn = per_step_batch_norm_weights([named[n] for n in self.per_step_bn_names], max_steps)
        statistics = PerStepBatchNormStatistics(self, model, max_steps) if per_step_bn_statistics else None
        self.per_step_bn_statistics = per_step_bn_statistics
        self.layout = ParameterLayout(
            tuple(self.adapted_names), tuple(n for n in named if n not in self.adapted_names and n not in bn_params),
            tuple(self.per_step_bn_names), inner_lr_mode, statistics)
        self._executions: dict[tuple[str, bool], backends.Execution] = {}

    @property
    def inner_lr_mode(self) -> str:
        return self.layout.inner_lr_mode

    # ----------------------------------------------------------------- public API
    def forward(self, batch: TaskBatch, *, steps: int | None = None, inner_lr: float | None = None) -> MAMLOutput:
        """One meta-step's forward: inner loop per task and the query (meta-)loss. ``steps`` and
        ``inner_lr`` override the mode's step count and the fixed step size for this call."""
        if not isinstance(batch, TaskBatch):
            raise TypeError(f"batch must be a maml_fast.TaskBatch, got {type(batch).__name__}")
        steps, second_order, weights = self.schedule(steps)
        meta_grad = torch.is_grad_enabled()
        loop = self._inner_loop(batch.support_y, batch.query_y, steps, inner_lr, second_order and meta_grad, meta_grad)
        parts = []
        for group in loop.execution.task_groups(batch.num_tasks):
            fast, update_from = self._initial_fast_weights(group.stop - group.start, meta_grad)
            theta = self._adapted_theta() if meta_grad else None
            parts.append(loop.run(fast, batch.support_x[group], batch.support_y[group], batch.query_x[group],
                                  batch.query_y[group], weights, update_from, theta)[1])
        rows = parts[0]["metric_rows"] if len(parts) == 1 else torch.cat([p["metric_rows"] for p in parts], dim=-1)
        objective = parts[0]["objective"] if len(parts) == 1 else torch.cat([p["objective"] for p in parts])
        if self.training:
            if self.layout.bn_statistics is not None:
                self.layout.bn_statistics.update()
            self.meta_iteration += 1
            self._iteration += 1
        # (the metrics of all keys in one mean: each key's rows are a range of metric_rows)
        keys = [key for key in parts[0] if key not in ("metric_rows", "objective")]
        sizes = [parts[0][key].shape[0] for key in keys]
        per_task = dict(zip(keys, rows.split(sizes)))
        metrics = dict(zip(keys, rows.mean(-1).split(sizes)))
        return MAMLOutput(objective.mean(), metrics, per_task["query_loss"][-1].detach(), per_task)

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int | None = None,
              inner_lr: float | None = None) -> FastWeights:
        """Per-task fast weights after ``steps`` inner steps (default: the eval step count), detached."""
        steps = check_int("steps", self.eval_inner_steps if steps is None else steps)
        # (the value scan reads the device: off with the other host checks, e.g. in a graph's capture)
        batch = TaskBatch(support_x, support_y, support_x, support_y, check_values=self.host_checks)
        loop = self._inner_loop(support_y, None, steps, inner_lr, second_order=False, meta_grad=False)
        adapted = []
        for group in loop.execution.task_groups(batch.num_tasks):
            tasks = group.stop - group.start
            fast, _ = loop.run(self._initial_fast_weights(tasks, False)[0], support_x[group], support_y[group])
            adapted.append(self.layout.params_at(fast, self._meta_tensors(), steps, tasks, loop.running_statistics))
        params = {n: torch.cat([a[n] for a in adapted]).detach() for n in adapted[0]}
        return FastWeights(params, steps, tuple(support_x.shape[2:]))

    def predict(self, fast: FastWeights, query_x: torch.Tensor) -> torch.Tensor:
        """Outputs ``[T, Q, ...]`` of each task's adapted network on ``query_x [T, Q, ...]``."""
        if not isinstance(fast, FastWeights):
            raise TypeError(f"fast must be the FastWeights returned by adapt(), got {type(fast).__name__}")
        if not isinstance(query_x, torch.Tensor) or query_x.dim() < 3:
            raise ValueError("query_x must be a tensor of shape [tasks, examples, *features]")
        if query_x.shape[0] != fast.num_tasks:
            raise ValueError(f"query_x has {query_x.shape[0]} tasks but fast holds {fast.num_tasks}")
        if tuple(query_x.shape[2:]) != fast.example_shape:
            raise ValueError(f"query_x has examples of shape {tuple(query_x.shape[2:])} but the support set "
                             f"they were adapted on had {fast.example_shape}")
        execution = self._execution(query_x.device)
        return torch.cat([execution.forward({n: p[g] for n, p in fast.params.items()}, query_x[g])
                          for g in execution.task_groups(fast.num_tasks)])

    def schedule(self, steps: int | None = None) -> tuple[int, bool, tuple]:
        """(inner steps, second order?, multi-step loss weights) for the current mode and iteration;
        ``steps`` overrides the mode's step count. While MAML++'s weights anneal they change every
        iteration and are 0-dim device tensors computed from ``meta_iteration`` (no host read)."""
        steps, second_order = self._steps_and_order(steps)
        if self._annealing(steps):
            weights = annealed_loss_weights(steps, self.meta_iteration, self.multi_step_loss_iterations)
        else:
            weights = [0.0] * max(steps - 1, 0) + [1.0]
        return steps, second_order, tuple(weights)

    def _steps_and_order(self, steps: int | None = None) -> tuple[int, bool]:
        steps = (self.inner_steps if self.training else self.eval_inner_steps) if steps is None else check_int("steps", steps)
        second_order = not self.first_order and not (self.training and self._iteration < self.first_order_iterations)
        return steps, second_order

    def _annealing(self, steps: int) -> bool:
        """MAML++ multi-step loss weights still annealing (every step's query loss weighs in)."""
        return bool(self.training and self.multi_step_loss_iterations and steps > 1
                    and self._iteration < self.multi_step_loss_iterations)

    def graph_key(self):
        """What a captured step depends on besides the input shapes (`maml_fast.cuda_graph`): the step
        count, the derivative order and the loss weights, or while they anneal only that they do (they
        are computed on the device then)."""
        steps, second_order = self._steps_and_order()
        return steps, second_order, "annealing" if self._annealing(steps) else self.schedule()[2]

    def on_graph_replay(self) -> None:
        """A captured training step was replayed: advance the host iteration count as forward would."""
        if self.training:
            self._iteration += 1

    @property
    def fallback_reason(self) -> str | None:
        """Why the network runs through torch.func.vmap instead of the task-batched program (or None)."""
        return next((e.fallback_reason for e in self._executions.values() if e.fallback_reason), None)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._iteration = int(self.meta_iteration)

    # ----------------------------------------------------------------- internals
    def _execution(self, device, backend: backends.Backend | None = None) -> backends.Execution:
        """How the network runs on `backend` (default: what ``backend=`` resolves to on `device`), lowered
        once per mode (a traced forward keeps what it read of ``training``, e.g. a functional dropout's flag)."""
        backend = backend or backends.resolve_backend(self.backend, device)
        key = (backend.name, self.model.training)
        if key not in self._executions:
            execution = backend.execution(self.model)
            if execution.fallback_reason and self.fallback_reason is None:
                warnings.warn(f"maml_fast: {execution.fallback_reason}; this network runs through torch.func.vmap "
                              "instead", stacklevel=4)
            self._executions[key] = execution
        return self._executions[key]

    def _inner_loop(self, support_y, query_y, steps: int, inner_lr: float | None, second_order: bool,
                    meta_grad: bool) -> InnerLoop:
        if inner_lr is not None and self.inner_lr_mode != "fixed":
            raise ValueError(f"inner_lr= overrides the fixed step size; this learner learns its step sizes "
                             f"(inner_lr_mode={self.inner_lr_mode!r})")
        backend = backends.resolve_backend(self.backend, support_y.device)
        return InnerLoop(
            self.layout, self._meta_tensors() if meta_grad else self._meta_tensors().detached(),
            execution=self._execution(support_y.device, backend), update=backend.fast_weight_update,
            loss=CheckedLoss(backend.losses[self._loss_name(support_y)], support_y, query_y, self.host_checks),
            steps=steps, inner_lr=self.inner_lr if inner_lr is None else check_number("inner_lr", inner_lr),
            second_order=second_order, reference_inner_loss=self.inner_loss == "reference",
            checkpoint=self.checkpoint_inner_steps and meta_grad, step_metrics=self.step_metrics,
            record_statistics=self.training and self.layout.bn_statistics is not None and query_y is not None,
            running_statistics=not self.training and self.layout.bn_statistics is not None)

    def _loss_name(self, labels) -> str:
        name = self.loss_name or ("mse" if labels.is_floating_point() else "cross_entropy")
        if name == "cross_entropy" and labels.is_floating_point():
            raise TypeError(f"support_y must hold integer class labels for cross_entropy, got dtype {labels.dtype}")
        if name == "mse" and not labels.is_floating_point():
            raise TypeError(f"support_y must hold floating targets for mse, got dtype {labels.dtype}")
        return name

    def _initial_fast_weights(self, tasks: int, meta_grad: bool) -> tuple[list[torch.Tensor], list | None]:
        """(θ expanded over the tasks, the views of θ the first update reads, `broadcast_over_tasks`'
        second use); when only adapting, (detached copies that take an inner gradient, None)."""
        theta = self._adapted_theta()
        if meta_grad:
            return broadcast_over_tasks(theta, tasks, uses=2)
        return [p.detach().expand(tasks, *p.shape).clone().requires_grad_() for p in theta], None

    def _adapted_theta(self) -> list[torch.Tensor]:
        """θ of the adapted parameters, in `adapted_names`' order."""
        theta = dict(self.model.named_parameters())
        return [theta[n] for n in self.adapted_names]

    def _meta_tensors(self) -> MetaTensors:
        theta = dict(self.model.named_parameters())
        return MetaTensors(tuple(theta[n] for n in self.layout.frozen),
                           tuple(self.per_step_bn) if self.per_step_bn_names else (),
                           tuple(self.inner_lrs) if self.inner_lr_mode != "fixed" else ())


def _selected(name, adapt, named) -> bool:
    if adapt is None:
        return True
    if callable(adapt):
        return bool(adapt(name))
    names = set(adapt)
    unknown = names - set(named)
    if unknown:
        raise ValueError(f"adapt names parameters the model does not have: {sorted(unknown)}")
    return name in names


def _norm_parameter_names(model: nn.Module, batch_norm_only: bool = False) -> set[str]:
    kinds = (nn.modules.batchnorm._BatchNorm,) if batch_norm_only else (
        nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
    return {f"{mod_name}.{p}" if mod_name else p
            for mod_name, mod in model.named_modules() if isinstance(mod, kinds)
            for p, _ in mod.named_parameters(recurse=False)}


def _use_batch_statistics(model: nn.Module) -> None:
    """MAML normalises with each task's batch statistics; running statistics would be shared across
    tasks and updated T times per step, so they are dropped (as torch.func's MAML example does)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            warnings.warn(f"maml_fast: {type(module).__name__} switched to per-task batch statistics "
                          "(track_running_stats=False)", stacklevel=3)
            module.track_running_stats = False
            module.running_mean = module.running_var = module.num_batches_tracked = None
