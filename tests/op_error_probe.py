"""The compiled ops' error path: every ``torch.ops.maml_fast.*`` operator called directly with each bad
value that its C++ checks reject, each call in a process of its own.

    python -m tests.op_error_probe                                  # CPU cases, one forked process each
    python tests/op_error_probe.py --devices cpu cuda --isolation spawn --jobs 8 --out probe.json

Every case must raise the ``ValueError`` / ``TypeError`` of its check (TORCH_CHECK_VALUE / _TYPE in
csrc/) with a message naming the argument, and its process must exit normally. On one machine
(benchmarks/RESULTS.md: the H100 image, Python 3.12.3, torch 2.11.0+cu130, GCC 13.3) such calls
killed the process with a segmentation fault; a case whose process dies by a signal is reported as
``crashed (SIGSEGV)`` with the case's command line, so that it can be rerun under a debugger.

Isolation: ``fork`` (this process imports torch and maml_fast once and forks one child per case:
fast; CPU cases only, because CUDA must not be initialised before a fork) or ``spawn`` (a fresh
interpreter per case: exactly a user's direct call; slower). CUDA cases always spawn.

Exit status: 0 when every case passed (CUDA cases are skipped, with the reason, where the compiled
CUDA kernels cannot run), 1 otherwise. ``--case NAME`` runs one case in this process (the child's
side: it prints one JSON line and exits 0 when the expected exception came).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: Exit codes of a case's process besides 0 (the expected exception) and a signal.
NO_ERROR, WRONG_ERROR, NOT_RUN = 3, 4, 5
#: Set to a signal's name (e.g. SIGSEGV), the case processes send it to themselves instead of calling
#: the op: tests/test_op_error_path.py shows that way that a crash is caught and reported.
SELF_TEST_VARIABLE = "OP_ERROR_PROBE_SELF_TEST_SIGNAL"


@dataclass(frozen=True)
class Case:
    op: str  # torch.ops.maml_fast.<op>
    label: str  # the bad value, in words
    argument: str  # what the message must name
    error: str  # "ValueError" or "TypeError"
    build: object  # build(torch, device) -> the op's arguments
    devices: tuple[str, ...] = ("cpu", "cuda")

    @property
    def name(self) -> str:
        return f"{self.op}:{self.label}"


def _cases() -> list[Case]:
    """The bad values each op's C++ checks reject, with otherwise valid float64 arguments."""
    cases: list[Case] = []

    def case(op, label, argument, error, build, devices=("cpu", "cuda")):
        cases.append(Case(op, label, argument, error, build, devices))

    def t(torch, device, *shape, dtype=None):
        return torch.randn(shape, dtype=dtype or torch.float64, device=device)

    # fast_weight_update(Tensor[] params, Tensor[] grads, Tensor[] lrs)
    def fwu(torch, d, **change):
        args = {"params": [t(torch, d, 2, 3), t(torch, d, 2, 4)], "grads": [t(torch, d, 2, 3), t(torch, d, 2, 4)],
                "lrs": [t(torch, d), t(torch, d, 4)]}
        for key, edit in change.items():
            args[key] = edit(torch, d, args[key])
        return args["params"], args["grads"], args["lrs"]

    op = "fast_weight_update"
    case(op, "one grad missing", "grads", "ValueError", lambda torch, d: fwu(torch, d, grads=lambda torch, d, g: g[:1]))
    case(op, "one lr missing", "lrs", "ValueError", lambda torch, d: fwu(torch, d, lrs=lambda torch, d, g: g[:1]))
    case(op, "integer params", "params[0]", "TypeError", lambda torch, d: (
        [torch.ones(2, 3, dtype=torch.int64, device=d)], [torch.ones(2, 3, dtype=torch.int64, device=d)],
        [torch.ones((), dtype=torch.int64, device=d)]))
    case(op, "0-dim params", "params[0]", "ValueError", lambda torch, d: ([t(torch, d)], [t(torch, d)], [t(torch, d)]))
    case(op, "float32 grad", "grads[1]", "TypeError",
         lambda torch, d: fwu(torch, d, grads=lambda torch, d, g: [g[0], g[1].float()]))
    case(op, "float32 lr", "lrs[0]", "TypeError", lambda torch, d: fwu(torch, d, lrs=lambda torch, d, g: [g[0].float(), g[1]]))
    case(op, "other task count", "params[1]", "ValueError",
         lambda torch, d: fwu(torch, d, params=lambda torch, d, p: [p[0], t(torch, d, 3, 4)],
                              grads=lambda torch, d, g: [g[0], t(torch, d, 3, 4)]))
    case(op, "mismatched grad shape", "grads[0]", "ValueError",
         lambda torch, d: fwu(torch, d, grads=lambda torch, d, g: [t(torch, d, 2, 5), g[1]]))
    case(op, "bad lr shape", "lrs[1]", "ValueError", lambda torch, d: fwu(torch, d, lrs=lambda torch, d, g: [g[0], t(torch, d, 3)]))
    case(op, "grad on the CPU", "grads[0]", "ValueError",
         lambda torch, d: fwu(torch, d, grads=lambda torch, d, g: [g[0].cpu(), g[1]]), devices=("cuda",))

    # sum_over_tasks(Tensor[] grads, Tensor[] pairs, int[] paired)
    def sot(torch, d, **change):
        args = {"grads": [t(torch, d, 3, 2), t(torch, d, 3, 4, 5)], "pairs": [t(torch, d, 3, 4, 5)], "paired": [1]}
        for key, edit in change.items():
            args[key] = edit(torch, d, args[key])
        return args["grads"], args["pairs"], args["paired"]

    op = "sum_over_tasks"
    case(op, "index missing", "paired", "ValueError", lambda torch, d: sot(torch, d, paired=lambda torch, d, p: []))
    case(op, "index out of range", "paired[0]", "ValueError", lambda torch, d: sot(torch, d, paired=lambda torch, d, p: [2]))
    case(op, "negative index", "paired[0]", "ValueError", lambda torch, d: sot(torch, d, paired=lambda torch, d, p: [-1]))
    case(op, "grad paired twice", "paired[1]", "ValueError", lambda torch, d: sot(
        torch, d, pairs=lambda torch, d, p: [p[0], p[0]], paired=lambda torch, d, p: [1, 1]))
    case(op, "pairs without grads", "pairs", "ValueError", lambda torch, d: sot(
        torch, d, grads=lambda torch, d, g: [], paired=lambda torch, d, p: [0]))
    case(op, "integer grads", "grads[0]", "TypeError", lambda torch, d: (
        [torch.ones(3, 2, dtype=torch.int64, device=d)], [], []))
    case(op, "0-dim grads", "grads[0]", "ValueError", lambda torch, d: ([t(torch, d)], [], []))
    case(op, "float32 grad", "grads[1]", "TypeError",
         lambda torch, d: sot(torch, d, grads=lambda torch, d, g: [g[0], g[1].float()]))
    case(op, "float32 pair", "pairs[0]", "TypeError",
         lambda torch, d: sot(torch, d, pairs=lambda torch, d, p: [p[0].float()]))
    case(op, "other task count", "grads[1]", "ValueError", lambda torch, d: sot(
        torch, d, grads=lambda torch, d, g: [g[0], t(torch, d, 2, 4, 5)], pairs=lambda torch, d, p: [t(torch, d, 2, 4, 5)]))
    case(op, "mismatched pair shape", "pairs[0]", "ValueError",
         lambda torch, d: sot(torch, d, pairs=lambda torch, d, p: [t(torch, d, 3, 5, 4)]))
    case(op, "pair on the CPU", "pairs[0]", "ValueError",
         lambda torch, d: sot(torch, d, pairs=lambda torch, d, p: [p[0].cpu()]), devices=("cuda",))

    # batch_norm_relu(Tensor x, Tensor weight, Tensor bias, float eps, float negative_slope=0.0) on x [rows, C]
    def bnr(torch, d, x=None, weight=None, bias=None, eps=1e-5, negative_slope=0.0):
        return (t(torch, d, 6, 4) if x is None else x, t(torch, d, 4) if weight is None else weight,
                t(torch, d, 4) if bias is None else bias, eps, negative_slope)

    op = "batch_norm_relu"
    case(op, "eps=-1", "eps", "ValueError", lambda torch, d: bnr(torch, d, eps=-1.0))
    case(op, "eps=inf", "eps", "ValueError", lambda torch, d: bnr(torch, d, eps=float("inf")))
    case(op, "eps=nan", "eps", "ValueError", lambda torch, d: bnr(torch, d, eps=float("nan")))
    case(op, "negative_slope=-0.1", "negative_slope", "ValueError", lambda torch, d: bnr(torch, d, negative_slope=-0.1))
    case(op, "negative_slope=nan", "negative_slope", "ValueError",
         lambda torch, d: bnr(torch, d, negative_slope=float("nan")))
    case(op, "integer x", "x", "TypeError", lambda torch, d: bnr(torch, d, x=torch.ones(6, 4, dtype=torch.int32, device=d)))
    case(op, "3-D x", "x", "ValueError", lambda torch, d: bnr(torch, d, x=t(torch, d, 6, 4, 1)))
    case(op, "one row", "x", "ValueError", lambda torch, d: bnr(torch, d, x=t(torch, d, 1, 4)))
    case(op, "wrong weight shape", "weight", "ValueError", lambda torch, d: bnr(torch, d, weight=t(torch, d, 5)))
    case(op, "float32 weight", "weight", "TypeError", lambda torch, d: bnr(torch, d, weight=t(torch, d, 4).float()))
    case(op, "wrong bias shape", "bias", "ValueError", lambda torch, d: bnr(torch, d, bias=t(torch, d, 4, 1)))
    case(op, "weight on the CPU", "weight", "ValueError", lambda torch, d: bnr(torch, d, weight=torch.ones(4, dtype=torch.float64)),
         devices=("cuda",))

    # batch_norm_relu_backward(grad_y, x, y, weight, mean, rstd)
    def bnr_saved(torch, d, **change):
        args = dict(grad_y=t(torch, d, 6, 4), x=t(torch, d, 6, 4), y=t(torch, d, 6, 4), weight=t(torch, d, 4),
                    mean=t(torch, d, 4), rstd=t(torch, d, 4).abs())
        args.update({k: v(torch, d) for k, v in change.items()})
        return args

    def bnr_backward(**change):
        return lambda torch, d: tuple(bnr_saved(torch, d, **change).values())

    op = "batch_norm_relu_backward"
    case(op, "1-D x", "x", "ValueError", bnr_backward(x=lambda torch, d: t(torch, d, 6)))
    case(op, "wrong grad_y shape", "grad_y", "ValueError", bnr_backward(grad_y=lambda torch, d: t(torch, d, 6, 5)))
    case(op, "float32 y", "y", "TypeError", bnr_backward(y=lambda torch, d: t(torch, d, 6, 4).float()))
    case(op, "wrong weight shape", "weight", "ValueError", bnr_backward(weight=lambda torch, d: t(torch, d, 3)))
    case(op, "float32 mean of float64 x", "mean", "TypeError", bnr_backward(mean=lambda torch, d: t(torch, d, 4).float()))
    case(op, "wrong rstd shape", "rstd", "ValueError", bnr_backward(rstd=lambda torch, d: t(torch, d, 2, 2)))
    case(op, "negative_slope=-1", "negative_slope", "ValueError",
         lambda torch, d: (*bnr_saved(torch, d).values(), -1.0))

    def bnr_double(gg_x=None, gg_w=None, gg_b=None, **change):
        def build(torch, d):
            saved = bnr_saved(torch, d, **change)
            grads = (t(torch, d, 6, 4) if gg_x is None else gg_x(torch, d),
                     t(torch, d, 4) if gg_w is None else gg_w(torch, d), t(torch, d, 4) if gg_b is None else gg_b(torch, d))
            return (*grads, *saved.values())
        return build

    op = "batch_norm_relu_double_backward"
    case(op, "wrong grad_grad_x shape", "grad_grad_x", "ValueError", bnr_double(gg_x=lambda torch, d: t(torch, d, 5, 4)))
    case(op, "float32 grad_grad_weight", "grad_grad_weight", "TypeError",
         bnr_double(gg_w=lambda torch, d: t(torch, d, 4).float()))
    case(op, "wrong grad_grad_bias shape", "grad_grad_bias", "ValueError", bnr_double(gg_b=lambda torch, d: t(torch, d, 5)))
    case(op, "wrong grad_y shape", "grad_y", "ValueError", bnr_double(grad_y=lambda torch, d: t(torch, d, 6, 3)))
    case(op, "negative_slope=inf", "negative_slope", "ValueError",
         lambda torch, d: (*bnr_double()(torch, d), float("inf")))

    # batch_norm_relu_max_pool(x [B, H, W, C], weight, bias, eps)
    def pool(torch, d, x=None, weight=None, bias=None, eps=1e-5):
        return (t(torch, d, 2, 4, 4, 3) if x is None else x, t(torch, d, 3) if weight is None else weight,
                t(torch, d, 3) if bias is None else bias, eps)

    op = "batch_norm_relu_max_pool"
    case(op, "eps=-1", "eps", "ValueError", lambda torch, d: pool(torch, d, eps=-1.0))
    case(op, "3-D x", "x", "ValueError", lambda torch, d: pool(torch, d, x=t(torch, d, 4, 4, 3)))
    case(op, "height 1", "x", "ValueError", lambda torch, d: pool(torch, d, x=t(torch, d, 2, 1, 4, 3)))
    case(op, "integer x", "x", "TypeError", lambda torch, d: pool(torch, d, x=torch.ones(2, 4, 4, 3, dtype=torch.int64, device=d)))
    case(op, "wrong weight shape", "weight", "ValueError", lambda torch, d: pool(torch, d, weight=t(torch, d, 4)))
    case(op, "float32 bias", "bias", "TypeError", lambda torch, d: pool(torch, d, bias=t(torch, d, 3).float()))

    def pool_saved(torch, d, **change):
        args = dict(grad_y=t(torch, d, 2, 2, 2, 3), x=t(torch, d, 2, 4, 4, 3), weight=t(torch, d, 3), bias=t(torch, d, 3),
                    mean=t(torch, d, 3), rstd=t(torch, d, 3).abs())
        args.update({k: v(torch, d) for k, v in change.items()})
        return args

    op = "batch_norm_relu_max_pool_backward"
    case(op, "unpooled grad_y", "grad_y", "ValueError",
         lambda torch, d: tuple(pool_saved(torch, d, grad_y=lambda torch, d: t(torch, d, 2, 4, 4, 3)).values()))
    case(op, "wrong mean shape", "mean", "ValueError",
         lambda torch, d: tuple(pool_saved(torch, d, mean=lambda torch, d: t(torch, d, 4)).values()))
    case(op, "float32 rstd of float64 x", "rstd", "TypeError",
         lambda torch, d: tuple(pool_saved(torch, d, rstd=lambda torch, d: t(torch, d, 3).float()).values()))
    case(op, "wrong bias shape", "bias", "ValueError",
         lambda torch, d: tuple(pool_saved(torch, d, bias=lambda torch, d: t(torch, d, 1)).values()))

    op = "batch_norm_relu_max_pool_double_backward"
    case(op, "wrong grad_grad_x shape", "grad_grad_x", "ValueError", lambda torch, d: (
        t(torch, d, 2, 2, 2, 3), None, None, *pool_saved(torch, d).values()))
    case(op, "float32 grad_grad_bias", "grad_grad_bias", "TypeError", lambda torch, d: (
        None, None, t(torch, d, 3).float(), *pool_saved(torch, d).values()))

    # cross_entropy_per_task(logits [T, B, N], labels [T, B] int64) and its backward ops
    def labels(torch, d, shape=(2, 3), high=4, dtype=None):
        return torch.randint(0, high, shape, device=d, dtype=dtype or torch.int64)

    op = "cross_entropy_per_task"
    case(op, "integer logits", "logits", "TypeError", lambda torch, d: (
        torch.ones(2, 3, 4, dtype=torch.int64, device=d), labels(torch, d)))
    case(op, "2-D logits", "logits", "ValueError", lambda torch, d: (t(torch, d, 2, 3), labels(torch, d)))
    case(op, "no classes", "logits", "ValueError", lambda torch, d: (t(torch, d, 2, 3, 0), labels(torch, d)))
    case(op, "int32 labels", "labels", "TypeError", lambda torch, d: (t(torch, d, 2, 3, 4), labels(torch, d, dtype=torch.int32)))
    case(op, "wrong labels shape", "labels", "ValueError", lambda torch, d: (t(torch, d, 2, 3, 4), labels(torch, d, (2, 2))))
    # (on CUDA the label range is the caller's to check: see maml_fast/ops/losses.py)
    case(op, "label out of range", "labels", "ValueError",
         lambda torch, d: (t(torch, d, 2, 3, 4), labels(torch, d).fill_(4)), devices=("cpu",))
    case(op, "negative label", "labels", "ValueError",
         lambda torch, d: (t(torch, d, 2, 3, 4), labels(torch, d).fill_(-1)), devices=("cpu",))

    def ce_backward(grad_loss=None, lse=None):
        def build(torch, d):
            return (t(torch, d, 2) if grad_loss is None else grad_loss(torch, d), t(torch, d, 2, 3, 4), labels(torch, d),
                    t(torch, d, 2, 3) if lse is None else lse(torch, d))
        return build

    op = "cross_entropy_per_task_backward"
    case(op, "wrong grad_loss shape", "grad_loss", "ValueError", ce_backward(grad_loss=lambda torch, d: t(torch, d, 3)))
    case(op, "float32 grad_loss", "grad_loss", "TypeError", ce_backward(grad_loss=lambda torch, d: t(torch, d, 2).float()))
    case(op, "float32 logsumexp of float64 logits", "logsumexp", "TypeError",
         ce_backward(lse=lambda torch, d: t(torch, d, 2, 3).float()))
    case(op, "wrong logsumexp shape", "logsumexp", "ValueError", ce_backward(lse=lambda torch, d: t(torch, d, 2)))

    op = "cross_entropy_per_task_double_backward"
    case(op, "wrong grad_grad_logits shape", "grad_grad_logits", "ValueError",
         lambda torch, d: (t(torch, d, 2, 3, 5), *ce_backward()(torch, d)))
    case(op, "float32 grad_grad_logits", "grad_grad_logits", "TypeError",
         lambda torch, d: (t(torch, d, 2, 3, 4).float(), *ce_backward()(torch, d)))

    # mse_per_task(prediction [T, M], target) and its backward
    op = "mse_per_task"
    case(op, "integer prediction", "prediction", "TypeError", lambda torch, d: (
        torch.ones(2, 3, dtype=torch.int64, device=d), torch.ones(2, 3, dtype=torch.int64, device=d)))
    case(op, "1-D prediction", "prediction", "ValueError", lambda torch, d: (t(torch, d, 3), t(torch, d, 3)))
    case(op, "wrong target shape", "target", "ValueError", lambda torch, d: (t(torch, d, 2, 3), t(torch, d, 2, 4)))
    case(op, "float32 target", "target", "TypeError", lambda torch, d: (t(torch, d, 2, 3), t(torch, d, 2, 3).float()))

    op = "mse_per_task_backward"
    case(op, "wrong grad_loss shape", "grad_loss", "ValueError",
         lambda torch, d: (t(torch, d, 3), t(torch, d, 2, 3), t(torch, d, 2, 3)))
    case(op, "float32 grad_loss", "grad_loss", "TypeError",
         lambda torch, d: (t(torch, d, 2).float(), t(torch, d, 2, 3), t(torch, d, 2, 3)))

    # pooled_linear(x [B, T*C, H, W], weight [T, O, C], bias [T, O]?) and its backward ops
    def head(x=None, weight=None, bias=None):
        def build(torch, d):
            return (t(torch, d, 2, 6, 2, 2) if x is None else x(torch, d),
                    t(torch, d, 2, 4, 3) if weight is None else weight(torch, d),
                    t(torch, d, 2, 4) if bias is None else bias(torch, d))
        return build

    op = "pooled_linear"
    case(op, "integer x", "x", "TypeError", head(x=lambda torch, d: torch.ones(2, 6, 2, 2, dtype=torch.int64, device=d)))
    case(op, "2-D x", "x", "ValueError", head(x=lambda torch, d: t(torch, d, 2, 6)))
    case(op, "channels not tasks*in", "x", "ValueError", head(x=lambda torch, d: t(torch, d, 2, 5, 2, 2)))
    case(op, "2-D weight", "weight", "ValueError", head(weight=lambda torch, d: t(torch, d, 4, 3)))
    case(op, "float32 weight", "weight", "TypeError", head(weight=lambda torch, d: t(torch, d, 2, 4, 3).float()))
    case(op, "wrong bias shape", "bias", "ValueError", head(bias=lambda torch, d: t(torch, d, 2, 3)))
    case(op, "float32 bias", "bias", "TypeError", head(bias=lambda torch, d: t(torch, d, 2, 4).float()))

    op = "pooled_linear_backward"
    case(op, "wrong grad_y shape", "grad_y", "ValueError",
         lambda torch, d: (t(torch, d, 2, 7), t(torch, d, 2, 6, 2, 2), t(torch, d, 2, 4, 3)))
    case(op, "float32 grad_y", "grad_y", "TypeError",
         lambda torch, d: (t(torch, d, 2, 8).float(), t(torch, d, 2, 6, 2, 2), t(torch, d, 2, 4, 3)))

    op = "pooled_linear_double_backward"
    saved = lambda torch, d: (t(torch, d, 2, 8), t(torch, d, 2, 6, 2, 2), t(torch, d, 2, 4, 3))  # noqa: E731
    case(op, "wrong grad_grad_x shape", "grad_grad_x", "ValueError",
         lambda torch, d: (t(torch, d, 2, 6, 1, 2), None, None, *saved(torch, d)))
    case(op, "float32 grad_grad_weight", "grad_grad_weight", "TypeError",
         lambda torch, d: (None, t(torch, d, 2, 4, 3).float(), None, *saved(torch, d)))
    case(op, "wrong grad_grad_bias shape", "grad_grad_bias", "ValueError",
         lambda torch, d: (None, None, t(torch, d, 4), *saved(torch, d)))

    # direct_conv2d(x [B, T*C, H, W], weight [T, O, C, kh, kw], bias [T, O]?, stride, padding)
    def conv(x=None, weight=None, bias=None, stride=(1, 1), padding=(0, 0)):
        def build(torch, d):
            return (t(torch, d, 2, 2, 5, 5) if x is None else x(torch, d),
                    t(torch, d, 2, 3, 1, 3, 3) if weight is None else weight(torch, d),
                    t(torch, d, 2, 3) if bias is None else bias(torch, d), list(stride), list(padding))
        return build

    op = "direct_conv2d"
    case(op, "integer x", "x", "TypeError", conv(x=lambda torch, d: torch.ones(2, 2, 5, 5, dtype=torch.int64, device=d)))
    case(op, "3-D x", "x", "ValueError", conv(x=lambda torch, d: t(torch, d, 2, 5, 5)))
    case(op, "float32 weight", "weight", "TypeError", conv(weight=lambda torch, d: t(torch, d, 2, 3, 1, 3, 3).float()))
    case(op, "4-D weight", "weight", "ValueError", conv(weight=lambda torch, d: t(torch, d, 2, 3, 3, 3)))
    case(op, "kernel size 0", "kernel size", "ValueError", conv(weight=lambda torch, d: t(torch, d, 2, 3, 1, 0, 3)))
    case(op, "channels not tasks*in", "x", "ValueError", conv(x=lambda torch, d: t(torch, d, 2, 3, 5, 5)))
    case(op, "wrong bias shape", "bias", "ValueError", conv(bias=lambda torch, d: t(torch, d, 3)))
    case(op, "float32 bias", "bias", "TypeError", conv(bias=lambda torch, d: t(torch, d, 2, 3).float()))
    case(op, "stride 0", "stride", "ValueError", conv(stride=(0, 1)))
    case(op, "three strides", "stride", "ValueError", conv(stride=(1, 1, 1)))
    case(op, "padding -1", "padding", "ValueError", conv(padding=(-1, 0)))
    case(op, "input smaller than the kernel", "spatial size", "ValueError", conv(x=lambda torch, d: t(torch, d, 2, 2, 2, 2)))

    # direct_conv2d_weight_grad(x, grad_out, tasks, kernel_size, stride, padding)
    def wgrad(x=None, grad_out=None, tasks=2, kernel=(3, 3), stride=(1, 1), padding=(0, 0)):
        def build(torch, d):
            return (t(torch, d, 2, 2, 5, 5) if x is None else x(torch, d),
                    t(torch, d, 2, 6, 3, 3) if grad_out is None else grad_out(torch, d), tasks, list(kernel),
                    list(stride), list(padding))
        return build

    op = "direct_conv2d_weight_grad"
    case(op, "float32 grad_out", "grad_out", "TypeError", wgrad(grad_out=lambda torch, d: t(torch, d, 2, 6, 3, 3).float()))
    case(op, "3-D grad_out", "grad_out", "ValueError", wgrad(grad_out=lambda torch, d: t(torch, d, 6, 3, 3)))
    case(op, "kernel_size 0", "kernel_size", "ValueError", wgrad(kernel=(0, 3)))
    case(op, "tasks 0", "tasks", "ValueError", wgrad(tasks=0))
    case(op, "x channels not a multiple of tasks", "x", "ValueError", wgrad(tasks=4))
    case(op, "grad_out channels not a multiple of tasks", "grad_out", "ValueError",
         wgrad(grad_out=lambda torch, d: t(torch, d, 2, 5, 3, 3)))
    case(op, "wrong grad_out spatial shape", "grad_out", "ValueError", wgrad(grad_out=lambda torch, d: t(torch, d, 2, 6, 4, 4)))
    case(op, "stride 0", "stride", "ValueError", wgrad(stride=(1, 0)))
    return cases


CASES = {case.name: case for case in _cases()}


# ------------------------------------------------------------------------------------ one case
def run_case(name: str, device: str) -> tuple[int, dict]:
    """Call the op of case `name` on `device` in this process: (exit code, result)."""
    import torch

    import maml_fast  # noqa: F401  (loads maml_fast._C: registers the ops)

    case = CASES[name]
    result = {"case": name, "device": device, "op": case.op, "expected": case.error, "argument": case.argument}
    try:
        args = case.build(torch, device)
    except Exception as error:  # noqa: BLE001  (a bug of the probe, not of the op)
        result["problem"] = f"the probe could not build the arguments: {type(error).__name__}: {error}"
        return NOT_RUN, result
    crash = os.environ.get(SELF_TEST_VARIABLE)  # the probe's own test: a case's process that dies
    try:
        if crash:
            os.kill(os.getpid(), getattr(signal, crash))
        getattr(torch.ops.maml_fast, case.op)(*args)
    except Exception as error:  # noqa: BLE001  (the point: which exception, and that the process lives)
        result["raised"] = type(error).__name__
        result["message"] = str(error).splitlines()[0][:300] if str(error) else ""
        named = re.search(rf"(?<![\w\[]){re.escape(case.argument)}(?![\w\]])", str(error))
        if type(error).__name__ == case.error and named:
            return 0, result
        result["problem"] = "wrong exception" if type(error).__name__ != case.error else "message does not name it"
        return WRONG_ERROR, result
    result["problem"] = "no exception"
    return NO_ERROR, result


def _child_main(name: str, device: str) -> None:
    import faulthandler

    faulthandler.enable()  # a crash prints the Python stack to stderr before the process dies
    code, result = run_case(name, device)
    print(json.dumps(result), flush=True)
    sys.exit(code)


# ------------------------------------------------------------------------------------ isolation
def _command(name: str, device: str) -> list[str]:
    return [sys.executable, "-X", "faulthandler", str(Path(__file__).resolve()), "--case", name, "--device", device]


def _outcome(status_code: int, result: dict | None, stderr: str = "") -> dict:
    """A case's report from its process's exit (`status_code`: a returncode, negative for a signal)."""
    report = dict(result or {})
    if status_code < 0:
        signame = signal.Signals(-status_code).name if -status_code in signal.valid_signals() else str(-status_code)
        report.update(status="crashed", signal=signame)
    elif status_code == 0:
        report["status"] = "ok"
    else:
        report["status"] = "failed"
        report.setdefault("problem", f"exit code {status_code}")
    if stderr and report["status"] != "ok":  # its head (the fault) and its tail (the innermost frames)
        report["stderr"] = stderr if len(stderr) <= 3000 else f"{stderr[:1500]}\n[...]\n{stderr[-1500:]}"
    return report


def _spawn(name: str, device: str, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    try:
        done = subprocess.run(_command(name, device), capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"case": name, "device": device, "status": "failed", "problem": f"timed out after {timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {"case": name, "device": device}
    return _outcome(done.returncode, result, done.stderr)


def _fork(name: str, device: str) -> dict:
    import faulthandler
    import tempfile

    read, write = os.pipe()
    with tempfile.TemporaryFile() as stderr:
        pid = os.fork()
        if pid == 0:  # the child: one case, its result down the pipe, its stderr to the file
            os.close(read)
            code = NOT_RUN
            try:
                os.dup2(stderr.fileno(), 2)
                faulthandler.enable(file=2)  # a crash prints the Python stack (to the file) first
                code, result = run_case(name, device)
                os.write(write, json.dumps(result).encode())
            finally:
                os._exit(code)
        os.close(write)
        chunks = []
        while chunk := os.read(read, 65536):
            chunks.append(chunk)
        os.close(read)
        _, status = os.waitpid(pid, 0)
        stderr.seek(0)
        errors = stderr.read().decode(errors="replace")
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    data = b"".join(chunks)
    return _outcome(code, json.loads(data) if data else {"case": name, "device": device}, errors)


@functools.cache
def cuda_skip_reason() -> str | None:
    """Why the CUDA cases cannot run here (None: they can). Does not initialise CUDA in this process
    (the CPU cases may still fork): where a device might be usable, a subprocess looks."""
    import torch

    from maml_fast import _extension

    if _extension.LOAD_ERROR or not _extension.CUDA_ARCHS or not torch.cuda.is_available():
        return "; ".join(_extension.extension_unavailable_reasons("cuda"))  # (touches no device)
    probe = ("import torch, maml_fast; from maml_fast import _extension; "
             "r = _extension.extension_unavailable_reasons('cuda'); print('; '.join(r) if r else 'OK')")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    answer = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else f"probe failed: {done.stderr[-300:]}"
    return None if answer == "OK" else answer


def probe(devices=("cpu",), isolation: str = "fork", jobs: int = 1, names=None, timeout: float = 120.0,
          on_report=None) -> list[dict]:
    """Run the cases (all, or `names`) on `devices`, each in its own process; one report per case
    (`on_report(report)` is called as each one comes in)."""
    on_report = on_report or (lambda report: None)
    if isolation == "fork" and not hasattr(os, "fork"):
        isolation = "spawn"
    from maml_fast import _extension  # (loads maml_fast._C; initialises no CUDA)

    reports, todo = [], []
    for device in devices:
        reason = _extension.LOAD_ERROR or (cuda_skip_reason() if device == "cuda" else None)
        for name, case in CASES.items():
            if names is not None and name not in names:
                continue
            if device not in case.devices:
                continue
            if reason is not None:
                reports.append({"case": name, "device": device, "status": "skipped", "reason": reason})
                on_report(reports[-1])
            else:
                todo.append((name, device))
    if isolation == "fork":
        import maml_fast  # noqa: F401  (once, before the forks)
        for name, device in [(n, d) for n, d in todo if d == "cpu"]:  # (sequential: each takes milliseconds)
            reports.append(_fork(name, device))
            on_report(reports[-1])
        todo = [(n, d) for n, d in todo if d != "cpu"]  # CUDA must not be initialised before a fork
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for future in as_completed([pool.submit(_spawn, name, device, timeout) for name, device in todo]):
            reports.append(future.result())
            on_report(reports[-1])
    return reports


def backtrace(report: dict, timeout: float = 240.0) -> str:
    """Rerun a crashed case under gdb (or cuda-gdb, which debugs host code too): the native stack of
    the crash and the shared libraries loaded (which libstdc++, which libtorch)."""
    import shutil

    debugger = shutil.which("gdb") or shutil.which("cuda-gdb")
    if debugger is None:
        return "no gdb or cuda-gdb on PATH: no native backtrace"
    command = [debugger, "-batch", "-ex", "run", "-ex", "bt", "-ex", "info sharedlibrary", "--args",
               *_command(report["case"], report["device"])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        return f"{shlex.join(command)}: timed out after {timeout} s\n{error.stdout or ''}"
    return f"$ {shlex.join(command)}\n{done.stdout}\n{done.stderr}"


def summary(reports: list[dict]) -> str:
    lines = []
    for status in ("crashed", "failed", "skipped", "ok"):
        chosen = [r for r in reports if r["status"] == status]
        lines.append(f"{status}: {len(chosen)}")
        if status in ("crashed", "failed"):
            for r in chosen:
                lines.append(f"  {r['device']} {r['case']}: {r.get('signal') or r.get('problem')} "
                             f"(raised {r.get('raised')}: {r.get('message', '')})")
                lines.append("    rerun: " + shlex.join(_command(r["case"], r["device"])))
    skipped = {r["reason"] for r in reports if r["status"] == "skipped"}
    lines += [f"  skipped because: {reason}" for reason in sorted(skipped)]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", nargs="+", default=["cpu"], choices=["cpu", "cuda"])
    parser.add_argument("--isolation", choices=["fork", "spawn"], default="fork",
                        help="fork: children of this process (CPU cases; fast); spawn: a fresh interpreter per case")
    parser.add_argument("--jobs", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)),
                        help="spawned processes at a time")
    parser.add_argument("--only", nargs="+", default=None, metavar="CASE", help="run only these cases (op:label)")
    parser.add_argument("--out", default=None, help="write every case's report here (JSON)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--backtrace", action="store_true",
                        help="rerun the first crashed case under gdb (or cuda-gdb) and print its native backtrace")
    parser.add_argument("--backtrace-timeout", type=float, default=100.0, help="seconds for that rerun")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # the child's side
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case is not None:
        _child_main(args.case, args.device)
    if args.list:
        for case in CASES.values():
            print(f"{case.name}  ({case.error} naming {case.argument}; {', '.join(case.devices)})")
        return 0
    start = time.monotonic()
    def show(report):  # as they come: a run cut short by a time limit still tells what it saw
        detail = report.get("signal") or report.get("problem") or report.get("reason") or report.get("raised")
        print(f"{report['status']:8s} {report['device']:4s} {report['case']}: {detail}", flush=True)

    reports = probe(tuple(args.devices), args.isolation, args.jobs, args.only, on_report=show)
    print(summary(reports))
    print(f"{len(reports)} cases in {time.monotonic() - start:.1f} s ({args.isolation}; "
          f"python {sys.version.split()[0]})")
    crashed = [r for r in reports if r["status"] == "crashed"]
    for report in crashed:
        if report.get("stderr"):
            print(f"--- {report['device']} {report['case']}: stderr of the crashed process\n{report['stderr']}")
            break
    if args.backtrace and crashed:
        print(f"--- native backtrace of {crashed[0]['device']} {crashed[0]['case']}")
        print(backtrace(crashed[0], args.backtrace_timeout))
    if args.out:
        Path(args.out).write_text(json.dumps(reports, indent=1))
    return 0 if all(r["status"] in ("ok", "skipped") for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
