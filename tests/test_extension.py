"""The extension loader `maml_fast._extension`: load state, capability reasons, import robustness."""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import maml_fast
from maml_fast import _extension
from conftest import cuda_initialisations


def test_load_state_is_consistent():
    if _extension.LOAD_ERROR is not None:
        assert isinstance(_extension.LOAD_ERROR, str) and _extension.LOAD_ERROR
        assert _extension.CUDA_ARCHS == ()
        pytest.skip(f"extension not built: {_extension.LOAD_ERROR}")
    assert hasattr(torch.ops.maml_fast, "fast_weight_update")
    assert _extension.CUDA_ARCHS == tuple(maml_fast._C.cuda_archs.split())
    assert torch._C._dispatch_has_kernel_for_dispatch_key("maml_fast::fast_weight_update", "CPU")
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("maml_fast::fast_weight_update", "CUDA")
    assert has_cuda_kernel == bool(_extension.CUDA_ARCHS)


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:63", "meta", torch.device("cpu")])
def test_reasons_are_strings_and_agree_with_is_available(device):
    reasons = _extension.extension_unavailable_reasons(device)
    assert isinstance(reasons, list)
    assert all(isinstance(reason, str) and reason for reason in reasons)
    assert _extension.is_available(device) == (not reasons)


def test_cpu_is_available_when_loaded():
    assert _extension.is_available("cpu") == (_extension.LOAD_ERROR is None)


def test_unknown_device_type_has_a_reason():
    if _extension.LOAD_ERROR is not None:
        pytest.skip(f"extension not built: {_extension.LOAD_ERROR}")
    assert any("'meta'" in reason for reason in _extension.extension_unavailable_reasons("meta"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_device_says_so():
    reasons = _extension.extension_unavailable_reasons("cuda")
    assert reasons
    if torch.version.cuda is not None and _extension.LOAD_ERROR is None:
        assert "no CUDA device" in reasons


def test_build_without_cuda_kernels_is_reported(monkeypatch):
    if _extension.LOAD_ERROR is not None:
        pytest.skip(f"extension not built: {_extension.LOAD_ERROR}")
    monkeypatch.setattr(_extension, "CUDA_ARCHS", ())
    _extension._cached_reasons.cache_clear()
    try:
        reasons = _extension.extension_unavailable_reasons("cuda")
    finally:
        monkeypatch.undo()
        _extension._cached_reasons.cache_clear()
    assert any("built without CUDA kernels" in reason for reason in reasons)


@pytest.mark.parametrize(
    ("archs", "capability", "runs"),
    [
        (("8.0", "9.0+PTX"), (8, 0), True),
        (("8.0", "9.0+PTX"), (8, 9), True),  # sm_80 machine code runs on later 8.x
        (("8.0", "9.0+PTX"), (9, 0), True),
        (("8.0", "9.0+PTX"), (10, 0), True),  # via the 9.0 PTX
        (("8.0", "9.0+PTX"), (7, 5), False),
        (("8.0", "9.0"), (10, 0), False),  # machine code does not cross major versions
    ],
)
def test_compute_capability_rules(archs, capability, runs):
    assert _extension._runs_on_capability(archs, capability) == runs


@pytest.fixture
def extension_module_restored():
    """Reload `_extension` after the test so later tests see the real load state."""
    yield
    _extension._cached_reasons.cache_clear()
    importlib.reload(_extension)


def test_import_survives_unloadable_library(monkeypatch, extension_module_restored):
    # `from maml_fast import _C` then fails as for a missing or broken shared library.
    monkeypatch.setitem(sys.modules, "maml_fast._C", None)
    monkeypatch.delattr(maml_fast, "_C", raising=False)
    reloaded = importlib.reload(_extension)
    monkeypatch.undo()
    assert isinstance(reloaded.LOAD_ERROR, str) and "maml_fast._C" in reloaded.LOAD_ERROR
    assert reloaded.CUDA_ARCHS == ()
    assert reloaded.extension_unavailable_reasons("cpu") == [reloaded.LOAD_ERROR]
    assert not reloaded.is_available("cuda")


def test_import_does_not_initialise_cuda():
    """Recorded in a fresh process (`conftest.cuda_initialisations`), so it can fail without a GPU too."""
    assert cuda_initialisations("import maml_fast._extension") == []


@pytest.mark.parametrize("archs", ["bogus", "9", "9.0 sm_90", ""])
def test_bad_cuda_archs_for_the_build_are_refused_by_name(archs):
    """setup.py's MAML_FAST_CUDA_ARCHS (the GPU check builds for its own device only) is checked before
    anything is built."""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "setup.py", "--name"], cwd=root, capture_output=True, text=True,
                            env=dict(os.environ, MAML_FAST_CUDA_ARCHS=archs), timeout=120)
    assert result.returncode != 0 and "MAML_FAST_CUDA_ARCHS must list compute capabilities" in result.stderr
