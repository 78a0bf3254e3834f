"""The whole meta-step as one CUDA graph: `GraphedMetaStep`.

One training iteration — the learner's forward with its inner loop, the query loss, the second-order
``loss.backward()``, the meta-gradient norm, optional clipping, the (capturable) optimizer step and
the non-finite check — is captured once per input signature and replayed with one launch per call:

    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3, fused=True, capturable=True)
    step = GraphedMetaStep(learner, optimizer, clip_norm=10.0, precision="fp32")
    for _ in range(iterations):
        metrics = step(sampler.sample())     # device tensors; no host synchronisation
        scheduler.step()                     # reaches the graph: the lr is a device tensor

``torch.cuda.make_graphed_callables`` cannot be used (it does not support double backward), so the
step is captured whole, as PyTorch's CUDA-graph notes do for whole-network capture:

* Static inputs: per signature a static `TaskBatch`; ``step(batch)`` copies the batch into it in
  place (``copy_``), the graph reads it there. A caller that draws each batch into `static_inputs()`
  itself (the trainer: ``source.sample(out=step.static_inputs())``) passes that batch: nothing is copied.
* Warm-up: the first ``warmup`` calls of a signature run eagerly on a side stream (they are real
  training steps, not extra ones): cuDNN/cuBLAS/Triton lazy initialisation and autotuning, the
  optimizer's lazily created state and the learner's lowering all happen before capture.
* Capture (``torch.cuda.graph`` on that side stream, one memory pool shared by this step's graphs),
  then one replay per call. A capture does not execute the step, so the capturing call replays once.
* Gradients: the step starts with ``optimizer.zero_grad(set_to_none=True)``, so during capture the
  backward *allocates* the gradients in the graph's pool (the first accumulation into a ``None``
  grad is an assignment: nothing stale is accumulated across replays). Those tensors are the
  graph's static gradients: they are kept, ``p.grad`` points at them after each replay, and nobody
  may zero them between replays (a ``zero_grad`` outside would only drop the reference; the graph
  still writes there). A ``zero_grad(set_to_none=False)`` inside the step would be needed instead if
  the grads were allocated outside the graph; the docs' way is used because it also keeps "a
  parameter without a gradient is not stepped" exactly as in the eager loop.
* The optimizer must be capturable (``capturable=True``; Adam/AdamW also ``fused=True`` for the
  on-device skip below). Its float learning rates are turned into 0-dim device tensors
  (``tensor_lr=True``): a Python float would be baked into the graph and an LR scheduler would not
  reach it; PyTorch's schedulers update a tensor lr in place.
* The step is `maml_fast.meta_step.MetaStep`, the trainer's: the non-finite skip is decided on the
  device and counted in device counters (`counters`); nothing is read on the host inside it.
* Re-capture: the signature is the batch's shapes, dtypes and device plus the learner's mode
  (``training``, ``inner_steps``, ``eval_inner_steps``, ``first_order``, and ``learner.graph_key()``
  if it defines one: anything a Python branch of the forward reads must be in it). A new signature
  gets its own static inputs, warm-up and graph; at most ``max_graphs`` are kept (least recently
  used first out).
* Host synchronisation: the last warm-up of a signature runs under `HostSyncDetector`, which names
  the source line of every ``.item()``/``int()``/``bool()`` on a device tensor, value-dependent shape
  (``nonzero``, boolean masks) and host-to-device copy — each would break the capture or be baked
  into it. ``check_host_syncs``: "raise" (default), "warn", "eager" (run that signature eagerly) or
  "ignore".
* ``enabled=False`` runs exactly the same step function eagerly (no static copies, no graph).

Optional learner protocol (all three are looked up with ``getattr``; a learner without them works):

* ``learner.graph_key()``: hashable; joins the signature (see above).
* ``learner.host_checks``: a bool attribute; when present it is set to False for every warm-up of
  a signature but the first and for the capture (restored afterwards), so value checks that read
  the device (labels in range, ...) run once per signature, eagerly, and are not captured (with
  ``warmup=1`` the only warm-up is the host-sync check, which runs without them: none run).
* ``learner.on_graph_replay()``: called after each replay that is not part of the capturing call.
  A replay runs no Python, so Python-side state the forward advances (a host mirror of an iteration
  counter) must be advanced here; the capturing call ran the forward's Python once itself.

The CUDA calls sit behind `CaptureBackend` (``warmup(fn)``, ``capture(fn) -> Replayable``), so the
buffer management, signatures, re-capture and eager switch are tested on the CPU: with a fake backend,
and with `EmulatedGraphBackend`, a CPU stand-in that records the aten ops of a capture and replays
them on the recorded tensors (no Python at replay: Python values read during capture are baked in,
as on a GPU). Nothing here touches CUDA at import.

After ``optimizer.load_state_dict`` (it replaces the state tensors the graphs point to) call
`GraphedMetaStep.reset`. ``learner.load_state_dict`` copies in place and needs nothing.
"""
from __future__ import annotations

import os
import traceback
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .checks import check_int
from .meta_step import MetaStep, host_checks
from .task_batch import TaskBatch

__all__ = ["GraphedMetaStep", "GraphedBatchCall", "GraphStats", "CaptureBackend", "Replayable", "CudaGraphBackend",
           "EmulatedGraphBackend", "HostSyncDetector", "HostSync", "HostSyncError", "find_host_syncs",
           "batch_signature"]

_FIELDS = ("support_x", "support_y", "query_x", "query_y")
SYNC_POLICIES = ("raise", "warn", "eager", "ignore")


# =============================================================================== host syncs
class HostSyncError(RuntimeError):
    """The step reads a device value on the host (or similar): it cannot be captured as it is."""


@dataclass(frozen=True)
class HostSync:
    op: str  # the aten op
    where: str  # "file:line in function" of the first frame outside torch and this module
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason} ({self.op})"


_TORCH_DIR = os.path.dirname(torch.__file__)
_THIS_FILE = os.path.abspath(__file__)
_SHAPE_FROM_VALUES = {"nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
                      "unique_dim_consecutive", "_unique"}


def _user_frame() -> str:
    """The innermost frame outside torch and this module, and its caller."""
    frames = []
    for frame in reversed(traceback.extract_stack()):
        filename = os.path.abspath(frame.filename)
        if filename == _THIS_FILE or filename.startswith(_TORCH_DIR) or "contextlib" in filename:
            if frames:
                break
            continue
        frames.append(f"{frame.filename}:{frame.lineno} in {frame.name}")
        if len(frames) == 2:
            break
    if not frames:
        return "<unknown>"
    return frames[0] if len(frames) == 1 else f"{frames[0]} (called from {frames[1]})"


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


class HostSyncDetector(TorchDispatchMode):
    """While active, reports every op that would make the host wait for the device (or bake host
    data into a captured graph) for tensors on `device_type`:

    * ``_local_scalar_dense``: ``.item()``, ``int()``, ``float()``, ``bool()``, a Python ``if`` on a tensor;
    * ops whose output shape depends on values (``nonzero``, ``masked_select``, ``unique``, boolean
      mask indexing);
    * ``.tolist()`` and ``.numpy()`` (on a CPU tensor they read memory without an aten op: the
      detector wraps them while it is active);
    * copies between the host and the device (``.cpu()``, ``.to("cuda")`` of host data). With
      ``device_type="cpu"`` (checking a CPU run for what a GPU run would do) every tensor made from
      host data (``torch.tensor``, ``new_tensor``: ``lift_fresh``) counts, since on a GPU it is a
      blocking host-to-device copy.

    ``policy="raise"`` raises `HostSyncError` at the op; ``"record"`` appends to ``found``.
    """

    def __init__(self, device_type: str = "cuda", policy: str = "record"):
        super().__init__()
        if policy not in ("raise", "record"):
            raise ValueError(f"policy must be 'raise' or 'record', got {policy!r}")
        self.device_type, self.policy = device_type, policy
        self.found: list[HostSync] = []

    def _on_device(self, value) -> bool:
        return any(t.device.type == self.device_type for t in _tensors(value))

    def _reason(self, func, args, kwargs) -> str | None:
        name = func.__name__.split(".")[0]
        if name == "_local_scalar_dense" and self._on_device(args):
            return "reads a device value on the host (.item(), int(), float(), bool() or an `if` on a tensor)"
        if name in _SHAPE_FROM_VALUES and self._on_device(args):
            return "an output shape that depends on values (the host waits for them)"
        if name in ("index", "index_put", "index_put_") and self._on_device(args[:1]) and len(args) > 1:
            if any(t.dtype in (torch.bool, torch.uint8) for t in _tensors(args[1])):
                return "boolean-mask indexing (nonzero: the host waits for the mask)"
        if name in ("lift_fresh", "lift_fresh_copy") and self.device_type == "cpu":
            return "a tensor made from host data (torch.tensor / new_tensor): on a GPU a blocking host-to-device copy"
        if name in ("_to_copy", "copy_", "to"):
            devices = {t.device.type for t in _tensors(args)}
            target = kwargs.get("device")
            if target is not None:
                devices.add(torch.device(target).type)
            if self.device_type in devices and len(devices) > 1:
                return "a copy between the host and the device"
        return None

    # Read on the host without an aten op for a CPU tensor (so the dispatch mode never sees them):
    # while a detector is active they are wrapped to report like `_local_scalar_dense`.
    _BYPASSING = ("tolist", "numpy")

    def __enter__(self):
        self._saved_methods = {name: getattr(torch.Tensor, name) for name in self._BYPASSING}
        for name, method in self._saved_methods.items():
            setattr(torch.Tensor, name, self._reporting(name, method))
        try:
            return super().__enter__()
        except BaseException:
            self._restore_methods()
            raise

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._restore_methods()

    def _restore_methods(self) -> None:
        for name, method in self.__dict__.pop("_saved_methods", {}).items():
            setattr(torch.Tensor, name, method)

    def _reporting(self, name, method):
        detector = self

        def reporting(tensor, *args, **kwargs):
            if tensor.device.type == detector.device_type:
                detector._report(HostSync(f"Tensor.{name}", _user_frame(), f"reads device values on the host "
                                          f"(.{name}())"))
            return method(tensor, *args, **kwargs)
        return reporting

    def _report(self, sync: HostSync) -> None:
        if self.policy == "raise":
            raise HostSyncError(f"host synchronisation in a step meant for CUDA-graph capture: {sync}")
        self.found.append(sync)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = self._reason(func, args, kwargs)
        if reason is not None:
            self._report(HostSync(str(func), _user_frame(), reason))
        return func(*args, **kwargs)


def find_host_syncs(fn: Callable, *args, device_type: str | None = None, **kwargs) -> list[HostSync]:
    """Run ``fn(*args, **kwargs)`` (for real) and return the host synchronisations it performs on
    `device_type` (default: ``"cuda"`` if CUDA is available, else ``"cpu"``)."""
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    with HostSyncDetector(device_type, policy="record") as detector:
        fn(*args, **kwargs)
    return detector.found


# =============================================================================== capture backends
class Replayable:
    """A captured step: ``replay()`` runs it again; ``outputs`` are its static output tensors."""

    outputs: Any = None

    def replay(self) -> None:
        raise NotImplementedError

    def release(self) -> None:
        """Free what the capture holds (called when the graph is evicted)."""
        self.outputs = None


class CaptureBackend:
    """The device-specific part of `GraphedMetaStep`.

    ``warmup(fn)``: run ``fn()`` eagerly, as a warm-up before capture, and return its outputs.
    ``capture(fn)``: record ``fn()`` into a `Replayable` *without* executing its effects (as CUDA
    graph capture does); `GraphedMetaStep` replays right after capturing.
    ``device_type``: where the step's tensors live (what `HostSyncDetector` watches).
    """

    name = "abstract"
    device_type = "cpu"

    def warmup(self, fn: Callable[[], Any]) -> Any:
        return fn()

    def capture(self, fn: Callable[[], Any]) -> Replayable:
        raise NotImplementedError


class _CudaGraph(Replayable):
    def __init__(self, graph, outputs):
        self.graph, self.outputs = graph, outputs

    def replay(self) -> None:
        self.graph.replay()

    def release(self) -> None:
        self.outputs = None
        if self.graph is not None:
            self.graph.reset()
            self.graph = None


class CudaGraphBackend(CaptureBackend):
    """CUDA graphs: warm-up on a side stream, capture on the same side stream with
    ``torch.cuda.graph`` into one memory pool shared by all graphs of this backend (safe: they are
    replayed one at a time on one stream, and each graph's live outputs and gradients stay
    referenced), replay on the current stream."""

    name = "cuda"
    device_type = "cuda"

    def __init__(self, device: torch.device | str | int | None = None, capture_error_mode: str = "global",
                 share_pool: bool = True):
        if capture_error_mode not in ("global", "thread_local", "relaxed"):
            raise ValueError("capture_error_mode must be 'global', 'thread_local' or 'relaxed', "
                             f"got {capture_error_mode!r}")
        self.device = None if device is None else torch.device(device)
        self.capture_error_mode, self.share_pool = capture_error_mode, share_pool
        self._stream = None
        self._pool = None

    def _side_stream(self):
        if not torch.cuda.is_available():
            raise RuntimeError("CudaGraphBackend needs a CUDA device (torch.cuda.is_available() is False)")
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
        return self._stream

    def warmup(self, fn):
        stream = self._side_stream()
        current = torch.cuda.current_stream(self.device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            outputs = fn()
        current.wait_stream(stream)
        for tensor in _tensors(outputs):  # made on the side stream, read on the current one
            tensor.record_stream(current)
        return outputs

    def capture(self, fn):
        stream = self._side_stream()
        if self.share_pool and self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=stream, capture_error_mode=self.capture_error_mode):
            outputs = fn()
        return _CudaGraph(graph, outputs)


class _EmulatedGraph(Replayable):
    def __init__(self, ops, outputs):
        self.ops, self.outputs = ops, outputs

    def replay(self) -> None:
        with torch.no_grad():
            for func, args, kwargs, recorded in self.ops:
                _refresh(recorded, func(*args, **kwargs))

    def release(self) -> None:
        self.ops, self.outputs = [], None


def _refresh(recorded, result) -> None:
    """Write a replayed op's result into the tensors the capture recorded (views and in-place results
    share their storage with them already)."""
    if isinstance(recorded, torch.Tensor) and isinstance(result, torch.Tensor):
        if recorded is result or recorded.numel() == 0:
            return
        if recorded.untyped_storage().data_ptr() == result.untyped_storage().data_ptr():
            return
        recorded.copy_(result)
    elif isinstance(recorded, (list, tuple)) and isinstance(result, (list, tuple)):
        for r, n in zip(recorded, result):
            _refresh(r, n)


def _written_tensors(func, args, kwargs) -> list[torch.Tensor]:
    written = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            written += _tensors(value)
    return written


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list = []
        self._created: set[int] = set()
        self._snapshots: dict[int, tuple] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        written = _written_tensors(func, args, kwargs)
        for tensor in written:
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key and key not in self._created and key not in self._snapshots:
                self._snapshots[key] = (storage, storage.clone())
        out = func(*args, **kwargs)
        # A result is new memory unless it aliases an argument (a view, an in-place or out= result).
        inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        for tensor in _tensors(out):
            key = tensor.untyped_storage().data_ptr()
            if key not in inputs and key not in self._snapshots:
                self._created.add(key)
        if written or _tensors(out):  # (a host read such as .item() has no effect to replay)
            self.ops.append((func, args, kwargs, out))
        return out

    def undo(self) -> None:
        for storage, saved in self._snapshots.values():
            storage.copy_(saved)
        self._snapshots.clear()


class EmulatedGraphBackend(CaptureBackend):
    """A CPU stand-in for CUDA graphs, to test graph semantics without a GPU.

    ``capture(fn)`` runs ``fn`` under a dispatch mode that records every aten op with its argument
    and result tensors (autograd's backward included), then undoes the run's writes to tensors that
    existed before (parameters, optimizer state, counters) and restores the CPU RNG, so that, as on
    a GPU, capturing does not take a step. ``replay()`` re-runs the recorded ops on the recorded
    tensors and writes each result into the recorded result tensor. No Python runs at replay:
    Python values read during capture (a float lr, an ``int()`` of a tensor) are baked in, and
    shapes are fixed — exactly the properties a CUDA graph has."""

    name = "emulated"
    device_type = "cpu"

    def capture(self, fn):
        rng = torch.get_rng_state()
        recorder = _OpRecorder()
        try:
            with recorder:
                outputs = fn()
        finally:
            recorder.undo()
            torch.set_rng_state(rng)
        return _EmulatedGraph(recorder.ops, outputs)


# =============================================================================== the graphed step
def batch_signature(batch: TaskBatch) -> tuple:
    """Shapes, dtypes and device of the four fields: what a captured graph is specialised to."""
    return tuple((tuple(getattr(batch, name).shape), getattr(batch, name).dtype, getattr(batch, name).device)
                 for name in _FIELDS)


@dataclass
class GraphStats:
    eager_steps: int = 0  # steps run eagerly (enabled=False or check_host_syncs="eager")
    warmup_steps: int = 0
    captures: int = 0
    replays: int = 0
    evictions: int = 0


@dataclass
class _Entry:
    batch: TaskBatch  # the static inputs
    warmups: int = 0
    graph: Replayable | None = None
    grads: list = field(default_factory=list)  # GraphedMetaStep: the graph's static gradients, per parameter
    eager_only: bool = False


class GraphedBatchCall:
    """A learner's computation on one `TaskBatch` (`_body`), captured once per input signature and
    replayed: the machinery `GraphedMetaStep` (a training step) and `maml_fast.evaluation.GraphedEvaluation`
    (adapt + predict of a batch of episodes) share — static inputs, warm-ups with the host-sync check,
    capture, replay, re-capture on a new signature, the LRU of graphs and the eager switch (see the module
    doc). A subclass defines `_body` and may hook `_captured(entry)`, `_before_replay(entry)`,
    `_replayed()` and `_signature_extra()`; `_run(batch)` is one call.

    A caller may write each batch into `static_inputs()` in place (``source.sample(out=...)``) and pass
    that batch: its tensors are the graph's inputs, so nothing is copied."""

    _what = "the computation"  # (for messages)

    def __init__(self, learner: torch.nn.Module, device: torch.device, *, enabled: bool, backend: CaptureBackend | None,
                 warmup: int, max_graphs: int, check_host_syncs: str, key: Callable[[], Any] | None):
        for name, value, minimum in (("warmup", warmup, 1), ("max_graphs", max_graphs, 1)):
            check_int(name, value, minimum)
        if check_host_syncs not in SYNC_POLICIES:
            raise ValueError(f"check_host_syncs must be one of {SYNC_POLICIES}, got {check_host_syncs!r}")
        if key is not None and not callable(key):
            raise TypeError(f"key must be None or a callable, got {type(key).__name__}")
        self.learner, self.device = learner, device
        self.enabled, self.warmup, self.max_graphs = bool(enabled), warmup, max_graphs
        self.check_host_syncs, self.key = check_host_syncs, key
        if self.enabled and backend is None:
            if device.type != "cuda":
                raise ValueError(f"enabled=True captures CUDA graphs but the parameters are on {device}: "
                                 "pass enabled=False (eager) or a backend (EmulatedGraphBackend for CPU tests)")
            backend = CudaGraphBackend(device)
        if backend is not None and not isinstance(backend, CaptureBackend):
            raise TypeError(f"backend must be a CaptureBackend, got {type(backend).__name__}")
        self.backend = backend
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._last: Any = None
        self._last_entry: _Entry | None = None
        self.stats = GraphStats()

    # ------------------------------------------------------------------ public
    def signature(self, batch: TaskBatch) -> tuple:
        """What a graph is specialised to: the batch's shapes/dtypes/device, the learner's mode and
        ``key()``. Reads no tensor values."""
        learner = self.learner
        mode = tuple(getattr(learner, name, None) for name in ("inner_steps", "eval_inner_steps", "first_order"))
        graph_key = learner.graph_key() if callable(getattr(learner, "graph_key", None)) else None
        return (batch_signature(batch), learner.training, torch.is_grad_enabled(), mode, graph_key,
                self.key() if self.key is not None else None, self._signature_extra())

    def static_inputs(self) -> TaskBatch | None:
        """The static input buffers of the last signature (None when eager)."""
        return None if self._last_entry is None else self._last_entry.batch

    @property
    def num_graphs(self) -> int:
        return sum(entry.graph is not None for entry in self._entries.values())

    def reset(self) -> None:
        """Drop every graph and static input: the next calls warm up and capture again."""
        for entry in self._entries.values():
            if entry.graph is not None:
                entry.graph.release()
        self._entries.clear()
        self._last_entry = None

    # ------------------------------------------------------------------ the hooks
    def _body(self, batch: TaskBatch):
        """The computation itself, identical eagerly, in warm-up and under capture; returns device tensors."""
        raise NotImplementedError

    def _signature_extra(self) -> Any:
        return None

    def _captured(self, entry: _Entry) -> None:
        """Right after `entry`'s capture (its replay follows)."""

    def _before_replay(self, entry: _Entry) -> None:
        """Before each replay of `entry`'s graph but the capturing call's."""

    def _replayed(self) -> None:
        """After each replay but the capturing call's (a replay runs no Python)."""

    # ------------------------------------------------------------------ one call
    def _run(self, batch: TaskBatch):
        if not self.enabled:
            self.stats.eager_steps += 1
            return self._finish(self._body(batch), None)
        signature = self.signature(batch)
        entry = self._entries.get(signature)
        if entry is None:
            entry = self._new_entry(signature, batch)
        else:
            self._entries.move_to_end(signature)
        for name in _FIELDS:
            static, given = getattr(entry.batch, name), getattr(batch, name)
            if given is not static:  # (a batch drawn into the static inputs in place is there already)
                static.copy_(given, non_blocking=True)
        if entry.eager_only:
            self.stats.eager_steps += 1
            return self._finish(self._body(entry.batch), entry)
        if entry.graph is None and entry.warmups < self.warmup:
            check = entry.warmups == self.warmup - 1 and self.check_host_syncs != "ignore"
            with host_checks(self.learner, entry.warmups == 0 and not check):  # (the checked warm-up runs without)
                outputs = self.backend.warmup(lambda: self._checked_body(entry, check))
            entry.warmups += 1
            self.stats.warmup_steps += 1
            return self._finish(outputs, entry)
        if entry.graph is None:
            with host_checks(self.learner, False):
                entry.graph = self.backend.capture(lambda: self._body(entry.batch))
            self._captured(entry)
            self.stats.captures += 1
            captured_now = True
        else:
            self._before_replay(entry)
            captured_now = False
        entry.graph.replay()
        self.stats.replays += 1
        if not captured_now:
            self._replayed()
        return self._finish(entry.graph.outputs, entry)

    def _new_entry(self, signature, batch) -> _Entry:
        while len(self._entries) >= self.max_graphs:
            _, old = self._entries.popitem(last=False)
            if old.graph is not None:
                old.graph.release()
            if old is self._last_entry:
                self._last_entry = None
            self.stats.evictions += 1
        static = TaskBatch(*(torch.empty_like(getattr(batch, name), memory_format=torch.contiguous_format)
                             for name in _FIELDS), check_values=False)
        entry = self._entries[signature] = _Entry(static)
        return entry

    def _finish(self, outputs, entry):
        self._last, self._last_entry = outputs, entry
        return outputs

    def _checked_body(self, entry: _Entry, check: bool):
        if not check:
            return self._body(entry.batch)
        with HostSyncDetector(self.backend.device_type, policy="record") as detector:
            outputs = self._body(entry.batch)
        if detector.found:
            found = "\n  ".join(dict.fromkeys(str(sync) for sync in detector.found))
            message = (f"{self._what} synchronises with the host, which a CUDA graph cannot capture (a capture "
                       f"fails or bakes the value in):\n  {found}")
            if self.check_host_syncs == "raise":
                raise HostSyncError(message + "\n(this warm-up step was taken; pass check_host_syncs='eager' to run "
                                    "such a step eagerly or 'warn' to capture anyway)")
            if self.check_host_syncs == "eager":
                entry.eager_only = True
                warnings.warn(f"maml_fast: {message}\nthis signature runs eagerly", stacklevel=5)
            else:
                warnings.warn(f"maml_fast: {message}", stacklevel=5)
        return outputs


class GraphedMetaStep(GraphedBatchCall):
    """One whole meta-training iteration, captured as a CUDA graph per input signature.

    Args:
        learner: a `MAML`-family module; ``learner(batch)`` returns an output with ``loss`` and
            ``metrics`` (detached device tensors).
        optimizer: steps every parameter it holds. For CUDA graphs: ``capturable=True`` (Adam/AdamW:
            also ``fused=True``, for the on-device skip of non-finite steps).
        clip_value / clip_norm: clip the meta-gradient elementwise and/or to a global norm, on the device.
        precision: a `maml_fast.precision` mode applied to the forward and backward
            (``precision_options`` go to `precision_mode`).
        enabled: False runs the same step eagerly.
        backend: a `CaptureBackend` (default: `CudaGraphBackend` for CUDA parameters; CPU parameters
            need ``enabled=False`` or an explicit backend such as `EmulatedGraphBackend`).
        warmup: eager (real) steps of a new signature before it is captured (>= 1).
        max_graphs: signatures kept (static inputs + graph), least recently used evicted.
        skip_nonfinite: skip the optimizer step when the meta-loss or meta-gradient is NaN/inf.
        check_host_syncs: what to do when the last warm-up finds host synchronisations: "raise",
            "warn" (capture anyway), "eager" (run that signature eagerly, with a warning), "ignore".
        tensor_lr: turn float learning rates of fused/capturable param groups into device tensors
            (so a scheduler reaches the graph).
        key: an optional callable whose (hashable) result joins the signature.

    ``step(batch)`` returns a dict of device tensors: ``meta_loss [1]``, ``grad_norm [1]``,
    ``found_inf []`` (1.0 when the step was skipped) and the learner's metrics. In graph mode they are
    the graph's static outputs, overwritten by the next replay of that graph: accumulate or clone
    them before the next step if they are needed later (`metrics` returns the last ones).
    """

    _what = "the meta-step"

    def __init__(self, learner: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                 clip_value: float | None = None, clip_norm: float | None = None, precision: str = "fp32",
                 precision_options: dict | None = None, enabled: bool = True, backend: CaptureBackend | None = None,
                 warmup: int = 3, max_graphs: int = 4, skip_nonfinite: bool = True,
                 check_host_syncs: str = "raise", tensor_lr: bool = True, key: Callable[[], Any] | None = None):
        self._step = MetaStep(learner, optimizer, clip_value=clip_value, clip_norm=clip_norm,
                              skip_nonfinite=skip_nonfinite, precision=precision, precision_options=precision_options)
        super().__init__(learner, self._step.device, enabled=enabled, backend=backend, warmup=warmup,
                         max_graphs=max_graphs, check_host_syncs=check_host_syncs, key=key)
        self._params, self.optimizer, self.tensor_lr = self._step.params, optimizer, tensor_lr
        if self.enabled and isinstance(self.backend, CudaGraphBackend):
            # (optimizers without a capturable option, such as SGD, keep no device-side step count)
            not_capturable = [i for i, g in enumerate(optimizer.param_groups)
                              if "capturable" in optimizer.defaults and not g.get("capturable", False)]
            if not_capturable:
                raise ValueError(f"optimizer param groups {not_capturable} are not capturable: build the optimizer "
                                 "with capturable=True (Adam/AdamW: fused=True, capturable=True) for CUDA graphs")
            # capturable=True run eagerly (the warm-up) is intended here: no warning about it.
            optimizer._warned_capturable_if_run_uncaptured = True
        if self.enabled and tensor_lr:
            self._tensor_lrs()

    # ------------------------------------------------------------------ public
    def __call__(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        return self.step(batch)

    def step(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        """One training iteration on `batch` (see the class doc for what it returns)."""
        if not isinstance(batch, TaskBatch):
            raise TypeError(f"batch must be a maml_fast.TaskBatch, got {type(batch).__name__}")
        return self._run(batch)

    def metrics(self) -> dict[str, torch.Tensor] | None:
        """The last step's outputs (device tensors; see `step`)."""
        return self._last

    def counters(self) -> dict[str, torch.Tensor]:
        """The step's device counters (`MetaStep.counters`)."""
        return self._step.counters()

    def reset(self) -> None:
        """Drop every graph and static input (e.g. after ``optimizer.load_state_dict``): the next
        steps warm up and capture again."""
        super().reset()
        if self.enabled and self.tensor_lr:
            self._tensor_lrs()

    # ------------------------------------------------------------------ internals
    def _body(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        """The step itself (`MetaStep`), identical eagerly, in warm-up and under capture."""
        return self._step(batch)

    def _captured(self, entry: _Entry) -> None:
        entry.grads = [p.grad for p in self._params]

    def _before_replay(self, entry: _Entry) -> None:
        # p.grad shows this graph's static gradients (an eager step or another graph moved it)
        for param, grad in zip(self._params, entry.grads):
            param.grad = grad

    def _replayed(self) -> None:
        if callable(getattr(self.learner, "on_graph_replay", None)):
            self.learner.on_graph_replay()

    def _tensor_lrs(self) -> None:
        for group in self.optimizer.param_groups:
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                if lr.device != self.device:  # e.g. loaded from a checkpoint on the CPU
                    group["lr"] = lr.detach().to(self.device, torch.float32)
                continue
            if group.get("fused") or group.get("capturable"):
                group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=self.device)
            else:
                warnings.warn("maml_fast: a param group's lr is a Python float and the optimizer is neither fused nor "
                              "capturable: the captured graph keeps that lr and an LR scheduler will not reach it",
                              stacklevel=3)
