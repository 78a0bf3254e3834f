"""The CPU's formulations of a task-batched conv primitive side by side: one grouped oneDNN call
(groups = T), one dense call per task (`maml_fast.ops.conv2d.TorchConvPrimitives.per_task`) and, for the
forward and the input gradient of θ shared by the tasks, one dense call with the tasks as depth
(`TorchConvPrimitives.shares_weight`), and for the weight gradient one batched matrix product over the tasks
(`TorchConvPrimitives.gemm_weight_grad`), for each primitive at the layer shapes of ResNet-12, Omniglot and
MiniImageNet (3x3, padding 1, channels-last, B=5). What sets ``TorchConvPrimitives.per_task_min_channels``,
``shared_min_channels`` and ``gemm_weight_grad_max_pixels``.

    python -m benchmarks.cpu_conv_formulations [--rounds 5] [--out benchmarks/results/x.json]

Single thread, process CPU time (robust to other jobs on a shared machine), rounds interleaved across the
formulations; the best round is reported, in ms.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from maml_fast.ops import conv2d as conv_ops

from .bench_table import environment, time_peers

# (network, tasks, channels per task in, out, image side, stride)
LAYERS = (("resnet12", 8, 64, 64, 32, 1), ("resnet12", 8, 160, 160, 16, 1), ("resnet12", 8, 320, 320, 8, 1),
          ("resnet12", 8, 320, 640, 4, 1), ("resnet12", 8, 640, 640, 4, 1),
          ("omniglot", 32, 64, 64, 14, 2), ("omniglot", 32, 64, 64, 7, 2), ("omniglot", 32, 64, 64, 4, 2),
          ("miniimagenet", 4, 3, 32, 84, 1), ("miniimagenet", 4, 32, 32, 42, 1), ("miniimagenet", 4, 32, 32, 21, 1),
          ("miniimagenet", 4, 32, 32, 10, 1))
BATCH = 5
PRIMITIVES = ("forward", "input_grad", "weight_grad")
NAMES = ("grouped", "per task", "shared", "batched matmul")


def formulations() -> dict[str, conv_ops.TorchConvPrimitives]:
    """Each formulation forced on every layer (the shared one reads θ expanded over the tasks)."""
    grouped, per_task, shared, gemm = all_primitives = [conv_ops.TorchConvPrimitives() for _ in NAMES]
    for primitives in all_primitives:
        primitives.per_task_min_channels = primitives.shared_min_channels = float("inf")
        primitives.gemm_weight_grad_max_pixels = 0
    per_task.per_task_min_channels = gemm.per_task_min_channels = 0
    shared.shared_min_channels = 0
    gemm.gemm_weight_grad_max_pixels = float("inf")
    return dict(zip(NAMES, all_primitives))


def calls(name: str, primitives, tasks: int, in_ch: int, out_ch: int, size: int, stride: int) -> dict[str, callable]:
    geo = conv_ops.ConvGeometry(tasks, (stride, stride), (1, 1), (size, size), (3, 3))
    x = torch.randn(BATCH, tasks * in_ch, size, size).contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(BATCH, tasks * out_ch, *geo.output_hw()).contiguous(memory_format=torch.channels_last)
    theta = torch.randn(out_ch, in_ch, 3, 3)
    weight = primitives.prepare_weight(theta.expand(tasks, -1, -1, -1, -1) if name == "shared"
                                       else torch.randn(tasks, out_ch, in_ch, 3, 3))
    steps = {"forward": lambda: primitives.forward(x, weight, geo),
             "input_grad": lambda: primitives.input_grad(grad_out, weight, geo),
             "weight_grad": lambda: primitives.weight_grad(x, grad_out, geo)}
    if name == "shared":
        del steps["weight_grad"]  # (it does not read the weight: the same call as grouped)
    if name == "batched matmul":
        return {"weight_grad": steps["weight_grad"]}
    return steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {"environment": environment("cpu"), "batch": BATCH, "ms": {}}
    print("| network | T | in, out | H=W | stride | primitive | grouped ms | per task ms | shared ms | batched matmul ms |\n"
          "|---|---:|---|---:|---:|---|---:|---:|---:|---:|")
    for network, tasks, in_ch, out_ch, size, stride in LAYERS:
        for primitive in PRIMITIVES:
            steps = {name: step for name, prims in formulations().items()
                     if (step := calls(name, prims, tasks, in_ch, out_ch, size, stride).get(primitive))}
            for step in steps.values():
                step()  # warm-up (oneDNN primitive creation)
            times = time_peers(steps, args.rounds, args.rounds, sync=lambda: None, clock=time.process_time)
            best = {name: min(t) * 1e3 for name, t in times.items()}
            results["ms"][f"{network}/T{tasks}/{in_ch}x{out_ch}/{size}/s{stride}/{primitive}"] = best
            cells = " | ".join(f"{best[name]:.2f}" if name in best else "-" for name in NAMES)
            print(f"| {network} | {tasks} | {in_ch}, {out_ch} | {size} | {stride} | {primitive} | {cells} |", flush=True)
    if args.out:
        with open(args.out, "w") as file:
            json.dump(results, file, indent=1)


if __name__ == "__main__":
    main()
