"""The compiled ops as complete PyTorch operators: each ``torch.ops.maml_fast.*`` op called directly is
differentiable (``torch.library.register_autograd``) to the order its Python wrapper is, and passes
``torch.library.opcheck`` with inputs that require grad (schema, autograd registration, fake kernel,
AOT dispatch with dynamic shapes, which compares the derivatives of the traced op with eager ones).

The backward ops take the forward's cached values (BatchNorm's mean/rstd and y, the cross-entropy's
logsumexp) as inputs; their registered derivatives treat them as those cached values of x / logits
(total derivative in x, none for them), so they are checked composed with the forward op, as the
wrappers use them."""
from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from maml_fast.backends.fused import FUSED
from maml_fast.ops import batch_norm_relu as bnr
from maml_fast.ops import batch_norm_relu_pool as pool
from maml_fast.ops import conv2d as conv_ops
from maml_fast.ops import direct_conv, fast_weight_update, losses, pooled_linear

pytestmark = pytest.mark.skipif(not bnr.is_available("cpu"), reason="; ".join(bnr.unavailable_reasons("cpu")))
ops = torch.ops.maml_fast
EPS = 1e-5


def leaf(*shape, dtype=torch.float64, scale=1.0, generator=None):
    return (scale * torch.randn(shape, dtype=torch.float64, generator=generator)).to(dtype).requires_grad_()


# ------------------------------------------------------------------------------------ the cases
def bn_inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return leaf(7, 3, dtype=dtype, generator=g), leaf(3, dtype=dtype, generator=g), leaf(3, dtype=dtype, generator=g)


def pool_inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return leaf(1, 4, 3, 2, dtype=dtype, generator=g), leaf(2, dtype=dtype, generator=g), leaf(2, dtype=dtype, generator=g)


LABELS = torch.tensor([[0, 3, 1], [2, 2, 0]])


def cases(dtype, slope=0.0):
    """name -> (the op's OpOverload, a function of differentiable leaves, those leaves, the op's own
    arguments for opcheck). The functions compose the backward ops with their forward op; the BatchNorm+ReLU
    ops take the negative `slope` (LeakyReLU where > 0)."""
    g = torch.Generator().manual_seed(2)
    x, w, b = bn_inputs(dtype)
    gy, ggx, ggw, ggb = leaf(7, 3, dtype=dtype, generator=g), leaf(7, 3, dtype=dtype, generator=g), \
        leaf(3, dtype=dtype, generator=g), leaf(3, dtype=dtype, generator=g)
    y, mean, rstd = (t.detach() for t in ops.batch_norm_relu(x, w, b, EPS, slope))

    def bn_backward(gy, x, w, b):
        y, mean, rstd = ops.batch_norm_relu(x, w, b, EPS, slope)
        return ops.batch_norm_relu_backward(gy, x, y, w, mean, rstd, slope)

    def bn_double_backward(ggx, ggw, ggb, gy, x, w, b):
        y, mean, rstd = ops.batch_norm_relu(x, w, b, EPS, slope)
        return ops.batch_norm_relu_double_backward(ggx, ggw, ggb, gy, x, y, w, mean, rstd, slope)

    px, pw, pb = pool_inputs(dtype)
    pgy, pggx, pggw = leaf(1, 2, 1, 2, dtype=dtype, generator=g), leaf(1, 4, 3, 2, dtype=dtype, generator=g), \
        leaf(2, dtype=dtype, generator=g)
    _, pmean, prstd = (t.detach() for t in ops.batch_norm_relu_max_pool(px, pw, pb, EPS))

    def pool_backward(gy, x, w, b):
        _, mean, rstd = ops.batch_norm_relu_max_pool(x, w, b, EPS)
        return ops.batch_norm_relu_max_pool_backward(gy, x, w, b, mean, rstd)

    def pool_double_backward(ggx, ggw, gy, x, w, b):
        _, mean, rstd = ops.batch_norm_relu_max_pool(x, w, b, EPS)
        return ops.batch_norm_relu_max_pool_double_backward(ggx, ggw, None, gy, x, w, b, mean, rstd)

    logits, gl, ggl = leaf(2, 3, 4, dtype=dtype, generator=g), leaf(2, dtype=dtype, generator=g), \
        leaf(2, 3, 4, dtype=dtype, generator=g)
    lse = ops.cross_entropy_per_task(logits.detach(), LABELS)[2]

    def ce_forward(logits):
        loss, _, lse = ops.cross_entropy_per_task(logits, LABELS)
        return loss, lse

    def ce_backward(gl, logits):
        return ops.cross_entropy_per_task_backward(gl, logits, LABELS, ops.cross_entropy_per_task(logits, LABELS)[2])

    def ce_double_backward(ggl, gl, logits):
        lse = ops.cross_entropy_per_task(logits, LABELS)[2]
        return ops.cross_entropy_per_task_double_backward(ggl, gl, logits, LABELS, lse)

    pred, target = leaf(2, 5, dtype=dtype, generator=g), leaf(2, 5, dtype=dtype, generator=g)
    cx, cw, cb = leaf(1, 2, 4, 4, dtype=dtype, generator=g), leaf(2, 2, 1, 2, 3, dtype=dtype, generator=g), \
        leaf(2, 2, dtype=dtype, generator=g)
    cgo = leaf(1, 4, 3, 4, dtype=dtype, generator=g)
    params = [leaf(3, 4, dtype=dtype, generator=g), leaf(3, 2, 2, dtype=dtype, generator=g)]
    grads = [leaf(3, 4, dtype=dtype, generator=g), leaf(3, 2, 2, dtype=dtype, generator=g)]
    lrs = [leaf(dtype=dtype, generator=g), leaf(2, 2, dtype=dtype, generator=g)]

    task_grads = [leaf(3, 2, 5, dtype=dtype, generator=g), leaf(3, dtype=dtype, generator=g)]
    task_pair = leaf(3, 5, 2, dtype=dtype, generator=g).transpose(1, 2)  # (another layout than its gradient's)

    hx, hw, hb = leaf(2, 6, 2, 1, dtype=dtype, generator=g), leaf(2, 4, 3, dtype=dtype, generator=g), \
        leaf(2, 4, dtype=dtype, generator=g)
    hgy, hggx, hggw, hggb = leaf(2, 8, dtype=dtype, generator=g), leaf(2, 6, 2, 1, dtype=dtype, generator=g), \
        leaf(2, 4, 3, dtype=dtype, generator=g), leaf(2, 4, dtype=dtype, generator=g)

    return {
        "pooled_linear": (ops.pooled_linear.default, ops.pooled_linear, (hx, hw, hb), (hx, hw, hb)),
        "pooled_linear_backward": (ops.pooled_linear_backward.default, ops.pooled_linear_backward, (hgy, hx, hw),
                                   (hgy, hx, hw)),
        "pooled_linear_double_backward": (ops.pooled_linear_double_backward.default,
                                          ops.pooled_linear_double_backward, (hggx, hggw, hggb, hgy, hx, hw),
                                          (hggx, hggw, hggb, hgy, hx, hw)),
        "batch_norm_relu": (ops.batch_norm_relu.default, lambda x, w, b: ops.batch_norm_relu(x, w, b, EPS, slope),
                            (x, w, b), (x, w, b, EPS, slope)),
        "batch_norm_relu_backward": (ops.batch_norm_relu_backward.default, bn_backward, (gy, x, w, b),
                                     (gy, x, y, w, mean, rstd, slope)),
        "batch_norm_relu_double_backward": (ops.batch_norm_relu_double_backward.default, bn_double_backward,
                                            (ggx, ggw, ggb, gy, x, w, b),
                                            (ggx, ggw, ggb, gy, x, y, w, mean, rstd, slope)),
        "batch_norm_relu_max_pool": (ops.batch_norm_relu_max_pool.default,
                                     lambda x, w, b: ops.batch_norm_relu_max_pool(x, w, b, EPS), (px, pw, pb),
                                     (px, pw, pb, EPS)),
        "batch_norm_relu_max_pool_backward": (ops.batch_norm_relu_max_pool_backward.default, pool_backward,
                                              (pgy, px, pw, pb), (pgy, px, pw, pb, pmean, prstd)),
        "batch_norm_relu_max_pool_double_backward": (
            ops.batch_norm_relu_max_pool_double_backward.default, pool_double_backward, (pggx, pggw, pgy, px, pw, pb),
            (pggx, pggw, None, pgy, px, pw, pb, pmean, prstd)),
        "cross_entropy_per_task": (ops.cross_entropy_per_task.default, ce_forward, (logits,), (logits, LABELS)),
        "cross_entropy_per_task_backward": (ops.cross_entropy_per_task_backward.default, ce_backward, (gl, logits),
                                            (gl, logits, LABELS, lse)),
        "cross_entropy_per_task_double_backward": (ops.cross_entropy_per_task_double_backward.default,
                                                   ce_double_backward, (ggl, gl, logits),
                                                   (ggl, gl, logits, LABELS, lse)),
        "mse_per_task": (ops.mse_per_task.default, ops.mse_per_task, (pred, target), (pred, target)),
        "mse_per_task_backward": (ops.mse_per_task_backward.default, ops.mse_per_task_backward, (gl, pred, target),
                                  (gl, pred, target)),
        "direct_conv2d": (ops.direct_conv2d.default, lambda x, w, b: ops.direct_conv2d(x, w, b, [2, 1], [1, 0]),
                          (cx, cw, cb), (cx, cw, cb, [2, 1], [1, 0])),
        "direct_conv2d_weight_grad": (ops.direct_conv2d_weight_grad.default,
                                      lambda x, go: ops.direct_conv2d_weight_grad(x, go, 2, [2, 3], [2, 1], [1, 1]),
                                      (cx, cgo), (cx, cgo, 2, [2, 3], [2, 1], [1, 1])),
        "sum_over_tasks": (ops.sum_over_tasks.default,
                           lambda g0, g1, p0: tuple(ops.sum_over_tasks([g0, g1], [p0], [0])),
                           (*task_grads, task_pair), (task_grads, [task_pair], [0])),
        "fast_weight_update": (ops.fast_weight_update.default,
                               lambda p0, p1, g0, g1, l0, l1: tuple(ops.fast_weight_update([p0, p1], [g0, g1], [l0, l1])),
                               (*params, *grads, *lrs), (params, grads, lrs)),
    }


NAMES = list(cases(torch.float64))
# Every op with ReLU's slope 0, and the BatchNorm+ReLU ops again with ResNet-12's LeakyReLU slope.
LEAKY_SLOPE = 0.1
CASES = [(name, 0.0) for name in NAMES] + [(name, LEAKY_SLOPE) for name in NAMES
                                           if name.startswith("batch_norm_relu") and "max_pool" not in name]
CASE_IDS = [name if not slope else f"{name}-slope{slope}" for name, slope in CASES]


def test_every_op_is_covered():
    defined = {name for name in dir(ops) if isinstance(getattr(ops, name), torch._ops.OpOverloadPacket)}
    assert set(NAMES) == defined and len(NAMES) == 18


# ------------------------------------------------------------------------------------ opcheck
# (an op without a registered autograd kernel passes opcheck here with only this warning: an error)
@pytest.mark.filterwarnings("error:.*an autograd kernel was not registered")
@pytest.mark.parametrize(("name", "negative_slope"), CASES, ids=CASE_IDS)
def test_opcheck_with_inputs_that_require_grad(name, negative_slope):
    overload, _, _, args = cases(torch.float32, negative_slope)[name]
    flat = [a for arg in args for a in (arg if isinstance(arg, list) else [arg])]
    assert any(isinstance(a, torch.Tensor) and a.requires_grad for a in flat)
    result = torch.library.opcheck(overload, args)
    assert set(result.values()) == {"SUCCESS"}, result


# ------------------------------------------------------------------------------------ derivatives
@pytest.mark.parametrize(("name", "negative_slope"), CASES, ids=CASE_IDS)
def test_gradcheck_and_gradgradcheck_of_the_op_called_directly(name, negative_slope):
    _, function, leaves, _ = cases(torch.float64, negative_slope)[name]
    outputs = function(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    assert all(o.grad_fn is not None for o in outputs if o.is_floating_point())  # an autograd graph, no warning
    assert gradcheck(function, leaves)
    assert gradgradcheck(function, leaves)


def third_derivatives(function, leaves, wrt):
    """d/d leaves of a scalar made from the second derivatives of a scalar made from function's first
    derivatives in `wrt` (a third derivative, through the ops' own derivatives)."""
    outputs = function(*leaves)
    first = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
    weights = torch.linspace(-1.0, 1.0, first.numel(), dtype=first.dtype).reshape(first.shape)
    g1 = torch.autograd.grad((first * weights).sum(), wrt, create_graph=True)
    g2 = torch.autograd.grad(sum(g.sin().sum() for g in g1), wrt, create_graph=True)
    return torch.autograd.grad(sum(g.pow(2).sum() for g in g2), leaves, allow_unused=True)


def _fused_conv(x, w, b):
    return conv_ops.conv2d(x, w, b, (2, 1), (1, 0), primitives=FUSED.conv)


# op name -> (the wrapper: its derivatives are the glue's; the pure-PyTorch reference[, the leaves
# differentiated twice: the first two by default]). (sum_over_tasks is linear: its second derivatives
# are zero, so no third exists to compare; its gradcheck and gradgradcheck are above.)
WRAPPERS = {
    "batch_norm_relu": (lambda x, w, b: bnr.batch_norm_relu_rows(x, w, b, EPS),
                        lambda x, w, b: bnr.batch_norm_relu_rows_reference(x, w, b, EPS)[0]),
    "batch_norm_leaky_relu": (lambda x, w, b: bnr.batch_norm_relu_rows(x, w, b, EPS, LEAKY_SLOPE),
                              lambda x, w, b: bnr.batch_norm_relu_rows_reference(x, w, b, EPS, LEAKY_SLOPE)[0]),
    "batch_norm_relu_max_pool": (lambda x, w, b: pool.batch_norm_relu_max_pool_nhwc(x, w, b, EPS),
                                 lambda x, w, b: pool.batch_norm_relu_max_pool_reference(x, w, b, EPS)[0]),
    "cross_entropy_per_task": (lambda logits: losses.fused_cross_entropy_per_task(logits, LABELS)[0],
                               lambda logits: losses.cross_entropy_per_task(logits, LABELS)[0]),
    "mse_per_task": (losses.fused_mse_per_task, lambda p, t: losses.mse_per_task(p, t)[0]),
    "pooled_linear": (pooled_linear.pooled_linear, pooled_linear.pooled_linear_reference),
    "direct_conv2d": (_fused_conv, lambda x, w, b: conv_ops.conv2d_reference(x, w, b, (2, 1), (1, 0))),
    "fast_weight_update": (
        lambda p0, p1, g0, g1, l0, l1: fast_weight_update.fast_weight_update([p0, p1], [g0, g1], [l0, l1])[0],
        lambda p0, p1, g0, g1, l0, l1: fast_weight_update.fast_weight_update_reference([p0, p1], [g0, g1], [l0, l1])[0],
        (2, 4)),
}


@pytest.mark.parametrize("name", list(WRAPPERS))
def test_third_derivatives_of_the_op_equal_the_wrappers(name):
    """The op called directly is differentiable to the wrapper's order (three and more): its third
    derivatives equal the wrapper's (the same functions: bit for bit, but for the convolution, whose
    wrapper adds the bias in another op) and the pure-PyTorch reference's (float64)."""
    if name == "batch_norm_leaky_relu":
        _, function, leaves, _ = cases(torch.float64, LEAKY_SLOPE)["batch_norm_relu"]
    else:
        _, function, leaves, _ = cases(torch.float64)[name]
    wrapper, reference, *which = WRAPPERS[name]
    wrt = [leaves[i] for i in (which[0] if which else (0, 1)) if i < len(leaves)]
    direct = third_derivatives(function, leaves, wrt)
    through_wrapper = third_derivatives(wrapper, leaves, wrt)
    by_reference = third_derivatives(reference, leaves, wrt)
    for d, w, r, leaf_ in zip(direct, through_wrapper, by_reference, leaves):
        if d is None:
            assert w is None or not w.any()
            continue
        if name == "direct_conv2d":
            torch.testing.assert_close(d, w, rtol=1e-12, atol=1e-12)
        else:
            assert torch.equal(d, w)
        torch.testing.assert_close(d, r, rtol=1e-9, atol=1e-10)


def test_statistics_outputs_are_differentiable():
    """mean and rstd of the BatchNorm ops are the batch statistics of x, with their derivatives."""
    x, w, b = bn_inputs()
    _, mean, rstd = ops.batch_norm_relu(x, w, b, EPS)
    (gm,) = torch.autograd.grad(mean.sum(), x, retain_graph=True)
    torch.testing.assert_close(gm, torch.full_like(x, 1 / x.shape[0]), rtol=0, atol=1e-15)
    (gr,) = torch.autograd.grad((rstd * torch.arange(3.0, dtype=x.dtype)).sum(), x)
    (expected,) = torch.autograd.grad((torch.rsqrt(x.var(0, unbiased=False) + EPS) * torch.arange(3.0, dtype=x.dtype)).sum(), x)
    torch.testing.assert_close(gr, expected, rtol=1e-12, atol=1e-14)
    loss, accuracy, lse = ops.cross_entropy_per_task(leaf(2, 3, 4), LABELS)
    assert accuracy.grad_fn is None and not accuracy.requires_grad and lse.requires_grad
