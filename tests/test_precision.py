"""Precision modes: flags set and restored, bf16 saved activations that keep the second-order terms,
and the meta-gradient error of each mode against a float64 reference (tiny conv4 on the CPU).

Measured here (CPU, conv4 hidden=8, 5-way 1-shot, 2 queries, T=2, 28x28 uniform images, 2 inner
steps, second order, min_numel=256; relative error of the whole meta-gradient vs float64):
  fp32:                    7.7e-7
  bf16-saved, BatchNorm:   4.8e-2 .. 1.8e-1 over seeds 0-2 (this test's seed 2: 4.8e-2)
  bf16-saved, no norm:     4.6e-4 .. 8.7e-4 over seeds 0-2 (seed 0: 5.3e-4)
With BatchNorm the error is the meta-gradient's own conditioning, not the mode's: moving the support
images by 1e-4 (relative) in float64 moves the float64 meta-gradient by 14% (seed 0) — the tiny
per-task batches (5 images, down to 2x2 maps) make BN + ReLU very sensitive.
"""
from __future__ import annotations

import pytest
import torch

import maml_fast as mf
from maml_fast.precision import (PRECISION_MODES, bf16_saved_tensors, meta_gradient_error, precision_mode,
                                 restore_tf32_state, tf32, tf32_state)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def image_batch(seed=0, tasks=2, ways=5, shots=1, queries=2, size=28, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(tasks, ways * shots, 1, size, size, generator=g)
    qx = torch.rand(tasks, ways * queries, 1, size, size, generator=g)
    sy = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)
    qy = torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1)
    return mf.TaskBatch(sx, sy, qx, qy).to(device)


def conv4_factory(seed=0, norm="batch", hidden=8, first_order=False, inner_steps=2, device="cpu"):
    def factory():
        torch.manual_seed(seed)
        net = mf.models.conv4(1, 5, hidden=hidden, norm=norm)
        return mf.MAML(net, inner_lr=0.4, inner_steps=inner_steps, first_order=first_order, backend="torch").to(device)
    return factory


def flat_meta_gradient(learner, batch, mode=None, **options):
    learner.zero_grad(set_to_none=True)
    context = precision_mode(mode, **options) if mode else torch.enable_grad()
    with context:
        learner(batch).loss.backward()
    return torch.cat([p.grad.double().flatten() for p in learner.parameters()])


# ------------------------------------------------------------------------------------ flags
def test_tf32_mode_sets_and_restores_the_flags():
    before = tf32_state()
    with precision_mode("tf32"):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert tf32_state() == before
    with precision_mode("fp32"):  # exact: also cuDNN convolutions (PyTorch's default lets them use TF32)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert tf32_state() == before
    with pytest.raises(RuntimeError, match="boom"), precision_mode("tf32"):
        raise RuntimeError("boom")
    assert tf32_state() == before


def test_tf32_restores_a_state_set_through_the_new_api():
    original = tf32_state()
    try:
        if hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cudnn.conv, "fp32_precision"):
            torch.backends.cudnn.conv.fp32_precision = "ieee"  # a mix the legacy flag cannot read
        torch.set_float32_matmul_precision("medium")
        mixed = tf32_state()
        with tf32(True):
            assert torch.backends.cudnn.allow_tf32
        assert tf32_state() == mixed
    finally:
        restore_tf32_state(original)
    assert tf32_state() == original


def test_unknown_mode_raises_naming_the_argument():
    with pytest.raises(ValueError, match=r"mode must be one of .*'fp16'"):
        with precision_mode("fp16"):
            pass
    with pytest.raises(ValueError, match="mode"):
        meta_gradient_error(conv4_factory(), image_batch(), "bf16")
    with pytest.raises(ValueError, match="min_numel"):
        with precision_mode("bf16-saved", min_numel=-1):
            pass
    assert PRECISION_MODES == ("fp32", "tf32", "bf16-saved")


def test_meta_gradient_error_checks_its_factory():
    learner = conv4_factory()()
    with pytest.raises(ValueError, match="new learner"):
        meta_gradient_error(lambda: learner, image_batch(), "fp32")
    with pytest.raises(ValueError, match="float64"):
        meta_gradient_error(lambda: conv4_factory()().double(), image_batch(), "fp32")
    with pytest.raises(TypeError, match="learner_factory"):
        meta_gradient_error(learner, image_batch(), "fp32")


# ------------------------------------------------------------------------------------ bf16 hooks
def test_bf16_saved_packs_only_large_activations():
    weight = torch.nn.Parameter(torch.randn(64, 64))
    x = torch.randn(64, 64, requires_grad=True)
    small = torch.randn(8, requires_grad=True)
    with bf16_saved_tensors(min_numel=1000) as stats:
        h = x * 3.0  # a non-leaf activation of 4096 elements
        y = h * weight  # saves h (packed) and weight (a parameter: kept)
    assert (stats.packed, stats.kept, stats.saved_bytes) == (1, 1, 4096 * 2)
    with bf16_saved_tensors(min_numel=1000) as stats:
        z = (small * 1.0) * (small * 1.0)  # small activations: kept
    assert (stats.packed, stats.kept) == (0, 2)
    with bf16_saved_tensors(min_numel=1000) as stats:
        v = (x * 1.0).sum(0).expand(64, 64) * h  # an expanded (stride 0) view: kept; h: packed
    assert (stats.packed, stats.kept) == (1, 1)
    with bf16_saved_tensors(min_numel=0) as stats:
        m = torch.nn.functional.max_pool2d((x * 1.0).view(1, 1, 64, 64), 2)  # saves the argmax (int64): kept
    assert stats.kept >= 1
    (y.sum() + z.sum() + v.sum() + m.sum()).backward()
    # d(sum(h * weight))/dweight is h, read back from its bf16 copy
    torch.testing.assert_close(weight.grad, (x.detach() * 3.0).bfloat16().float(), rtol=0, atol=0)
    torch.testing.assert_close(small.grad, 2 * small.detach())  # exact


def test_bf16_saved_rounds_what_the_backward_reads_and_nothing_else():
    a = torch.randn(100, 100, requires_grad=True)
    with bf16_saved_tensors(min_numel=0):
        h = a * 1.0
        out = (h * h).sum()  # d/dh = 2h, read from the saved (rounded) h
    (grad,) = torch.autograd.grad(out, a)
    torch.testing.assert_close(grad, 2 * a.detach().bfloat16().float(), rtol=0, atol=0)
    torch.testing.assert_close(out, (a.detach() ** 2).sum())  # the forward is exact float32


def test_bf16_saved_keeps_the_graph_for_double_backward():
    w = torch.randn(50, 50, dtype=torch.float64, requires_grad=True)

    def second_order(hooks):
        a = w * 1.0
        with bf16_saved_tensors(min_numel=0) if hooks else torch.enable_grad():
            loss = (a * a * a).sum()
            (g,) = torch.autograd.grad(loss, a, create_graph=True)
            fast = a - 0.1 * g
            query = (fast * fast).sum()
        (meta,) = torch.autograd.grad(query, w)
        return meta

    exact, rounded = second_order(False), second_order(True)
    first_order = 2 * (w - 0.1 * 3 * w * w).detach()  # the inner gradient as a constant
    assert float((rounded - exact).norm() / exact.norm()) < 1e-2
    assert float((first_order - exact).norm() / exact.norm()) > 0.1


# ------------------------------------------------------------------------------------ meta-gradient error
def test_fp32_meta_gradient_error_is_tiny():
    error = meta_gradient_error(conv4_factory(), image_batch(0), "fp32")
    assert error < 1e-5  # measured 7.7e-7


def test_bf16_saved_meta_gradient_error_is_bounded():
    result = meta_gradient_error(conv4_factory(seed=2), image_batch(2), "bf16-saved", details=True, min_numel=256)
    assert result.saved.packed > 50 and result.saved.kept > 0  # the hooks did pack the activations
    assert result.relative < 0.25  # measured 4.8e-2 (1.8e-1 at the worst of seeds 0-2): see the module doc
    # the forward is float32; the meta-loss moves only through the inner steps' gradients (their
    # backward reads rounded activations): measured 4.0e-5
    assert result.loss_relative < 1e-3


def test_bf16_saved_meta_gradient_error_without_batch_norm():
    error = meta_gradient_error(conv4_factory(norm="none"), image_batch(0), "bf16-saved", min_numel=256)
    assert error < 5e-3  # measured 5.3e-4


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_bf16_saved_still_differs_from_first_order(norm):
    """The hooks do not silently turn MAML into first-order MAML: under bf16-saved the second-order
    meta-gradient is as far from the first-order one as in float64."""
    batch = image_batch(0)
    second = conv4_factory(norm=norm)()
    first = conv4_factory(norm=norm, first_order=True)()
    reference = conv4_factory(norm=norm)().double()
    first_reference = conv4_factory(norm=norm, first_order=True)().double()
    g_so = flat_meta_gradient(second, batch, "bf16-saved", min_numel=256)
    g_fo = flat_meta_gradient(first, batch, "bf16-saved", min_numel=256)
    batch64 = batch.to(dtype=torch.float64)
    r_so, r_fo = flat_meta_gradient(reference, batch64), flat_meta_gradient(first_reference, batch64)
    gap = float((r_so - r_fo).norm() / r_so.norm())  # measured 0.22 (none), 0.74 (batch)
    assert gap > 0.1
    assert abs(float((g_so - g_fo).norm() / r_so.norm()) - gap) < 0.1 * gap
    if norm == "none":  # well conditioned: the bf16 error is far below the second-order terms
        assert float((g_so - r_so).norm() / r_so.norm()) < 0.02 * gap


# ------------------------------------------------------------------------------------ CUDA
@cuda
def test_cuda_error_of_each_mode(capsys):
    """Prints the measured errors on the GPU (tf32 differs from fp32 only there)."""
    batch = image_batch(0)
    errors = {mode: meta_gradient_error(conv4_factory(hidden=32, device="cuda"), batch, mode, min_numel=4096)
              for mode in PRECISION_MODES}
    with capsys.disabled():
        print("\nconv4 hidden=32 meta-gradient relative error vs float64 on CUDA: "
              + ", ".join(f"{mode} {error:.2e}" for mode, error in errors.items()))
    assert errors["fp32"] < 1e-4
    assert errors["tf32"] < 0.25 and errors["bf16-saved"] < 0.25


@cuda
def test_cuda_bf16_saved_lowers_peak_memory(capsys):
    factory = conv4_factory(hidden=64, device="cuda")
    batch = image_batch(0, tasks=16, shots=5, queries=15).to("cuda")
    peaks = {}
    for mode in ("fp32", "bf16-saved"):
        learner = factory()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        flat_meta_gradient(learner, batch, mode)
        torch.cuda.synchronize()
        peaks[mode] = torch.cuda.max_memory_allocated() - base
        del learner
    with capsys.disabled():
        print("\nconv4 hidden=64 T=16 5-way 5-shot 15-query peak memory of a meta-step: "
              f"fp32 {peaks['fp32'] / 2**20:.1f} MiB, "
              f"bf16-saved {peaks['bf16-saved'] / 2**20:.1f} MiB")
    assert peaks["bf16-saved"] < peaks["fp32"]
