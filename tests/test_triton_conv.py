"""The "triton" backend's conv kernels (kernels/conv2d.py) against the PyTorch reference.

On a machine without CUDA the kernels run through Triton's CPU interpreter: tests/conftest.py sets
TRITON_INTERPRET=1 for the whole test session before anything imports triton (Triton reads it when a
@triton.jit function is defined, so it cannot be switched per module without making the result depend
on the order the modules run in). With CUDA they run compiled on the GPU, with TF32 switched off.
Every kernel output is allocated NaN-filled (the kernels' debug mode), so an element a kernel fails to
write fails the comparison.

Should triton have been imported before the conftest's setting (e.g. pytest started on another
directory's tests first), Triton's own library functions are compiled-mode: the fp64 fallback's tl.sum
is such a function, so that check then runs in a subprocess.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
triton = pytest.importorskip("triton")

import maml_fast as mf  # noqa: E402
from maml_fast import backends  # noqa: E402
from maml_fast.backends import triton as triton_backend  # noqa: E402
from maml_fast.ops import conv2d as conv_ops  # noqa: E402

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-11), torch.float32: dict(rtol=1e-5, atol=1e-5)}
REPO = Path(__file__).resolve().parent.parent


def _tf32_off():
    """Switch TF32 off for cuDNN convolutions and matmuls (the Triton kernels follow the conv flag);
    returns a function restoring the previous settings."""
    if hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cudnn.conv, "fp32_precision"):
        saved = torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
        torch.backends.cudnn.conv.fp32_precision = torch.backends.cuda.matmul.fp32_precision = "ieee"

        def restore():
            torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved
        return restore
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    def restore_legacy():
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    return restore_legacy


@pytest.fixture(scope="module", autouse=True)
def kernels():
    """The kernels module, loaded under the interpreter on the CPU, with NaN-poisoned outputs."""
    restore = lambda: None
    if DEVICE == "cpu" and not triton_backend.interpreter_enabled():
        # The same for every module and order: the session's setting (tests/conftest.py).
        pytest.skip("this session runs with TRITON_INTERPRET=0 and there is no CUDA device: the Triton kernels "
                    "run on a CPU only under the interpreter (leave TRITON_INTERPRET unset or set it to 1)")
    loaded = sys.modules.get(f"{triton_backend.KERNELS_PACKAGE}.conv2d")
    if loaded is not None and loaded.INTERPRETED != triton_backend.interpreter_enabled():
        pytest.fail(f"{loaded.__name__} was loaded with TRITON_INTERPRET={int(loaded.INTERPRETED)} but the session "
                    "runs with the other setting: something changed TRITON_INTERPRET during the session "
                    "(tests/conftest.py fixes it for the whole session)")
    with pytest.MonkeyPatch.context() as mp:
        if DEVICE == "cuda":
            restore = _tf32_off()
        module = triton_backend.load_kernels()
        mp.setattr(module, "POISON_OUTPUTS", True)
        yield module
        restore()


def _stdlib_interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(triton.language.standard.sum, InterpretedFunction)


def rand(*shape, dtype=torch.float64, grad=False):
    return torch.randn(*shape, dtype=dtype, device=DEVICE).requires_grad_(grad)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


# tasks, batch, in_ch, out_ch, H, W, kernel, stride, padding
CASES = {
    "T1_one_channel": (1, 2, 1, 5, 7, 7, 3, 1, 1),
    "stride2_odd_primes": (2, 3, 3, 7, 9, 7, 3, 2, 1),
    "anisotropic": (3, 2, 5, 2, 8, 9, (3, 1), (2, 1), (1, 0)),
    "1x1": (2, 1, 2, 3, 6, 6, 1, 1, 0),
    "T33_tiny": (33, 1, 1, 2, 5, 5, 3, 2, 1),
    "stride3_kernel2": (2, 2, 3, 3, 7, 8, 2, 3, 1),
    "many_channels_pad2": (2, 2, 17, 19, 5, 5, 3, 1, 2),
}


def _geometry(case):
    tasks, batch, cin, cout, h, w, k, stride, pad = case
    geo = conv_ops.ConvGeometry(tasks, _pair(stride), _pair(pad), (h, w), _pair(k))
    shapes = dict(x=(batch, tasks * cin, h, w), w=(tasks, cout, cin, *_pair(k)),
                  y=(batch, tasks * cout, *geo.output_hw()))
    return geo, shapes


def _reference_primitives(x, w, g, geo):
    """forward, input grad and weight grad from the per-task F.conv2d loop (the definition)."""
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = conv_ops.conv2d_reference(x, w, None, geo.stride, geo.padding)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    return y.detach(), gx, gw


# ------------------------------------------------------------------------------- the primitives
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(CASES))
def test_primitives_match_reference(kernels, name, dtype):
    geo, s = _geometry(CASES[name])
    x, w, g = rand(*s["x"], dtype=dtype), rand(*s["w"], dtype=dtype), rand(*s["y"], dtype=dtype)
    y_ref, gx_ref, gw_ref = _reference_primitives(x, w, g, geo)
    tol = TOL[dtype]
    torch.testing.assert_close(kernels.conv2d_forward(x, w, geo.stride, geo.padding), y_ref, **tol)
    torch.testing.assert_close(kernels.conv2d_input_grad(g, w, geo.input_hw, geo.stride, geo.padding), gx_ref, **tol)
    for split in (None, 3):
        gw = kernels.conv2d_weight_grad(x, g, geo.kernel_hw, geo.tasks, geo.stride, geo.padding, split_k=split)
        torch.testing.assert_close(gw, gw_ref, **tol)


@pytest.mark.parametrize("name", ["stride2_odd_primes", "many_channels_pad2"])
def test_small_tiles_cover_every_element(kernels, name):
    """16x16x16 tiles: several M, N and K blocks per task, partial edge tiles, split-K of 2."""
    geo, s = _geometry(CASES[name])
    x, w, g = rand(*s["x"]), rand(*s["w"]), rand(*s["y"])
    y_ref, gx_ref, gw_ref = _reference_primitives(x, w, g, geo)
    cfg = kernels.BlockConfig(16, 16, 16, 4, 2)
    y = kernels.conv2d_forward(x, w, geo.stride, geo.padding, config=cfg)
    gx = kernels.conv2d_input_grad(g, w, geo.input_hw, geo.stride, geo.padding, config=cfg)
    gw = kernels.conv2d_weight_grad(x, g, geo.kernel_hw, geo.tasks, geo.stride, geo.padding, config=cfg, split_k=2)
    for out, ref in ((y, y_ref), (gx, gx_ref), (gw, gw_ref)):
        assert not torch.isnan(out).any(), "an output element was never written"
        torch.testing.assert_close(out, ref, **TOL[torch.float64])


def test_strided_layouts_without_copies(kernels):
    """Expanded weights (stride 0 over tasks, as MAML's θ.expand), channels-last activations and a
    transposed-view gradient are read through their strides."""
    geo, s = _geometry(CASES["stride2_odd_primes"])
    tasks = geo.tasks
    w_expanded = rand(*s["w"][1:]).expand(tasks, *s["w"][1:])
    assert w_expanded.stride(0) == 0
    x = rand(*s["x"]).contiguous(memory_format=torch.channels_last)
    g = rand(s["y"][0], s["y"][1], s["y"][3], s["y"][2]).transpose(2, 3)   # non-contiguous view
    y_ref, gx_ref, gw_ref = _reference_primitives(x, w_expanded.contiguous(), g, geo)
    tol = TOL[torch.float64]
    torch.testing.assert_close(kernels.conv2d_forward(x, w_expanded, geo.stride, geo.padding), y_ref, **tol)
    torch.testing.assert_close(kernels.conv2d_input_grad(g, w_expanded, geo.input_hw, geo.stride, geo.padding),
                               gx_ref, **tol)
    torch.testing.assert_close(kernels.conv2d_weight_grad(x, g, geo.kernel_hw, tasks, geo.stride, geo.padding),
                               gw_ref, **tol)


def test_forward_bias_epilogue(kernels):
    geo, s = _geometry(CASES["anisotropic"])
    x, w, b = rand(*s["x"]), rand(*s["w"]), rand(geo.tasks, s["w"][1])
    expected = conv_ops.conv2d_reference(x, w, b, geo.stride, geo.padding)
    torch.testing.assert_close(kernels.conv2d_forward(x, w, geo.stride, geo.padding, bias=b), expected,
                               **TOL[torch.float64])


_FALLBACK_CHECK = """
import torch
from maml_fast.backends import triton as triton_backend
from maml_fast.ops import conv2d as conv_ops
K = triton_backend.load_kernels()
K.POISON_OUTPUTS = True
torch.manual_seed(0)
x, w, g = torch.randn(3, 6, 9, 7, dtype=torch.float64), torch.randn(2, 7, 3, 3, 3, dtype=torch.float64), None
y = conv_ops.conv2d_reference(x.requires_grad_(), w.requires_grad_(), None, 2, 1)
g = torch.randn_like(y)
gx, gw = torch.autograd.grad(y, (x, w), g)
tol = dict(rtol=1e-10, atol=1e-11)
torch.testing.assert_close(K.conv2d_forward(x.detach(), w.detach(), 2, 1), y.detach(), **tol)
torch.testing.assert_close(K.conv2d_input_grad(g, w.detach(), (9, 7), 2, 1), gx, **tol)
torch.testing.assert_close(K.conv2d_weight_grad(x.detach(), g, (3, 3), 2, 2, 1, split_k=2), gw, **tol)
print("ok")
"""


def test_fp64_without_tl_dot(kernels, monkeypatch):
    """The broadcast-multiply-sum fallback for Triton builds whose fp64 tl.dot fails
    (MAML_FAST_TRITON_FP64_DOT=0)."""
    monkeypatch.setenv("MAML_FAST_TRITON_FP64_DOT", "0")
    if DEVICE == "cpu" and not _stdlib_interpreted():
        # tl.sum is a @triton.jit library function, defined (compiled-mode) when triton was imported:
        # run the check in a fresh interpreter with TRITON_INTERPRET=1 set from the start.
        env = dict(os.environ, TRITON_INTERPRET="1", MAML_FAST_TRITON_FP64_DOT="0")
        code = "import os, sys; sys.path.insert(0, os.getcwd()); import triton\n" + _FALLBACK_CHECK
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
        assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
        return
    geo, s = _geometry(CASES["stride2_odd_primes"])
    x, w, g = rand(*s["x"]), rand(*s["w"]), rand(*s["y"])
    y_ref, gx_ref, gw_ref = _reference_primitives(x, w, g, geo)
    tol = TOL[torch.float64]
    torch.testing.assert_close(kernels.conv2d_forward(x, w, geo.stride, geo.padding), y_ref, **tol)
    torch.testing.assert_close(kernels.conv2d_input_grad(g, w, geo.input_hw, geo.stride, geo.padding), gx_ref, **tol)
    torch.testing.assert_close(kernels.conv2d_weight_grad(x, g, geo.kernel_hw, geo.tasks, geo.stride, geo.padding,
                                                          split_k=2), gw_ref, **tol)


_COMPILE_CHECK = """
import os, sys
sys.path.insert(0, os.getcwd())
import torch, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from maml_fast.backends import triton as triton_backend
K = triton_backend.load_kernels()
assert not K.INTERPRETED
geometry = dict(KH=3, KW=3, SH=2, SW=2, PH=1, PW=1)
variants = [(torch.float32, "fp32", "ieee"), (torch.float32, "fp32", "tf32"), (torch.float64, "fp64", "ieee"),
            (torch.bfloat16, "bf16", "ieee")]
for dtype, name, precision in variants:
    for kind, fn, extra in (("fwd", K._conv_fwd_kernel, dict(HAS_BIAS=True, RELU=False, STATS=False)),
                            ("fwd", K._conv_fwd_kernel, dict(HAS_BIAS=True, RELU=True, STATS=True)),
                            ("dgrad", K._conv_dgrad_kernel, dict(KR=2, KS=2)),
                            ("wgrad", K._conv_wgrad_kernel, {})):
        if (name != "fp32" or precision == "tf32") and not (kind == "fwd" and extra["STATS"]):
            continue
        cfg = K.block_config(kind, 5000, 64, 576, dtype)        # the GPU heuristic (not interpreting)
        acc, use_dot, _ = K._kernel_flags(dtype, torch.device("cpu"))
        constexprs = dict(geometry, **extra, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                          ACC_DTYPE=acc, USE_DOT=use_dot, PRECISION=precision)
        signature = {a: "constexpr" if a in constexprs else ("*" + name if a.endswith("_ptr") else "i32")
                     for a in fn.arg_names}
        for accumulator in ("out_ptr", "stats_ptr"):   # fp32/fp64 workspaces
            if accumulator in signature:
                signature[accumulator] = "*fp32" if name != "fp64" else "*fp64"
        compiled = triton.compile(triton.compiler.ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        ptx = compiled.asm["ptx"]
        if precision == "tf32" or name == "bf16":
            assert "wgmma" in ptx, (kind, name, precision, "no tensor-core instruction")
        if name == "fp64":
            assert "mma.sync" in ptx and ".f64" in ptx, (kind, "no fp64 mma")
        print(kind, extra, name, precision, "ok")
"""


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the kernels are compiled and run by the other tests")
def test_kernels_compile_for_sm90_without_a_gpu():
    """Triton compiles the kernels for an H100 (sm_90) with its bundled ptxas, no GPU needed: fp32 IEEE
    and TF32 (wgmma), fp64 (DMMA), bf16 (wgmma) with the GPU block-size heuristic; the forward also
    with the fused ReLU and BatchNorm-statistics epilogue for every dtype."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_CHECK], capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode != 0 and "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("Triton's ptxas is not available")
    assert result.returncode == 0, result.stderr[-3000:]


def test_empty_batch(kernels):
    geo, s = _geometry(CASES["1x1"])
    x = rand(0, *s["x"][1:])
    w = rand(*s["w"])
    assert kernels.conv2d_forward(x, w).shape == (0, *s["y"][1:])
    gw = kernels.conv2d_weight_grad(x, rand(0, *s["y"][1:]), geo.kernel_hw, geo.tasks)
    torch.testing.assert_close(gw, torch.zeros_like(w))


def test_bad_operands_fail_with_the_argument_name(kernels):
    geo, s = _geometry(CASES["1x1"])
    x, w = rand(*s["x"]), rand(*s["w"])
    with pytest.raises(TypeError, match="x has dtype"):
        kernels.conv2d_forward(x.float(), w)
    with pytest.raises(ValueError, match="x has .* channels"):
        kernels.conv2d_forward(x[:, :1], w)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        kernels.conv2d_input_grad(rand(1, 5, 6, 6), w, (6, 6))
    with pytest.raises(TypeError, match="float16/bfloat16/float32/float64"):
        kernels.conv2d_forward(x.to(torch.int32), w.to(torch.int32))


def test_block_heuristic_and_split_k(kernels, monkeypatch):
    for kind in ("fwd", "dgrad", "wgrad"):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            for m, n, k in ((1, 1, 1), (37, 3, 9), (250_000, 64, 576), (64, 576, 2_000_000)):
                cfg = kernels.block_config(kind, m, n, k, dtype)
                for size in (cfg.block_m, cfg.block_n, cfg.block_k):
                    assert size >= 16 and size & (size - 1) == 0
    monkeypatch.setattr(kernels, "_sm_count", lambda device: 132)
    # MiniImageNet layer 2 wgrad: 4 tasks, O=32, N=288 -> 5 tiles -> 20 programs: split to fill 132 SMs
    split = kernels.split_k_heuristic(tiles=5, tasks=4, k=80 * 42 * 42, block_k=64, device=torch.device(DEVICE))
    assert 1 < split <= 64 and 20 * split >= 2 * 132
    # Omniglot with 32 tasks and 9 tiles already fills the GPU
    assert kernels.split_k_heuristic(tiles=9, tasks=32, k=10 * 14 * 14, block_k=64, device=torch.device(DEVICE)) == 1
    # a short reduction is not split below four K blocks per slice
    assert kernels.split_k_heuristic(tiles=1, tasks=1, k=100, block_k=64, device=torch.device(DEVICE)) == 1


# ------------------------------------------------------------------------ autograd, every order
def _check(fn, inputs):
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)
    assert gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


GRAD_CASES = [(2, 1, 2, 2, 5, 4, 3, 2, 1), (1, 2, 1, 3, 4, 4, 3, 1, 1)]


@pytest.mark.parametrize("case", GRAD_CASES)
def test_conv2d_gradcheck_gradgradcheck(kernels, case):
    geo, s = _geometry(case)
    x, w, b = rand(*s["x"], grad=True), rand(*s["w"], grad=True), rand(geo.tasks, s["w"][1], grad=True)
    triton_conv = backends.get_backend("triton").conv
    _check(lambda x, w, b: conv_ops.conv2d(x, w, b, geo.stride, geo.padding, primitives=triton_conv), (x, w, b))


@pytest.mark.parametrize("primitive", ["input_grad", "weight_grad"])
def test_backward_primitives_gradgradcheck(kernels, primitive):
    geo, s = _geometry(GRAD_CASES[0] if primitive == "input_grad" else GRAD_CASES[1])
    if primitive == "input_grad":
        fn = lambda g, w: conv_ops.conv2d_input_grad(g, w, geo, backends.get_backend("triton").conv)
        inputs = (rand(*s["y"], grad=True), rand(*s["w"], grad=True))
    else:
        fn = lambda x, g: conv_ops.conv2d_weight_grad(x, g, geo, backends.get_backend("triton").conv)
        inputs = (rand(*s["x"], grad=True), rand(*s["y"], grad=True))
    _check(fn, inputs)


def test_fused_bias_function(kernels):
    """conv2d with a bias on the Triton backend (bias in the forward epilogue) is the same function
    as conv + bias, to second order."""
    geo, s = _geometry(GRAD_CASES[1])
    x, w, b = rand(*s["x"], grad=True), rand(*s["w"], grad=True), rand(geo.tasks, s["w"][1], grad=True)
    triton_conv = backends.get_backend("triton").conv
    fused = lambda x, w, b: conv_ops.conv2d(x, w, b, geo.stride, geo.padding, primitives=triton_conv)
    _check(fused, (x, w, b))
    expected = conv_ops.conv2d_reference(x, w, b, geo.stride, geo.padding)
    torch.testing.assert_close(fused(x, w, b), expected, **TOL[torch.float64])


def test_third_order_matches_torch_backend(kernels):
    geo, s = _geometry(GRAD_CASES[0])
    x, w = rand(*s["x"], grad=True), rand(*s["w"], grad=True)
    v = rand(*s["y"])

    def third(backend):
        y = torch.tanh(conv_ops.conv2d(x, w, None, geo.stride, geo.padding,
                                       primitives=backends.get_backend(backend).conv))
        gx, gw = torch.autograd.grad((y * v).sum(), (x, w), create_graph=True)
        hx, = torch.autograd.grad((gw * gw.detach()).sum(), (x,), create_graph=True)
        return torch.autograd.grad((hx * hx.detach()).sum() + (gx * gx.detach()).sum(), (w, x))
    for a, b in zip(third("triton"), third("torch")):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


# ------------------------------------------------------------------ the full MAML meta-gradient
def _meta_step(learner, batch):
    learner.zero_grad(set_to_none=True)
    out = learner(batch)
    out.loss.backward()
    return out.loss.detach(), [p.grad.detach().clone() for p in learner.model.parameters()]


@pytest.mark.parametrize("downsample,size,steps,norm", [("stride", 8, 2, "batch"), ("stride", 8, 2, "none"),
                                                        ("maxpool", 16, 1, "batch")])
def test_second_order_meta_gradient_matches_loop(kernels, make_batch, downsample, size, steps, norm):
    """The triton program (conv+BN statistics and conv+ReLU fused, see test_triton_fusion.py) against
    the loop backend, float64."""
    torch.manual_seed(0)
    net = mf.models.conv4(in_channels=1, num_classes=2, hidden=3, downsample=downsample, norm=norm,
                          image_size=size)
    net = net.to(device=DEVICE, dtype=torch.float64)
    batch = make_batch(tasks=2, ways=2, shots=1, queries=2, example_shape=(1, size, size))
    batch = mf.TaskBatch(*(t.to(DEVICE) for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y)))
    results = {}
    for backend in ("triton", "loop"):
        learner = mf.MAML(net, inner_lr=0.4, inner_steps=steps, backend=backend, step_metrics=False)
        results[backend] = _meta_step(learner, batch)
    (loss_t, grads_t), (loss_l, grads_l) = results["triton"], results["loop"]
    tol = dict(rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(loss_t, loss_l, **tol)
    for a, b in zip(grads_t, grads_l):
        torch.testing.assert_close(a, b, **tol)


def test_fp32_meta_gradient_error_is_that_of_the_torch_backend(kernels, make_batch):
    """fp32: the triton program's meta-gradient judged against the float64 loop result for the same net
    and batch, within 4x the "torch" backend's own fp32 error. This tiny net's last BatchNorms see
    N = 2 values per channel, which amplifies rounding: measured max abs errors (gradients of O(0.1-1))
    loop 5.2e-6, torch 8.4e-6, triton 2.1e-5 with the fused BN statistics (with the conv bias before
    each BatchNorm cancelled exactly; computed, its rounding noise had raised torch to 2.5e-5 and
    triton to 6.3e-5)."""
    torch.manual_seed(0)
    net = mf.models.conv4(in_channels=1, num_classes=2, hidden=3, downsample="stride", image_size=8)
    batch = make_batch(tasks=2, ways=2, shots=1, queries=2, example_shape=(1, 8, 8), dtype=torch.float32)

    def meta_step(backend, dtype):
        learner = mf.MAML(copy.deepcopy(net).to(device=DEVICE, dtype=dtype), inner_lr=0.4, inner_steps=1,
                          backend=backend, step_metrics=False)
        x_y = (batch.support_x.to(DEVICE, dtype), batch.support_y.to(DEVICE),
               batch.query_x.to(DEVICE, dtype), batch.query_y.to(DEVICE))
        loss, grads = _meta_step(learner, mf.TaskBatch(*x_y))
        return [loss.double(), *(g.double() for g in grads)]

    truth = meta_step("loop", torch.float64)
    error = lambda result: max((a - b).abs().max().item() for a, b in zip(result, truth))
    assert error(meta_step("triton", torch.float32)) <= 4 * error(meta_step("torch", torch.float32))


# --------------------------------------------------------------------------------- the backend
def test_backend_registration_and_availability(kernels, monkeypatch):
    assert "triton" in backends.backend_names()
    assert isinstance(backends.get_backend("triton").conv, triton_backend.TritonConvPrimitives)
    assert backends.resolve_backend("auto", torch.device(DEVICE)).name != "triton"  # "auto" never picks it (unmeasured)
    if DEVICE == "cpu":
        assert backends.unavailable_reasons("triton", torch.device("cpu")) == []
        monkeypatch.delenv("TRITON_INTERPRET")
        reasons = backends.unavailable_reasons("triton", torch.device("cpu"))
        assert any("TRITON_INTERPRET=1" in r for r in reasons)
        with pytest.raises(ValueError, match="triton"):
            backends.resolve_backend("triton", torch.device("cpu"))
    else:
        assert backends.unavailable_reasons("triton", torch.device("cuda")) == []
    assert backends.unavailable_reasons("triton", torch.device("meta"))


def test_import_loads_no_kernel_and_touches_no_gpu():
    # (triton itself may be imported: torch._dynamo, which maml_fast's imports load, imports it)
    code = ("import sys, torch, maml_fast, maml_fast.backends.triton; "
            "assert 'maml_fast.kernels.conv2d' not in sys.modules, 'kernels loaded'; "
            "assert not any(m.startswith(('kernels', 'maml_fast.kernels.')) or 'triton_conv' in m "
            "for m in sys.modules), 'kernels imported'; "
            "assert not torch.cuda.is_initialized(), 'CUDA initialised'; "
            "assert 'triton' in maml_fast.backends.backend_names()")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------ bf16, tiles, output layout
# bf16 inputs, fp32 accumulation, bf16 outputs: against float64 of the same (rounded) inputs, the error is
# the output's rounding (2^-9 relative) plus fp32 sums. Under the interpreter the bf16 operands are
# widened before tl.dot (see kernels/conv2d.py's _mma): exact products, as on the GPU's bf16 MMA.
TOL[torch.bfloat16] = dict(rtol=8e-3, atol=1e-4)


@pytest.mark.parametrize("name", list(CASES))
def test_bf16_primitives_match_float64(kernels, name):
    geo, s = _geometry(CASES[name])
    x, w, g = (rand(*s[k]).to(torch.bfloat16) for k in ("x", "w", "y"))
    y_ref, gx_ref, gw_ref = _reference_primitives(x.double(), w.double(), g.double(), geo)
    tol = TOL[torch.bfloat16]
    y = kernels.conv2d_forward(x, w, geo.stride, geo.padding)
    gx = kernels.conv2d_input_grad(g, w, geo.input_hw, geo.stride, geo.padding)
    for out, ref in ((y, y_ref), (gx, gx_ref)):
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.double(), ref, **tol)
    for split in (1, 3):   # bf16 output written directly, and the fp32 split-K workspace reduced
        gw = kernels.conv2d_weight_grad(x, g, geo.kernel_hw, geo.tasks, geo.stride, geo.padding, split_k=split)
        assert gw.dtype == torch.bfloat16
        torch.testing.assert_close(gw.double(), gw_ref, **tol)


@pytest.mark.parametrize("kind", ["fwd", "dgrad", "wgrad"])
def test_every_autotune_config_is_correct(kernels, kind):
    """Each tile configuration triton.autotune may pick on a GPU gives the reference result (fp32; the
    interpreter runs it as an explicit config)."""
    geo, s = _geometry(CASES["stride2_odd_primes"])
    x, w, g = rand(*s["x"], dtype=torch.float32), rand(*s["w"], dtype=torch.float32), rand(*s["y"], dtype=torch.float32)
    expected = dict(zip(("fwd", "dgrad", "wgrad"), _reference_primitives(x, w, g, geo)))[kind]
    for cfg in kernels.AUTOTUNE_CONFIGS[kind]:
        if kind == "fwd":
            out = kernels.conv2d_forward(x, w, geo.stride, geo.padding, config=cfg)
        elif kind == "dgrad":
            out = kernels.conv2d_input_grad(g, w, geo.input_hw, geo.stride, geo.padding, config=cfg)
        else:
            out = kernels.conv2d_weight_grad(x, g, geo.kernel_hw, geo.tasks, geo.stride, geo.padding, config=cfg,
                                             split_k=2)
        torch.testing.assert_close(out, expected, **TOL[torch.float32], msg=lambda m, cfg=cfg: f"{cfg}: {m}")


def test_autotuning_is_for_compiled_gpu_launches_only(kernels):
    assert not kernels._autotuned(torch.float32, torch.device("cpu"))
    assert not kernels._autotuned(torch.float64, torch.device("cuda"))
    assert kernels._autotuned(torch.bfloat16, torch.device("cuda")) == (not kernels.INTERPRETED)


def test_channels_last_outputs(kernels):
    """memory_format= allocates y and gx channels-last (the "fused" backend's layout); same values."""
    geo, s = _geometry(CASES["many_channels_pad2"])
    x, w, g = rand(*s["x"]), rand(*s["w"]), rand(*s["y"])
    y_ref, gx_ref, _ = _reference_primitives(x, w, g, geo)
    cl = torch.channels_last
    y = kernels.conv2d_forward(x, w, geo.stride, geo.padding, memory_format=cl)
    gx = kernels.conv2d_input_grad(g, w, geo.input_hw, geo.stride, geo.padding, memory_format=cl)
    for out, ref in ((y, y_ref), (gx, gx_ref)):
        assert out.is_contiguous(memory_format=cl)
        torch.testing.assert_close(out, ref, **TOL[torch.float64])


def test_error_vs_float64_per_precision(kernels):
    """Each primitive's error against float64 of the same float32 data, fp32 and bf16 inputs, at the
    Omniglot conv4 layer-2 geometry (64 -> 64 channels, 14x14, stride 2; T=2, batch 5). Printed (run
    with -s; benchmarks/RESULTS.md); bounded at about 5x what was measured under the interpreter: fp32
    1.2e-7..1.5e-7, bf16 4.1e-3 (norm-wise; the input and output rounding to bf16). TF32 is
    measured on a GPU only (benchmarks/test_conv_primitives.py): the interpreter's tl.dot ignores
    input_precision."""
    geo = conv_ops.ConvGeometry(2, (2, 2), (1, 1), (14, 14), (3, 3))
    x, w, g = (rand(*shape, dtype=torch.float32) for shape in ((5, 128, 14, 14), (2, 64, 64, 3, 3), (5, 128, 7, 7)))
    reference = _reference_primitives(x.double(), w.double(), g.double(), geo)
    for dtype, bound in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2)):
        xs, ws, gs = x.to(dtype), w.to(dtype), g.to(dtype)
        outputs = (kernels.conv2d_forward(xs, ws, geo.stride, geo.padding),
                   kernels.conv2d_input_grad(gs, ws, geo.input_hw, geo.stride, geo.padding),
                   kernels.conv2d_weight_grad(xs, gs, geo.kernel_hw, geo.tasks, geo.stride, geo.padding))
        for primitive, out, ref in zip(("forward", "input_grad", "weight_grad"), outputs, reference):
            error = float((out.double() - ref).norm() / ref.norm())
            print(f"{dtype} {primitive}: relative error vs float64 {error:.2e}")
            assert error < bound, (dtype, primitive, error)
