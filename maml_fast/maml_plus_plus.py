"""The MAML++ pieces of the learner (Antoniou et al., 2019), and Meta-SGD's learned step sizes:

* `multi_step_loss_weights`: the annealed importance of the query loss after each inner step;
* `learned_inner_lrs` / `inner_lr_at`: LSLR (a learned α per adapted tensor and step) and Meta-SGD
  (a learned α of each adapted tensor's shape);
* `per_step_batch_norm_weights`: a copy of every BatchNorm weight and bias per inner step (meta-learned,
  never adapted);
* `PerStepBatchNormStatistics`: per-step BatchNorm running statistics, recorded in training and used
  for normalisation in evaluation.

Their tensors live on the learner under the names its state dict has always had (``inner_lrs.i``,
``per_step_bn.i``, ``bn_step_mean_i`` / ``bn_step_var_i``), so checkpoints load across versions.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

INNER_LR_MODES = ("fixed", "per_layer_per_step", "per_element")


def multi_step_loss_weights(steps: int, iteration: int, anneal_iterations: int) -> list[float]:
    """MAML++ multi-step loss importance: every step starts at 1/K; the non-final weights decay
    linearly to 0.03/K over ``anneal_iterations`` and the final step takes the rest. After
    ``anneal_iterations`` only the final step counts (as in MAML++)."""
    if iteration >= anneal_iterations:
        return [0.0] * (steps - 1) + [1.0]
    return [float(w) for w in annealed_loss_weights(steps, torch.tensor(iteration), anneal_iterations)]


def annealed_loss_weights(steps: int, iteration: torch.Tensor, anneal_iterations: int) -> list[torch.Tensor]:
    """`multi_step_loss_weights` while they anneal (``iteration < anneal_iterations``), as 0-dim float64
    tensors on the iteration counter's device: no host read, so a captured step follows the schedule."""
    decay = iteration.to(torch.float64) / (steps * anneal_iterations)
    non_final = torch.clamp_min(1.0 / steps - decay, 0.03 / steps)
    total = torch.zeros_like(non_final)
    for _ in range(steps - 1):  # (left to right, as Python's sum)
        total = total + non_final
    return [non_final] * (steps - 1) + [1.0 - total]


def learned_inner_lrs(mode: str, adapted: list[torch.Tensor], steps: int, inner_lr: float) -> nn.ParameterList:
    """The learned step sizes of `mode` for the `adapted` parameters, all starting at `inner_lr`:
    ``[steps]`` per tensor (LSLR, "per_layer_per_step") or the tensor's shape (Meta-SGD, "per_element")."""
    if mode == "per_layer_per_step":
        return nn.ParameterList([nn.Parameter(torch.full((max(steps, 1),), inner_lr, dtype=p.dtype, device=p.device))
                                 for p in adapted])
    return nn.ParameterList([nn.Parameter(torch.full_like(p, inner_lr)) for p in adapted])


def inner_lr_at(lr: torch.Tensor, mode: str, step: int) -> torch.Tensor:
    """The step size that inner step `step` uses of the learned `lr` (LSLR: its entry for the step,
    the last one beyond; Meta-SGD: all of it)."""
    return lr[min(step, lr.shape[0] - 1)] if mode == "per_layer_per_step" else lr


def per_step_batch_norm_weights(params: list[torch.Tensor], steps: int) -> nn.ParameterList:
    """One copy of each BatchNorm parameter per inner step 0..steps: ``[steps + 1, *shape]``."""
    return nn.ParameterList([nn.Parameter(p.detach().unsqueeze(0).repeat(steps + 1, *[1] * p.dim())) for p in params])


class PerStepBatchNormStatistics:
    """MAML++ per-step BatchNorm running statistics: training records, for every inner step k, the
    support set's batch statistics at the step-k fast weights (mean over tasks, with the BN layer's
    momentum); in eval mode step k normalises with them instead of the batch statistics.

    The buffers ``bn_step_mean_i`` / ``bn_step_var_i`` ``[steps + 1, C]`` are registered on `owner`
    (the learner); forward pre-hooks on the BatchNorm layers collect the statistics while `record`
    runs the module."""

    def __init__(self, owner: nn.Module, model: nn.Module, steps: int):
        self.owner, self.model = owner, model
        self.layers = {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)}
        if not self.layers:
            raise ValueError("per_step_bn_statistics=True but the model has no BatchNorm layer")
        reference = next(model.parameters())
        for i, (name, mod) in enumerate(self.layers.items()):
            owner.register_buffer(f"bn_step_mean_{i}", reference.new_zeros((steps + 1, mod.num_features)))
            owner.register_buffer(f"bn_step_var_{i}", reference.new_ones((steps + 1, mod.num_features)))
            mod.register_forward_pre_hook(self._hook(name))
        self._sink: list | None = None
        self._sums: dict = {}

    def _buffer(self, kind: str, i: int) -> torch.Tensor:
        return getattr(self.owner, f"bn_step_{kind}_{i}")

    def _hook(self, name):
        def collect(module, args):
            if self._sink is not None:
                x = args[0]
                dims = [0, *range(2, x.dim())]
                self._sink.append((name, torch.stack([x.mean(dims), x.var(dims, correction=1)])))
        return collect

    def running_at(self, step: int, tasks: int) -> dict[str, torch.Tensor]:
        """``{"<layer>.running_mean" / "<layer>.running_var": [T, C]}`` for inner step `step`: the entries
        that make the lowered program (and functional_call) normalise with these statistics."""
        index = min(step, self._buffer("mean", 0).shape[0] - 1)
        return {f"{name}.running_{kind}": self._buffer(kind, i)[index].expand(tasks, -1)
                for i, name in enumerate(self.layers) for kind in ("mean", "var")}

    def reset(self) -> None:
        self._sums = {}

    @torch.no_grad()
    def record(self, params: dict, support_x: torch.Tensor, step: int) -> None:
        """Accumulate every BN layer's input batch statistics at the step's per-task `params`: one
        vmapped forward of the module (hooks collect the statistics as outputs), the same on every
        backend."""
        names = []

        def statistics(task_params, x):
            self._sink = sink = []
            try:
                functional_call(self.model, task_params, (x,))
            finally:
                self._sink = None
            names[:] = [name for name, _ in sink]
            return [stats for _, stats in sink]

        per_task = torch.func.vmap(statistics, randomness="different")(params, support_x)   # [T, 2, C] each
        for name, stats in zip(names, per_task):
            entry = self._sums.setdefault((name, step), [0.0, 0])
            entry[0], entry[1] = entry[0] + stats.sum(0), entry[1] + stats.shape[0]

    @torch.no_grad()
    def update(self) -> None:
        """Move the running statistics towards this meta-step's recorded means (the layer's momentum)."""
        for i, (name, layer) in enumerate(self.layers.items()):
            momentum = 0.1 if layer.momentum is None else layer.momentum
            for (recorded, step), (stats_sum, count) in self._sums.items():
                if recorded == name:
                    mean, var = stats_sum / count
                    self._buffer("mean", i)[step].lerp_(mean, momentum)
                    self._buffer("var", i)[step].lerp_(var, momentum)
        self._sums = {}
