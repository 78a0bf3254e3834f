"""The Triton conv's fused epilogues (kernels/conv2d.py) and their lowering in the "triton" backend:
conv + bias + ReLU, and conv + bias with BatchNorm's batch statistics feeding
`batch_norm_from_statistics`.

Runs like tests/test_triton_conv.py (whose fixture and helpers it shares): under Triton's CPU
interpreter without CUDA, every kernel output (y and the per-tile statistics workspace) NaN-poisoned.
"""
from __future__ import annotations

import pytest
import torch

import maml_fast as mf
from maml_fast import program
from maml_fast.backends import BACKENDS, get_backend
from maml_fast.backends import triton as triton_backend
from maml_fast.data.omniglot import load_omniglot_characters
from maml_fast.ops import conv2d as conv_ops
from maml_fast.ops import norm as norm_ops
from test_triton_conv import CASES, DEVICE, GRAD_CASES, TOL, _check, _geometry, kernels, rand  # noqa: F401

# tasks, batch, in_ch, out_ch, H, W, kernel, stride, padding: T=1 with one input channel, stride 2 on
# odd sizes with prime channel counts, an odd T=3 with a 3x1 kernel.
FUSED_CASES = ["T1_one_channel", "stride2_odd_primes", "anisotropic"]


def _reference(x, w, b, geo, relu):
    """The float64 definition: y (relu'd or not) and its per-channel mean and biased variance."""
    y = conv_ops.conv2d_reference(x.double(), w.double(), b.double(), geo.stride, geo.padding)
    y = torch.relu(y) if relu else y
    return y, y.mean(dim=(0, 2, 3)), y.var(dim=(0, 2, 3), unbiased=False)


@pytest.mark.parametrize("small_tiles", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", FUSED_CASES)
def test_fused_epilogues_match_reference(kernels, name, dtype, small_tiles):
    """ReLU and the statistics against float64; 16x16x16 tiles give several M tiles per task whose last
    one is partial (its rows past M hold relu(bias) and must not count; the tile combination must
    weight it by its row count)."""
    geo, s = _geometry(CASES[name])
    x, w, b = rand(*s["x"], dtype=dtype), rand(*s["w"], dtype=dtype), rand(geo.tasks, s["w"][1], dtype=dtype)
    config = kernels.BlockConfig(16, 16, 16, 4, 1) if small_tiles else None
    count = s["y"][0] * s["y"][2] * s["y"][3]
    if small_tiles:
        assert count > 16 and count % 16, "the case must give a partial last M tile"
    for relu in (False, True):
        y_ref, mean_ref, var_ref = _reference(x, w, b, geo, relu)
        y = kernels.conv2d_forward(x, w, geo.stride, geo.padding, bias=b, relu=relu, config=config)
        torch.testing.assert_close(y, y_ref.to(dtype), **TOL[dtype])
        y, mean, var = kernels.conv2d_forward_with_stats(x, w, geo.stride, geo.padding, bias=b, relu=relu,
                                                         config=config)
        assert mean.dtype == var.dtype == dtype and mean.shape == var.shape == (s["y"][1],)
        for out, ref in ((y, y_ref), (mean, mean_ref), (var, var_ref)):
            torch.testing.assert_close(out, ref.to(dtype), **TOL[dtype])


def test_statistics_of_an_empty_batch_are_nan(kernels):
    """As torch's mean of an empty tensor."""
    geo, s = _geometry(CASES["1x1"])
    y, mean, var = kernels.conv2d_forward_with_stats(rand(0, *s["x"][1:]), rand(*s["w"]))
    assert y.shape == (0, *s["y"][1:]) and mean.shape == var.shape == (s["y"][1],)
    assert mean.isnan().all() and var.isnan().all()


def test_bad_operands_fail_with_the_argument_name(kernels):
    geo, s = _geometry(CASES["1x1"])
    x, w = rand(*s["x"]), rand(*s["w"])
    with pytest.raises(ValueError, match="bias must have shape"):
        kernels.conv2d_forward_with_stats(x, w, bias=rand(geo.tasks, 1))
    y, mean, var = kernels.conv2d_forward_with_stats(x, w)
    with pytest.raises(ValueError, match="var must have shape"):
        norm_ops.batch_norm_from_statistics(y, mean, var[:-1], None, None, geo.tasks)
    with pytest.raises(ValueError, match="weight must have shape"):
        norm_ops.batch_norm_from_statistics(y, mean, var, rand(geo.tasks, 1), None, geo.tasks)


# ------------------------------------------------------------------------ the differentiable ops
@pytest.mark.parametrize("case", GRAD_CASES)
def test_conv2d_relu_gradcheck_gradgradcheck(kernels, case):
    geo, s = _geometry(case)
    x, w, b = rand(*s["x"], grad=True), rand(*s["w"], grad=True), rand(geo.tasks, s["w"][1], grad=True)
    triton_conv = get_backend("triton").conv
    fused = lambda x, w, b: conv_ops.conv2d_relu(x, w, b, geo.stride, geo.padding, primitives=triton_conv)
    torch.testing.assert_close(fused(x, w, b), _reference(x, w, b, geo, True)[0], **TOL[torch.float64])
    _check(fused, (x, w, b))
    _check(lambda x, w: conv_ops.conv2d_relu(x, w, None, geo.stride, geo.padding, primitives=triton_conv), (x, w))


@pytest.mark.parametrize("case", GRAD_CASES)
def test_conv2d_with_batch_stats_gradcheck_gradgradcheck(kernels, case):
    """All three outputs (y, mean, var) differentiable to second order (their gradients enter gy)."""
    geo, s = _geometry(case)
    x, w, b = rand(*s["x"], grad=True), rand(*s["w"], grad=True), rand(geo.tasks, s["w"][1], grad=True)
    triton_conv = get_backend("triton").conv
    fused = lambda x, w, b: conv_ops.conv2d_with_batch_stats(x, w, b, geo.stride, geo.padding, primitives=triton_conv)
    for out, ref in zip(fused(x, w, b), _reference(x, w, b, geo, False)):
        torch.testing.assert_close(out, ref, **TOL[torch.float64])
    _check(fused, (x, w, b))


def test_unfused_backends_compute_the_same_ops(kernels):
    """On a backend without the fused epilogue the two ops are conv2d followed by torch ops."""
    geo, s = _geometry(CASES["stride2_odd_primes"])
    x, w, b = rand(*s["x"]), rand(*s["w"]), rand(geo.tasks, s["w"][1])
    for backend in ("torch", "triton"):
        primitives = get_backend(backend).conv
        relu = conv_ops.conv2d_relu(x, w, b, geo.stride, geo.padding, primitives=primitives)
        torch.testing.assert_close(relu, _reference(x, w, b, geo, True)[0], **TOL[torch.float64])
        for out, ref in zip(conv_ops.conv2d_with_batch_stats(x, w, b, geo.stride, geo.padding, primitives=primitives),
                            _reference(x, w, b, geo, False)):
            torch.testing.assert_close(out, ref, **TOL[torch.float64])


def _conv_bn(x, w, b, gamma, beta, geo, fused: bool):
    if fused:
        y, mean, var = conv_ops.conv2d_with_batch_stats(x, w, b, geo.stride, geo.padding,
                                                        primitives=get_backend("triton").conv)
        return norm_ops.batch_norm_from_statistics(y, mean, var, gamma, beta, geo.tasks)
    y = conv_ops.conv2d(x, w, b, geo.stride, geo.padding, primitives=get_backend("torch").conv)
    return norm_ops.batch_norm(y, gamma, beta, geo.tasks)


def test_batch_norm_from_conv_statistics_matches_batch_norm_to_second_order(kernels):
    """conv -> BN from the conv kernel's statistics is the same function as conv -> batch_norm:
    values, first and second derivatives in float64; and gradgradcheck of the chain."""
    geo, s = _geometry(CASES["stride2_odd_primes"])
    x, w, b = rand(*s["x"], grad=True), rand(*s["w"], grad=True), rand(geo.tasks, s["w"][1], grad=True)
    gamma, beta = rand(geo.tasks, s["w"][1], grad=True), rand(geo.tasks, s["w"][1], grad=True)
    inputs = (x, w, b, gamma, beta)
    v = rand(*s["y"])

    def derivatives(fused):
        out = _conv_bn(*inputs, geo, fused)
        first = torch.autograd.grad((torch.tanh(out) * v).sum(), inputs, create_graph=True)
        second = torch.autograd.grad(sum((g * g).sum() for g in first), inputs)
        return (out, *first, *second)

    for a, r in zip(derivatives(True), derivatives(False)):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10)
    geo, s = _geometry(GRAD_CASES[0])
    small = (rand(*s["x"], grad=True), rand(*s["w"], grad=True), rand(geo.tasks, s["w"][1], grad=True),
             rand(geo.tasks, s["w"][1], grad=True), rand(geo.tasks, s["w"][1], grad=True))
    _check(lambda *args: _conv_bn(*args, geo, True), small)


def test_fp32_statistics_error_on_omniglot_conv4(kernels):
    """The fp32 error of the conv epilogue's batch statistics, measured on the four conv layers of a
    freshly initialised conv4 (64 channels, stride 2, seed 0) fed real Omniglot images (2 tasks x 5
    characters x 16 drawers, ink = 1) against float64 two-pass statistics of the float64 conv.

    Bounds asserted per channel, ε = 2^-24 and c = 600 (the worst case of summing a 512-row tile in
    sequence, as the interpreter does, plus the tiles; a GPU's tree reduction has c ~ log2 rows):
    |Δvar|/var <= c·ε, |Δmean| <= c·ε·(|mean| + std); BN's output within 1e-4.
    Measured under the interpreter, seeds 0/1/2: |Δvar|/var <= 1.5e-6, |Δmean|/std <= 2.2e-5 (layer 1,
    mostly blank images, |mean|/std up to 6.7), BN output error <= 2.3e-5 (fp32 two-pass BatchNorm of
    the same fp32 y: <= 2.2e-6). Σy and Σy² (var = E[y²] - E[y]²) gave |Δvar|/var up to 4.5e-4 and BN
    output errors up to 1.4e-3 on the same layers, hence the per-tile centred sums."""
    characters = load_omniglot_characters()
    tasks, ways, drawers = 2, 5, 16
    ink = 1.0 - torch.from_numpy(characters.images[: tasks * ways, :drawers]).double() / 255.0
    # [T, ways, drawers, 28, 28] -> grouped [B = ways*drawers, T, 28, 28]
    h = ink.reshape(tasks, ways * drawers, 28, 28).transpose(0, 1).contiguous()
    torch.manual_seed(0)
    net = mf.models.conv4(in_channels=1, num_classes=5, hidden=64, downsample="stride").double()
    bound = 600 * 2.0 ** -24
    measured = []
    for conv in (m for m in net if isinstance(m, torch.nn.Conv2d)):
        w = conv.weight.detach().expand(tasks, *conv.weight.shape)
        b = conv.bias.detach().expand(tasks, -1)
        y64 = conv_ops.conv2d_reference(h, w, b, conv.stride, conv.padding)
        y32, mean32, var32 = kernels.conv2d_forward_with_stats(h.float(), w.float(), conv.stride, conv.padding,
                                                               bias=b.float())
        mean64 = y64.mean(dim=(0, 2, 3))
        var64 = y64.var(dim=(0, 2, 3), unbiased=False)
        rel_var = (var32.double() - var64).abs() / var64
        mean_err = (mean32.double() - mean64).abs()
        assert (rel_var <= bound).all() and (mean_err <= bound * (mean64.abs() + var64.sqrt())).all()
        bn64 = norm_ops.batch_norm_reference(y64, None, None, tasks)
        fused = norm_ops.batch_norm_from_statistics(y32, mean32, var32, None, None, tasks).double()
        two_pass = norm_ops.batch_norm(y32, None, None, tasks).double()
        measured.append(((mean64.abs() / var64.sqrt()).max().item(), rel_var.max().item(),
                         (mean_err / var64.sqrt()).max().item(), (fused - bn64).abs().max().item(),
                         (two_pass - bn64).abs().max().item()))
        h = torch.relu(bn64)
    for layer, (ratio, var_err, mean_err, fused_err, two_pass_err) in enumerate(measured, 1):
        print(f"layer {layer}: max |mean|/std {ratio:.1f}, max |Δvar|/var {var_err:.1e}, max |Δmean|/std "
              f"{mean_err:.1e}, BN output error {fused_err:.1e} (fp32 two-pass BN {two_pass_err:.1e})")
        assert fused_err < 1e-4


# --------------------------------------------------------------------------------- the lowering
def _count_launches(kernels, monkeypatch):
    """Counts of the kernels module's forward launchers, by (launcher, relu)."""
    counts: dict[tuple[str, bool], int] = {}
    for launcher in ("conv2d_forward", "conv2d_forward_with_stats"):
        original = getattr(kernels, launcher)

        def counted(*args, _launcher=launcher, _original=original, relu=False, **kwargs):
            counts[_launcher, relu] = counts.get((_launcher, relu), 0) + 1
            return _original(*args, relu=relu, **kwargs)
        monkeypatch.setattr(kernels, launcher, counted)
    return counts


@pytest.mark.parametrize("norm,expected", [("batch", {("conv2d_forward_with_stats", False): 4}),
                                           ("none", {("conv2d_forward", True): 4})])
def test_triton_program_uses_the_fused_kernels(kernels, monkeypatch, norm, expected):
    """conv4: each Conv2d+BatchNorm2d becomes one conv-with-statistics launch feeding the BN, each
    Conv2d+(Identity+)ReLU one conv+ReLU launch; the program's output equals the unfused torch one."""
    net = mf.models.conv4(in_channels=1, num_classes=2, hidden=3, norm=norm, image_size=8).double()
    tasks = 2
    params = {n: p.detach().expand(tasks, *p.shape) for n, p in net.named_parameters()}
    x = rand(tasks, 3, 1, 8, 8)
    fused, reason = program.lower(net, get_backend("triton"))
    unfused, _ = program.lower(net, get_backend("torch"))
    assert reason is None and len(fused.layers) < len(unfused.layers)
    counts = _count_launches(kernels, monkeypatch)
    out = fused(params, x)
    assert counts == expected
    torch.testing.assert_close(out, unfused(params, x), **TOL[torch.float64])


def test_fused_conv_batch_norm_uses_running_statistics_when_given(kernels):
    """Evaluation with MAML++ per-step running statistics (entries of params) normalises with them: the
    fused layer then runs the unfused conv and BatchNorm, as the torch program does."""
    net = mf.models.conv4(in_channels=1, num_classes=2, hidden=3, image_size=8).double()
    tasks = 2
    params = {n: p.detach().expand(tasks, *p.shape) for n, p in net.named_parameters()}
    for name, module in net.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            params[name + ".running_mean"] = rand(tasks, module.num_features)
            params[name + ".running_var"] = rand(tasks, module.num_features).abs() + 0.5
    x = rand(tasks, 3, 1, 8, 8)
    expected = program.lower(net, get_backend("torch"))[0](params, x)
    torch.testing.assert_close(program.lower(net, get_backend("triton"))[0](params, x), expected,
                               **TOL[torch.float64])


def test_fusion_rule_leaves_other_backends_and_unsupported_convs_alone():
    # the rule is the triton backend's alone: no other backend lowers with it
    assert triton_backend.fuse_conv_epilogue in get_backend("triton").fusion_rules
    for name, backend in BACKENDS.items():
        if name != "triton":
            assert triton_backend.fuse_conv_epilogue not in getattr(backend, "fusion_rules", ()), name
    triton = get_backend("triton")
    children = [("0", torch.nn.Conv2d(1, 2, 3)), ("1", torch.nn.ReLU())]
    assert triton_backend.fuse_conv_epilogue(children, "", triton)[1] == 2
    dilated = [("0", torch.nn.Conv2d(1, 2, 3, dilation=2)), ("1", torch.nn.ReLU())]
    assert triton_backend.fuse_conv_epilogue(dilated, "", triton) is None
    tracked = [("0", torch.nn.Conv2d(1, 2, 3)), ("1", torch.nn.BatchNorm2d(2))]
    assert triton_backend.fuse_conv_epilogue(tracked, "", triton) is None
    assert triton_backend.fuse_conv_epilogue(children[:1], "", triton) is None
