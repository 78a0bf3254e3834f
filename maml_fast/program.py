"""Lowering: an `nn.Module` becomes a task-batched program of ops.

A program runs a network for all T tasks at once with per-task parameters ``{name: [T, *shape]}``.
Activations flow in the grouped layout ``[B, T*C, ...]`` (see `maml_fast.ops.conv2d`): task t's
channels (or features) in block t of dimension 1.

`lower` traces the module with torch.fx (the layers of `_LOWERINGS` are leaves; any other module,
nn.Sequential included, is traced through) and lowers every node of the graph:

- layers (``call_module``): the layers of `_LOWERINGS`. Runs of layers that feed only each other
  (an nn.Sequential, a conv-BatchNorm-activation chain) are lowered together, so that the backend's
  fusion rules (`maml_fast.backends.ProgramBackend.fusion_rules`) can replace several by one op and a
  conv bias that the next BatchNorm cancels is left out;
- functions and methods (``call_function`` / ``call_method``): those of `_FUNCTIONS` and `_METHODS`,
  which compute the same per-task function in the grouped layout: elementwise ops (residual adds,
  activations, dropout with independent masks per task), spatial pooling, flattening, concatenation
  (along channels it interleaves the task blocks), reductions over spatial dimensions.

Anything else (a parameter used directly, a channel-mixing function, an input-dependent Python branch
that torch.fx cannot trace) makes `lower` return the reason, naming the node and its layer, and the
learner runs the whole model through `torch.func.vmap` instead.
"""
from __future__ import annotations

import builtins
import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.node import map_arg

from .models import DropBlock

from .ops import conv2d as conv_ops
from .ops import linear as linear_ops
from .ops import norm as norm_ops
from .ops.low_rank_conv import LowRankFastWeight, low_rank_conv2d

Layer = Callable[[torch.Tensor, dict, int], torch.Tensor]


def parameter(params: dict, prefix: str, name: str, module: nn.Module):
    return params[prefix + name] if getattr(module, name, None) is not None else None


class _BiasCancelledByBatchNorm(torch.autograd.Function):
    """h unchanged, and no gradient (None: exactly zero) for `bias`: the conv bias that a BatchNorm with
    batch statistics cancels (it subtracts the per-channel mean, bias included). Computed, that gradient
    is rounding noise (~1e-15), which Adam would normalise into real steps that differ with the task
    split; and the program saves the bias add and its gradient's reduction. The inner loop leaves a
    weight with no gradient as it is, and the meta-gradient of its θ is an exact zero
    (`maml_fast.ops.task_broadcast`)."""

    @staticmethod
    def forward(ctx, h, bias):
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad_h):
        return grad_h, None


def cancel_bias_before_batch_norm(h, bias):
    """h, for a conv output whose bias a BatchNorm with batch statistics cancels: `bias` gets no gradient
    (`_BiasCancelledByBatchNorm`)."""
    return _BiasCancelledByBatchNorm.apply(h, bias)


def is_batch_norm_with_batch_statistics(module: nn.Module | None) -> bool:
    return type(module) in (nn.BatchNorm1d, nn.BatchNorm2d) and not module.track_running_stats


def lower_conv2d(module: nn.Conv2d, prefix: str, backend, batch_norm_prefix: str | None = None):
    """The per-task conv; `batch_norm_prefix` names the BatchNorm (batch statistics) right after it,
    which cancels the bias (`_BiasCancelledByBatchNorm`) unless it normalises with MAML++ per-step
    running statistics (passed in params)."""
    if module.groups != 1 or module.dilation != (1, 1) or module.padding_mode != "zeros" or isinstance(module.padding, str):
        return None, "only groups=1, dilation=1, zero padding given as numbers is task-batched"
    stride, padding = module.stride, module.padding

    def run(x, params, tasks):
        weight, bias = params[prefix + "weight"], parameter(params, prefix, "bias", module)
        conv = low_rank_conv2d if isinstance(weight, LowRankFastWeight) else conv_ops.conv2d
        if bias is not None and batch_norm_prefix is not None and batch_norm_prefix + "running_mean" not in params:
            return cancel_bias_before_batch_norm(conv(x, weight, None, stride, padding, backend.conv), bias)
        return conv(x, weight, bias, stride, padding, backend.conv)
    return run, None


def _lower_linear(module: nn.Linear, prefix: str, backend):
    def run(x, params, tasks):
        return linear_ops.linear(x, params[prefix + "weight"], parameter(params, prefix, "bias", module), backend.matmul)
    return run, None


def lower_batch_norm(module: nn.modules.batchnorm._BatchNorm, prefix: str, backend):
    if module.track_running_stats:
        return None, "BatchNorm with track_running_stats=True (MAML uses per-task batch statistics)"

    def run(x, params, tasks):
        if prefix + "running_mean" in params:
            return batch_norm_with_statistics(x, params, prefix, module)
        return norm_ops.batch_norm(x, parameter(params, prefix, "weight", module),
                                   parameter(params, prefix, "bias", module), tasks, module.eps)
    return run, None


def batch_norm_with_statistics(x, params, prefix: str, module: nn.Module):
    """Eval with MAML++ per-step running statistics (passed as ``[T, C]`` entries of params, like
    functional_call's buffers): normalise with them instead of the batch statistics."""
    flat = lambda t: None if t is None else t.reshape(-1)
    return F.batch_norm(x, flat(params[prefix + "running_mean"]), flat(params[prefix + "running_var"]),
                        flat(parameter(params, prefix, "weight", module)), flat(parameter(params, prefix, "bias", module)),
                        training=False, eps=module.eps)


def _lower_layer_norm(module: nn.LayerNorm, prefix: str, backend):
    def run(x, params, tasks):
        return norm_ops.layer_norm(x, module.normalized_shape, parameter(params, prefix, "weight", module),
                                   parameter(params, prefix, "bias", module), tasks, module.eps)
    return run, None


def _lower_group_norm(module: nn.GroupNorm, prefix: str, backend):
    def run(x, params, tasks):
        return norm_ops.group_norm(x, module.num_groups, parameter(params, prefix, "weight", module),
                                   parameter(params, prefix, "bias", module), tasks, module.eps)
    return run, None


def _lower_stateless(module: nn.Module, prefix: str, backend):
    # Elementwise and channel-wise ops compute the same function in the grouped layout as per task
    # (dropout draws an independent mask for every element, so for every task).
    return (lambda x, params, tasks: module(x)), None


def _lower_max_pool(module: nn.MaxPool2d, prefix: str, backend):
    if module.dilation not in (1, (1, 1)) or module.return_indices:
        return None, "MaxPool2d with dilation or return_indices has no task-batched op"
    return _lower_stateless(module, prefix, backend)


def _lower_drop_block(module: DropBlock, prefix: str, backend):
    # Its kept units are counted per task: the layer's own task-batched mode.
    return (lambda x, params, tasks: module(x, tasks)), None


def global_mean_pool(x: torch.Tensor) -> torch.Tensor:
    """x.mean(dim=(2, 3), keepdim=True). A channels-last x is reduced through its [B, H, W, C] view, so
    that the gradient comes out channels-last too, the layout the layer below reads, in one op (the
    NCHW gradient of x.mean would be copied to it)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).mean(dim=(1, 2), keepdim=True).permute(0, 3, 1, 2)
    return x.mean(dim=(2, 3), keepdim=True)


def _lower_adaptive_avg_pool(module: nn.AdaptiveAvgPool2d, prefix: str, backend):
    if module.output_size not in (1, (1, 1)):
        return _lower_stateless(module, prefix, backend)
    return (lambda x, params, tasks: global_mean_pool(x)), None


def _lower_flatten(module: nn.Flatten, prefix: str, backend):
    if module.start_dim != 1 or module.end_dim != -1:
        return None, "only Flatten(start_dim=1, end_dim=-1) is task-batched"
    # [B, T*C, H, W] in logical NCHW order flattens to [B, T*(C*H*W)]: task t's features stay in block t.
    return (lambda x, params, tasks: x.reshape(x.shape[0], -1)), None


_STATELESS = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.ReLU6,
              nn.Hardswish, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.Identity, nn.Dropout, nn.Dropout2d,
              nn.AlphaDropout)
_LOWERINGS = {
    nn.Conv2d: lower_conv2d,
    nn.Linear: _lower_linear,
    nn.BatchNorm1d: lower_batch_norm,
    nn.BatchNorm2d: lower_batch_norm,
    nn.LayerNorm: _lower_layer_norm,
    nn.GroupNorm: _lower_group_norm,
    nn.MaxPool2d: _lower_max_pool,
    nn.AdaptiveAvgPool2d: _lower_adaptive_avg_pool,
    nn.Flatten: _lower_flatten,
    DropBlock: _lower_drop_block,
    **dict.fromkeys(_STATELESS, _lower_stateless),
}


# ----------------------------------------------------------------------------- functions and methods
def _channel_dims(dims, ndim: int) -> bool:
    """Whether the reduction dims (an int, a sequence, or None: all) include the channel dimension 1."""
    if dims is None:
        return True
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    return any(d % ndim == 1 for d in dims)


def _reduction(function):
    """A reduction that must not mix channels (so neither tasks): over spatial dimensions only."""
    def run(x, *args, **kwargs):
        dims = kwargs.get("dim", args[0] if args else None)
        if _channel_dims(dims, x.dim()):
            raise ValueError(f"a task-batched program reduces only over spatial dimensions, got dim={dims!r} "
                             f"for a {x.dim()}-d activation")
        return function(x, *args, **kwargs)
    return run


def _concatenate(tasks: int, tensors, dim=0):
    """torch.cat in the grouped layout: along channels, task t's blocks of every input stay together."""
    tensors = list(tensors)
    if dim % tensors[0].dim() != 1:
        return torch.cat(tensors, dim)
    batch, rest = tensors[0].shape[0], tensors[0].shape[2:]
    blocks = [t.reshape(batch, tasks, t.shape[1] // tasks, *rest) for t in tensors]
    return torch.cat(blocks, 2).reshape(batch, -1, *rest)


def _flatten_from_one(x, start_dim=0, end_dim=-1):
    if start_dim != 1 or end_dim != -1:
        raise ValueError(f"a task-batched program flattens from dim 1 to the end only, got ({start_dim}, {end_dim})")
    return x.reshape(x.shape[0], -1)


def _rows(x, *shape):
    """x.view(B, -1) / x.reshape(B, -1): flattening every example's features (task blocks stay in order)."""
    shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    if len(shape) != 2 or shape[1] != -1 or shape[0] != x.shape[0]:
        raise ValueError(f"a task-batched program reshapes an activation only to (batch, -1), got {shape}")
    return x.reshape(x.shape[0], -1)


_FULL = slice(None)


def _keeps_batch_and_channels(index, ndim: int | None = None) -> bool:
    """Whether `index` leaves an activation's batch and channel dims whole: it starts with two full slices,
    or with Ellipsis followed by slices that (for an `ndim`-d activation, when known) stay past dim 1."""
    entries = index if isinstance(index, tuple) else (index,)
    if entries and entries[0] is Ellipsis:
        return all(isinstance(e, slice) for e in entries[1:]) and (ndim is None or ndim - (len(entries) - 1) >= 2)
    return len(entries) >= 2 and entries[0] == _FULL and entries[1] == _FULL


def _index(value, index):
    """value[index]; on an activation only an index that keeps the batch and channel dims whole."""
    if isinstance(value, torch.Tensor) and not _keeps_batch_and_channels(index, value.dim()):
        raise ValueError(f"a task-batched program indexes an activation only past its batch and channel dims, "
                         f"got [{index!r}] on a {value.dim()}-d activation")
    return value[index]


def _size(x, dim=None):
    if dim is None or dim % x.dim() == 1:
        raise ValueError("a task-batched program reads an activation's size only along the batch and spatial dims")
    return x.size(dim)


_ELEMENTWISE = (operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, torch.add, torch.sub,
                torch.mul, torch.div, torch.relu, torch.sigmoid, torch.tanh, torch.exp, F.relu, F.leaky_relu,
                F.elu, F.gelu, F.silu, F.sigmoid, F.tanh, F.softplus, F.relu6, F.hardswish, F.dropout, F.dropout2d,
                F.alpha_dropout)
_SPATIAL = (F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate)
#: call_function targets -> what runs them in the grouped layout
_FUNCTIONS: dict[Callable, Callable] = {
    **{f: f for f in _ELEMENTWISE + _SPATIAL},
    torch.cat: _concatenate, torch.concat: _concatenate,  # (the only one that takes the task count first)
    torch.flatten: _flatten_from_one,
    torch.mean: _reduction(torch.mean), torch.sum: _reduction(torch.sum), torch.amax: _reduction(torch.amax),
    operator.getitem: _index,
}
#: call_method names -> what runs them (the tensor is the first argument)
_METHODS: dict[str, Callable] = {
    **{name: getattr(torch.Tensor, name) for name in (
        "add", "sub", "mul", "div", "neg", "relu", "sigmoid", "tanh", "exp", "contiguous", "clone")},
    "flatten": _flatten_from_one, "view": _rows, "reshape": _rows, "size": _size,
    "mean": _reduction(torch.Tensor.mean), "sum": _reduction(torch.Tensor.sum), "amax": _reduction(torch.Tensor.amax),
}
_REDUCTIONS = {_FUNCTIONS[torch.mean], _FUNCTIONS[torch.sum], _FUNCTIONS[torch.amax], _METHODS["mean"], _METHODS["sum"],
               _METHODS["amax"]}


# ----------------------------------------------------------------------------- the program
@dataclass
class _Step:
    """One node (or one run of layers) of the program: ``output = run(*inputs)``."""

    output: str
    run: Callable
    args: tuple
    kwargs: dict = field(default_factory=dict)
    layers: tuple[Callable, ...] = ()
    frees: tuple[str, ...] = ()


@dataclass
class Program:
    """The lowered network: `_Step` s over named values, from the input to the output."""

    steps: list[_Step]
    input_name: str
    output_name: str

    @property
    def layers(self) -> list[Callable]:
        """Every lowered layer and function, in order (a fused layer counts once)."""
        return [layer for step in self.steps for layer in step.layers]

    def __call__(self, params: dict, x: torch.Tensor) -> torch.Tensor:
        """Run all tasks: params ``{name: [T, ...]}``, x task-major ``[T, B, *features]``;
        returns task-major ``[T, B, *outputs]``."""
        tasks, batch = x.shape[:2]
        values = {self.input_name: x.transpose(0, 1).reshape(batch, tasks * x.shape[2], *x.shape[3:])}
        resolve = lambda node: values[node.name]  # noqa: E731
        for step in self.steps:
            values[step.output] = step.run(params, tasks, *map_arg(step.args, resolve),
                                           **map_arg(step.kwargs, resolve))
            for name in step.frees:
                del values[name]
        h = values[self.output_name]
        return h.reshape(batch, tasks, h.shape[1] // tasks, *h.shape[2:]).transpose(0, 1)


class _Tracer(torch.fx.Tracer):
    """Layers with a lowering are graph leaves; every other module is traced through."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return type(module) in _LOWERINGS


def _where(node: torch.fx.Node, root: nn.Module) -> str:
    """The node and the innermost layer it belongs to (the model itself at the top level), for a reason."""
    if node.op == "call_module":
        return f"layer {node.target!r}"
    stack = node.meta.get("nn_module_stack") or {}
    path, kind = list(stack.values())[-1] if stack else ("", type(root))
    return (f"node {node.name!r} ({node.op} {getattr(node.target, '__name__', node.target)}) of layer "
            f"{path!r} ({kind.__name__})")


def _lower_layers(modules: list[tuple[str, nn.Module]], backend) -> tuple[Callable | None, str | None]:
    """A run of layers, each feeding only the next: the backend's fusion rules first at every position,
    then the per-layer lowerings (a conv feeding a BatchNorm with batch statistics leaves its bias out)."""
    layers: list[Layer] = []
    index = 0
    while index < len(modules):
        fused = next(filter(None, (rule(modules[index:], "", backend) for rule in backend.fusion_rules)), None)
        if fused is not None:
            layers.append(fused[0])
            index += fused[1]
            continue
        name, module = modules[index]
        following = modules[index + 1] if index + 1 < len(modules) else None
        extra = {}
        if type(module) is nn.Conv2d and following and is_batch_norm_with_batch_statistics(following[1]):
            extra["batch_norm_prefix"] = following[0] + "."
        run, reason = _LOWERINGS[type(module)](module, name + ".", backend, **extra)
        if reason:
            return None, f"layer {name!r} ({type(module).__name__}): {reason}"
        layers.append(run)
        index += 1

    def run_layers(params, tasks, x):
        for layer in layers:
            x = layer(x, params, tasks)
        return x
    run_layers.layers = tuple(layers)
    return run_layers, None


def _chain(node: torch.fx.Node) -> list[torch.fx.Node]:
    """`node` and the layers after it that each take only the previous one's output, its only use."""
    chain = [node]
    while True:
        users = list(chain[-1].users)
        following = chain[-1].next
        if (len(users) != 1 or users[0] is not following or following.op != "call_module"
                or following.args != (chain[-1],) or following.kwargs):
            return chain
        chain.append(following)


def lower(module: nn.Module, backend) -> tuple[Program | None, str | None]:
    """The task-batched program of `module` on `backend` (a `maml_fast.backends.ProgramBackend`), or
    (None, the reason naming the node and layer that prevent it)."""
    try:
        graph = _Tracer().trace(module)
    except Exception as error:  # noqa: BLE001  (tracing runs arbitrary user code: any failure means "cannot trace")
        return None, f"the model {type(module).__name__} cannot be traced by torch.fx ({type(error).__name__}: {error})"
    nodes = list(graph.nodes)
    inputs = [node for node in nodes if node.op == "placeholder"]
    if len(inputs) != 1:
        return None, f"the model {type(module).__name__} takes {len(inputs)} inputs; a task-batched program takes one"
    steps: list[_Step] = []
    output = None
    skip: set = set()
    for node in nodes:
        if node in skip or node.op == "placeholder":
            continue
        if node.op == "output":
            output = node.args[0]
            if not isinstance(output, torch.fx.Node):
                return None, f"the model {type(module).__name__} returns {type(output).__name__}; a task-batched program returns one tensor"
            continue
        if node.op == "call_module":
            if len(node.args) != 1 or node.kwargs:
                return None, f"{_where(node, module)} is called with {len(node.args) + len(node.kwargs)} arguments; a layer takes one"
            chain = _chain(node)
            skip.update(chain)
            run, reason = _lower_layers([(n.target, module.get_submodule(n.target)) for n in chain], backend)
            if reason:
                return None, reason
            steps.append(_Step(chain[-1].name, run, node.args, layers=run.layers))
            continue
        if node.op == "call_function" and node.target in _FUNCTIONS:
            function = _FUNCTIONS[node.target]
        elif node.op == "call_method" and node.target in _METHODS:
            function = _METHODS[node.target]
        elif node.op == "call_function" and node.target is builtins.getattr and node.args[1] == "shape":
            return None, f"{_where(node, module)} reads an activation's .shape; use .size(0) (its channel size is per task)"
        elif node.op == "get_attr":
            return None, f"{_where(node, module)} uses the parameter or buffer {node.target!r} directly, not through a layer"
        else:
            return None, f"{_where(node, module)} has no task-batched op"
        reason = _mixes_tasks(function, node)
        if reason:
            return None, f"{_where(node, module)} {reason}"
        if function is _concatenate:
            run = lambda params, tasks, *args, **kwargs: _concatenate(tasks, *args, **kwargs)  # noqa: E731
        else:
            run = lambda params, tasks, *args, _f=function, **kwargs: _f(*args, **kwargs)  # noqa: E731
        steps.append(_Step(node.name, run, node.args, dict(node.kwargs), layers=(function,)))
    _mark_last_uses(steps, inputs[0].name, output.name)
    return Program(steps, inputs[0].name, output.name), None


def _mixes_tasks(function: Callable, node: torch.fx.Node) -> str | None:
    """Why a function node, as traced, would mix the tasks (a reduction over channels, an index into the
    batch or channel dims, a channel size, a flatten from another dim), or None. Negative dims and
    Ellipsis indexes depend on the activation's rank: those are checked when the program runs."""
    def argument(position, name, default=None):
        return node.kwargs.get(name, node.args[position] if len(node.args) > position else default)

    if function in _REDUCTIONS:
        dims = argument(1, "dim")
        if dims is None or 1 in ((dims,) if isinstance(dims, int) else tuple(dims)):
            return f"reduces over the channels (dim={dims!r}), which mixes the tasks"
    if function is _index and not (node.args[0].op == "call_method" and node.args[0].target == "size"):
        if not _keeps_batch_and_channels(node.args[1]):
            return "indexes an activation along its batch or channel dims, which mixes the tasks"
    if function is _size and argument(1, "dim") in (None, 1):
        return "reads an activation's channel count (per task, it is not the grouped layout's)"
    if function is _flatten_from_one and (argument(1, "start_dim", 0), argument(2, "end_dim", -1)) != (1, -1):
        return "flattens other dims than 1 to the end (the task blocks would not stay in order)"
    return None


def _mark_last_uses(steps: list[_Step], input_name: str, output_name: str) -> None:
    """Let every step drop the values it is the last to read (the program then holds no more
    activations than autograd saves)."""
    seen = {output_name}
    for step in reversed(steps):
        names = []
        map_arg((step.args, step.kwargs), lambda node: names.append(node.name))
        step.frees = tuple(dict.fromkeys(n for n in names if n not in seen))
        seen.update(names)
