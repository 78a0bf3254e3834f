"""The backends: how the meta-batch runs. One `Backend` object per backend, one file each, and this
registry (`BACKENDS`) of all of them; ``backend=`` names one by its name or an alias.

| name | file | what it runs |
|---|---|---|
| "loop" | loop.py | a Python loop over tasks, plain PyTorch per task (the reference and the baseline) |
| "vmap" | vmap.py | torch.func.vmap over the per-task module |
| "torch" | pytorch.py | the task-batched program of pure PyTorch ops |
| "fused" ("cuda") | fused.py | the program on the compiled C++/CUDA C++ ops of maml_fast._C |
| "triton" | triton.py | the program with Triton conv and batched-matmul kernels |

A backend is chosen by checks that return the reasons it cannot run (an empty list means it can), never
by catching an exception from a failed launch; ``"auto"`` takes the available backend of highest
``auto_rank`` for the device type ("torch" where none ranks).
"""
from __future__ import annotations

import torch

from .base import Backend, Execution, ProgramBackend
from .fused import FUSED
from .loop import LOOP
from .pytorch import TORCH
from .triton import TRITON
from .vmap import VMAP

BACKENDS: dict[str, Backend] = {backend.name: backend for backend in (LOOP, VMAP, TORCH, FUSED, TRITON)}
_ALIASES = {alias: backend for backend in BACKENDS.values() for alias in backend.aliases}


def backend_names() -> tuple[str, ...]:
    """The names ``backend=`` accepts besides "auto" (aliases included)."""
    return (*BACKENDS, *_ALIASES)


def get_backend(name: str | Backend) -> Backend:
    """The backend named `name` (or an alias of it); a `Backend` is returned as it is."""
    if isinstance(name, Backend):
        return name
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    backend = BACKENDS.get(name) or _ALIASES.get(name)
    if backend is None:
        raise ValueError(f"backend must be 'auto' or one of {backend_names()}, got {name!r}")
    return backend


def unavailable_reasons(name: str, device: torch.device | str) -> list[str]:
    """Why backend `name` cannot run on `device` (empty when it can)."""
    if name not in BACKENDS and name not in _ALIASES:
        return [f"unknown backend {name!r}; known backends: {', '.join(backend_names())}"]
    return get_backend(name).unavailable_reasons(torch.device(device))


def resolve_backend(name: str | Backend, device: torch.device | str) -> Backend:
    """The backend that runs on `device` for ``backend=name``: "auto" picks the available backend of
    highest ``auto_rank`` there; any other name raises ValueError with the reasons it cannot run."""
    device = torch.device(device)
    if name == "auto":
        ranked = sorted((b for b in BACKENDS.values() if device.type in b.auto_rank),
                        key=lambda b: -b.auto_rank[device.type])
        return next((b for b in ranked if not b.unavailable_reasons(device)), TORCH)
    backend = get_backend(name)
    reasons = backend.unavailable_reasons(device)
    if reasons:
        raise ValueError(f"backend={name!r} cannot run on {device}: " + "; ".join(reasons))
    return backend


def available_backends(device: torch.device | str = "cpu") -> dict[str, list[str]]:
    """Every backend (by name) with the reasons it cannot run on `device` (empty list: it can)."""
    return {name: backend.unavailable_reasons(torch.device(device)) for name, backend in BACKENDS.items()}


__all__ = ["Backend", "ProgramBackend", "Execution", "BACKENDS", "backend_names", "get_backend",
           "unavailable_reasons", "resolve_backend", "available_backends"]
