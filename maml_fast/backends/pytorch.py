"""Backend "torch": the task-batched program in pure PyTorch. One op call per layer for all tasks
(convolutions as grouped convolutions with the task index as the group, channels-last on the CPU;
BatchNorm per task as one batch norm over T*C channels with closed-form derivatives); runs everywhere."""
from __future__ import annotations

from .base import ProgramBackend


class TorchBackend(ProgramBackend):
    name = "torch"
    summary = "the task-batched program of pure PyTorch ops"
    # The fallback of "auto": every other backend outranks it where it is preferred and available.
    auto_rank = {"cpu": 0, "cuda": 0}


TORCH = TorchBackend()
