"""Peak memory of one second-order meta-step against the number of inner steps K, with and without
`checkpoint_inner_steps`. Each measurement runs in a fresh process: on the CPU the figure is the rise
of the process's peak resident memory during the step (getrusage ru_maxrss); on CUDA it is
torch.cuda.max_memory_allocated over the step.

    python -m benchmarks.memory [--config omniglot_5w1s] [--steps 1 2 5 10] [--out results/memory.json]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

import maml_fast as mf

from .bench_table import environment
from .configs import CONFIGS


def measure(config_name: str, steps: int, checkpoint: bool, device: str) -> dict:
    config = CONFIGS[config_name]
    net = config.make_net(device)
    batch = config.make_batch(device)
    learner = mf.MAML(net, inner_lr=config.inner_lr, inner_steps=steps, backend="torch",
                      checkpoint_inner_steps=checkpoint, step_metrics=False)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    learner(batch).loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"steps": steps, "checkpoint": checkpoint, "peak_bytes": peak}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="omniglot_5w1s", choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 5, 10])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", nargs=2, metavar=("STEPS", "CHECKPOINT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.config, int(args.child[0]), args.child[1] == "1", args.device)))
        return
    rows = []
    for steps in args.steps:
        for checkpoint in (False, True):
            child = subprocess.run(
                [sys.executable, "-m", "benchmarks.memory", "--config", args.config, "--device", args.device,
                 "--child", str(steps), str(int(checkpoint))],
                capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent)
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(f"K={steps:2d} checkpoint={checkpoint!s:5}  peak {rows[-1]['peak_bytes'] / 2**20:8.1f} MiB", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"environment": environment(args.device), "config": args.config,
                                        "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
