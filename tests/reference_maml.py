"""An independent per-task MAML reference, written from the papers, for the exactness tests.

Nothing here comes from `maml_fast.maml` or `maml_fast.program`: every task runs in a Python loop,
the network is evaluated layer by layer with plain ``torch.nn.functional`` on a per-task parameter
dict, and the inner gradient is ``torch.autograd.grad(..., create_graph=second_order)``. The network
`nn.Module` is only read for its structure (layer types and hyper-parameters). Use it in float64.

Semantics implemented (MAML, Finn et al. 2017; FOMAML; ANIL; Meta-SGD; MAML++ options):

    fast_0 = θ[adapted]
    for k < K:  L = inner_scale · loss(f(params_k, support_x), support_y)     (mean over examples)
                fast_{k+1} = fast_k − α_k ⊙ ∇_{fast_k} L         (∇ a constant for first order)
    objective = Σ_k w_k · loss(f(params_k, query_x), query_y)     (w = one-hot on K by default)
    meta-loss = mean over tasks of the objective

``params_k`` is θ with the adapted entries replaced by ``fast_k`` and the per-step BatchNorm entries
by their copy ``min(k, copies-1)``. BatchNorm uses the task's own batch statistics, or, given MAML++
per-step running statistics (``Config.running``, evaluation), step k's statistics. Those statistics
are defined by `per_step_statistics`: at every step k = 0..K, each BatchNorm layer's input batch mean and
unbiased variance on the support set at ``params_k``, averaged over the tasks, moved into the running
values with the layer's momentum once per meta-step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


# --------------------------------------------------------------------------- the network, per task
def layer_plan(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(parameter-name prefix, module) for each leaf layer of a (nested) nn.Sequential, in order."""
    plan = []

    def visit(module, prefix):
        if isinstance(module, nn.Sequential):
            for name, child in module.named_children():
                visit(child, f"{prefix}{name}.")
        else:
            plan.append((prefix, module))

    visit(model, "")
    return plan


def _get(params, prefix, name):
    return params.get(prefix + name)


def run_layer(prefix: str, module: nn.Module, params: dict, x: torch.Tensor, running=None) -> torch.Tensor:
    """One layer for one task: x ``[B, ...]`` -> ``[B, ...]`` with the parameters in ``params``;
    ``running``: {BatchNorm prefix: (mean, var)} to normalise with instead of the batch statistics."""
    w, b = _get(params, prefix, "weight"), _get(params, prefix, "bias")
    if isinstance(module, nn.Conv2d):
        return F.conv2d(x, w, b, module.stride, module.padding, module.dilation, module.groups)
    if isinstance(module, nn.Linear):
        return F.linear(x, w, b)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        # transductive: this task's batch statistics, biased variance
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        if running is not None:
            mean, var = (t.reshape(shape) for t in running[prefix])
        else:
            mean = x.mean(dim=dims, keepdim=True)
            var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
        y = (x - mean) / torch.sqrt(var + module.eps)
        if w is not None:
            y = y * w.reshape(shape)
        if b is not None:
            y = y + b.reshape(shape)
        return y
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, w, b, module.eps)
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, w, b, module.eps)
    if isinstance(module, nn.ReLU):
        return F.relu(x)
    if isinstance(module, nn.MaxPool2d):
        return F.max_pool2d(x, module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode)
    if isinstance(module, nn.AvgPool2d):
        return F.avg_pool2d(x, module.kernel_size, module.stride, module.padding, module.ceil_mode,
                            module.count_include_pad, module.divisor_override)
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return F.adaptive_avg_pool2d(x, module.output_size)
    if isinstance(module, nn.Flatten):
        return x.flatten(module.start_dim, module.end_dim)
    if isinstance(module, nn.Identity):
        return x
    if isinstance(module, nn.Dropout):
        return F.dropout(x, module.p, module.training)
    if hasattr(module, "reference_forward"):  # test-defined custom layers
        return module.reference_forward(prefix, params, x)
    raise NotImplementedError(f"reference has no rule for {type(module).__name__}")


def network(plan, params: dict, x: torch.Tensor, running=None, bn_inputs: dict | None = None) -> torch.Tensor:
    """The network on one task's x; ``bn_inputs`` (a dict) collects every BatchNorm layer's input."""
    for prefix, module in plan:
        if bn_inputs is not None and isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            bn_inputs[prefix] = x
        x = run_layer(prefix, module, params, x, running)
    return x


# --------------------------------------------------------------------------- losses, per task
def task_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the examples (integer labels) or mean squared error (float targets)."""
    if target.is_floating_point():
        return ((output.reshape(target.shape) - target) ** 2).mean()
    log_probs = output - torch.logsumexp(output, dim=-1, keepdim=True)
    return -log_probs.gather(-1, target.unsqueeze(-1)).mean()


def maml_pp_step_weights(steps: int, iteration: int, anneal_iterations: int) -> list[float]:
    """MAML++ (Antoniou et al. 2019) `get_per_step_loss_importance_vector`, written after their code:
    weights for the query losses after steps 1..K."""
    weights = [1.0 / steps] * steps
    decay = 1.0 / steps / anneal_iterations
    floor = 0.03 / steps
    for i in range(steps - 1):
        weights[i] = max(weights[i] - iteration * decay, floor)
    weights[-1] = min(weights[-1] + iteration * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return weights


# --------------------------------------------------------------------------- the algorithm
@dataclass
class Config:
    steps: int
    inner_lr: float = 0.4
    second_order: bool = True
    adapted: list[str] | None = None                     # None: every parameter
    lrs: dict[str, torch.Tensor] | None = None           # learned rates: [K'] per tensor (LSLR) or param-shaped
    lr_mode: str = "fixed"                               # "fixed" | "per_layer_per_step" | "per_element"
    per_step: dict[str, torch.Tensor] = field(default_factory=dict)   # name -> [copies, *shape]
    query_weights: list[float] | None = None             # weights of the query loss after steps 1..K
    inner_scale: str = "mean"                            # "mean" | "reference" (x number of classes)
    running: list[dict] | None = None                    # per step: {BN prefix: (mean, var)} (evaluation)


def _running_at(cfg: Config, step: int):
    return None if cfg.running is None else cfg.running[min(step, len(cfg.running) - 1)]


def _learning_rate(cfg: Config, name: str, step: int):
    if cfg.lr_mode == "fixed":
        return cfg.inner_lr
    lr = cfg.lrs[name]
    if cfg.lr_mode == "per_layer_per_step":
        return lr[min(step, lr.shape[0] - 1)]
    return lr


def _params_at(theta, cfg, fast, step):
    params = dict(theta)
    for name, copies in cfg.per_step.items():
        params[name] = copies[min(step, copies.shape[0] - 1)]
    params.update(fast)
    return params


def adapt_one_task(plan, theta: dict, cfg: Config, support_x, support_y, steps=None):
    """The fast weights of one task after ``steps`` (default cfg.steps) inner steps: {name: tensor}."""
    steps = cfg.steps if steps is None else steps
    names = list(theta) if cfg.adapted is None else list(cfg.adapted)
    fast = {n: theta[n] for n in names}
    history = [fast]
    for k in range(steps):
        params = _params_at(theta, cfg, fast, k)
        output = network(plan, params, support_x, _running_at(cfg, k))
        loss = task_loss(output, support_y)
        if cfg.inner_scale == "reference" and not support_y.is_floating_point():
            loss = loss * output.shape[-1]
        grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=cfg.second_order,
                                    retain_graph=True)
        if not cfg.second_order:
            grads = [g.detach() for g in grads]
        fast = {n: fast[n] - _learning_rate(cfg, n, k) * g for n, g in zip(names, grads)}
        history.append(fast)
    return history


def meta_objective(model: nn.Module, theta: dict, cfg: Config, batch):
    """(meta-loss, per-task query loss after the last step [T], per-task fast-weight histories)."""
    plan = layer_plan(model)
    K = cfg.steps
    if K == 0:
        weights = [1.0]
    else:
        after = cfg.query_weights if cfg.query_weights is not None else [0.0] * (K - 1) + [1.0]
        weights = [0.0] + list(after)
    objectives, finals, histories = [], [], []
    for t in range(batch.support_x.shape[0]):
        history = adapt_one_task(plan, theta, cfg, batch.support_x[t], batch.support_y[t])
        objective = 0.0
        for k, w in enumerate(weights):
            if w == 0.0 and k != K:
                continue
            loss = task_loss(network(plan, _params_at(theta, cfg, history[k], k), batch.query_x[t],
                                     _running_at(cfg, k)), batch.query_y[t])
            if k == K:
                finals.append(loss.detach())
            if w != 0.0:
                objective = objective + w * loss
        objectives.append(objective)
        histories.append(history)
    return torch.stack(objectives).mean(), torch.stack(finals), histories


def predict_one_task(model, theta, cfg, fast, step, x):
    return network(layer_plan(model), _params_at(theta, cfg, fast, step), x, _running_at(cfg, step))


# --------------------------------------------------------------------------- MAML++ per-step statistics
def per_step_statistics(model: nn.Module, theta: dict, cfg: Config, batches, momentum: float = 0.1) -> list[dict]:
    """MAML++ per-step BatchNorm running statistics after one training meta-step per batch of `batches`
    at the fixed θ: per step k = 0..cfg.steps, {BN prefix: (mean, var)}, starting from (0, 1); each
    meta-step moves them by `momentum` towards the task-average of the support set's BatchNorm input
    batch mean and unbiased variance at ``params_k`` (batch statistics in the network meanwhile)."""
    plan = layer_plan(model)
    running = None
    for batch in batches:
        per_step = [dict() for _ in range(cfg.steps + 1)]
        tasks = batch.support_x.shape[0]
        for t in range(tasks):
            history = adapt_one_task(plan, theta, cfg, batch.support_x[t], batch.support_y[t])
            for k, fast in enumerate(history):
                inputs = {}
                network(plan, _params_at(theta, cfg, fast, k), batch.support_x[t], bn_inputs=inputs)
                for prefix, x in inputs.items():
                    dims = [0] + list(range(2, x.dim()))
                    mean = x.mean(dims)
                    var = ((x - mean.reshape([1, -1] + [1] * (x.dim() - 2))) ** 2).sum(dims) / (x.numel() / x.shape[1] - 1)
                    total = per_step[k].get(prefix, (0.0, 0.0))
                    per_step[k][prefix] = (total[0] + mean.detach() / tasks, total[1] + var.detach() / tasks)
        if running is None:
            running = [{p: (torch.zeros_like(m), torch.ones_like(v)) for p, (m, v) in step.items()} for step in per_step]
        running = [{p: tuple(r + momentum * (new - r) for r, new in zip(running[k][p], per_step[k][p]))
                    for p in per_step[k]} for k in range(len(per_step))]
    return running
