"""Backend names and capability checks.

A backend is chosen by checks that return the reasons it cannot run (an empty list means it can),
never by catching an exception from a failed launch. Fused backends (Triton, the CUDA extension)
register themselves with `register_backend` and plug their primitives into the ops' implementation
tables (see `maml_fast.ops.conv2d.CONV_IMPLEMENTATIONS`).
"""
from __future__ import annotations

from typing import Callable

import torch

# "loop": plain PyTorch per task (the reference and the baseline); "vmap": torch.func.vmap over the
# per-task module (the functorch MAML example, and the fallback for unsupported layers); "torch":
# the task-batched program, one op call per layer for all tasks.
REFERENCE_BACKENDS = ("loop", "vmap")

_availability_checks: dict[str, Callable[[torch.device], list[str]]] = {
    "loop": lambda device: [],
    "vmap": lambda device: [],
    "torch": lambda device: [],
}
# Preference order for backend="auto" on each device type; a backend is taken only if available.
_auto_preference: dict[str, list[str]] = {"cpu": ["torch"], "cuda": ["torch"]}


def register_backend(name: str, availability: Callable[[torch.device], list[str]], prefer_on: tuple[str, ...] = ()):
    """Make `name` selectable; `availability(device)` returns why it cannot run there ([] = it can)."""
    _availability_checks[name] = availability
    for device_type in prefer_on:
        preference = _auto_preference.setdefault(device_type, ["torch"])
        if name not in preference:
            preference.insert(0, name)


def backend_names() -> tuple[str, ...]:
    return tuple(_availability_checks)


def unavailable_reasons(name: str, device: torch.device) -> list[str]:
    """Why backend `name` cannot run on `device` (empty when it can)."""
    if name not in _availability_checks:
        return [f"unknown backend {name!r}; known backends: {', '.join(backend_names())}"]
    return _availability_checks[name](torch.device(device))


def resolve_backend(name: str, device: torch.device) -> str:
    """Turn "auto" into a concrete backend for `device`; raise ValueError if `name` cannot run there."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    device = torch.device(device)
    if name == "auto":
        for candidate in _auto_preference.get(device.type, ["torch"]):
            if not unavailable_reasons(candidate, device):
                return candidate
        return "torch"
    reasons = unavailable_reasons(name, device)
    if reasons:
        raise ValueError(f"backend={name!r} cannot run on {device}: " + "; ".join(reasons))
    return name


def available_backends(device: torch.device | str = "cpu") -> dict[str, list[str]]:
    """Every known backend with the reasons it cannot run on `device` (empty list: it can)."""
    return {name: unavailable_reasons(name, device) for name in backend_names()}
