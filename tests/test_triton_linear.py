"""The "triton" backend's task-batched linear layer (kernels/linear.py, ops/linear.py) against the
per-task F.linear reference, to every derivative order and inside a full second-order MAML step.

Runs like tests/test_triton_conv.py (whose fixture and helpers it shares): under Triton's CPU
interpreter without CUDA, every kernel output NaN-poisoned.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import maml_fast as mf
from maml_fast.backends import BACKENDS, ProgramBackend, get_backend
from maml_fast.backends import triton as triton_backend
from maml_fast.ops import linear as linear_ops
from test_triton_conv import DEVICE, REPO, TOL, _check, _meta_step, kernels, rand  # noqa: F401

# tasks, batch, in_features, out_features
CASES = {"T1_B1_primes": (1, 1, 5, 13), "T7_primes": (7, 3, 13, 5), "one_feature": (2, 4, 1, 1)}


@pytest.fixture
def linear_kernels(kernels):
    return triton_backend.load_linear_kernels()


def _operands(case, dtype=torch.float64, grad=False):
    tasks, batch, fin, fout = case
    return (rand(batch, tasks * fin, dtype=dtype, grad=grad), rand(tasks, fout, fin, dtype=dtype, grad=grad),
            rand(tasks, fout, dtype=dtype, grad=grad))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(CASES))
def test_linear_and_gradients_match_reference(kernels, poisoned_empty, name, dtype):
    """y, gx, gW and gb of the triton linear (the three products of one kernel) against the float64
    per-task reference, with and without bias."""
    x, w, b = _operands(CASES[name], dtype, grad=True)
    for bias in (b, None):
        inputs = (x, w) if bias is None else (x, w, bias)
        y = linear_ops.linear(x, w, bias, matmul=get_backend("triton").matmul)
        g = torch.randn_like(y)
        grads = torch.autograd.grad(y, inputs, g)
        ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
        y_ref = linear_ops.linear_reference(*ref_inputs)
        grads_ref = torch.autograd.grad(y_ref, ref_inputs, g.double())
        torch.testing.assert_close(y, y_ref.to(dtype), **TOL[dtype])
        for got, expected in zip(grads, grads_ref):
            torch.testing.assert_close(got, expected.to(dtype), **TOL[dtype])


def test_small_tiles_and_strided_operands(linear_kernels):
    """16x16x16 tiles: several M, N and K blocks per task with partial edge tiles; a transposed a and an
    expanded b (task stride 0, as MAML's θ.expand), read without copies; both output layouts."""
    a = rand(37, 3, 41).transpose(0, 1)                  # [T=3, M=37, K=41], rows-first
    b = rand(1, 19, 41).expand(3, 19, 41).transpose(1, 2)  # [3, K=41, N=19], stride 0 in tasks
    bias = rand(3, 19)
    cfg = linear_kernels.BlockConfig(16, 16, 16, 4, 1)
    expected = torch.baddbmm(bias.unsqueeze(1), a, b)
    for batch_major in (False, True):
        c = linear_kernels.batched_matmul(a, b, bias, batch_major, config=cfg)
        assert not torch.isnan(c).any(), "an output element was never written"
        assert (c.stride(0) < c.stride(1)) == batch_major
        torch.testing.assert_close(c, expected, **TOL[torch.float64])


def test_unwritten_outputs_are_poisoned(linear_kernels, monkeypatch):
    """The launcher's output allocation is NaN-filled in the tests' debug mode (so the comparisons
    above see any element the kernel skips): here with the kernel launch replaced by nothing."""
    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None
    monkeypatch.setattr(linear_kernels, "_bmm_kernel", NoLaunch())
    assert torch.isnan(linear_kernels.batched_matmul(rand(2, 3, 4), rand(2, 4, 5))).all()


def test_empty_and_zero_depth_products(linear_kernels):
    assert linear_kernels.batched_matmul(rand(2, 0, 3), rand(2, 3, 4)).shape == (2, 0, 4)
    bias = rand(2, 4)
    c = linear_kernels.batched_matmul(rand(2, 3, 0), rand(2, 0, 4), bias)
    torch.testing.assert_close(c, bias.unsqueeze(1).expand(2, 3, 4))


@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_gradcheck_gradgradcheck(kernels, with_bias):
    x, w, b = _operands((7, 2, 3, 2), grad=True)
    matmul = get_backend("triton").matmul
    if with_bias:
        _check(lambda x, w, b: linear_ops.linear(x, w, b, matmul=matmul), (x, w, b))
    else:
        _check(lambda x, w: linear_ops.linear(x, w, None, matmul=matmul), (x, w))


def test_third_order_matches_torch_backend(kernels):
    x, w, b = _operands(CASES["T7_primes"], grad=True)
    v = rand(x.shape[0], w.shape[0] * w.shape[1])

    def third(backend):
        y = torch.tanh(linear_ops.linear(x, w, b, matmul=get_backend(backend).matmul))
        gx, gw = torch.autograd.grad((y * v).sum(), (x, w), create_graph=True)
        hx, = torch.autograd.grad((gw * gw.detach()).sum(), (x,), create_graph=True)
        return torch.autograd.grad((hx * hx.detach()).sum() + (gx * gx.detach()).sum(), (w, x, b))
    for got, expected in zip(third("triton"), third("torch")):
        torch.testing.assert_close(got, expected, **TOL[torch.float64])


def _count_kernel_calls(monkeypatch, linear_kernels) -> dict[str, int]:
    calls = {"batched_matmul": 0}
    launch = linear_kernels.batched_matmul

    def counting(*args, **kwargs):
        calls["batched_matmul"] += 1
        return launch(*args, **kwargs)
    monkeypatch.setattr(linear_kernels, "batched_matmul", counting)
    return calls


@pytest.mark.parametrize("model", ["mlp", "conv4"])
def test_second_order_meta_gradient_matches_loop(linear_kernels, make_batch, monkeypatch, model):
    """A full second-order MAML meta-gradient of the triton program (its linear layers on the Triton
    kernel, counted) against the loop backend, float64."""
    torch.manual_seed(0)
    if model == "mlp":
        net = mf.models.mlp((6, 5, 3))
        batch = make_batch(tasks=3, ways=3, shots=1, queries=2, example_shape=(6,))
    else:
        net = mf.models.conv4(in_channels=1, num_classes=2, hidden=3, downsample="stride", image_size=8)
        batch = make_batch(tasks=2, ways=2, shots=1, queries=2, example_shape=(1, 8, 8))
    net = net.to(device=DEVICE, dtype=torch.float64)
    batch = mf.TaskBatch(*(t.to(DEVICE) for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y)))
    calls = _count_kernel_calls(monkeypatch, linear_kernels)
    results = {}
    for backend in ("triton", "loop"):
        learner = mf.MAML(net, inner_lr=0.4, inner_steps=2, backend=backend, step_metrics=False)
        results[backend] = _meta_step(learner, batch)
        if backend == "triton":
            # per inner step and linear layer: forward, and gx/gW in the inner backward, all again in
            # the meta-backward (second order)
            assert calls["batched_matmul"] >= 6 * sum(isinstance(m, torch.nn.Linear) for m in net.modules())
            triton_calls = calls["batched_matmul"]
    assert calls["batched_matmul"] == triton_calls, "the loop backend called the Triton kernel"
    (loss_t, grads_t), (loss_l, grads_l) = results["triton"], results["loop"]
    tol = dict(rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(loss_t, loss_l, **tol)
    for got, expected in zip(grads_t, grads_l):
        torch.testing.assert_close(got, expected, **tol)


def test_bad_operands_fail_with_the_argument_name(linear_kernels):
    a, b = rand(2, 3, 4), rand(2, 4, 5)
    with pytest.raises(ValueError, match="a must be a 3-d tensor"):
        linear_kernels.batched_matmul(a[0], b)
    with pytest.raises(TypeError, match="b has dtype"):
        linear_kernels.batched_matmul(a, b.float())
    with pytest.raises(ValueError, match="b must have shape"):
        linear_kernels.batched_matmul(a, rand(2, 3, 5))
    with pytest.raises(ValueError, match="bias must have shape"):
        linear_kernels.batched_matmul(a, b, rand(2, 4))
    with pytest.raises(TypeError, match="float16/bfloat16/float32/float64"):
        linear_kernels.batched_matmul(a.to(torch.int32), b.to(torch.int32))
    with pytest.raises(ValueError, match="x must have shape"):
        linear_ops.linear(rand(3, 7), rand(2, 5, 3), matmul=get_backend("triton").matmul)


def test_registration(kernels):
    assert isinstance(get_backend("triton").matmul, triton_backend.TritonBatchedMatmul)
    others = {name: type(backend.matmul) for name, backend in BACKENDS.items()
              if isinstance(backend, ProgramBackend) and name != "triton"}
    assert others == {"torch": type(None), "fused": linear_ops.TorchBatchedMatmul}, f"other backends keep torch.bmm: {others}"


_COMPILE_CHECK = """
import os, sys
sys.path.insert(0, os.getcwd())
import torch, triton
from triton.backends.compiler import GPUTarget
from maml_fast.backends import triton as triton_backend
K = triton_backend.load_linear_kernels()
assert not K.INTERPRETED
for dtype, name, precision in ((torch.float32, "fp32", "ieee"), (torch.float32, "fp32", "tf32"),
                               (torch.float64, "fp64", "ieee"), (torch.bfloat16, "bf16", "ieee")):
    cfg = K.block_config(5000, 64, 800, dtype)              # the GPU heuristic (not interpreting)
    acc, use_dot, _ = K._kernel_flags(dtype, torch.device("cpu"))
    constexprs = dict(HAS_BIAS=True, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                      ACC_DTYPE=acc, USE_DOT=use_dot, PRECISION=precision)
    fn = K._bmm_kernel
    signature = {a: "constexpr" if a in constexprs else ("*" + name if a.endswith("_ptr") else "i32")
                 for a in fn.arg_names}
    compiled = triton.compile(triton.compiler.ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    ptx = compiled.asm["ptx"]
    if precision == "tf32" or name == "bf16":
        assert "wgmma" in ptx, (name, precision, "no tensor-core instruction")
    if name == "fp64":
        assert "mma.sync" in ptx and ".f64" in ptx, "no fp64 mma"
    print(name, precision, "ok")
"""


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the kernel is compiled and run by the other tests")
def test_kernel_compiles_for_sm90_without_a_gpu():
    """Triton compiles the batched-matmul kernel for an H100 (sm_90) with its bundled ptxas: fp32 IEEE and
    TF32 (wgmma), fp64 (DMMA), bf16 (wgmma), with the GPU block-size heuristic and the bias epilogue."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_CHECK], capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode != 0 and "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("Triton's ptxas is not available")
    assert result.returncode == 0, result.stderr[-3000:]
