"""Backend "loop": the naive baseline and the reference. The learner's whole inner loop runs once per
task, with plain PyTorch on the per-task module (what learn2learn and most ports do)."""
from __future__ import annotations

from .base import Backend, Execution, per_task_forward


class LoopBackend(Backend):
    name = "loop"
    summary = "a Python loop over tasks, plain PyTorch per task (the reference and the baseline)"

    def execution(self, model):
        return Execution(per_task_forward(model), per_task=True)


LOOP = LoopBackend()
