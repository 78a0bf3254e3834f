"""Soak: a CPU training run with periodic evaluation and checkpoints, its resident memory recorded.

    python benchmarks/soak.py --minutes 5 --out benchmarks/results/soak.json

Trains MAML on the bundled Omniglot (5-way 1-shot, a small conv4, second order) with validation
every ``--val-every`` iterations and a checkpoint every ``--checkpoint-every``, for ``--minutes``,
while a thread reads this process's RSS (``/proc/self/status`` VmRSS) every ``--sample-s`` seconds.
The JSON holds every sample (seconds, RSS in MiB, iteration) and a summary: RSS at the end of
warm-up, at the end, the growth between them and its slope (least squares over the samples after
warm-up, MiB per minute). tests/test_soak.py runs the same for a few seconds and bounds the growth.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def soak(seconds: float, logdir: str | Path, *, warmup_s: float | None = None, sample_s: float = 1.0,
         hidden: int = 16, meta_batch_size: int = 4, val_every: int = 20, val_episodes: int = 16,
         checkpoint_every: int = 10, threads: int = 1, leak_bytes_per_step: int = 0) -> dict:
    """Train for `seconds` (wall clock), sampling RSS; returns the samples and a summary.
    `leak_bytes_per_step` > 0 keeps that many bytes alive per step (a deliberate leak, to show the
    measurement catches one)."""
    import torch

    import maml_fast as mf
    from maml_fast.data import EpisodeSampler, Omniglot
    from maml_fast.trainer import Trainer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    warmup_s = seconds / 4 if warmup_s is None else warmup_s
    learner = mf.MAML(mf.models.conv4(1, 5, hidden=hidden), inner_lr=0.4, inner_steps=1)
    train = EpisodeSampler(Omniglot(split="train"), ways=5, shots=1, queries=5, meta_batch_size=meta_batch_size,
                           seed=0)
    val = EpisodeSampler(Omniglot(split="test"), ways=5, shots=1, queries=5, meta_batch_size=meta_batch_size,
                         seed=1)
    trainer = Trainer(learner, train, iterations=10**9, logdir=logdir, log_every=5, checkpoint_every=checkpoint_every,
                      progress=False, val_source=val, val_every=val_every, val_episodes=val_episodes,
                      time_limit=seconds)
    leaked: list[bytearray] = []
    if leak_bytes_per_step:
        step = trainer._step

        def leaky_step():
            leaked.append(bytearray(os.urandom(16)) * (leak_bytes_per_step // 16))
            step()

        trainer._step = leaky_step
    samples: list[dict] = []
    stop = threading.Event()
    start = time.monotonic()

    def sample() -> None:
        while True:
            samples.append({"t_s": round(time.monotonic() - start, 3), "rss_mib": round(rss_mib(), 2),
                            "iteration": trainer.iteration})
            if stop.wait(sample_s):
                break

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = trainer.train()
    finally:
        stop.set()
        sampler.join()
        trainer.close()
    after = [s for s in samples if s["t_s"] >= warmup_s]
    if len(after) < 2:
        raise RuntimeError(f"only {len(after)} RSS samples after the {warmup_s} s warm-up: run longer")
    ts = [s["t_s"] for s in after]
    rs = [s["rss_mib"] for s in after]
    t_mean, r_mean = sum(ts) / len(ts), sum(rs) / len(rs)
    slope = sum((t - t_mean) * (r - r_mean) for t, r in zip(ts, rs)) / max(sum((t - t_mean) ** 2 for t in ts), 1e-12)
    metrics = (Path(logdir) / "metrics.jsonl").read_text().splitlines()
    return {
        "config": {"seconds": seconds, "warmup_s": warmup_s, "sample_s": sample_s, "hidden": hidden,
                   "meta_batch_size": meta_batch_size, "val_every": val_every, "val_episodes": val_episodes,
                   "checkpoint_every": checkpoint_every, "threads": threads, "leak_bytes_per_step": leak_bytes_per_step,
                   "torch": torch.__version__},
        "summary": {
            "iterations": result.iteration, "steps_per_s": round(result.steps_per_s, 2),
            "validations": sum('"kind": "val"' in line for line in metrics),
            "checkpoints_written": result.iteration // checkpoint_every,
            "rss_start_mib": samples[0]["rss_mib"], "rss_after_warmup_mib": after[0]["rss_mib"],
            "rss_end_mib": after[-1]["rss_mib"], "rss_max_after_warmup_mib": max(rs),
            "growth_after_warmup_mib": round(after[-1]["rss_mib"] - after[0]["rss_mib"], 2),
            "max_growth_after_warmup_mib": round(max(rs) - after[0]["rss_mib"], 2),
            "slope_mib_per_min": round(slope * 60, 3),
        },
        "samples": samples,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--warmup-minutes", type=float, default=None, help="default: a quarter of --minutes, at most 2")
    parser.add_argument("--sample-s", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/soak.json")
    args = parser.parse_args(argv)
    seconds = args.minutes * 60
    warmup = min(seconds / 4, 120) if args.warmup_minutes is None else args.warmup_minutes * 60
    with tempfile.TemporaryDirectory(prefix="maml-fast-soak-") as logdir:
        record = soak(seconds, logdir, warmup_s=warmup, sample_s=args.sample_s, threads=args.threads)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record["summary"], indent=1))
    print(f"samples: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
