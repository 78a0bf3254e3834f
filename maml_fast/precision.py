"""Precision modes of the meta-step, and how far each one moves the meta-gradient.

    with precision_mode("bf16-saved"):
        out = learner(batch)
        out.loss.backward()

Modes (`PRECISION_MODES`):

* ``"fp32"`` (default, exact): float32 everywhere; TF32 is switched *off* for cuBLAS matmuls and cuDNN
  convolutions inside the block (PyTorch's own default lets cuDNN convolutions use TF32), so the
  step keeps the float32 contract (meta-gradient within ~1e-5 relative of the float64 reference).
* ``"tf32"``: TF32 on for cuBLAS matmuls and cuDNN convolutions (``torch.backends.cuda.matmul.
  allow_tf32`` and ``torch.backends.cudnn.allow_tf32``), restored on exit. It changes nothing on
  the CPU; its error is measured on a GPU (`meta_gradient_error`).
* ``"bf16-saved"``: compute stays float32 (TF32 off, as in ``"fp32"``), but the activations autograd
  saves for the backward — of the inner loop's ``autograd.grad(create_graph=True)`` and of the outer
  double backward — are stored in bfloat16 (`bf16_saved_tensors`): half the memory and bandwidth of
  the saved graph. Only floating tensors of at least ``min_numel`` elements are packed; parameters
  (leaves that require grad), expanded (stride-0) views such as θ expanded over the tasks, and
  small tensors are kept exact. The autograd graph itself is unchanged (an unpacked tensor gets its
  ``grad_fn`` back), so the second-order terms stay: only the values the backward reads are rounded.

The flags a mode sets are read by the kernels when they are launched, so a CUDA graph captured in a
mode replays in that mode (`maml_fast.cuda_graph.GraphedMetaStep` takes ``precision=``).

`meta_gradient_error(learner_factory, batch, mode)` measures the relative error of the meta-gradient
in a mode against a float64 copy of the same learner (same weights).

Measured on the CPU (tests/test_precision.py; tiny conv4, hidden 8, 5-way 1-shot, T=2, 2 inner
steps): fp32 7.7e-7; bf16-saved 4.6e-4..8.7e-4 without normalisation, 4.8e-2..1.8e-1 with BatchNorm.
The BatchNorm figure is the meta-gradient's own sensitivity on such tiny per-task batches (a 1e-4
relative change of the support images moves the float64 meta-gradient by 14%), so measure a mode on
the real configuration (a GPU, the real network and batch sizes) before relying on it.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

PRECISION_MODES = ("fp32", "tf32", "bf16-saved")
DEFAULT_MIN_NUMEL = 4096  # bf16-saved: smaller saved tensors stay exact (4096 floats = 16 KiB)


def check_mode(mode: object, name: str = "mode") -> str:
    """Return `mode` if it is a precision mode, else raise ValueError naming the argument `name`."""
    if not isinstance(mode, str) or mode not in PRECISION_MODES:
        raise ValueError(f"{name} must be one of {PRECISION_MODES}, got {mode!r}")
    return mode


# --------------------------------------------------------------------------- TF32 flags
_NEW_API = (  # (owner path, attribute); written back in this order (parents before children)
    ("backends", "fp32_precision"),
    ("backends.cuda.matmul", "fp32_precision"),
    ("backends.cudnn", "fp32_precision"),
    ("backends.cudnn.conv", "fp32_precision"),
    ("backends.cudnn.rnn", "fp32_precision"),
)


def _owner(path: str):
    obj = torch
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def tf32_state() -> dict[str, object]:
    """Every TF32-related setting, as a dict that `restore_tf32_state` writes back exactly. Uses
    PyTorch's ``fp32_precision`` settings where they exist (reading the legacy ``cudnn.allow_tf32``
    raises when someone mixed the legacy and new APIs), else the legacy ``allow_tf32`` flags."""
    state: dict[str, object] = {"float32_matmul_precision": torch.get_float32_matmul_precision()}
    for path, attr in _NEW_API:
        owner = _owner(path)
        if owner is not None and hasattr(owner, attr):
            state[f"{path}.{attr}"] = getattr(owner, attr)
    if len(state) == 1:  # an older torch without the fp32_precision settings
        state["backends.cuda.matmul.allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        state["backends.cudnn.allow_tf32"] = torch.backends.cudnn.allow_tf32
    return state


def restore_tf32_state(state: dict[str, object]) -> None:
    """Write back a `tf32_state` snapshot."""
    torch.set_float32_matmul_precision(state["float32_matmul_precision"])
    for key, value in state.items():
        if key == "float32_matmul_precision":
            continue
        path, attr = key.rsplit(".", 1)
        setattr(_owner(path), attr, value)


def _set_tf32(enabled: bool) -> None:
    # The legacy setters keep the new-API settings consistent (cudnn: conv and rnn together).
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def conv_fp32_precision() -> str:
    """'tf32' when PyTorch lets cuDNN convolutions use TF32, else 'ieee' (exact fp32 products): the switch
    `tf32` sets, which the Triton conv kernels follow as cuDNN does."""
    for path in (("cudnn", "conv"), ("cudnn",), ()):
        obj = torch.backends
        try:
            for attr in path:
                obj = getattr(obj, attr)
            value = getattr(obj, "fp32_precision")
        except (AttributeError, RuntimeError):
            break
        if value in ("tf32", "ieee"):
            return value
        # "none": inherit from the parent setting
    else:
        return "ieee"
    try:
        return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    except RuntimeError:
        return "ieee"


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 on (or off) for cuBLAS matmuls and cuDNN convolutions inside the block; every setting is
    restored on exit, also after an exception."""
    saved = tf32_state()
    try:
        _set_tf32(bool(enabled))
        yield
    finally:
        restore_tf32_state(saved)


# --------------------------------------------------------------------------- bf16 saved tensors
@dataclass
class SavedTensorStats:
    """What `bf16_saved_tensors` did: tensors packed to bfloat16 and kept exact, and their bytes."""

    packed: int = 0
    kept: int = 0
    packed_bytes: int = 0  # size of the packed tensors in their original dtype
    saved_bytes: int = 0  # bytes the packing saved (packed_bytes minus the bf16 copies)


class _Packed:
    __slots__ = ("data", "dtype")

    def __init__(self, data: torch.Tensor, dtype: torch.dtype):
        self.data, self.dtype = data, dtype


def _is_expanded(tensor: torch.Tensor) -> bool:
    return any(stride == 0 and size > 1 for size, stride in zip(tensor.shape, tensor.stride()))


@contextlib.contextmanager
def bf16_saved_tensors(min_numel: int = DEFAULT_MIN_NUMEL,
                       keep: Callable[[torch.Tensor], bool] | None = None) -> Iterator[SavedTensorStats]:
    """Inside the block, tensors that autograd saves for the backward are stored in bfloat16 and
    given back in their own dtype when the backward reads them.

    Packed: floating tensors of a wider dtype than bfloat16 with at least `min_numel` elements that
    are neither leaves requiring grad (parameters), nor expanded views (stride 0), nor selected by
    `keep` (a predicate: True keeps a tensor exact). Everything else is saved as is. The tensors
    saved inside the inner loop's ``autograd.grad(create_graph=True)`` are packed too, and the
    unpacked tensors keep their place in the autograd graph, so a double backward still has every
    second-order term. Yields a `SavedTensorStats` that counts what was packed."""
    if isinstance(min_numel, bool) or not isinstance(min_numel, int) or min_numel < 0:
        raise ValueError(f"min_numel must be a non-negative int, got {min_numel!r}")
    stats = SavedTensorStats()

    def pack(tensor: torch.Tensor):
        if (tensor.is_floating_point() and tensor.dtype in (torch.float32, torch.float64)
                and tensor.numel() >= min_numel and not (tensor.is_leaf and tensor.requires_grad)
                and not _is_expanded(tensor) and not (keep is not None and keep(tensor))):
            stats.packed += 1
            nbytes = tensor.numel() * tensor.element_size()
            stats.packed_bytes += nbytes
            stats.saved_bytes += nbytes - tensor.numel() * 2
            return _Packed(tensor.detach().to(torch.bfloat16), tensor.dtype)
        stats.kept += 1
        return tensor

    def unpack(packed):
        if isinstance(packed, _Packed):
            return packed.data.to(packed.dtype)
        return packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield stats


# --------------------------------------------------------------------------- modes
@contextlib.contextmanager
def precision_mode(mode: str = "fp32", *, min_numel: int = DEFAULT_MIN_NUMEL,
                   keep: Callable[[torch.Tensor], bool] | None = None) -> Iterator[SavedTensorStats | None]:
    """Run the block (the learner's forward and the meta-backward) in precision `mode`; every flag is
    restored on exit. Yields the `SavedTensorStats` of ``"bf16-saved"`` (None in the other modes).
    `min_numel` and `keep` apply to ``"bf16-saved"`` (see `bf16_saved_tensors`)."""
    check_mode(mode)
    with tf32(mode == "tf32"):
        if mode == "bf16-saved":
            with bf16_saved_tensors(min_numel, keep) as stats:
                yield stats
        else:
            yield None


# --------------------------------------------------------------------------- error measurement
@dataclass
class MetaGradientError:
    """`meta_gradient_error(..., details=True)`: the global relative error, each parameter's
    (relative to its own reference norm, floored at 1e-6 of the global one), the meta-loss's, and the
    bf16-saved packing statistics (None in the other modes)."""

    relative: float
    per_parameter: dict[str, float]
    loss_relative: float
    saved: SavedTensorStats | None


def _meta_gradient(learner, batch, mode=None, **options):
    learner.zero_grad(set_to_none=True)
    context = precision_mode(mode, **options) if mode is not None else contextlib.nullcontext()
    with context as stats:
        out = learner(batch)
        out.loss.backward()
    grads = {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
             for n, p in learner.named_parameters() if p.requires_grad}
    learner.zero_grad(set_to_none=True)
    return out.loss.detach(), grads, stats


def meta_gradient_error(learner_factory: Callable[[], torch.nn.Module], batch, mode: str, *,
                        details: bool = False, **options) -> float | MetaGradientError:
    """Relative error ``‖g_mode − g_ref‖ / ‖g_ref‖`` of the meta-gradient of `batch` in precision
    `mode`, where ``g_ref`` is the meta-gradient of a float64 copy of the same learner (same
    weights) on the batch in float64, and ``g_mode`` that of the learner in its own dtype on the
    batch in that dtype. ``learner_factory()`` is called twice (the second learner takes the first
    one's state and is cast to float64), so it must build the same architecture each time.
    With ``details=True`` returns a `MetaGradientError`. `options` go to `precision_mode`.
    TF32 only differs from fp32 on a GPU."""
    check_mode(mode)
    if not callable(learner_factory) or isinstance(learner_factory, torch.nn.Module):
        raise TypeError("learner_factory must be a callable that builds a new learner on each call (e.g. a lambda), "
                        f"got {type(learner_factory).__name__}")
    learner = learner_factory()
    reference = learner_factory()
    if reference is learner:
        raise ValueError("learner_factory must build a new learner on each call (it returned the same object twice)")
    reference.load_state_dict(learner.state_dict())
    reference.double()
    param = next(p for p in learner.parameters() if p.is_floating_point())
    if param.dtype == torch.float64:
        raise ValueError("learner_factory builds a float64 learner: the reference is float64 already, "
                         "so there is no precision to measure (build it in float32)")
    learner.train()
    reference.train()
    loss, grads, stats = _meta_gradient(learner, batch.to(device=param.device, dtype=param.dtype), mode, **options)
    with tf32(False):
        ref_loss, ref_grads, _ = _meta_gradient(reference, batch.to(device=param.device, dtype=torch.float64))
    diffs = {n: float(torch.linalg.vector_norm(grads[n].double() - ref)) for n, ref in ref_grads.items()}
    norms = {n: float(torch.linalg.vector_norm(ref)) for n, ref in ref_grads.items()}
    num, den = math.sqrt(sum(d * d for d in diffs.values())), math.sqrt(sum(v * v for v in norms.values()))
    relative = num / den if den > 0 else (0.0 if num == 0 else math.inf)
    # A parameter whose true meta-gradient is ~0 (a conv bias followed by BatchNorm) is measured
    # against 1e-6 of the whole meta-gradient's norm instead of its own.
    per_parameter = {n: diffs[n] / max(norms[n], 1e-6 * den) if den > 0 else relative for n in diffs}
    if not details:
        return relative
    loss_relative = float((loss.double() - ref_loss).abs() / ref_loss.abs().clamp_min(1e-300))
    return MetaGradientError(relative, per_parameter, loss_relative, stats)
