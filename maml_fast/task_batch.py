"""`TaskBatch`: the support and query sets of a whole meta-batch, task-major.

Shapes: ``support_x [T, S, *features]``, ``support_y [T, S]`` (class indices, integer dtype) or
``[T, S, *targets]`` (regression, floating dtype); the same for the query set with ``Q`` examples.
Everything is checked when the batch is built, so bad input fails before any compute, with a message
that names the argument.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

_FIELDS = ("support_x", "support_y", "query_x", "query_y")


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise ValueError naming `name` if a floating tensor holds NaN or inf."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or inf values")


def check_labels(labels: dict[str, torch.Tensor], num_classes: int) -> None:
    """Raise ValueError naming the tensor (``{name: labels}``) if a class label lies outside
    [0, num_classes). One reduction per tensor and one read for all of them."""
    named = [(name, tensor) for name, tensor in labels.items() if tensor.numel() > 0]
    if not named:
        return
    bounds = torch.stack([bound for _, tensor in named for bound in torch.aminmax(tensor)]).tolist()
    for (name, _), low, high in zip(named, bounds[0::2], bounds[1::2]):
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"{name} holds labels in [{low}, {high}] but the model predicts {num_classes} classes: "
                f"labels must lie in [0, {num_classes})"
            )


@dataclass(frozen=True)
class TaskBatch:
    """One meta-batch of T tasks: ``TaskBatch(support_x, support_y, query_x, query_y)``."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    # NaN/inf scanning reads every value (and on a GPU waits for it); a sampler drawing from data it
    # has already checked passes False. Shapes, dtypes and devices are always checked.
    check_values: bool = field(default=True, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in _FIELDS:
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        for name in ("support_x", "query_x"):
            value = getattr(self, name)
            if value.dim() < 3:
                raise ValueError(
                    f"{name} must have shape [tasks, examples, *features] (3 or more dims), "
                    f"got shape {tuple(value.shape)}"
                )
            if not value.is_floating_point():
                raise TypeError(f"{name} must be a floating tensor, got dtype {value.dtype}")
        tasks = self.support_x.shape[0]
        for name in _FIELDS[1:]:
            if getattr(self, name).shape[0] != tasks:
                raise ValueError(
                    f"{name} has {getattr(self, name).shape[0]} tasks but support_x has {tasks}: "
                    "the first dim of every field is the task index and must agree"
                )
        if tasks == 0:
            raise ValueError("support_x holds no tasks (its first dim is 0)")
        for split in ("support", "query"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.shape[1] == 0:
                raise ValueError(f"{split}_x is empty: each task needs at least one {split} example")
            if y.dim() < 2 or y.shape[:2] != x.shape[:2]:
                raise ValueError(
                    f"{split}_y must have shape [tasks, examples, ...] matching {split}_x's "
                    f"{tuple(x.shape[:2])}, got {tuple(y.shape)}"
                )
            if y.dtype == torch.bool or y.is_complex():
                raise TypeError(f"{split}_y must be integer class labels or floating targets, got {y.dtype}")
            if not y.is_floating_point() and y.dim() != 2:
                raise ValueError(f"{split}_y as class labels must have shape [tasks, examples], got {tuple(y.shape)}")
        if self.support_x.shape[2:] != self.query_x.shape[2:]:
            raise ValueError(
                f"query_x has example shape {tuple(self.query_x.shape[2:])} but support_x has "
                f"{tuple(self.support_x.shape[2:])}"
            )
        if self.support_y.is_floating_point() != self.query_y.is_floating_point():
            raise TypeError("support_y and query_y must both be class labels or both be floating targets")
        if self.support_x.dtype != self.query_x.dtype:
            raise TypeError(f"query_x has dtype {self.query_x.dtype} but support_x has {self.support_x.dtype}")
        devices = {getattr(self, name).device for name in _FIELDS}
        if len(devices) != 1:
            raise ValueError(f"support_x, support_y, query_x and query_y must be on one device, got {devices}")
        if self.check_values:
            for name in _FIELDS:
                check_finite(name, getattr(self, name))

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    @property
    def is_classification(self) -> bool:
        return not self.support_y.is_floating_point()

    def to(self, *args, **kwargs) -> "TaskBatch":
        """Move every field (``non_blocking`` etc. pass through); labels keep their integer dtype."""
        moved = {}
        for name in _FIELDS:
            value = getattr(self, name)
            if value.is_floating_point():
                moved[name] = value.to(*args, **kwargs)
            else:
                device_args = [a for a in args if not isinstance(a, torch.dtype)]
                device_kwargs = {k: v for k, v in kwargs.items() if k != "dtype"}
                moved[name] = value.to(*device_args, **device_kwargs)
        return TaskBatch(**moved, check_values=False)

    def split_tasks(self, start: int, stop: int) -> "TaskBatch":
        """The tasks ``start:stop`` (views, no copy): used to split a meta-batch across ranks."""
        return TaskBatch(*(getattr(self, name)[start:stop] for name in _FIELDS), check_values=False)
