"""Input checks shared by the compiled ops (each raises an error that names the argument)."""
from __future__ import annotations

import torch


def check_tensor(name: str, tensor) -> None:
    """TypeError naming `name` unless `tensor` is a torch.Tensor."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
