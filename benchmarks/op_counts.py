"""Count the kernel-launching ops of one second-order meta-step, per configuration and backend (CPU).

    OMP_NUM_THREADS=1 python -m benchmarks.op_counts [--out op_counts.json] [--configs omniglot_5w1s ...]

One meta-step is the inner loop, the query loss and ``loss.backward()`` of ``mf.MAML(..., step_metrics=False)``
on a `benchmarks.configs` configuration; it is counted after one warm-up step, under a TorchDispatchMode.
Counted: every op reaching the mode except views (``func.is_view``) and the metadata/allocation-only ops in
`NOT_LAUNCHING`. A compiled ``maml_fast::*`` op counts as one op (the kernels it runs inside are not seen);
those are also reported on their own. Backends: the available ones among `BACKENDS`; "cuda" (the old name of
"fused") is counted once, as "fused", when both are available; Triton (CUDA or TRITON_INTERPRET only) is skipped.

Per phase (`PHASES`): each counted op is charged to the phase the step is in when it runs. The phases are
marked by wrapping, for the counted step only, the learner's pieces (nothing on the normal path changes):
an inner step's forward and loss ("inner forward", up to its ``torch.autograd.grad``), that gradient
("inner backward"), the fast-weight update and the step sizes ("update"), the network and loss on the
query set outside the inner steps ("query forward"), ``loss.backward()`` ("meta-backward", including a
checkpointed step's recomputation), and the rest of the forward ("other": the label-range check, stacking
the per-step metrics, the objective's weights, the iteration counter).
"""
from __future__ import annotations

import argparse
import contextlib
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


PHASES = ("inner forward", "inner backward", "update", "query forward", "meta-backward", "other")


class OpCounter(TorchDispatchMode):
    """Counts kernel-launching ops by name (`counts`) and by the current phase (`phase_counts`; the
    phase is `phase`, set by `marked_phases`)."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()
        self.phase_counts = Counter()
        self.phase = "other"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (func.is_view or func.overloadpacket in NOT_LAUNCHING):
            self.counts[str(func)] += 1  # e.g. "aten.convolution.default", "maml_fast.direct_conv2d.default"
            self.phase_counts[self.phase] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def in_phase(self, phase: str, unless=("meta-backward",)):
        """The ops within count to `phase`, unless the step is already in one of `unless`."""
        if self.phase in unless:
            yield
            return
        saved, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = saved


def _marked(counter: OpCounter, phase: str, fn, unless):
    def marked(*args, **kwargs):
        with counter.in_phase(phase, unless):
            return fn(*args, **kwargs)
    return marked


class _QueryExecution:
    """An execution whose forward counts to "query forward" outside an inner step."""

    def __init__(self, execution, counter):
        self._execution, self.forward = execution, _marked(counter, "query forward", execution.forward,
                                                           ("meta-backward", "inner forward"))

    def __getattr__(self, name):
        return getattr(self._execution, name)


@contextlib.contextmanager
def marked_phases(counter: OpCounter):
    """Charge the ops of a meta-step to `PHASES` (see the module doc) while within."""
    from maml_fast import inner_loop, maml

    step_call, make_loop, grad = inner_loop.InnerStep.__call__, maml.MAML._inner_loop, torch.autograd.grad

    def inner_step(self, *args, **kwargs):
        with counter.in_phase("inner forward"):
            return step_call(self, *args, **kwargs)

    def inner_grad(*args, **kwargs):
        if counter.phase != "inner forward":  # (e.g. a checkpointed step's backward)
            return grad(*args, **kwargs)
        with counter.in_phase("inner backward"):
            result = grad(*args, **kwargs)
        counter.phase = "update"  # the rest of the inner step: step sizes and the update
        return result

    def inner_loop_of(self, *args, **kwargs):
        loop = make_loop(self, *args, **kwargs)
        loop.execution = _QueryExecution(loop.execution, counter)
        loop.loss = _marked(counter, "query forward", loop.loss, ("meta-backward", "inner forward"))
        loop.update = _marked(counter, "update", loop.update, ("meta-backward",))
        return loop

    inner_loop.InnerStep.__call__, maml.MAML._inner_loop, torch.autograd.grad = inner_step, inner_loop_of, inner_grad
    try:
        yield counter
    finally:
        inner_loop.InnerStep.__call__, maml.MAML._inner_loop, torch.autograd.grad = step_call, make_loop, grad


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


def count_step(backend: str, config, **maml_options) -> OpCounter:
    """The counter (``counts`` by op, ``phase_counts`` by phase) of one meta-step after a warm-up."""
    net, batch = config.make_net(), config.make_batch()
    options = {"inner_lr": config.inner_lr, "inner_steps": config.inner_steps, "backend": backend,
               "step_metrics": False, **maml_options}
    learner = mf.MAML(net, **options)
    counter = OpCounter()

    def step():
        learner.zero_grad(set_to_none=True)
        loss = learner(batch).loss
        with counter.in_phase("meta-backward"):
            loss.backward()

    step()  # warm-up
    with counter, marked_phases(counter):
        step()
    return counter


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
            counter = count_step(backend, CONFIGS[name])
            counts = counter.counts
            compiled = sum(n for op, n in counts.items() if op.startswith("maml_fast."))
            results[name][backend] = {"total": sum(counts.values()), "maml_fast": compiled,
                                      "phases": {phase: counter.phase_counts[phase] for phase in PHASES},
                                      "ops": dict(counts.most_common())}
            print(f"{name} {backend}: {sum(counts.values())} ops", file=sys.stderr)

    print("Kernel-launching ops of one meta-step: total (of which compiled maml_fast ops)\n")
    print("| config | " + " | ".join(backends) + " |")
    print("|---|" + "---:|" * len(backends))
    for name, row in results.items():
        print(f"| {name} | " + " | ".join(f"{r['total']} ({r['maml_fast']})" for r in row.values()) + " |")
    print("\nPer phase\n")
    print("| config | backend | " + " | ".join(PHASES) + " | total |")
    print("|---|---|" + "---:|" * (len(PHASES) + 1))
    for name, row in results.items():
        for backend, r in row.items():
            print(f"| {name} | {backend} | " + " | ".join(str(r["phases"][p]) for p in PHASES) + f" | {r['total']} |")

    if args.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        meta = {"commit": commit, "torch": torch.__version__,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "device": "cpu", "counts": results}
        with open(args.out, "w") as f:
            json.dump(meta, f, indent=1)


if __name__ == "__main__":
    main()
