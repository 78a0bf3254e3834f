"""The least time that any implementation of a configuration's second-order meta-step can take on this
machine: the FLOPs the step must do, over the fastest dense float32 matrix product measured here; and,
for each peer timed beside it, how much faster than that peer any implementation could be.

    python -m benchmarks.flop_floor [--config resnet12_5w1s_32px] [--peers loop vmap fused] [--rounds 3]
                                    [--threads 2] [--out f.json]

The FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products,
their backward and double backward included) around one step of the "loop" peer: it runs every task's
network on its own, so each convolution is dense (``groups=1``) and each product 2-D, which the counter
counts exactly. (It ignores ``groups`` in a convolution's weight gradient, so a task-batched grouped
step would be over-counted T times.) Every peer computes the same meta-gradient by the same chain rule,
so the loop's count is the work of them all, plus one product that torch's double backward makes and
nothing uses (the images' gradient in the layers that read them; tests/test_flop_floor.py checks the
count against MAML's structure). Elementwise ops, normalisation and memory traffic are not counted: the
floor is below any real step.

The rate is the best of a few large float32 matrix products (oneDNN's matmul where torch has it, and
``torch.mm``), best of `MATMUL_REPEATS` calls each, on the threads the step runs on: the speed of the
kernels every peer's convolutions are made of, run where they run best.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from .bench_table import environment, set_up, time_peers
from .configs import CONFIGS, MetaStepConfig, meta_step

#: (M, K, N) of the matrix products whose best rate bounds the machine's float32 throughput.
MATMUL_SHAPES = ((2048, 4096, 2048), (4096, 4096, 4096))
MATMUL_REPEATS = 5


def step_flops(config: MetaStepConfig, peer: str = "loop") -> dict[str, int]:
    """FLOPs of one second-order meta-step of `peer` on `config` by aten op (``aten.convolution``,
    ``aten.convolution_backward``, ``aten.mm``, ...), counted after one uncounted warm-up step."""
    step = meta_step(peer, config)
    step()
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return {str(op): count for op, count in counter.get_flop_counts()["Global"].items()}


def matmul_products() -> dict[str, callable]:
    """name -> a float32 product ``(a [M, K], b [N, K]) -> a @ b.T`` this build of torch has on the CPU."""
    products = {"torch.mm": lambda a, b: torch.mm(a, b.t())}
    if torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled:
        products["oneDNN matmul"] = lambda a, b: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    return products


def best_matmul_rate(shapes=None, repeats: int = MATMUL_REPEATS) -> dict:
    """The best float32 FLOP/s of `matmul_products` over `shapes` (default `MATMUL_SHAPES`; each the fastest
    of `repeats` calls after one warm-up), with every product's rate: ``{"flop_per_s", "by_product":
    {"<name> MxKxN": flop/s}}``."""
    rates = {}
    gen = torch.Generator().manual_seed(0)
    for m, k, n in MATMUL_SHAPES if shapes is None else shapes:
        a, b = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
        for name, product in matmul_products().items():
            product(a, b)
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                product(a, b)
                best = min(best, time.perf_counter() - start)
            rates[f"{name} {m}x{k}x{n}"] = 2 * m * k * n / best
    return {"flop_per_s": max(rates.values()), "by_product": rates}


def floor_table(flops: int, rate: float, medians: dict[str, float]) -> dict:
    """The floor (seconds) and, per peer, its median step, the FLOP rate it reaches and ``median / floor``:
    the most that any implementation could be faster than it."""
    floor = flops / rate
    return {"floor_s": floor, "peers": {peer: {"median_s": median, "flop_per_s": flops / median,
                                               "most_any_step_can_be_faster": median / floor}
                                        for peer, median in medians.items()}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="resnet12_5w1s_32px", choices=list(CONFIGS))
    parser.add_argument("--peers", nargs="+", default=["loop", "vmap", "fused"])
    parser.add_argument("--rounds", type=int, default=3, help="timed steps of each peer")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--tasks", type=int, help="override the configuration's meta-batch size (dry runs)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = CONFIGS[args.config] if args.tasks is None else dataclasses.replace(CONFIGS[args.config], tasks=args.tasks)

    by_op = step_flops(config)
    flops = sum(by_op.values())
    matmul = best_matmul_rate()
    steps, failed = set_up(config, args.peers, "cpu", lambda: None)
    times = time_peers(steps, args.rounds, 0, lambda: None)
    table = floor_table(flops, matmul["flop_per_s"], {peer: statistics.median(t) for peer, t in times.items()})
    results = {"environment": environment("cpu"), "config": args.config, "tasks": config.tasks,
               "step_flops": flops, "step_flops_by_op": by_op, "matmul": matmul, **table,
               "times_s": times, "failed": failed}

    print(f"# {results['environment']}")
    print(f"## {args.config} (T={config.tasks}): {flops / 1e9:.1f} GFLOP per second-order meta-step; the fastest "
          f"float32 product here: {matmul['flop_per_s'] / 1e9:.1f} GFLOP/s; floor {table['floor_s'] * 1e3:.1f} ms")
    print("| peer | median ms | GFLOP/s | most any step can be faster |")
    print("|---|---|---|---|")
    for peer, row in table["peers"].items():
        print(f"| {peer} | {row['median_s'] * 1e3:.1f} | {row['flop_per_s'] / 1e9:.1f} | "
              f"{row['most_any_step_can_be_faster']:.2f}x |")
    for peer, error in failed.items():
        print(f"# {peer} failed in its set-up, not timed: {error}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
