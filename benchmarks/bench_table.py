"""Print the meta-step ratio table: every peer on every configuration, timed side by side in one
process (rounds interleaved across peers so drift on a shared machine hits all of them alike), and
write the raw numbers with the machine, torch version and commit as JSON.

    python -m benchmarks.bench_table [--configs omniglot_5w1s] [--rounds 7] [--replays 50] [--out x.json]

Peers (benchmarks/configs.py): the eager ones ("loop", "vmap", "functorch", "torch", "fused", "triton") time
the trainer's MetaStep per call; the graphed ones ("vmap+graph", "torch+graph", "fused+graph",
"triton+graph", CUDA only) time replays of the same step captured whole as one CUDA graph
(`GraphedMetaStep`: the optimizer step included; a call is the batch's copy into the graph's static inputs and
one replay, as in training), the median of >= --replays replays after the warm-up and the capture. A peer
that cannot run on the device is listed with the reason and not timed.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from .configs import (CONFIGS, GRAPHED_PEERS, PEERS, available_peers, base_peer, is_graphed, meta_step,
                      unavailable_reason, warmup_calls)


#: Environment variables that choose or tune the CPU allocator (glibc's MALLOC_* too): recorded with every
#: table, since they move CPU step times by 10% and more (benchmarks/RESULTS.md).
ALLOCATOR_ENV = ("THP_MEM_ALLOC_ENABLE", "GLIBC_TUNABLES", "LD_PRELOAD")


#: glibc's mallopt parameters (malloc.h) and the values `--steady-allocator` pins them to: mmap only above 32 MiB
#: (glibc's largest threshold) and never give the heap's top back to the kernel.
MALLOPT_CODES = {"M_TRIM_THRESHOLD": -1, "M_MMAP_THRESHOLD": -3}
STEADY_MALLOPT = {"M_MMAP_THRESHOLD": 32 * 2**20, "M_TRIM_THRESHOLD": 2**31 - 1}


def steady_allocator() -> dict[str, int]:
    """Pin glibc's mmap and trim thresholds for the rest of the process (as MALLOC_MMAP_THRESHOLD_ and
    MALLOC_TRIM_THRESHOLD_ would at start-up). Freed memory then stays in the heap instead of faulting in
    again, and one peer's allocations no longer move the dynamic thresholds the next peer runs under
    (benchmarks/RESULTS.md: vmap's time moved by ~12% with the fused peer's allocations). Returns what
    it set; raises RuntimeError where the C library has no mallopt or refuses a value."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallopt"):
        raise RuntimeError("--steady-allocator needs glibc's mallopt, which this C library does not have")
    for name, value in STEADY_MALLOPT.items():
        if libc.mallopt(MALLOPT_CODES[name], value) != 1:
            raise RuntimeError(f"mallopt({name}, {value}) was refused")
    return dict(STEADY_MALLOPT)


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
        "allocator_env": {name: value for name, value in os.environ.items()
                          if name in ALLOCATOR_ENV or name.startswith("MALLOC_")},
    }


def set_up(config, peers, device, sync) -> tuple[dict, dict[str, str]]:
    """Each peer's step, warmed up: allocator, oneDNN/cuDNN plans, lowering, Triton compilation; a graphed
    peer's eager warm-ups, its capture and one replay. A peer whose set-up fails (a graphed step that does
    not capture: a host read found by GraphedMetaStep's check, an error of the CUDA capture; a kernel that
    does not compile) is left out with the error, which the table reports: on a time-limited GPU run one
    peer's failure must not cost the others' numbers."""
    steps, failed = {}, {}
    for peer in peers:
        try:
            step = meta_step(peer, config, device)
            for _ in range(warmup_calls(peer)):
                step()
            sync()
        except Exception as error:  # noqa: BLE001  (reported, see above)
            failed[peer] = f"{type(error).__name__}: {error}"
            continue
        steps[peer] = step
    return steps, failed


def time_peers(steps: dict, rounds: int, replays: int, sync, clock=time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call of each step, rounds interleaved across peers; in each round an eager peer runs
    once and a graphed peer ceil(replays / rounds) times, so that it gets >= `replays` samples."""
    per_round = math.ceil(replays / rounds)
    times = {peer: [] for peer in steps}
    for _ in range(rounds):
        for peer, step in steps.items():
            for _ in range(per_round if is_graphed(peer) else 1):
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
    parser.add_argument("--rounds", type=int, default=7, help="timed steps of each eager peer")
    parser.add_argument("--replays", type=int, default=50, help="timed replays of each graphed peer (after warm-up)")
    parser.add_argument("--tasks", type=int, help="override the configurations' meta-batch size (dry runs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--steady-allocator", action="store_true",
                        help="pin glibc's mmap and trim thresholds first (steadier CPU times and ratios; recorded)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time the process's CPU time instead of the wall clock (CPU only: on a shared machine "
                             "other jobs then cost less accuracy; use with --threads 1)")
    args = parser.parse_args(argv)
    if args.cpu_time and args.device != "cpu":
        parser.error("--cpu-time measures CPU runs only")
    if args.threads:
        torch.set_num_threads(args.threads)
    mallopt = steady_allocator() if args.steady_allocator else {}
    unavailable = {peer: unavailable_reason(peer, args.device) for peer in PEERS + GRAPHED_PEERS}
    if args.peers:
        refused = {peer: unavailable_reason(peer, args.device) for peer in args.peers}
        refused = [f"{peer}: {reason}" for peer, reason in refused.items() if reason]
        if refused:
            parser.error(f"cannot time on {args.device}: " + "; ".join(refused))
    else:
        args.peers = available_peers(args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    results = {"environment": {**environment(args.device), "mallopt": mallopt},
               "clock": "process CPU time" if args.cpu_time else "wall", "configs": {}}
    print(f"# {results['environment']}")
    for peer, reason in unavailable.items():
        if reason and peer not in args.peers:
            print(f"# not timed: {peer}: {reason}")
    for name in args.configs:
        config = CONFIGS[name] if args.tasks is None else dataclasses.replace(CONFIGS[name], tasks=args.tasks)
        steps, failed = set_up(config, args.peers, args.device, sync)
        times = time_peers(steps, args.rounds, args.replays, sync,
                           time.process_time if args.cpu_time else time.perf_counter)
        medians = {peer: statistics.median(t) for peer, t in times.items()}
        graphs = {peer: dataclasses.asdict(step.func.stats) for peer, step in steps.items() if is_graphed(peer)}
        results["configs"][name] = {"tasks": config.tasks, "median_s": medians, "times_s": times,
                                    "graph_stats": graphs, "failed": failed}
        print(f"\n## {name} (T={config.tasks}; median ms of {args.rounds} steps, graphed peers of >= {args.replays} "
              "replays; ratio = peer time / this time)")
        print("| backend | ms | vs loop | vs vmap | vs functorch | vs eager |")
        print("|---|---|---|---|---|---|")
        for peer, median in medians.items():
            ratios = [f"{medians[base] / median:.2f}x" if base in medians else "-"
                      for base in ("loop", "vmap", "functorch", base_peer(peer) if is_graphed(peer) else None)]
            print(f"| {peer} | {median * 1e3:.2f} | " + " | ".join(ratios) + " |")
        for peer, stats in graphs.items():
            print(f"# {peer}: {stats}")
        for peer, error in failed.items():
            print(f"# {peer} failed in its set-up, not timed: {error}")
        if args.out:  # after every configuration: a run stopped by a time limit keeps what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2))
    if args.out:
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
