"""Shared fixtures: deterministic seeding and small random TaskBatch builders; and the one
TRITON_INTERPRET setting of the whole test session.

Triton reads TRITON_INTERPRET when a ``@triton.jit`` function is defined: its own library functions
(``tl.sum`` ...) when ``triton`` is first imported (``import maml_fast`` imports it, through
torch._dynamo), our kernels when ``maml_fast.kernels`` is first loaded. A setting changed later in the
process is not seen, so the triton test modules cannot switch it per module without depending on the
order the modules run in. Instead it is fixed here, before anything imports triton: on a machine without
CUDA the session runs with ``TRITON_INTERPRET=1`` (the only way the Triton kernels run on a CPU) unless
the variable is set already; with CUDA it is left as it is (compiled kernels on the GPU). The triton
modules then fail, not skip, if the kernels were somehow loaded with another setting, and skip (with
that reason) if the session was started with ``TRITON_INTERPRET=0`` on a machine without CUDA."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch  # (does not import triton)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import maml_fast as mf  # noqa: E402  (imports triton: after the setting above)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state (and leaves the default dtype alone)."""
    torch.manual_seed(1234)
    yield


@pytest.fixture
def one_thread():
    """torch on one CPU thread for the test (training tests: fast and deterministic on a shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_task_batch(tasks=2, ways=2, shots=1, queries=2, example_shape=(1, 8, 8), *,
                      regression=False, dtype=torch.float64, generator=None):
    """A random TaskBatch. Classification: every class appears ``shots`` times in each support set
    (shuffled per task); query labels are random in [0, ways). Regression: ``ways`` is ignored,
    ``shots`` support and ``queries`` query examples with targets ``[T, n, 1]``."""
    g = generator
    if regression:
        sx = torch.randn(tasks, shots, *example_shape, dtype=dtype, generator=g)
        qx = torch.randn(tasks, queries, *example_shape, dtype=dtype, generator=g)
        sy = torch.randn(tasks, shots, 1, dtype=dtype, generator=g)
        qy = torch.randn(tasks, queries, 1, dtype=dtype, generator=g)
        return mf.TaskBatch(sx, sy, qx, qy)
    support = ways * shots
    sx = torch.randn(tasks, support, *example_shape, dtype=dtype, generator=g)
    base = torch.arange(ways).repeat_interleave(shots)
    sy = torch.stack([base[torch.randperm(support, generator=g)] for _ in range(tasks)])
    qx = torch.randn(tasks, queries, *example_shape, dtype=dtype, generator=g)
    qy = torch.randint(0, ways, (tasks, queries), generator=g)
    return mf.TaskBatch(sx, sy, qx, qy)


@pytest.fixture
def make_batch():
    """``make_batch(tasks=, ways=, shots=, queries=, example_shape=, regression=, dtype=)``."""
    return random_task_batch


#: Marks a test that calls the compiled ops on the CPU: skipped, with the loader's reason, without them.
needs_cpu_extension = pytest.mark.skipif(not mf._extension.is_available("cpu"),
                                         reason="; ".join(mf._extension.extension_unavailable_reasons("cpu")))


def op_devices(unavailable_reasons):
    """The "cpu" and "cuda" test parameters of a compiled op, each skipped with its reason where the
    op module's `unavailable_reasons(device)` says the op cannot run there."""
    def param(device):
        if device == "cuda" and not torch.cuda.is_available():
            return pytest.param(device, marks=pytest.mark.skip(reason="no CUDA device"))
        reasons = unavailable_reasons(device)
        return pytest.param(device, marks=pytest.mark.skip(reason="; ".join(reasons))) if reasons else device
    return [param("cpu"), param("cuda")]


def cpu_backend_param(name: str):
    """Backend `name` as a test parameter, skipped with the backend's own reasons where it cannot run on
    the CPU ("fused" without the built extension; "triton" outside Triton's interpreter)."""
    from maml_fast.backends import unavailable_reasons
    reasons = unavailable_reasons(name, "cpu")
    return pytest.param(name, marks=[pytest.mark.skip(reason=f"backend {name!r}: " + "; ".join(reasons))] if reasons else [])


@pytest.fixture
def poisoned_empty():
    """Deterministic mode fills every freshly allocated float tensor with NaN."""
    was_enabled = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.empty(16).isnan().all(), "deterministic mode no longer fills empty tensors"
        yield
    finally:
        torch.use_deterministic_algorithms(was_enabled)


def count_op_calls(monkeypatch, *names: str) -> dict[str, int]:
    """Counts the calls of the compiled ``torch.ops.maml_fast`` operators `names` from here on (the
    launchers and autograd glue look them up per call)."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        op = getattr(torch.ops.maml_fast, name)

        def counting(*args, _op=op, _name=name):
            calls[_name] += 1
            return _op(*args)

        monkeypatch.setattr(torch.ops.maml_fast, name, counting)
    return calls


def assert_rejected(error, argument: str, check, op, args, op_available: bool):
    """Both the Python check and (where it can run) the compiled op reject `args` with `error`
    naming `argument`."""
    with pytest.raises(error, match=rf"\b{argument}\b"):
        check(*args)
    if op_available:
        with pytest.raises(error, match=rf"\b{argument}\b"):
            op(*args)


_RECORD_CUDA_INITIALISATION = """
import sys, traceback, torch, torch.cuda
calls = []
_original = torch.cuda._lazy_init
def _record():
    calls.append("".join(traceback.format_stack(limit=8)[:-1]))
for _name, _module in list(sys.modules.items()):
    if _name.startswith("torch.cuda") and getattr(_module, "_lazy_init", None) is _original:
        _module._lazy_init = _record
"""


def cuda_initialisations(code: str) -> list[str]:
    """Runs `code` in a fresh interpreter in which every CUDA initialisation is recorded instead of done
    (``torch.cuda._lazy_init``, which every CUDA call goes through) and returns the stack of each: a
    check of "touches no CUDA" that can fail on a machine without a GPU too (there
    ``torch.cuda.is_initialized()`` stays False whatever the code does)."""
    script = _RECORD_CUDA_INITIALISATION + code + "\nimport json; print('CUDA_INITIALISATIONS=' + json.dumps(calls))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("CUDA_INITIALISATIONS="))
    return json.loads(line.split("=", 1)[1])
