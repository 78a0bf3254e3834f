"""Count the kernel-launching ops of one second-order meta-step, per configuration and backend (CPU).

    OMP_NUM_THREADS=1 python -m benchmarks.op_counts [--out op_counts.json] [--configs omniglot_5w1s ...]

One meta-step is the inner loop, the query loss and ``loss.backward()`` of ``mf.MAML(..., step_metrics=False)``
on a `benchmarks.configs` configuration; it is counted after one warm-up step, under a TorchDispatchMode.
Counted: every op reaching the mode except views (``func.is_view``) and the metadata/allocation-only ops in
`NOT_LAUNCHING`. A compiled ``maml_fast::*`` op counts as one op (the kernels it runs inside are not seen);
those are also reported on their own. Backends: the available ones among `BACKENDS`; "cuda" (the old name of
"fused") is counted once, as "fused", when both are available; Triton (CUDA or TRITON_INTERPRET only) is skipped.
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import maml_fast as mf

from .configs import CONFIGS

BACKENDS = ("loop", "vmap", "torch", "cuda", "fused", "triton")
DEFAULT_CONFIGS = ("omniglot_5w1s", "miniimagenet_5w1s")
aten = torch.ops.aten
# Ops that only change metadata, alias or allocate (no kernel launch) but are not all marked as views.
NOT_LAUNCHING = {aten.detach, aten.alias, aten._reshape_alias, aten.view, aten._unsafe_view, aten.as_strided,
                 aten.t, aten.transpose, aten.permute, aten.expand, aten.unsqueeze, aten.squeeze, aten.slice,
                 aten.select, aten.split, aten.unbind, aten.lift_fresh, aten.sym_size, aten.is_same_size,
                 aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (func.is_view or func.overloadpacket in NOT_LAUNCHING):
            self.counts[str(func)] += 1  # e.g. "aten.convolution.default", "maml_fast.direct_conv2d.default"
        return func(*args, **(kwargs or {}))


def backends_to_count() -> list[str]:
    try:
        from maml_fast.backends import available_backends
    except ImportError:
        from maml_fast import available_backends
    reasons = available_backends("cpu")
    names = [name for name in BACKENDS if name != "triton" and name in reasons and not reasons[name]]
    if "cuda" in names and "fused" in names:
        names.remove("cuda")
    return names


def count_step(backend: str, config) -> Counter:
    net, batch = config.make_net(), config.make_batch()
    learner = mf.MAML(net, inner_lr=config.inner_lr, inner_steps=config.inner_steps, backend=backend,
                      step_metrics=False)

    def step():
        learner.zero_grad(set_to_none=True)
        learner(batch).loss.backward()

    step()  # warm-up
    with OpCounter() as counter:
        step()
    return counter.counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the counts (with commit, torch version, date) as JSON here")
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), choices=sorted(CONFIGS))
    args = parser.parse_args(argv)
    print(f"maml_fast from {mf.__file__}", file=sys.stderr)
    backends = backends_to_count()
    results = {}
    for name in args.configs:
        results[name] = {}
        for backend in backends:
            counts = count_step(backend, CONFIGS[name])
            compiled = sum(n for op, n in counts.items() if op.startswith("maml_fast."))
            results[name][backend] = {"total": sum(counts.values()), "maml_fast": compiled,
                                      "ops": dict(counts.most_common())}
            print(f"{name} {backend}: {sum(counts.values())} ops", file=sys.stderr)

    print("Kernel-launching ops of one meta-step: total (of which compiled maml_fast ops)\n")
    print("| config | " + " | ".join(backends) + " |")
    print("|---|" + "---:|" * len(backends))
    for name, row in results.items():
        print(f"| {name} | " + " | ".join(f"{r['total']} ({r['maml_fast']})" for r in row.values()) + " |")

    if args.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        meta = {"commit": commit, "torch": torch.__version__,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "device": "cpu", "counts": results}
        with open(args.out, "w") as f:
            json.dump(meta, f, indent=1)


if __name__ == "__main__":
    main()
