"""Backend "vmap": `torch.func.vmap` of the per-task module over the meta-batch (the functorch MAML
example's approach, and what a task-batched backend falls back to for a network it cannot lower)."""
from __future__ import annotations

from .base import Backend, Execution, vmapped_forward


class VmapBackend(Backend):
    name = "vmap"
    summary = "torch.func.vmap over the per-task module"

    def execution(self, model):
        return Execution(vmapped_forward(model))


VMAP = VmapBackend()
