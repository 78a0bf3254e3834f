"""The backend registry (one `Backend` object per backend, one file each), "auto", the "cuda" alias, the
learner's per-call overrides, and the rule that nothing outside maml_fast/backends/ compares backend names."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import maml_fast as mf
from maml_fast import backends
from maml_fast.backends.base import Backend, ProgramBackend

PACKAGE = Path(mf.__file__).parent


def test_every_backend_is_one_object_in_its_own_file():
    assert set(backends.BACKENDS) == {"loop", "vmap", "torch", "fused", "triton"}
    files = {backend.name: Path(type(backend).__module__.replace(".", "/")).name for backend in backends.BACKENDS.values()}
    assert files == {"loop": "loop", "vmap": "vmap", "torch": "pytorch", "fused": "fused", "triton": "triton"}
    for name, backend in backends.BACKENDS.items():
        assert isinstance(backend, Backend) and backend.name == name and backend.summary
        assert backends.get_backend(name) is backend
    assert all(isinstance(backends.BACKENDS[name], ProgramBackend) for name in ("torch", "fused", "triton"))


def test_cuda_is_an_alias_of_fused():
    assert backends.get_backend("cuda") is backends.get_backend("fused")
    assert "cuda" in backends.backend_names() and "cuda" not in backends.available_backends("cpu")
    assert backends.unavailable_reasons("cuda", "cpu") == backends.unavailable_reasons("fused", "cpu")


def test_unknown_backend_is_rejected_naming_the_argument():
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of .*'fused'.*got 'cudnn'"):
        mf.MAML(mf.models.conv4(1, 2, hidden=3), backend="cudnn")
    with pytest.raises(TypeError, match="backend must be a string"):
        backends.get_backend(3)
    assert backends.unavailable_reasons("cudnn", "cpu") == [
        f"unknown backend 'cudnn'; known backends: {', '.join(backends.backend_names())}"]


def test_auto_takes_the_available_backend_of_highest_rank(monkeypatch):
    cpu = torch.device("cpu")
    fused = backends.get_backend("fused")
    expected = "fused" if fused.is_available(cpu) else "torch"
    assert backends.resolve_backend("auto", cpu).name == expected
    # Unavailable: auto falls back to "torch" and naming it explicitly says why it cannot run.
    monkeypatch.setattr(type(fused), "unavailable_reasons", lambda self, device: ["no kernels here"])
    assert backends.resolve_backend("auto", cpu).name == "torch"
    with pytest.raises(ValueError, match=r"backend='fused' cannot run on cpu: no kernels here"):
        backends.resolve_backend("fused", cpu)
    # A higher rank wins where it is available.
    monkeypatch.setattr(type(backends.get_backend("vmap")), "auto_rank", {"cpu": 99})
    assert backends.resolve_backend("auto", cpu).name == "vmap"


def test_triton_reports_why_it_cannot_run_on_the_cpu_without_the_interpreter(monkeypatch):
    """(The test session itself runs with TRITON_INTERPRET=1 on a machine without CUDA: tests/conftest.py.)"""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reasons = backends.unavailable_reasons("triton", "cpu")
    assert any("TRITON_INTERPRET=1" in reason for reason in reasons), reasons


def test_no_backend_name_is_compared_outside_the_backends_package():
    """What a backend does is decided in its own file: no module outside maml_fast/backends/ compares a
    backend name, and no `use_extension` flag is threaded through the ops."""
    names = "|".join(re.escape(name) for name in backends.backend_names())
    comparison = re.compile(rf"""(==|!=)\s*["']({names})["']|["']({names})["']\s*(==|!=)|\buse_extension\b""")
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if PACKAGE / "backends" in path.parents:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            # device types are not backend names: `device.type == "cuda"` and the like stay
            if comparison.search(line) and not re.search(r"""(device|\.type|DEVICE)\s*(==|!=)""", line):
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


# ------------------------------------------------------------------------------ per-call overrides
def _learner(make_batch, **options):
    torch.manual_seed(0)
    net = mf.models.conv4(1, 3, hidden=4, downsample="stride").double()
    return mf.MAML(net, inner_lr=0.3, inner_steps=2, backend="torch", **options), make_batch(3, 3, 1, 2, (1, 8, 8))


def test_steps_override_equals_a_learner_built_with_those_steps(make_batch):
    learner, batch = _learner(make_batch)
    overridden = learner(batch, steps=0)
    assert learner.inner_steps == 2  # nothing was set on the learner
    reference, _ = _learner(make_batch, **{})
    reference.inner_steps = 0
    expected = reference(batch)
    torch.testing.assert_close(overridden.loss, expected.loss, rtol=0, atol=0)
    assert overridden.metrics["query_loss"].shape == (1,)
    assert learner(batch).metrics["query_loss"].shape == (3,)


def test_inner_lr_override_equals_a_learner_built_with_that_lr(make_batch):
    learner, batch = _learner(make_batch)
    torch.manual_seed(0)
    net = mf.models.conv4(1, 3, hidden=4, downsample="stride").double()
    reference = mf.MAML(net, inner_lr=0.05, inner_steps=2, backend="torch")
    out, expected = learner(batch, inner_lr=0.05), reference(batch)
    torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=0)
    assert learner.inner_lr == 0.3
    assert not torch.equal(learner(batch).loss, out.loss)
    fast = learner.adapt(batch.support_x, batch.support_y, steps=1, inner_lr=0.05)
    expected_fast = reference.adapt(batch.support_x, batch.support_y, steps=1)
    for name, value in expected_fast.params.items():
        torch.testing.assert_close(fast.params[name], value, rtol=0, atol=0)


def test_inner_lr_override_is_refused_when_the_step_sizes_are_learned(make_batch):
    learner, batch = _learner(make_batch, inner_lr_mode="per_element")
    with pytest.raises(ValueError, match=r"inner_lr= overrides the fixed step size.*per_element"):
        learner(batch, inner_lr=0.1)
    with pytest.raises(ValueError, match=r"\bsteps\b"):
        learner(batch, steps=-1)
