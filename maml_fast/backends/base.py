"""What a backend is: the `Backend` object every backend file defines, and how a network runs on it.

A backend answers, in one place:

* ``name`` (and ``aliases``): what ``backend=`` selects it by;
* `Backend.unavailable_reasons`: why it cannot run on a device (an empty list: it can), checked
  without launching anything;
* ``auto_rank``: where ``backend="auto"`` prefers it (device type -> rank; the available backend of
  highest rank wins);
* `Backend.execution`: how a network runs for a group of tasks (`Execution`);
* its losses (`Backend.losses`) and its fast-weight update (`Backend.fast_weight_update`).

`ProgramBackend` is the base of the task-batched backends: the network is lowered
(`maml_fast.program.lower`) to one op per layer for all tasks, and the backend names the primitives
those ops run on (``conv``, ``matmul``) and its fusion rules (several layers lowered to one op).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from ..ops import conv2d as conv_ops
from ..ops.fast_weight_update import fast_weight_update_reference
from ..ops.losses import LOSSES

#: ``(output [T, B, ...], labels [T, B, ...]) -> (loss [T], accuracy [T] or None)``
LossFn = Callable[[torch.Tensor, torch.Tensor], tuple]
#: ``forward(params {name: [T, ...]}, x [T, B, ...]) -> [T, B, ...]``
Forward = Callable[[dict, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Execution:
    """How a network runs on a backend: ``forward`` maps per-task parameters and task-major inputs of
    a group of tasks to task-major outputs; ``per_task`` runs the learner's inner loop one task at a
    time (the loop backend); ``fallback_reason`` says why a task-batched backend runs this network
    through `torch.func.vmap` instead (None when it does not)."""

    forward: Forward
    per_task: bool = False
    fallback_reason: str | None = None
    #: the conv weights that ``forward`` takes as `maml_fast.ops.low_rank_conv.LowRankFastWeight`
    low_rank_weights: frozenset[str] = frozenset()

    def task_groups(self, tasks: int) -> list[slice]:
        """The groups of tasks that one inner loop runs at once."""
        return [slice(t, t + 1) for t in range(tasks)] if self.per_task else [slice(0, tasks)]


def per_task_forward(model: nn.Module) -> Forward:
    """The module applied to one task (a group of exactly one task)."""
    def forward(params, x):
        return functional_call(model, {n: p[0] for n, p in params.items()}, (x[0],)).unsqueeze(0)
    return forward


def vmapped_forward(model: nn.Module) -> Forward:
    """The module vmapped over the tasks; each task draws its own dropout mask, as in the loop."""
    def task(params, x):
        return functional_call(model, params, (x,))
    return lambda params, x: torch.func.vmap(task, randomness="different")(params, x)


class Backend:
    """One way of running the meta-batch (see the module doc). Subclasses set the class attributes
    and override what differs; the defaults are plain PyTorch."""

    name: str = ""
    aliases: tuple[str, ...] = ()
    summary: str = ""
    auto_rank: Mapping[str, int] = {}
    losses: Mapping[str, LossFn] = LOSSES

    def unavailable_reasons(self, device: torch.device) -> list[str]:
        """Why this backend cannot run on `device` (an empty list: it can)."""
        return []

    def is_available(self, device: torch.device | str) -> bool:
        return not self.unavailable_reasons(torch.device(device))

    def execution(self, model: nn.Module) -> Execution:
        raise NotImplementedError

    def fast_weight_update(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                           lrs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``[params_i - lrs_i * grads_i]`` for every adapted tensor, differentiable to any order."""
        return fast_weight_update_reference(params, grads, lrs)

    def __repr__(self) -> str:
        return f"<maml_fast backend {self.name!r}>"


#: A fusion rule: ``rule(children, prefix, backend)`` gets the ``(name, module)`` pairs of an
#: nn.Sequential from the current position on and returns ``(layer, number of children it replaces)``,
#: or None to leave them to the per-layer lowerings (`maml_fast.program`).
FusionRule = Callable[[list, str, "ProgramBackend"], "tuple[Callable, int] | None"]


class ProgramBackend(Backend):
    """A task-batched backend: the network lowered to one op per layer for all tasks. ``conv``: the
    conv primitives (`maml_fast.ops.conv2d`); ``matmul``: the linear layer's batched product (None:
    torch.bmm); ``fusion_rules``: tried in order at every position of an nn.Sequential, before the
    per-layer lowerings. A network that does not lower runs through `torch.func.vmap`."""

    conv = conv_ops.TORCH_CONV
    matmul = None
    fusion_rules: tuple[FusionRule, ...] = ()

    def execution(self, model: nn.Module) -> Execution:
        from ..program import lower
        program, reason = lower(model, self)
        if program is None:
            return Execution(vmapped_forward(model), fallback_reason=reason)
        # (the lowered convolutions take a factored fast weight; the primitives decide where it pays)
        convs = frozenset(f"{name}.weight" for name, module in model.named_modules() if type(module) is nn.Conv2d)
        return Execution(program, low_rank_weights=convs if hasattr(self.conv, "factors_updates") else frozenset())
