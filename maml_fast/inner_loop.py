"""The inner loop of the MAML family, for a group of tasks at once:

    fast_0 = θ expanded to [T, ...]                              (no copy)
    for k < K:  g_k = ∇ Σ_t L_support,t(fast_k)                  (create_graph for second order)
                fast_{k+1} = fast_k − α_k ⊙ g_k                  (the backend's fast-weight update)
    objective = Σ_k w_k L_query,t(fast_k)                        (w: the last step only, or MAML++'s)

`InnerLoop` runs it (`InnerLoop.run`) with one `InnerStep` per k. Both are written once over an
`maml_fast.backends.Execution` (the backend's forward for the group) and the learner's
`ParameterLayout`, which says how meta-parameters become per-task network parameters at step k.

A conv weight may be kept as θ and its updates instead (`maml_fast.ops.low_rank_conv`): its layer
records its input x and output y in each support forward, and the step takes the gradient with respect
to y, whose product with x's patches is the weight's gradient, so that fast_{k+1} = fast_k − α_k gy^T P(x)
stays in that form.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .backends import Execution
from .checkpointing import checkpointed_inner_step
from .maml_plus_plus import PerStepBatchNormStatistics, inner_lr_at
from .ops import low_rank_conv
from .ops.low_rank_conv import LowRankFastWeight
from .ops.task_broadcast import broadcast_over_tasks
from .task_batch import check_labels

METRIC_KEYS = ("support_loss", "support_accuracy", "query_loss", "query_accuracy")


@dataclass(frozen=True)
class MetaTensors:
    """What an inner step reads besides the fast weights, all meta-learned: the network parameters that
    do not adapt (``frozen``), MAML++ per-step BatchNorm weights ``[K+1, ...]`` (``per_step_bn``) and
    the learned step sizes (``inner_lrs``)."""

    frozen: tuple[torch.Tensor, ...]
    per_step_bn: tuple[torch.Tensor, ...]
    inner_lrs: tuple[torch.Tensor, ...]

    def flat(self) -> list[torch.Tensor]:
        return [*self.frozen, *self.per_step_bn, *self.inner_lrs]

    def like(self, tensors: list[torch.Tensor]) -> "MetaTensors":
        """The same structure holding `tensors` (in the order of `flat`)."""
        a, b = len(self.frozen), len(self.frozen) + len(self.per_step_bn)
        return MetaTensors(tuple(tensors[:a]), tuple(tensors[a:b]), tuple(tensors[b:]))

    def detached(self) -> "MetaTensors":
        return self.like([t.detach() for t in self.flat()])


@dataclass(frozen=True)
class ParameterLayout:
    """Which network parameters adapt in the inner loop (``adapted``), which have a per-step copy
    (``per_step_bn``, MAML++), and which stay as they are (``frozen``); how the learned step sizes are
    indexed (``inner_lr_mode``); and the per-step BatchNorm statistics used in evaluation."""

    adapted: tuple[str, ...]
    frozen: tuple[str, ...]
    per_step_bn: tuple[str, ...]
    inner_lr_mode: str
    bn_statistics: PerStepBatchNormStatistics | None = None

    def params_at(self, fast: list[torch.Tensor], meta: MetaTensors, step: int, tasks: int,
                  running_statistics: bool = False) -> dict[str, torch.Tensor]:
        """Every network parameter as ``[T, ...]`` for inner step `step` (and, with
        `running_statistics`, the BatchNorm layers' per-step running statistics)."""
        params = dict(zip(self.frozen, broadcast_over_tasks(meta.frozen, tasks)))
        for n, per_step in zip(self.per_step_bn, meta.per_step_bn):
            params[n] = per_step[min(step, per_step.shape[0] - 1)].expand(tasks, *per_step.shape[1:])
        params.update(zip(self.adapted, fast))
        if running_statistics:
            params.update(self.bn_statistics.running_at(step, tasks))
        return params


class CheckedLoss:
    """`loss_fn` with the labels checked against the network's output: class labels once, at the first
    loss of an inner loop (before any loss kernel could index out of range; ``host_checks=False`` skips
    this check, which reads label values, for a graph-captured step), regression targets' shape at
    every call."""

    def __init__(self, loss_fn: Callable, support_y: torch.Tensor, query_y: torch.Tensor | None, host_checks: bool):
        self.loss_fn, self.support_y, self.query_y = loss_fn, support_y, query_y
        self.pending = host_checks and not support_y.is_floating_point()

    def __call__(self, output: torch.Tensor, labels: torch.Tensor):
        if self.pending:
            named = {"support_y": self.support_y, **({"query_y": self.query_y} if self.query_y is not None else {})}
            check_labels(named, output.shape[-1])
            self.pending = False
        elif labels.is_floating_point() and output.shape[2:].numel() != labels.shape[2:].numel():
            which = "support_y" if labels is self.support_y else "query_y"
            raise ValueError(
                f"{which} holds floating targets of shape {tuple(labels.shape[2:])} per example but the model "
                f"outputs {tuple(output.shape[2:])}; pass integer class labels (or loss='cross_entropy') "
                "for classification")
        return self.loss_fn(output, labels)


def _factored(weight) -> bool:
    """Whether `weight` is a conv weight whose updates are kept factored (its layer recorded its uses)."""
    return isinstance(weight, LowRankFastWeight) and bool(weight.tape and weight.tape.factored)


def _gradient_targets(weight) -> list[torch.Tensor]:
    """What an inner step's gradient of `weight` is taken with respect to: the weight itself, or for
    a factored conv weight the outputs of its layer (`maml_fast.ops.low_rank_conv`)."""
    if _factored(weight):
        return [y for _, y in weight.tape.uses]
    return [_dense(weight)]


def _dense(weight):
    """A weight as the tensor the plain ops take: itself, or a conv weight not factored: θ expanded."""
    return weight.expanded if isinstance(weight, LowRankFastWeight) and not weight.updates else weight


def _unchanged(weight):
    """A weight that took no step: as a new view (see `InnerStep.__call__`); a factored one as it is."""
    if isinstance(weight, LowRankFastWeight) and weight.updates:
        return dataclasses.replace(weight, tape=None)
    return _dense(weight).view_as(_dense(weight))


@dataclass(frozen=True)
class InnerStep:
    """Inner step `step`: ``(fast_k, meta, create_graph) -> (fast_{k+1}, support loss [T], accuracy [T]
    or None)``, a pure function of its tensor arguments (so that a checkpointed step can recompute it)."""

    step: int
    loop: "InnerLoop"
    support_x: torch.Tensor
    support_y: torch.Tensor

    def __call__(self, fast: list[torch.Tensor], meta: MetaTensors, create_graph: bool,
                 update_from: list[torch.Tensor] | None = None):
        """`update_from`: the same values as `fast`, for the update to read (θ's second use, so that
        its gradient reaches θ's broadcast apart from the network's); None: `fast` itself."""
        loop = self.loop
        update_from = fast if update_from is None else update_from
        # (a factored conv weight records its layer's input and output in this forward)
        fast = [weight.recording() if isinstance(weight, LowRankFastWeight) else weight for weight in fast]
        params = loop.layout.params_at(fast, meta, self.step, self.support_x.shape[0], loop.running_statistics)
        output = loop.execution.forward(params, self.support_x)
        loss, accuracy = loop.loss(output, self.support_y)
        # The reference code differentiates sum(CE)/K_shots = N_ways x the mean (see MAML's inner_loss).
        scale = output.shape[-1] if loop.reference_inner_loss and not self.support_y.is_floating_point() else 1.0
        total = loss.sum() if scale == 1.0 else loss.sum() * scale
        # (None: a weight the loss does not depend on, e.g. a conv bias that a BatchNorm cancels)
        targets = [_gradient_targets(weight) for weight in fast]
        flat = torch.autograd.grad(total, [t for ts in targets for t in ts], create_graph=create_graph,
                                   allow_unused=True)
        ends = list(itertools.accumulate(len(ts) for ts in targets))
        grads = [list(flat[end - len(ts):end]) for ts, end in zip(targets, ends)]
        factored = {i for i, weight in enumerate(fast) if _factored(weight)}
        moving = [i for i, g in enumerate(grads) if i not in factored and g[0] is not None]
        if loop.layout.inner_lr_mode == "fixed":
            first = fast[0].theta if isinstance(fast[0], LowRankFastWeight) else fast[0]
            lrs = [first.new_full((), loop.inner_lr)] * len(fast)
        else:
            lrs = [inner_lr_at(lr, loop.layout.inner_lr_mode, self.step) for lr in meta.inner_lrs]
        updated = dict(zip(moving, loop.update([_dense(update_from[i]) for i in moving], [grads[i][0] for i in moving],
                                               [lrs[i] for i in moving])))
        for i in factored:
            if any(g is not None for g in grads[i]):
                updated[i] = fast[i].updated(lrs[i], fast[i].tape.uses, grads[i], create_graph)
        # A weight with no gradient stays as it is, as a new view: the next step's gradient with respect
        # to it then stops there, instead of waiting on the backward of the node that made it and its
        # neighbours (θ's broadcast, or an update), which that gradient would run (and, first-order, free).
        new_fast = [updated[i] if i in updated else _unchanged(weight) for i, weight in enumerate(fast)]
        return new_fast, loss, accuracy

    def flat(self, tensors: list[torch.Tensor], layouts: list, create_graph: bool):
        """The step on the flat list ``[*flatten(fast), *meta.flat()]`` (the checkpointed step's
        arguments; `layouts`: `maml_fast.ops.low_rank_conv.flatten`'s)."""
        num_fast = low_rank_conv.flat_size(layouts)
        return self(low_rank_conv.unflatten(tensors[:num_fast], layouts), self.loop.meta.like(tensors[num_fast:]),
                    create_graph)


@dataclass
class InnerLoop:
    """One inner loop for a group of tasks: K steps on the support set and, with a query set, the query
    loss after 0..K steps (metrics, and the objective weighted by ``weights``).

    ``execution``/``update``: the backend's; ``loss``: the backend's loss with the label checks
    (`CheckedLoss`);
    ``meta``: the meta-learned tensors (detached when only adapting); ``record_statistics``: record
    MAML++ per-step BatchNorm statistics (training); ``running_statistics``: normalise with them
    (evaluation)."""

    layout: ParameterLayout
    meta: MetaTensors
    execution: Execution
    update: Callable
    loss: Callable
    steps: int
    inner_lr: float
    second_order: bool
    reference_inner_loss: bool = False
    checkpoint: bool = False
    step_metrics: bool = True
    record_statistics: bool = False
    running_statistics: bool = False

    def _with_low_rank_candidates(self, fast: list[torch.Tensor], theta: list[torch.Tensor]) -> list:
        """`fast` with the conv weights that may keep their updates factored as `LowRankFastWeight`
        (their layers decide at the first step, `maml_fast.ops.low_rank_conv`) over θ (`theta`): those
        the execution allows, when every step size is one number per tensor and the fast weights stay
        inside this loop (not read by MAML++'s statistics through the module)."""
        if (not self.steps or self.record_statistics or self.running_statistics
                or self.layout.inner_lr_mode == "per_element"):
            return fast
        allowed = self.execution.low_rank_weights
        return [LowRankFastWeight(param, weight.shape[0], expanded=weight, max_updates=self.steps)
                if name in allowed else weight for name, weight, param in zip(self.layout.adapted, fast, theta)]

    def run(self, fast: list[torch.Tensor], support_x, support_y, query_x=None, query_y=None,
            weights=None, update_from: list[torch.Tensor] | None = None,
            theta: list[torch.Tensor] | None = None) -> tuple[list, dict[str, torch.Tensor]]:
        """(fast weights after K steps, records): ``support_loss``/``support_accuracy`` ``[K, T]``,
        ``query_loss``/``query_accuracy`` ``[K+1, T]`` (views of ``metric_rows``, all of them stacked
        in this order) and ``objective`` ``[T]`` with a query set. `theta`: the meta-parameters that
        `fast` expands, with which a query set's loop may keep conv weights factored (the fast weights
        returned then include `LowRankFastWeight` s)."""
        tasks = support_x.shape[0]
        if query_x is not None and theta is not None:
            fast = self._with_low_rank_candidates(fast, theta)
        record: dict[str, list] = {key: [] for key in METRIC_KEYS}
        objective, unmeasured = 0.0, None  # (unmeasured: the NaN placeholder of a query metric not computed)
        for k in range(self.steps + 1):
            if query_x is not None:
                # weights[k-1] weighs the query loss after k steps; with no steps the loss is at θ.
                weight = weights[k - 1] if k > 0 else (1.0 if self.steps == 0 else 0.0)
                weighed = isinstance(weight, torch.Tensor) or weight != 0.0  # (a device weight is never 0)
                if weighed or self.step_metrics or k == self.steps:
                    params = self.layout.params_at(fast, self.meta, k, tasks, self.running_statistics)
                    with torch.set_grad_enabled(weighed and torch.is_grad_enabled()):
                        loss, accuracy = self.loss(self.execution.forward(params, query_x), query_y)
                    if weighed:  # (no ops for the plain MAML objective, the last query loss alone)
                        weighted = loss if isinstance(weight, float) and weight == 1.0 else weight * loss
                        objective = weighted if isinstance(objective, float) and objective == 0.0 else objective + weighted
                    record["query_loss"].append(loss.detach())
                    record["query_accuracy"].append(accuracy)
                else:
                    if unmeasured is None:
                        unmeasured = support_x.new_full((tasks,), math.nan)
                    record["query_loss"].append(unmeasured)
                    record["query_accuracy"].append(unmeasured)
                if self.record_statistics:
                    self.layout.bn_statistics.record(self.layout.params_at(fast, self.meta, k, tasks), support_x, k)
            if k == self.steps:
                break
            step = InnerStep(k, self, support_x, support_y)
            with torch.enable_grad():
                if self.checkpoint:
                    fast, loss, accuracy = checkpointed_inner_step(step, fast, self.meta.flat(), self.second_order)
                else:
                    fast, loss, accuracy = step(fast, self.meta, self.second_order, update_from if k == 0 else None)
            record["support_loss"].append(loss.detach())
            record["support_accuracy"].append(accuracy)
        classification = not support_y.is_floating_point()
        keys = [k for k, v in record.items() if v and (classification or "accuracy" not in k)]
        # One copy for every record: the keys are row ranges of one [rows, T] tensor (`metric_rows`).
        stacked = {}
        if keys:
            rows = torch.stack([value for key in keys for value in record[key]])
            stacked = {"metric_rows": rows, **dict(zip(keys, rows.split([len(record[k]) for k in keys])))}
        if query_x is not None:
            stacked["objective"] = objective
        return fast, stacked
