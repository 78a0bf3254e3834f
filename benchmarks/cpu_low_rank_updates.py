"""Factored against materialised fast weights of wide conv layers on the CPU, by the rank the updates
reach: one second-order meta-step (the trainer's `MetaStep` with Adam, backend "fused", one inner step,
T=8) of a network of two 3x3 convs (C -> C -> C, BatchNorm, ReLU) and a pooled linear head on C-channel
H x H inputs, with every conv's updates kept factored (`maml_fast.ops.low_rank_conv`) or never, for
growing support sets. Rank = support images x H^2, against the weight's smaller side C; what sets
``TorchConvPrimitives.low_rank_max_fraction``.

    python -m benchmarks.cpu_low_rank_updates [--rounds 5] [--threads 2] [--out benchmarks/results/x.json]

Rounds interleaved across the two formulations; the median round is reported, in ms.
"""
from __future__ import annotations

import argparse
import json
import statistics
from unittest import mock

import torch
from torch import nn

import maml_fast as mf
from maml_fast.meta_step import MetaStep
from maml_fast.ops import conv2d as conv_ops

from .bench_table import environment, time_peers

# (channels, image side, support images per task)
LAYERS = ((640, 4, 5), (640, 4, 10), (640, 4, 20), (640, 4, 40), (320, 8, 5), (320, 8, 10), (320, 8, 20))
TASKS, WAYS = 8, 5
FRACTIONS = {"factored": float("inf"), "materialised": 0.0}


def step(channels: int, size: int, support: int, fraction: float):
    """One meta-step's callable with `low_rank_max_fraction` = `fraction` while it runs."""
    torch.manual_seed(0)
    block = lambda: (nn.Conv2d(channels, channels, 3, padding=1, bias=False),  # noqa: E731
                     nn.BatchNorm2d(channels, track_running_stats=False), nn.ReLU())
    net = nn.Sequential(*block(), *block(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, WAYS))
    learner = mf.MAML(net, inner_lr=0.01, inner_steps=1, backend="fused", step_metrics=False)
    meta_step = MetaStep(learner, torch.optim.Adam(learner.parameters(), lr=1e-3, fused=True))
    x = torch.randn(TASKS, support, channels, size, size)
    y = torch.arange(WAYS).repeat(support // WAYS + 1)[:support].expand(TASKS, -1).contiguous()
    batch = mf.TaskBatch(x, y, x.clone(), y)

    def run():
        with mock.patch.object(conv_ops.TorchConvPrimitives, "low_rank_max_fraction", fraction):
            meta_step(batch)
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {"environment": environment("cpu"), "tasks": TASKS, "ms": {}}
    print("| C | H | support images | rank / C | factored ms | materialised ms |\n|---:|---:|---:|---:|---:|---:|")
    for channels, size, support in LAYERS:
        steps = {name: step(channels, size, support, fraction) for name, fraction in FRACTIONS.items()}
        for run in steps.values():
            run()  # warm-up
        times = time_peers(steps, args.rounds, args.rounds, sync=lambda: None)
        median = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        results["ms"][f"{channels}/{size}/{support}"] = median
        print(f"| {channels} | {size} | {support} | {support * size * size / channels:.3g} | "
              f"{median['factored']:.1f} | {median['materialised']:.1f} |", flush=True)
    if args.out:
        with open(args.out, "w") as file:
            json.dump(results, file, indent=1)


if __name__ == "__main__":
    main()
