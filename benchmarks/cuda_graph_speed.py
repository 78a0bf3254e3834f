"""Eager vs graphed (`maml_fast.cuda_graph.GraphedMetaStep`) ms per second-order meta-step of the real
learner on a benchmark configuration; moved here from tests/test_cuda_graph.py, where it asserted nothing.
Whether mf.MAML captures on CUDA is issue 15's work: a host read found by the warm-up's check is printed
and the script exits with status 1.

    python -m benchmarks.cuda_graph_speed [--config omniglot_5w1s] [--backend torch] [--rounds 50]

Without CUDA it runs the graphed step on `EmulatedGraphBackend` (a dry run of the script: the emulator's
times mean nothing); ``--tasks`` shrinks the meta-batch for such a run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import torch

import maml_fast as mf
from maml_fast.cuda_graph import EmulatedGraphBackend, GraphedMetaStep, HostSyncError

from .bench_table import environment
from .configs import CONFIGS


def steps_for(config, backend: str, device: str) -> dict[str, GraphedMetaStep]:
    steps = {}
    for name in ("eager", "graphed"):
        learner = mf.MAML(config.make_net(device), inner_lr=config.inner_lr, inner_steps=config.inner_steps,
                          backend=backend, step_metrics=False)
        lr = torch.tensor(1e-3, device=device)
        optimizer = torch.optim.Adam(learner.parameters(), lr=lr, fused=True,
                                     **({"capturable": True} if device == "cuda" else {}))
        options = {"enabled": False} if name == "eager" else (
            {"warmup": 3} if device == "cuda" else {"warmup": 1, "backend": EmulatedGraphBackend()})
        steps[name] = GraphedMetaStep(learner, optimizer, **options)
    return steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="omniglot_5w1s", choices=list(CONFIGS))
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--tasks", type=int, default=None, help="override the configuration's meta-batch size")
    parser.add_argument("--out", default=None, help="write the raw times as JSON here")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = CONFIGS[args.config]
    if args.tasks is not None:
        config = dataclasses.replace(config, tasks=args.tasks)
    batch = config.make_batch(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = {}
    try:
        for name, step in steps_for(config, args.backend, device).items():
            for _ in range(5):  # warm-up (and, graphed, capture)
                step(batch)
            sync()
            times[name] = []
            for _ in range(args.rounds):
                start = time.perf_counter()
                step(batch)
                sync()
                times[name].append((time.perf_counter() - start) * 1e3)
    except HostSyncError as error:
        print(f"not capture-safe on {device} (issue 15): {error}", file=sys.stderr)
        return 1
    eager, graphed = (statistics.median(times[name]) for name in ("eager", "graphed"))
    emulated = "" if device == "cuda" else " (CPU emulator: a dry run, not a measurement)"
    print(f"{args.config} (T={config.tasks}, {config.inner_steps} inner steps, backend {args.backend!r}) on {device}: "
          f"eager {eager:.3f} ms, graphed {graphed:.3f} ms, speed-up {eager / graphed:.2f}x{emulated}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": environment(device), "config": dataclasses.asdict(config), "backend": args.backend,
                       "ms": times}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
