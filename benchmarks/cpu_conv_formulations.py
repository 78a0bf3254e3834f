"""The CPU's two formulations of a task-batched conv primitive side by side: one grouped oneDNN call
(groups = T) and one dense call per task (`maml_fast.ops.conv2d.TorchConvPrimitives.per_task`), for each
primitive at ResNet-12's layer shapes (3x3, stride 1, padding 1, channels-last, B=5, T=8). What sets
``TorchConvPrimitives.per_task_min_channels``.

    python -m benchmarks.cpu_conv_formulations [--rounds 5] [--out benchmarks/results/x.json]

Single thread, process CPU time (robust to other jobs on a shared machine), rounds interleaved across the
two formulations; the best round is reported, in ms.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from maml_fast.ops import conv2d as conv_ops

from .bench_table import environment, time_peers

LAYERS = ((64, 32), (160, 16), (320, 8), (640, 4))  # (channels per task in and out, image side)
TASKS, BATCH = 8, 5
PRIMITIVES = ("forward", "input_grad", "weight_grad")


def formulations() -> dict[str, conv_ops.TorchConvPrimitives]:
    grouped, per_task = conv_ops.TorchConvPrimitives(), conv_ops.TorchConvPrimitives()
    grouped.per_task_min_channels = float("inf")
    per_task.per_task_min_channels = 0
    return {"grouped": grouped, "per task": per_task}


def calls(primitives, channels: int, size: int) -> dict[str, callable]:
    geo = conv_ops.ConvGeometry(TASKS, (1, 1), (1, 1), (size, size), (3, 3))
    x = torch.randn(BATCH, TASKS * channels, size, size).contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(BATCH, TASKS * channels, size, size).contiguous(memory_format=torch.channels_last)
    weight = primitives.prepare_weight(torch.randn(TASKS, channels, channels, 3, 3))
    return {"forward": lambda: primitives.forward(x, weight, geo),
            "input_grad": lambda: primitives.input_grad(grad_out, weight, geo),
            "weight_grad": lambda: primitives.weight_grad(x, grad_out, geo)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {"environment": environment("cpu"), "tasks": TASKS, "batch": BATCH, "ms": {}}
    print("| C=O, H=W | primitive | grouped ms | per task ms | grouped / per task |\n|---|---|---:|---:|---:|")
    for channels, size in LAYERS:
        for primitive in PRIMITIVES:
            steps = {name: calls(prims, channels, size)[primitive] for name, prims in formulations().items()}
            for step in steps.values():
                step()  # warm-up (oneDNN primitive creation)
            times = time_peers(steps, args.rounds, args.rounds, sync=lambda: None, clock=time.process_time)
            best = {name: min(t) * 1e3 for name, t in times.items()}
            results["ms"][f"{channels}x{size}/{primitive}"] = best
            print(f"| {channels}, {size} | {primitive} | {best['grouped']:.1f} | {best['per task']:.1f} | "
                  f"{best['grouped'] / best['per task']:.2f} |")
    if args.out:
        with open(args.out, "w") as file:
            json.dump(results, file, indent=1)


if __name__ == "__main__":
    main()
