"""Print the meta-step ratio table: every peer on every configuration, timed side by side in one
process (rounds interleaved across peers so drift on a shared machine hits all of them alike), and
write the raw numbers with the machine, torch version and commit as JSON.

    python -m benchmarks.bench_table [--configs omniglot_5w1s] [--rounds 7] [--out benchmarks/results/x.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from .configs import CONFIGS, available_peers, meta_step


def environment(device: str) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, cwd=Path(__file__).parent).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()} "
                  f"CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
        "commit": commit + ("+dirty" if dirty else ""), "date": datetime.date.today().isoformat(),
    }


def time_peers(config, peers, device, rounds, clock=time.perf_counter) -> dict[str, list[float]]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    steps = {peer: meta_step(peer, config, device) for peer in peers}
    for step in steps.values():  # warm-up: allocator, oneDNN/cuDNN plans, lowering
        step()
        sync()
    times = {peer: [] for peer in peers}
    for _ in range(rounds):
        for peer, step in steps.items():
            sync()
            start = clock()
            step()
            sync()
            times[peer].append(clock() - start)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["omniglot_5w1s", "miniimagenet_5w1s"], choices=list(CONFIGS))
    parser.add_argument("--peers", nargs="+", help="default: every peer available on the device")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time the process's CPU time instead of the wall clock (CPU only: on a shared machine "
                             "other jobs then cost less accuracy; use with --threads 1)")
    args = parser.parse_args(argv)
    if args.cpu_time and args.device != "cpu":
        parser.error("--cpu-time measures CPU runs only")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.peers = args.peers or available_peers(args.device)

    results = {"environment": environment(args.device), "clock": "process CPU time" if args.cpu_time else "wall",
               "configs": {}}
    print(f"# {results['environment']}")
    for name in args.configs:
        times = time_peers(CONFIGS[name], args.peers, args.device, args.rounds,
                           time.process_time if args.cpu_time else time.perf_counter)
        medians = {peer: statistics.median(t) for peer, t in times.items()}
        results["configs"][name] = {"median_s": medians, "times_s": times}
        print(f"\n## {name} (median of {args.rounds}, ms; ratio = peer time / this time)")
        print("| backend | ms | vs loop | vs vmap | vs functorch |")
        print("|---|---|---|---|---|")
        for peer, median in medians.items():
            ratios = [f"{medians[base] / median:.2f}x" if base in medians else "-" for base in ("loop", "vmap", "functorch")]
            print(f"| {peer} | {median * 1e3:.1f} | " + " | ".join(ratios) + " |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
