"""The benchmarked meta-step configurations, shared by the pytest-benchmark suite, the ratio table
and the memory script. Inputs are random (speed does not depend on the pixel values)."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

import maml_fast as mf


@dataclass(frozen=True)
class MetaStepConfig:
    name: str
    tasks: int
    ways: int
    shots: int
    queries_per_class: int
    inner_steps: int
    channels: int
    image_size: int
    hidden: int
    downsample: str
    inner_lr: float
    network: str = "conv4"  # or "resnet12" (block widths: resnet_widths)
    resnet_widths: tuple[int, ...] = (64, 160, 320, 640)

    def make_net(self, device="cpu", dtype=torch.float32):
        torch.manual_seed(0)
        if self.network == "resnet12":
            net = mf.models.resnet12(self.channels, self.ways, self.resnet_widths)
        else:
            net = mf.models.conv4(self.channels, self.ways, self.hidden, self.downsample, image_size=self.image_size)
        return net.to(device=device, dtype=dtype)

    def make_batch(self, device="cpu", dtype=torch.float32, seed=0) -> mf.TaskBatch:
        gen = torch.Generator().manual_seed(seed)
        image = (self.channels, self.image_size, self.image_size)

        def split(per_class):
            x = torch.randn(self.tasks, self.ways * per_class, *image, generator=gen, dtype=dtype)
            y = torch.arange(self.ways).repeat_interleave(per_class).expand(self.tasks, -1).contiguous()
            return x.to(device), y.to(device)

        return mf.TaskBatch(*split(self.shots), *split(self.queries_per_class))


CONFIGS = {
    "omniglot_5w1s": MetaStepConfig("omniglot_5w1s", tasks=32, ways=5, shots=1, queries_per_class=1, inner_steps=1,
                                    channels=1, image_size=28, hidden=64, downsample="stride", inner_lr=0.4),
    # The paper's 20-way 1-shot Omniglot: 16 tasks, 5 inner steps of α = 0.1 (maml_fast.presets "omniglot-20w1s").
    "omniglot_20w1s": MetaStepConfig("omniglot_20w1s", tasks=16, ways=20, shots=1, queries_per_class=1, inner_steps=5,
                                     channels=1, image_size=28, hidden=64, downsample="stride", inner_lr=0.1),
    "miniimagenet_5w1s": MetaStepConfig("miniimagenet_5w1s", tasks=4, ways=5, shots=1, queries_per_class=15,
                                        inner_steps=5, channels=3, image_size=84, hidden=32, downsample="maxpool",
                                        inner_lr=0.01),
    # ResNet-12 (full width) on small images, T=8: the issue-11 target configuration.
    "resnet12_5w1s_32px": MetaStepConfig("resnet12_5w1s_32px", tasks=8, ways=5, shots=1, queries_per_class=1,
                                         inner_steps=1, channels=3, image_size=32, hidden=0, downsample="",
                                         inner_lr=0.01, network="resnet12"),
    "resnet12_narrow_5w1s_32px": MetaStepConfig("resnet12_narrow_5w1s_32px", tasks=8, ways=5, shots=1,
                                                queries_per_class=1, inner_steps=1, channels=3, image_size=32,
                                                hidden=0, downsample="", inner_lr=0.01, network="resnet12",
                                                resnet_widths=(16, 40, 80, 160)),
}


PEERS = ("loop", "vmap", "functorch", "torch", "fused", "triton")
# The whole MetaStep captured as one CUDA graph (`maml_fast.cuda_graph.GraphedMetaStep`) and timed by its
# replays; "<backend>+graph". The loop and functorch peers are not offered: they are the eager baselines.
GRAPH_SUFFIX = "+graph"
GRAPHED_PEERS = tuple(peer + GRAPH_SUFFIX for peer in ("vmap", "torch", "fused", "triton"))
GRAPH_WARMUP = 3  # eager warm-up steps before the capture (GraphedMetaStep's default)
# Adam's lr, exact in float32: a graphed step holds its lr as a float32 device tensor (so that a scheduler
# reaches the graph), and then takes exactly the eager peer's steps (tests/test_benchmark_peers.py).
META_LR = 2.0 ** -10


def base_peer(peer: str) -> str:
    """The eager peer that `peer` runs: "fused" for "fused+graph"."""
    return peer.removesuffix(GRAPH_SUFFIX)


def is_graphed(peer: str) -> bool:
    return peer.endswith(GRAPH_SUFFIX)


def warmup_calls(peer: str) -> int:
    """Untimed calls of a peer's step before timing it: one; a graphed peer's eager warm-ups, its capture
    and one replay."""
    return GRAPH_WARMUP + 2 if is_graphed(peer) else 1


def unavailable_reason(peer: str, device) -> str | None:
    """Why `peer` cannot be timed on `device` (None when it can)."""
    from maml_fast.backends import unavailable_reasons
    if peer not in PEERS + GRAPHED_PEERS:
        return f"unknown peer {peer!r}; known: {', '.join(PEERS + GRAPHED_PEERS)}"
    base = base_peer(peer)
    reasons = [] if base == "functorch" else unavailable_reasons(base, device)
    if is_graphed(peer) and torch.device(device).type != "cuda":
        reasons.append("CUDA graphs need a CUDA device (the CPU emulator, EmulatedGraphBackend, replays recorded ops "
                       "to test graph semantics: its times mean nothing)")
    return "; ".join(reasons) or None


def available_peers(device) -> list[str]:
    """The peers that can run on `device`, graphed ones included (see `unavailable_reason`)."""
    return [peer for peer in PEERS + GRAPHED_PEERS if unavailable_reason(peer, device) is None]


def make_learner(peer: str, net: torch.nn.Module, config: MetaStepConfig) -> torch.nn.Module:
    """The learner that ``peer`` times on ``net`` (``learner(batch).loss`` is its second-order
    meta-loss): the functorch recipe, or mf.MAML on that backend with per-step metrics off so every peer
    does the same work. tests/test_benchmark_peers.py checks each against the reference."""
    from .functorch_peer import FunctorchMAML

    if peer == "functorch":
        return FunctorchMAML(net, config.inner_lr, config.inner_steps)
    return mf.MAML(net, inner_lr=config.inner_lr, inner_steps=config.inner_steps, backend=peer, step_metrics=False)


def meta_step(peer: str, config: MetaStepConfig, device="cpu", dtype=torch.float32, capture_backend=None):
    """A zero-argument callable running one second-order meta-training iteration of ``peer`` on
    ``config``: the trainer's `maml_fast.meta_step.MetaStep` (inner loop, query loss, meta-backward,
    gradient norm, fused Adam step) on `make_learner`'s learner; for a graphed peer that step inside
    `GraphedMetaStep` (``GRAPH_WARMUP`` eager steps, then one capture, then replays), on CUDA graphs or
    on `capture_backend` (tests: `EmulatedGraphBackend`). The callable is a ``functools.partial`` of
    the step object (``.func``: a graphed step's ``stats`` say what was timed)."""
    from maml_fast.cuda_graph import GraphedMetaStep
    from maml_fast.meta_step import MetaStep

    learner = make_learner(base_peer(peer), config.make_net(device, dtype), config)
    batch = config.make_batch(device, dtype)
    # a CUDA graph replays the optimizer step too: its step count must then live on the device (capturable)
    capturable = {"capturable": True} if is_graphed(peer) and capture_backend is None else {}
    optimizer = torch.optim.Adam(learner.parameters(), lr=META_LR, fused=True, **capturable)
    if is_graphed(peer):
        return functools.partial(GraphedMetaStep(learner, optimizer, backend=capture_backend, warmup=GRAPH_WARMUP), batch)
    return functools.partial(MetaStep(learner, optimizer), batch)
