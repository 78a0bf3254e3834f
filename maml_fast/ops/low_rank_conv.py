"""A conv layer's fast weight kept as its inner-loop updates, which have low rank on small maps.

An inner step's gradient of a conv weight is a sum over the support set's output pixels,
``gw = gy^T P(x)`` per task (``P``: the patches of the layer's input x, one row per output pixel; ``gy``:
the loss's gradient with respect to the layer's output). Its rank is at most B*Ho*Wo, the support
pixels per task. After k inner steps with step sizes lr_j the fast weight is

    W_k = θ - Σ_j lr_j gy_j^T P(x_j)

and the convolution of any input x with it is

    conv(x, W_k) = conv(x, θ) - Σ_j lr_j (P(x) P(x_j)^T) gy_j.

`LowRankFastWeight` holds θ (expanded over the tasks) and the updates ``(lr_j, x_j, gy_j)``;
`low_rank_conv2d` computes the right-hand side: one convolution with θ, which every task shares, and
two small batched products per update. Where B*Ho*Wo is much smaller than the weight's sides (wide
layers on small maps) that replaces per-task convolutions with weight-sized per-task fast weights and
gradients by far fewer FLOPs and bytes. Every op here is differentiable to any order, so second-order
MAML differentiates through it exactly (tests/test_low_rank_conv.py, tests/test_exactness.py).

`low_rank_conv2d_reference` materialises W_k (`LowRankFastWeight.dense`) and runs the plain per-task
convolution: the definition the tests compare with.

The inner loop (`maml_fast.inner_loop`) gives a lowered conv layer its weight in this form when the
execution allows it; at the first inner step the backend's conv primitives decide from the layer's
shapes whether the updates are worth keeping factored (``factors_updates``) and the layer records its
input and output (``tape``), the output being what the inner gradient is taken with respect to.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import conv2d as conv_ops

#: One update ``(lr, x, grad_y)``: a 0-dim step size, the layer's input ``[B, T*C, H, W]`` and the
#: support loss's gradient with respect to its output ``[B, T*O, Ho, Wo]`` at that inner step.
Update = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class Tape:
    """What a layer records in an inner step's support forward: whether its updates are kept factored
    (decided by the first use; None until then) and, if so, ``(x, y)`` of every use of the weight."""

    factored: bool | None = None
    uses: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    #: θ as the factored convolutions read it: channels-last on the CPU, one differentiable copy for all
    #: uses and later steps (oneDNN would reorder it in every call)
    theta: torch.Tensor | None = None


@dataclass(frozen=True)
class LowRankFastWeight:
    """``θ - Σ_j lr_j grad_y_j^T P(x_j)`` for T tasks, a conv weight kept as its terms: ``theta``
    ``[O, C, kh, kw]``, which every task shares, and ``updates`` (`Update`). Before its first update it
    also holds ``expanded``, θ as the per-task ``[T, O, C, kh, kw]`` tensor that the plain convolution
    and an unfactored inner step take. ``max_updates``: the inner steps of the loop (the rank the
    updates reach); ``tape``: where the layer records its input and output in a support forward (None:
    it does not record)."""

    theta: torch.Tensor
    tasks: int
    updates: tuple[Update, ...] = ()
    expanded: torch.Tensor | None = None
    max_updates: int = 1
    tape: Tape | None = field(default=None, compare=False)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.tasks, *self.theta.shape))

    def recording(self) -> "LowRankFastWeight":
        """The same weight with an empty `Tape`: the layer taking it records into it."""
        return dataclasses.replace(self, tape=Tape(factored=True if self.updates else None))

    def updated(self, lr: torch.Tensor, uses: list[tuple[torch.Tensor, torch.Tensor]],
                grad_ys: list[torch.Tensor | None], keep_graph: bool = True) -> "LowRankFastWeight":
        """One more inner step: an update per recorded use ``(x, y)`` with the gradient of the support
        loss with respect to y; x detached unless `keep_graph` (first order: the update is a constant
        of the meta-gradient, as a detached dense gradient is)."""
        new = tuple((lr, x if keep_graph else x.detach(), grad_y) for (x, _), grad_y in zip(uses, grad_ys, strict=True)
                    if grad_y is not None)
        # (θ channels-last from now on, one differentiable copy: oneDNN would reorder it in every call)
        theta = self.tape.theta if self.tape is not None and self.tape.theta is not None else self.theta
        return LowRankFastWeight(theta, self.tasks, self.updates + new, None, self.max_updates)

    def dense(self, stride=1, padding=0) -> torch.Tensor:
        """The weight itself, ``[T, O, C, kh, kw]`` (the reference)."""
        weight = self.theta.expand(self.shape)
        for lr, x, grad_y in self.updates:
            geo = _geometry(self.tasks, self.theta.shape[2:], stride, padding, x)
            weight = weight - lr * conv_ops.conv2d_weight_grad(x, grad_y, geo, conv_ops.TORCH_CONV)
        return weight


#: How `flatten` laid out one fast weight: None for a tensor; for a `LowRankFastWeight`, (tasks, whether it
#: holds ``expanded``, its number of updates, ``max_updates``).
Layout = tuple[int, bool, int, int] | None


def flatten(fast: list) -> tuple[list[torch.Tensor], list[Layout]]:
    """The tensors of `fast` (tensors and `LowRankFastWeight` s) as one list, and how to rebuild it
    (`unflatten`): for a checkpointed inner step, whose arguments and results are tensors."""
    tensors, layouts = [], []
    for weight in fast:
        if isinstance(weight, LowRankFastWeight):
            held = [weight.expanded] if weight.expanded is not None else []
            tensors += [weight.theta, *held, *(t for update in weight.updates for t in update)]
            layouts.append((weight.tasks, bool(held), len(weight.updates), weight.max_updates))
        else:
            tensors.append(weight)
            layouts.append(None)
    return tensors, layouts


def flat_size(layouts: list[Layout]) -> int:
    """The number of tensors `flatten` gave for these layouts."""
    return sum(1 if layout is None else 1 + layout[1] + 3 * layout[2] for layout in layouts)


def unflatten(tensors: list[torch.Tensor], layouts: list[Layout]) -> list:
    """The inverse of `flatten`."""
    fast, position = [], 0
    for layout in layouts:
        if layout is None:
            fast.append(tensors[position])
            position += 1
            continue
        tasks, held, count, max_updates = layout
        theta, position = tensors[position], position + 1
        expanded, position = (tensors[position], position + 1) if held else (None, position)
        updates = tuple(tuple(tensors[position + 3 * j:position + 3 * j + 3]) for j in range(count))
        position += 3 * count
        fast.append(LowRankFastWeight(theta, tasks, updates, expanded, max_updates))
    return fast


def _geometry(tasks: int, kernel_hw, stride, padding, x: torch.Tensor) -> conv_ops.ConvGeometry:
    return conv_ops.ConvGeometry(tasks, conv_ops._pair(stride, "stride"), conv_ops._pair(padding, "padding"),
                                 tuple(x.shape[2:]), tuple(kernel_hw))


def _pixel_rows(x: torch.Tensor, tasks: int) -> torch.Tensor:
    """``[T, B*H*W, C]``: each task's channels of ``x [B, T*C, H, W]``, a row per pixel (a view of
    channels-last x)."""
    batch, channels, height, width = x.shape
    return x.permute(0, 2, 3, 1).reshape(batch * height * width, tasks, channels // tasks).transpose(0, 1)


def patch_products(x: torch.Tensor, x_update: torch.Tensor, geo: conv_ops.ConvGeometry,
                   update_geo: conv_ops.ConvGeometry) -> torch.Tensor:
    """``P(x) P(x_j)^T``, ``[T, B*Ho*Wo, Bj*Ho_j*Wo_j]``: the inner product of every kh x kw patch of x
    (geometry `geo`) with every patch of x_j (`update_geo`), per task, rows in (image, pixel) order. Two
    patches' product is the sum, over the kernel positions, of the products of the pixels they hold there;
    so it is taken from the products of all pixel pairs, one matrix product over the channels, summed along
    the kh*kw shifted diagonals: kh*kw times fewer FLOPs than multiplying the patches, and no patch copies."""
    tasks = geo.tasks
    pixels = torch.bmm(_pixel_rows(x, tasks), _pixel_rows(x_update, tasks).transpose(1, 2))
    pixels = pixels.view(tasks, x.shape[0], *geo.input_hw, x_update.shape[0], *update_geo.input_hw)
    (ph, pw), (sh, sw), (kh, kw) = geo.padding, geo.stride, geo.kernel_hw
    pixels = F.pad(pixels, (pw, pw, ph, ph, 0, 0, pw, pw, ph, ph))  # (zero padding: its products are zero)
    (ho, wo), (hu, wu) = geo.output_hw(), update_geo.output_hw()
    terms = [pixels[:, :, dy:dy + sh * (ho - 1) + 1:sh, dx:dx + sw * (wo - 1) + 1:sw,
                    :, dy:dy + sh * (hu - 1) + 1:sh, dx:dx + sw * (wu - 1) + 1:sw]
             for dy in range(kh) for dx in range(kw)]
    products = terms[0] if len(terms) == 1 else torch.stack(terms).sum(0)
    return products.reshape(tasks, x.shape[0] * ho * wo, x_update.shape[0] * hu * wu)


def _rows(y: torch.Tensor, tasks: int) -> torch.Tensor:
    """``[T, B*Ho*Wo, O]``: each task's output channels of ``y [B, T*O, Ho, Wo]``, a row per pixel."""
    batch, channels, height, width = y.shape
    return y.view(batch, tasks, channels // tasks, height * width).permute(1, 0, 3, 2).reshape(
        tasks, batch * height * width, channels // tasks)


def _from_rows(rows: torch.Tensor, batch: int, output_hw: tuple[int, int]) -> torch.Tensor:
    """The inverse of `_rows`: ``[T, B*Ho*Wo, O]`` as ``[B, T*O, Ho, Wo]``, channels-last (a view of the
    rows reordered once: B, Ho, Wo, T, O)."""
    tasks, _, out_ch = rows.shape
    height, width = output_hw
    return (rows.view(tasks, batch, height, width, out_ch).permute(1, 2, 3, 0, 4)
            .reshape(batch, height, width, tasks * out_ch).permute(0, 3, 1, 2))


def correction(x: torch.Tensor, update: Update, geo: conv_ops.ConvGeometry) -> torch.Tensor:
    """``lr (P(x) P(x_j)^T) gy_j`` of one update, ``[B, T*O, Ho, Wo]``: the convolution of x with the
    update's weight ``lr gy_j^T P(x_j)``, through its factors."""
    lr, x_update, grad_y = update
    update_geo = dataclasses.replace(geo, input_hw=tuple(x_update.shape[2:]))
    kernel = patch_products(x, x_update, geo, update_geo)
    return lr * _from_rows(torch.bmm(kernel, _rows(grad_y, geo.tasks)), x.shape[0], geo.output_hw())


def low_rank_conv2d(x: torch.Tensor, weight: LowRankFastWeight, bias=None, stride=1, padding=0,
                    primitives=conv_ops.TORCH_CONV) -> torch.Tensor:
    """``conv2d(x, weight.dense(), bias)``. A weight with updates, or one whose layer keeps them factored
    (the first use of a recording weight asks ``primitives.factors_updates``; it then records ``(x, y)``
    in ``weight.tape``): one `conv_ops.shared_conv2d` with θ and one `correction` per update. Otherwise the
    plain per-task convolution with θ expanded."""
    geo = _geometry(weight.tasks, weight.theta.shape[2:], stride, padding, x)
    tape, theta = weight.tape, weight.theta
    if tape is not None and tape.factored is None:
        factors = getattr(primitives, "factors_updates", None)
        tape.factored = bool(factors and factors(x, geo, theta.shape[0], weight.max_updates))
        if tape.factored:
            tape.theta = conv_ops.SHARED_WEIGHT.prepare_weight(theta)
    if not weight.updates and not (tape and tape.factored):
        return conv_ops.conv2d(x, weight.expanded, bias, stride, padding, primitives)
    theta = tape.theta if tape is not None and tape.theta is not None else theta
    if x.dim() != 4 or x.shape[1] != weight.tasks * weight.theta.shape[1]:
        raise ValueError(f"x must have shape [batch, tasks*in_channels={weight.tasks * weight.theta.shape[1]}, H, W] "
                         f"for weight {tuple(weight.shape)}, got {tuple(x.shape)}")
    y = conv_ops.shared_conv2d(x, theta, weight.tasks, geo.stride, geo.padding)
    if bias is not None:
        y = y + bias.reshape(1, -1, 1, 1)
    for update in weight.updates:
        y = y - correction(x, update, geo)
    if tape is not None:
        tape.uses.append((x, y))
    return y


def low_rank_conv2d_reference(x, weight: LowRankFastWeight, bias=None, stride=1, padding=0) -> torch.Tensor:
    """The definition: the plain per-task convolution with the materialised weight."""
    return conv_ops.conv2d_reference(x, weight.dense(stride, padding), bias, stride, padding)
