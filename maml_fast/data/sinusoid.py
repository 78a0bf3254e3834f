"""Sinusoid regression tasks of the MAML paper (Finn et al. 2017, section 5.1).

Task t is ``y = A_t * sin(x - phase_t)`` with amplitude ``A_t ~ U[0.1, 5.0]``, phase
``phase_t ~ U[0, pi]`` and inputs ``x ~ U[-5, 5]``, as in the reference code (cbfinn/maml).
"""
from __future__ import annotations

import math

import torch

from maml_fast.checks import check_int
from maml_fast.data.episodes import SeededTaskSource
from maml_fast.task_batch import _FIELDS, TaskBatch

AMPLITUDE_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, math.pi)
INPUT_RANGE = (-5.0, 5.0)


class SinusoidTasks(SeededTaskSource):
    """Meta-batches of sinusoid tasks: ``x`` and ``y`` of shape ``[T, num_shots, 1]`` (support) and
    ``[T, num_query, 1]`` (query), floating `dtype`, on `device`, from a generator seeded with `seed`.

    Every number of a meta-batch comes from one ``torch.rand`` call, so there is no per-task loop.
    `meta_batch_size` is optional here: `sample` can take it instead.
    """

    def __init__(
        self,
        num_shots: int,
        num_query: int,
        device: torch.device | str | None = None,
        seed: int = 0,
        meta_batch_size: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(device, seed, meta_batch_size)
        self.num_shots = check_int("num_shots", num_shots, 1)
        self.num_query = check_int("num_query", num_query, 1)
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        self.dtype = dtype

    def _draw(self, generator: torch.Generator, num_tasks: int) -> tuple[torch.Tensor]:
        # Per task: column 0 -> amplitude, column 1 -> phase, the rest -> support then query inputs.
        uniform = torch.rand(
            num_tasks, 2 + self.num_shots + self.num_query, generator=generator, device=self.device, dtype=self.dtype
        )
        return (uniform,)

    def _layout(self, num_tasks: int) -> tuple[tuple[tuple[int, ...], torch.dtype], ...]:
        shots, queries = self.num_shots, self.num_query
        return tuple(((num_tasks, n, 1), self.dtype) for n in (shots, shots, queries, queries))

    def _build(self, uniform: torch.Tensor, *, out: TaskBatch) -> TaskBatch:
        def scaled(values: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
            return bounds[0] + (bounds[1] - bounds[0]) * values

        amplitude = scaled(uniform[:, 0:1], AMPLITUDE_RANGE)
        phase = scaled(uniform[:, 1:2], PHASE_RANGE)
        x = scaled(uniform[:, 2:], INPUT_RANGE)
        y = amplitude * torch.sin(x - phase)
        shots = self.num_shots
        for name, values in zip(_FIELDS, (x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])):
            getattr(out, name).copy_(values.unsqueeze(-1))
        return out
