"""Named members of the MAML family: thin constructors over `MAML`'s options."""
from __future__ import annotations

from torch import nn

from .maml import MAML


class MetaSGD(MAML):
    """Meta-SGD (Li et al., 2017): a learned inner step size for every parameter element."""

    def __init__(self, model: nn.Module, inner_lr: float = 0.4, inner_steps: int = 1, **options):
        super().__init__(model, inner_lr, inner_steps, inner_lr_mode="per_element", **options)


class ANIL(MAML):
    """ANIL (Raghu et al., 2020): only the head adapts in the inner loop. ``head`` names the head's
    module (e.g. "4" in a Sequential); by default the last module that owns parameters."""

    def __init__(self, model: nn.Module, inner_lr: float = 0.4, inner_steps: int = 1, head: str | None = None, **options):
        if head is None:
            owners = [name for name, mod in model.named_modules() if name and any(True for _ in mod.parameters(recurse=False))]
            if not owners:
                raise ValueError("model has no parameters: ANIL needs a head to adapt")
            head = owners[-1]
        prefix = head + "."
        if not any(n.startswith(prefix) for n, _ in model.named_parameters()):
            raise ValueError(f"head={head!r} names no module with parameters in the model")
        super().__init__(model, inner_lr, inner_steps, adapt=lambda name: name.startswith(prefix), **options)


class MAMLPlusPlus(MAML):
    """MAML++ (Antoniou et al., 2019): per-layer per-step learned inner lrs (LSLR), multi-step loss
    annealed over ``multi_step_loss_iterations``, per-step BatchNorm weights, and derivative-order
    annealing (first order for the first ``first_order_iterations``)."""

    def __init__(self, model: nn.Module, inner_lr: float = 0.1, inner_steps: int = 5, *,
                 multi_step_loss_iterations: int = 10_000, first_order_iterations: int = 20_000, **options):
        options.setdefault("per_step_bn", True)
        options.setdefault("adapt_bn_affine", False)
        super().__init__(model, inner_lr, inner_steps, inner_lr_mode="per_layer_per_step",
                         multi_step_loss_iterations=multi_step_loss_iterations,
                         first_order_iterations=first_order_iterations, **options)
