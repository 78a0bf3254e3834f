"""The torch.func MAML recipe (PyTorch's functorch `maml-omniglot` example, written here from its
description): per task, the inner loop uses `torch.func.grad` on `functional_call`, and `vmap` maps that
whole per-task function over the meta-batch. A benchmark peer only; maml_fast's own backends are
"loop", "vmap" and "torch".

`FunctorchMAML` wraps it as a learner (``learner(batch).loss``) so that it runs in the same
`maml_fast.meta_step.MetaStep` as maml_fast's learners."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import maml_fast as mf


def functorch_meta_loss(net, batch, inner_lr: float, inner_steps: int) -> torch.Tensor:
    params = dict(net.named_parameters())

    def task_loss(support_x, support_y, query_x, query_y):
        def support_loss(fast):
            return F.cross_entropy(functional_call(net, fast, (support_x,)), support_y)

        fast = params
        for _ in range(inner_steps):
            grads = grad(support_loss)(fast)
            fast = {name: fast[name] - inner_lr * grads[name] for name in fast}
        return F.cross_entropy(functional_call(net, fast, (query_x,)), query_y)

    return vmap(task_loss)(batch.support_x, batch.support_y, batch.query_x, batch.query_y).mean()


class FunctorchMAML(nn.Module):
    """The recipe as a learner: ``learner(batch)`` returns its meta-loss (and no metrics)."""

    def __init__(self, net: nn.Module, inner_lr: float, inner_steps: int):
        super().__init__()
        self.net, self.inner_lr, self.inner_steps = net, inner_lr, inner_steps

    def forward(self, batch) -> mf.MAMLOutput:
        loss = functorch_meta_loss(self.net, batch, self.inner_lr, self.inner_steps)
        return mf.MAMLOutput(loss, {}, loss.detach().reshape(1), {})
