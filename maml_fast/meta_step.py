"""`MetaStep`: one meta-training iteration, written once. The trainer runs it eagerly, `GraphedMetaStep`
captures it as a CUDA graph, and the benchmarks time it.

    step = MetaStep(learner, torch.optim.Adam(learner.parameters(), lr=1e-3, fused=True), clip_norm=10.0)
    outputs = step(batch)      # device tensors: meta_loss, grad_norm, found_inf and the learner's metrics

What one call does, with no host read (so that it can be captured):

1. the learner's forward (``steps=`` overrides its inner step count) and the meta-loss's backward,
   optionally under a `maml_fast.precision` mode;
2. ``reduce`` (distributed training: sums the gradients and outputs of every process in place);
3. the meta-gradient's global norm, then clipping by value and/or by global norm;
4. the optimizer step, skipped on the device when the meta-loss or meta-gradient is not finite: a fused
   optimizer skips it itself (its ``found_inf`` input, as under AMP); any other optimizer's parameters
   and state are restored with ``torch.where``;
5. device counters of skipped steps (`counters`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from .checks import check_number
from .precision import check_mode, precision_mode
from .task_batch import TaskBatch


@contextlib.contextmanager
def host_checks(learner: torch.nn.Module, enabled: bool):
    """Within: the learner's value checks that read the device (``learner.host_checks``: the label
    range) run only if `enabled` (and the learner has them on); restored afterwards. A learner
    without the attribute is left alone."""
    if not hasattr(learner, "host_checks"):
        yield
        return
    saved, learner.host_checks = learner.host_checks, bool(enabled) and learner.host_checks
    try:
        yield
    finally:
        learner.host_checks = saved


class MetaStep:
    """One meta-training iteration of `learner` with `optimizer` (see the module doc).

    Args:
        learner: a `MAML`-family module; ``learner(batch)`` returns an output with ``loss`` and ``metrics``.
        optimizer: steps every parameter it holds.
        clip_value / clip_norm: clip the meta-gradient elementwise and/or to a global norm.
        skip_nonfinite: skip the optimizer step when the meta-loss or meta-gradient is NaN/inf.
        precision, precision_options: a `maml_fast.precision` mode for the forward and backward.
        reduce: ``reduce(tensors)`` sums the gradients and outputs across processes in place.
    """

    def __init__(self, learner: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                 clip_value: float | None = None, clip_norm: float | None = None, skip_nonfinite: bool = True,
                 precision: str = "fp32", precision_options: dict | None = None,
                 reduce: Callable[[list[torch.Tensor]], None] | None = None):
        if not isinstance(learner, torch.nn.Module):
            raise TypeError(f"learner must be an nn.Module, got {type(learner).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.clip_value = check_number("clip_value", clip_value, positive=True, optional=True)
        self.clip_norm = check_number("clip_norm", clip_norm, positive=True, optional=True)
        check_mode(precision, "precision")
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if not params:
            raise ValueError("optimizer holds no parameters")
        devices = {p.device for p in params}
        if len(devices) != 1:
            raise ValueError(f"optimizer's parameters must be on one device, got {sorted(map(str, devices))}")
        self.learner, self.optimizer, self.params = learner, optimizer, params
        self.device = params[0].device
        self.skip_nonfinite, self.reduce = bool(skip_nonfinite), reduce
        self.precision, self.precision_options = precision, dict(precision_options or {})
        self._fused_skip = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        zeros = lambda: torch.zeros((), device=self.device)  # noqa: E731
        self.skipped, self.bad_run, self.bad_run_max = zeros(), zeros(), zeros()

    def counters(self) -> dict[str, torch.Tensor]:
        """Device counters (float tensors): ``skipped_steps`` in total, ``bad_run`` (the current run
        of consecutive skipped steps) and ``bad_run_max`` (its maximum so far)."""
        return {"skipped_steps": self.skipped, "bad_run": self.bad_run, "bad_run_max": self.bad_run_max}

    def backward(self, batch: TaskBatch, *, steps: int | None = None,
                 loss_weight: float = 1.0) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """Steps 1-2: (outputs ``meta_loss [1]`` and the learner's metrics, the meta-gradients). The
        meta-loss and metrics are scaled by `loss_weight` (a process's share of the tasks)."""
        self.optimizer.zero_grad(set_to_none=True)
        with precision_mode(self.precision, **self.precision_options):
            out = self.learner(batch) if steps is None else self.learner(batch, steps=steps)
            loss = out.loss * loss_weight if loss_weight != 1.0 else out.loss
            loss.backward()
        outputs = {"meta_loss": loss.detach().reshape(1)}
        for key, value in out.metrics.items():
            value = value.detach().reshape(-1)
            outputs[key] = value * loss_weight if loss_weight != 1.0 else value
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.reduce is not None:
            self.reduce(grads + list(outputs.values()))
        return outputs, grads

    def __call__(self, batch: TaskBatch, *, steps: int | None = None, loss_weight: float = 1.0) -> dict[str, torch.Tensor]:
        """One iteration (see the module doc); returns device tensors: ``meta_loss [1]``, ``grad_norm
        [1]``, ``found_inf []`` (1.0 when the step was skipped) and the learner's metrics."""
        outputs, grads = self.backward(batch, steps=steps, loss_weight=loss_weight)
        if grads:
            total_norm = torch.linalg.vector_norm(torch.stack([n.double() for n in torch._foreach_norm(grads)]))
        else:
            total_norm = torch.zeros((), dtype=torch.float64, device=self.device)
        finite = torch.isfinite(total_norm) & torch.isfinite(outputs["meta_loss"].float()).all()
        found_inf = (~finite).to(torch.float32)
        if self.clip_value is not None and grads:
            torch._foreach_clamp_min_(grads, -self.clip_value)
            torch._foreach_clamp_max_(grads, self.clip_value)
        if self.clip_norm is not None and grads:
            coef = torch.clamp(self.clip_norm / (total_norm + 1e-6), max=1.0)
            for dtype in {g.dtype for g in grads}:
                torch._foreach_mul_([g for g in grads if g.dtype == dtype], coef.to(dtype))
        self._optimizer_step(finite, found_inf)
        self.skipped.add_(found_inf)
        self.bad_run.add_(found_inf).mul_(found_inf)
        torch.maximum(self.bad_run_max, self.bad_run, out=self.bad_run_max)
        outputs.update(grad_norm=total_norm.reshape(1), found_inf=found_inf)
        return outputs

    def _optimizer_step(self, finite: torch.Tensor, found_inf: torch.Tensor) -> None:
        optimizer = self.optimizer
        if not self.skip_nonfinite:
            optimizer.step()
            return
        if self._fused_skip:  # the fused kernel skips the update (and undoes its step count) itself
            optimizer.found_inf, optimizer.grad_scale = found_inf, None
            try:
                optimizer.step()
            finally:
                optimizer.found_inf = None
            return
        # Any other optimizer: keep the old parameters and state where the step was not finite.
        guarded = [p for p in self.params if p.grad is not None]
        before = {id(t): t for p in guarded for t in optimizer.state.get(p, {}).values() if isinstance(t, torch.Tensor)}
        with torch.no_grad():
            saved = [(t, t.clone()) for t in [*guarded, *before.values()]]
        optimizer.step()
        with torch.no_grad():
            for tensor, old in saved:
                tensor.copy_(torch.where(finite, tensor, old))
            for p in guarded:  # state created by this very step starts from zeros when the step is skipped
                for t in optimizer.state.get(p, {}).values():
                    if isinstance(t, torch.Tensor) and id(t) not in before:
                        t.copy_(torch.where(finite, t, torch.zeros_like(t)))
