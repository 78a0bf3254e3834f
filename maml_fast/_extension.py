"""The compiled extension `maml_fast._C` and where its kernels can run.

Importing `maml_fast._C` registers the ``torch.ops.maml_fast.*`` operators: CPU kernels always, CUDA
kernels when the build found nvcc. Importing this module never fails: when the library is missing
or cannot be loaded, `LOAD_ERROR` says why, and every capability check reports it. Checks return
reasons rather than a bare bool, so a caller (or a skipped test) can say why a backend is off.
Nothing here touches a GPU until a CUDA device is asked about.
"""
from __future__ import annotations

import functools

import torch

try:
    from maml_fast import _C
except (ImportError, OSError) as error:  # not built, or built against another torch / Python
    _C = None
    LOAD_ERROR: str | None = (
        f"maml_fast._C cannot be loaded ({type(error).__name__}: {error}); "
        "build it with `pip install -e . --no-build-isolation`"
    )
else:
    LOAD_ERROR = None

#: Compute capabilities the CUDA kernels were compiled for, e.g. ("8.0", "9.0+PTX"); () without them.
CUDA_ARCHS: tuple[str, ...] = tuple(_C.cuda_archs.split()) if _C is not None else ()


def _runs_on_capability(archs: tuple[str, ...], capability: tuple[int, int]) -> bool:
    """CUDA's compatibility rules: machine code for X.Y runs on X.Z with Z >= Y, PTX for X.Y on >= X.Y."""
    for arch in archs:
        major, minor = (int(part) for part in arch.removesuffix("+PTX").split("."))
        if major == capability[0] and minor <= capability[1]:
            return True
        if arch.endswith("+PTX") and (major, minor) <= capability:
            return True
    return False


@functools.cache
def _cached_reasons(device: torch.device) -> tuple[str, ...]:
    if LOAD_ERROR is not None:
        return (LOAD_ERROR,)
    if device.type == "cpu":
        return ()
    if device.type != "cuda":
        return (f"maml_fast._C has no kernels for device type {device.type!r}",)
    reasons = []
    if not CUDA_ARCHS:
        reasons.append(
            "maml_fast._C was built without CUDA kernels (no nvcc at build time, or MAML_FAST_BUILD_CUDA=0)"
        )
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is a CPU-only build")
    elif not torch.cuda.is_available():
        reasons.append("no CUDA device")
    elif device.index is not None and device.index >= torch.cuda.device_count():
        reasons.append(f"no CUDA device {device.index} ({torch.cuda.device_count()} visible)")
    elif CUDA_ARCHS:
        capability = torch.cuda.get_device_capability(device)
        if not _runs_on_capability(CUDA_ARCHS, capability):
            reasons.append(
                f"the CUDA kernels were compiled for {' '.join(CUDA_ARCHS)}; "
                f"{torch.cuda.get_device_name(device)} has compute capability {capability[0]}.{capability[1]}"
            )
    return tuple(reasons)


def extension_unavailable_reasons(device: torch.device | str) -> list[str]:
    """Why the compiled kernels cannot run on `device`; an empty list means they can."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return list(_cached_reasons(device))


# Fixed for the process's life: torch.compile evaluates it while tracing and keeps the answer.
@torch.compiler.assume_constant_result
def is_available(device: torch.device | str) -> bool:
    """True when the compiled kernels can run on `device`."""
    return not extension_unavailable_reasons(device)


class CompiledOps:
    """A group of ``torch.ops.maml_fast`` operators and where they can run: the extension's reasons
    (`extension_unavailable_reasons`), plus one when a loaded library was built from sources older
    than these operators. Each op module keeps one and exports its two checks."""

    def __init__(self, *names: str):
        missing = [name for name in names if LOAD_ERROR is None and not hasattr(torch.ops.maml_fast, name)]
        self.missing_reason = (
            f"maml_fast._C has no {', '.join(missing)} operator (built from older sources); "
            "rebuild it with `pip install -e . --no-build-isolation`"
        ) if missing else None
        #: Whether the operators are registered (the library loaded and has them): their fake
        #: (meta) kernels can be registered.
        self.registered = LOAD_ERROR is None and not missing

    def unavailable_reasons(self, device: torch.device | str) -> list[str]:
        """Why these compiled ops cannot run on `device`; an empty list means they can."""
        reasons = extension_unavailable_reasons(device)
        return reasons if reasons or self.missing_reason is None else [self.missing_reason]

    def is_available(self, device: torch.device | str) -> bool:
        """True when these compiled ops can run on `device`."""
        return self.missing_reason is None and is_available(device)
