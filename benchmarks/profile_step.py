"""Per-kernel GPU time of one graphed meta-step: `torch.profiler` around one replay of a peer's captured
step (benchmarks/configs.py; default "fused+graph" on MiniImageNet 5w1s), the top kernels by GPU time
written as a table.

    python -m benchmarks.profile_step [--config miniimagenet_5w1s] [--peer fused+graph] [--rows 25] [--out f.txt]
    python -m benchmarks.profile_step --dry-run     # CPU: one eager step of the peer's backend, tiny sizes

The dry run (benchmarks/gpu_check.sh's CPU rehearsal) profiles CPU ops instead of kernels, through the
same path: profile, keep the events of the timed device, rank them by their own time, write the table.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import EventList
from torch.profiler import ProfilerActivity, profile

from .bench_table import environment
from .configs import CONFIGS, base_peer, is_graphed, meta_step, unavailable_reason, warmup_calls

# A MiniImageNet-shaped step small enough for a CPU rehearsal (4 max-pools still leave a 1x1 map).
DRY_RUN_SIZES = {"tasks": 2, "image_size": 20, "queries_per_class": 2}


def kernel_table(step, device: str, rows: int) -> tuple[str, int, float]:
    """(the top `rows` events of one call of `step` by their own time on `device`, the number of events
    recorded there, their total time in ms). On CUDA the events are the kernels (a graph replay's too)."""
    cuda = device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with profile(activities=activities) as prof:
        step()
        sync()
    timed = DeviceType.CUDA if cuda else DeviceType.CPU
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = EventList([e for e in prof.key_averages() if e.device_type == timed])
    total_us = sum(getattr(e, key) for e in events)
    return events.table(sort_by=key, row_limit=rows), sum(e.count for e in events), total_us / 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="miniimagenet_5w1s", choices=list(CONFIGS))
    parser.add_argument("--peer", default="fused+graph")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--dry-run", action="store_true", help="CPU, eager, tiny sizes: exercise the script")
    parser.add_argument("--out", type=Path, help="write the table here too")
    args = parser.parse_args(argv)
    config, peer, device = CONFIGS[args.config], args.peer, "cuda"
    if args.dry_run:
        config, peer, device = dataclasses.replace(config, **DRY_RUN_SIZES), base_peer(peer), "cpu"
    reason = unavailable_reason(peer, device)
    if reason:
        print(f"profile_step: cannot run {peer!r} on {device}: {reason}", file=sys.stderr)
        return 2
    step = meta_step(peer, config, device)
    for _ in range(warmup_calls(peer)):  # warm-up (graphed: capture and one replay)
        step()
    table, count, total_ms = kernel_table(step, device, args.rows)
    what = "kernels" if device == "cuda" else "CPU ops (dry run)"
    graph = f", graph {dataclasses.asdict(step.func.stats)}" if is_graphed(peer) else ""
    text = (f"# {environment(device)}\n# {args.config} (T={config.tasks}), peer {peer}, one "
            f"{'replay' if is_graphed(peer) else 'eager step'}{graph}: {count} {what}, {total_ms:.3f} ms "
            f"in all; top {args.rows} by own time\n{table}")
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
