"""The meta-learner: MAML and its family (FOMAML, ANIL, Meta-SGD, MAML++) over one inner-loop engine.

One meta-step for T tasks (second order by default):

    fast_0 = θ expanded to [T, ...]                              (no copy)
    for k < K:  g_k = ∇ Σ_t L_support,t(fast_k)                  (create_graph for second order)
                fast_{k+1} = fast_k − α_k ⊙ g_k
    loss = mean_t L_query,t(fast_K)        (MAML++ multi-step loss: Σ_k w_k mean_t L_query,t(fast_k))

The engine is written once over a "forward" that maps per-task parameters ``{name: [T, ...]}`` and
task-major inputs ``[T, B, ...]`` to task-major outputs. Backends differ only in that forward:
``"torch"`` runs the lowered task-batched program (one op per layer for all tasks), ``"vmap"`` runs
``torch.func.vmap`` over the module, and ``"loop"`` runs the whole engine once per task with plain
per-task PyTorch (the baseline and the reference).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn
from torch.func import functional_call

from . import backends, cuda_backend
from .ops.fast_weight_update import fast_weight_update
from .ops.losses import LOSSES, per_task_loss
from .program import lower
from .task_batch import TaskBatch, check_labels

INNER_LR_MODES = ("fixed", "per_layer_per_step", "per_element")
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


def _check_nonneg_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def multi_step_loss_weights(steps: int, iteration: int, anneal_iterations: int) -> list[float]:
    """MAML++ multi-step loss importance: every step starts at 1/K; the non-final weights decay
    linearly to 0.03/K over ``anneal_iterations`` and the final step takes the rest. After
    ``anneal_iterations`` only the final step counts (as in MAML++)."""
    if iteration >= anneal_iterations:
        return [0.0] * (steps - 1) + [1.0]
    decay = iteration / (steps * anneal_iterations)
    non_final = [max(1.0 / steps - decay, 0.03 / steps)] * (steps - 1)
    return non_final + [1.0 - sum(non_final)]


class _CheckpointedInnerStep(torch.autograd.Function):
    """One inner step that keeps no graph: its backward recomputes the step (with the graph for the
    second-order terms) and returns the vector-Jacobian product. Memory for K steps is then the
    fast weights per step plus one step's graph, not K graphs."""

    @staticmethod
    def forward(ctx, step_fn, num_fast, create_graph, *tensors):
        ctx.step_fn, ctx.num_fast, ctx.create_graph = step_fn, num_fast, create_graph
        ctx.save_for_backward(*tensors)
        with torch.enable_grad():
            inputs = _fresh_inputs(tensors, num_fast)
            new_fast, loss, accuracy = step_fn(inputs[:num_fast], inputs[num_fast:], False)
        loss = loss.detach()
        accuracy = loss.new_full(loss.shape, math.nan) if accuracy is None else accuracy
        ctx.mark_non_differentiable(loss, accuracy)
        return (*[f.detach() for f in new_fast], loss, accuracy)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_outputs):
        tensors = ctx.saved_tensors
        with torch.enable_grad():
            inputs = _fresh_inputs(tensors, ctx.num_fast)
            new_fast, _, _ = ctx.step_fn(inputs[:ctx.num_fast], inputs[ctx.num_fast:], ctx.create_graph)
            wrt = [i for i in inputs if i.requires_grad]
            grads = iter(torch.autograd.grad(new_fast, wrt, grad_outputs[:len(new_fast)], allow_unused=True))
        return (None, None, None, *[next(grads) if i.requires_grad else None for i in inputs])


def _fresh_inputs(tensors, num_fast):
    # Fast weights always need a gradient (the inner gradient is taken w.r.t. them).
    return [t.detach().requires_grad_(i < num_fast or t.requires_grad) for i, t in enumerate(tensors)]


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
        backend: "auto" | "torch" | "vmap" | "loop" (and fused backends when registered).
        adapt: which parameters adapt in the inner loop: None (all), an iterable of parameter names,
            or a predicate ``name -> bool`` (ANIL: the head only).
        adapt_bn_affine: adapt BatchNorm/LayerNorm/GroupNorm weights and biases (the reference code
            does not: pass False).
        inner_lr_mode: "fixed"; "per_layer_per_step" (MAML++ LSLR: a learned α per parameter tensor and
            step); "per_element" (Meta-SGD: a learned α of each parameter's shape).
        multi_step_loss_iterations: MAML++ multi-step loss: for the first N training iterations the
            meta-loss weights the query loss after every step (`multi_step_loss_weights`).
        per_step_bn: MAML++ per-step BatchNorm weights and biases: inner step k (and the query after k
            steps) uses copy k; these are meta-learned, never adapted.
        per_step_bn_statistics: MAML++ per-step BatchNorm running statistics: training records, for
            every inner step k, the support set's batch statistics at the step-k fast weights (mean over
            tasks, momentum of the BN layer); in eval mode step k normalises with them instead of the
            batch statistics. Off: BN always uses each task's batch statistics (transductive).
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
                 loss: str | None = None,
                 checkpoint_inner_steps: bool = False, step_metrics: bool = True):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(inner_lr, bool) or not isinstance(inner_lr, (int, float)) or not math.isfinite(inner_lr) or inner_lr < 0:
            raise ValueError(f"inner_lr must be a finite non-negative number, got {inner_lr!r}")
        _check_nonneg_int("inner_steps", inner_steps)
        eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        _check_nonneg_int("eval_inner_steps", eval_inner_steps)
        _check_nonneg_int("first_order_iterations", first_order_iterations)
        _check_nonneg_int("multi_step_loss_iterations", multi_step_loss_iterations)
        for name, value, choices in (("inner_lr_mode", inner_lr_mode, INNER_LR_MODES),
                                     ("inner_loss", inner_loss, INNER_LOSS_CONVENTIONS),
                                     ("loss", loss, (None, *LOSSES))):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        if backend != "auto" and backend not in backends.backend_names():
            raise ValueError(f"backend must be 'auto' or one of {backends.backend_names()}, got {backend!r}")
        if inner_lr_mode == "per_layer_per_step" and max(inner_steps, eval_inner_steps) == 0:
            raise ValueError("inner_lr_mode='per_layer_per_step' needs inner_steps >= 1")

        self.model = model
        _use_batch_statistics(model)
        self.inner_lr = float(inner_lr)
        self.inner_steps, self.eval_inner_steps = inner_steps, eval_inner_steps
        self.first_order, self.first_order_iterations = bool(first_order), first_order_iterations
        self.backend = backend
        self.inner_lr_mode, self.inner_loss, self.loss_name = inner_lr_mode, inner_loss, loss
        self.multi_step_loss_iterations = multi_step_loss_iterations
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
        if not self.adapted_names and max(inner_steps, eval_inner_steps) > 0:
            raise ValueError("adapt selects no parameter of the model: nothing would adapt in the inner loop")
        max_steps = max(inner_steps, eval_inner_steps)
        if inner_lr_mode == "per_layer_per_step":
            self.inner_lrs = nn.ParameterList(
                [nn.Parameter(torch.full((max(inner_steps, 1),), self.inner_lr, dtype=named[n].dtype, device=named[n].device))
                 for n in self.adapted_names])
        elif inner_lr_mode == "per_element":
            self.inner_lrs = nn.ParameterList(
                [nn.Parameter(torch.full_like(named[n], self.inner_lr)) for n in self.adapted_names])
        self.per_step_bn_names = []
        if per_step_bn:
            self.per_step_bn_names = [n for n in named if n in bn_params]
            self.per_step_bn = nn.ParameterList(
                [nn.Parameter(named[n].detach().unsqueeze(0).repeat(max_steps + 1, *[1] * named[n].dim()))
                 for n in self.per_step_bn_names])
        self.per_step_bn_statistics = bool(per_step_bn_statistics)
        self._bn_layers = {}
        if per_step_bn_statistics:
            self._bn_layers = {name: mod for name, mod in model.named_modules()
                               if isinstance(mod, nn.modules.batchnorm._BatchNorm)}
            if not self._bn_layers:
                raise ValueError("per_step_bn_statistics=True but the model has no BatchNorm layer")
            reference = next(model.parameters())
            for i, (name, mod) in enumerate(self._bn_layers.items()):
                stats_shape = (max_steps + 1, mod.num_features)
                self.register_buffer(f"bn_step_mean_{i}", reference.new_zeros(stats_shape))
                self.register_buffer(f"bn_step_var_{i}", reference.new_ones(stats_shape))
                mod.register_forward_pre_hook(self._bn_statistics_hook(name))
        self._statistics_sink: list | None = None
        self._bn_statistic_sums: dict = {}
        self._programs: dict[str, object] = {}
        self._compiled_update = False
        self._fallback_reason: str | None = None

    # ----------------------------------------------------------------- public API
    def forward(self, batch: TaskBatch) -> MAMLOutput:
        """One meta-step's forward: inner loop per task and the query (meta-)loss."""
        if not isinstance(batch, TaskBatch):
            raise TypeError(f"batch must be a maml_fast.TaskBatch, got {type(batch).__name__}")
        loss_fn = self._loss_fn(batch.support_y)
        steps, second_order, weights = self._schedule()
        meta_grad = torch.is_grad_enabled()
        self._bn_statistic_sums = {}
        result = self._run(batch.support_x, batch.support_y, batch.query_x, batch.query_y, steps,
                           second_order and meta_grad, loss_fn, weights, meta_grad)
        if self.training:
            self._update_bn_statistics()
            self.meta_iteration += 1
            self._iteration += 1
        per_task = {key: result[key] for key in ("support_loss", "support_accuracy", "query_loss", "query_accuracy")
                    if key in result}
        metrics = {key: value.mean(-1) for key, value in per_task.items()}
        return MAMLOutput(result["objective"].mean(), metrics, result["query_loss"][-1].detach(), per_task)

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int | None = None) -> FastWeights:
        """Per-task fast weights after ``steps`` inner steps (default: the eval step count), detached."""
        steps = self.eval_inner_steps if steps is None else steps
        _check_nonneg_int("steps", steps)
        batch = TaskBatch(support_x, support_y, support_x, support_y)
        loss_fn = self._loss_fn(support_y)
        forward, groups = self._engine(batch.support_x.device)
        fast_all = []
        for group in groups(batch.num_tasks):
            fast, _ = self._inner_loop(support_x[group], support_y[group], forward, steps, False, loss_fn,
                                       meta_grad=False)
            fast_all.append(self._params_at(fast, steps, len(range(*group.indices(batch.num_tasks)))))
        params = {n: torch.cat([f[n] for f in fast_all]).detach() for n in fast_all[0]}
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
        forward, groups = self._engine(query_x.device)
        return torch.cat([forward({n: p[g] for n, p in fast.params.items()}, query_x[g])
                          for g in groups(fast.num_tasks)])

    def graph_key(self):
        """What a captured step depends on besides the input shapes (`maml_fast.cuda_graph`)."""
        steps, second_order, weights = self._schedule()
        return steps, second_order, tuple(weights)

    def on_graph_replay(self) -> None:
        """A captured training step was replayed: advance the host iteration count as forward would."""
        if self.training:
            self._iteration += 1

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._iteration = int(self.meta_iteration)

    def _schedule(self):
        """(inner steps, second order?, multi-step loss weights) for the current mode and iteration."""
        steps = self.inner_steps if self.training else self.eval_inner_steps
        iteration = self._iteration
        second_order = not self.first_order and not (self.training and iteration < self.first_order_iterations)
        if self.training and self.multi_step_loss_iterations and steps > 1:
            weights = multi_step_loss_weights(steps, iteration, self.multi_step_loss_iterations)
        else:
            weights = [0.0] * max(steps - 1, 0) + [1.0]
        return steps, second_order, weights

    @property
    def fallback_reason(self) -> str | None:
        """Why the network runs through torch.func.vmap instead of the task-batched program (or None)."""
        return self._fallback_reason

    # ----------------------------------------------------------------- engine
    def _loss_fn(self, labels):
        name = self.loss_name or ("mse" if labels.is_floating_point() else "cross_entropy")
        if name == "cross_entropy" and labels.is_floating_point():
            raise TypeError(f"support_y must hold integer class labels for cross_entropy, got dtype {labels.dtype}")
        if name == "mse" and not labels.is_floating_point():
            raise TypeError(f"support_y must hold floating targets for mse, got dtype {labels.dtype}")
        # Backend "cuda" takes the fused loss ops (and their derivatives) wherever the extension runs.
        backend = backends.resolve_backend(self.backend, labels.device)
        return per_task_loss(name, use_extension=cuda_backend.uses_extension_ops(backend, labels.device))

    def _engine(self, device):
        """(forward, task groups): the loop backend runs the engine on one task at a time."""
        backend = backends.resolve_backend(self.backend, device)
        # The compiled multi-tensor update belongs to the extension backend; the others stay plain PyTorch.
        self._compiled_update = backend == "cuda"
        if backend == "loop":
            return self._loop_forward, lambda tasks: [slice(t, t + 1) for t in range(tasks)]
        whole = lambda tasks: [slice(0, tasks)]
        if backend == "vmap":
            return self._vmap_forward, whole
        if backend not in self._programs:
            program, reason = lower(self.model, backend)
            if reason and self._fallback_reason is None:
                self._fallback_reason = reason
                warnings.warn(f"maml_fast: {reason}; this network runs through torch.func.vmap instead", stacklevel=3)
            self._programs[backend] = program
        program = self._programs[backend]
        return (self._vmap_forward if program is None else program), whole

    def _functional(self, params, x):
        return functional_call(self.model, params, (x,))

    def _vmap_forward(self, params, x):
        # randomness="different": each task draws its own dropout mask, as in the loop backend.
        return torch.func.vmap(self._functional, randomness="different")(params, x)

    def _loop_forward(self, params, x):
        return self._functional({n: p[0] for n, p in params.items()}, x[0]).unsqueeze(0)

    def _run(self, support_x, support_y, query_x, query_y, steps, second_order, loss_fn, weights, meta_grad):
        forward, groups = self._engine(support_x.device)
        parts = []
        for group in groups(support_x.shape[0]):
            fast, record = self._inner_loop(support_x[group], support_y[group], forward, steps, second_order,
                                            loss_fn, meta_grad, query_x[group], query_y[group], weights)
            parts.append(record)
        return {key: torch.cat([p[key] for p in parts], dim=-1) for key in parts[0]}

    def _inner_loop(self, support_x, support_y, forward, steps, second_order, loss_fn, meta_grad,
                    query_x=None, query_y=None, weights=None):
        """Run K inner steps for a group of tasks; with a query set, also the weighted query
        objective ``[T]`` and per-step metrics ``[steps, T]``."""
        tasks = support_x.shape[0]
        theta = dict(self.model.named_parameters())
        if meta_grad:
            fast = [theta[n].expand(tasks, *theta[n].shape) for n in self.adapted_names]
        else:  # adaptation only: detached copies that still take an inner gradient
            fast = [theta[n].detach().expand(tasks, *theta[n].shape).clone().requires_grad_() for n in self.adapted_names]
        static = self._static_tensors(meta_grad)
        record: dict[str, list] = {"support_loss": [], "support_accuracy": [], "query_loss": [], "query_accuracy": []}
        objective = 0.0
        labels_checked = support_y.is_floating_point() or not self.host_checks

        def checked_loss_fn(output, labels):
            # Labels are checked against the network's output size at the first loss, before any
            # loss kernel could index out of range.
            nonlocal labels_checked
            if not labels_checked:
                check_labels("support_y", support_y, output.shape[-1])
                if query_y is not None:
                    check_labels("query_y", query_y, output.shape[-1])
                labels_checked = True
            elif labels.is_floating_point() and output.shape[2:].numel() != labels.shape[2:].numel():
                which = "support_y" if labels is support_y else "query_y"
                raise ValueError(
                    f"{which} holds floating targets of shape {tuple(labels.shape[2:])} per example but the model "
                    f"outputs {tuple(output.shape[2:])}; pass integer class labels (or loss='cross_entropy') "
                    "for classification")
            return loss_fn(output, labels)

        def query_eval(step, weight):
            nonlocal objective
            params = self._params_at(dict(zip(self.adapted_names, fast)), step, tasks, static)
            with torch.set_grad_enabled(weight != 0.0 and torch.is_grad_enabled()):
                loss, accuracy = checked_loss_fn(forward(params, query_x), query_y)
            if weight != 0.0:
                objective = objective + weight * loss
            record["query_loss"].append(loss.detach())
            record["query_accuracy"].append(accuracy)

        for k in range(steps + 1):
            if query_x is not None:
                # weights[k-1] weighs the query loss after k steps; with no steps the loss is at θ.
                weight = weights[k - 1] if k > 0 else (1.0 if steps == 0 else 0.0)
                if weight != 0.0 or self.step_metrics or k == steps:
                    query_eval(k, weight)
                else:
                    record["query_loss"].append(support_x.new_full((tasks,), math.nan))
                    record["query_accuracy"].append(support_x.new_full((tasks,), math.nan))
            if self.training and self.per_step_bn_statistics and query_x is not None:
                self._record_bn_statistics(fast, static, k, tasks, support_x)
            if k == steps:
                break
            step_fn = self._step_function(k, tasks, forward, support_x, support_y, checked_loss_fn)
            with torch.enable_grad():
                if self.checkpoint_inner_steps and meta_grad:
                    *fast, loss, accuracy = _CheckpointedInnerStep.apply(step_fn, len(fast), second_order, *fast, *static)
                else:
                    fast, loss, accuracy = step_fn(fast, static, second_order)
            record["support_loss"].append(loss.detach())
            record["support_accuracy"].append(accuracy)
        classification = not support_y.is_floating_point()
        stacked = {k: torch.stack(v) for k, v in record.items() if v and (classification or "accuracy" not in k)}
        if query_x is not None:
            stacked["objective"] = objective
        return dict(zip(self.adapted_names, fast)), stacked

    def _static_tensors(self, meta_grad):
        """Tensors besides the fast weights that an inner step depends on (meta-learned): the
        non-adapted parameters, per-step BN parameters and learned inner lrs — in a fixed order."""
        theta = dict(self.model.named_parameters())
        tensors = [theta[n] for n in self._frozen_names()]
        tensors += list(self.per_step_bn) if self.per_step_bn_names else []
        tensors += list(self.inner_lrs) if self.inner_lr_mode != "fixed" else []
        return tensors if meta_grad else [t.detach() for t in tensors]

    def _frozen_names(self):
        return [n for n, _ in self.model.named_parameters()
                if n not in self.adapted_names and n not in self.per_step_bn_names]

    def _params_at(self, fast: dict, step: int, tasks: int, static=None):
        """Every network parameter as ``[T, ...]`` for inner step ``step``."""
        static = self._static_tensors(True) if static is None else static
        frozen = self._frozen_names()
        params = {n: t.expand(tasks, *t.shape) for n, t in zip(frozen, static)}
        for i, n in enumerate(self.per_step_bn_names):
            per_step = static[len(frozen) + i]
            params[n] = per_step[min(step, per_step.shape[0] - 1)].expand(tasks, *per_step.shape[1:])
        params.update(fast)
        if self.per_step_bn_statistics and not self.training:
            index = min(step, self.bn_step_mean_0.shape[0] - 1)
            for i, name in enumerate(self._bn_layers):
                for kind in ("mean", "var"):
                    stats = getattr(self, f"bn_step_{kind}_{i}")[index]
                    params[f"{name}.running_{kind}"] = stats.expand(tasks, *stats.shape)
        return params

    # ----------------------------------------------------------------- per-step BN statistics
    def _bn_statistics_hook(self, name):
        def record(module, args):
            if self._statistics_sink is not None:
                x = args[0]
                dims = [0, *range(2, x.dim())]
                self._statistics_sink.append((name, torch.stack([x.mean(dims), x.var(dims, correction=1)])))
        return record

    @torch.no_grad()
    def _record_bn_statistics(self, fast, static, step, tasks, support_x):
        """Accumulate every BN layer's input batch statistics at the step-k fast weights: one vmapped
        forward of the module (hooks collect the statistics as outputs), the same on every backend."""
        params = self._params_at(dict(zip(self.adapted_names, fast)), step, tasks, static)
        names = []

        def statistics(task_params, x):
            self._statistics_sink = sink = []
            try:
                self._functional(task_params, x)
            finally:
                self._statistics_sink = None
            names[:] = [name for name, _ in sink]
            return [stats for _, stats in sink]

        per_task = torch.func.vmap(statistics, randomness="different")(params, support_x)   # [T, 2, C] each
        for name, stats in zip(names, per_task):
            entry = self._bn_statistic_sums.setdefault((name, step), [0.0, 0])
            entry[0], entry[1] = entry[0] + stats.sum(0), entry[1] + stats.shape[0]

    @torch.no_grad()
    def _update_bn_statistics(self):
        for i, (name, layer) in enumerate(self._bn_layers.items()):
            momentum = 0.1 if layer.momentum is None else layer.momentum
            for (recorded, step), (stats_sum, count) in self._bn_statistic_sums.items():
                if recorded == name:
                    mean, var = stats_sum / count
                    getattr(self, f"bn_step_mean_{i}")[step].lerp_(mean, momentum)
                    getattr(self, f"bn_step_var_{i}")[step].lerp_(var, momentum)
        self._bn_statistic_sums = {}

    def _step_function(self, step, tasks, forward, support_x, support_y, loss_fn):
        """fast_k, static -> (fast_{k+1}, support loss [T], accuracy [T]) as a pure function of its
        tensor arguments (so that the checkpointed step can recompute it)."""
        num_frozen = len(self._frozen_names()) + len(self.per_step_bn_names)

        def step_fn(fast, static, create_graph):
            params = self._params_at(dict(zip(self.adapted_names, fast)), step, tasks, static)
            output = forward(params, support_x)
            loss, accuracy = loss_fn(output, support_y)
            # The reference code differentiates sum(CE)/K_shots = N_ways x the mean (see inner_loss).
            scale = output.shape[-1] if self.inner_loss == "reference" and not support_y.is_floating_point() else 1.0
            grads = torch.autograd.grad(loss.sum() * scale, fast, create_graph=create_graph)
            if self.inner_lr_mode == "fixed":
                lrs = [fast[0].new_full((), self.inner_lr)] * len(fast)
            else:
                learned = static[num_frozen:]
                lrs = [lr[min(step, lr.shape[0] - 1)] if self.inner_lr_mode == "per_layer_per_step" else lr
                       for lr in learned]
            return fast_weight_update(fast, grads, lrs, use_extension=self._compiled_update), loss, accuracy
        return step_fn


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
