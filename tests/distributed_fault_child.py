"""One rank of the 2-process CPU runs that tests/test_distributed_faults.py breaks.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/distributed_fault_child.py MODE LOGDIR

Joins the gloo process group as torchrun would (`DistributedContext.from_environment`, collective
timeout ``TIMEOUT_S``) and trains the tiny run of `build` in LOGDIR (resuming from its checkpoint).
Lines written to stdout (one write each):

    start <iteration>            training starts (resumed) at this iteration
    done <iteration> <run> <sha> training completed; <sha>: SHA-256 of the final parameters' bytes
                                 (also saved to LOGDIR/final.<rank>.pt)
    error <Type> <message>       training raised (the message on one line)

MODE: ``slow`` (every step sleeps ``STEP_SLEEP_S``, so the test can kill a rank mid-training),
``fast``, or ``full_disk`` (rank 0's checkpoint writes fail with ENOSPC; then rank 0 stays alive,
as under a launcher or a notebook that handles the error, until LOGDIR/release appears).
"""
from __future__ import annotations

import errno
import hashlib
import os
import sys
import time
from pathlib import Path

ITERATIONS = 40
CHECKPOINT_EVERY = 4
TASKS = 3
STEP_SLEEP_S = 0.05
TIMEOUT_S = float(os.environ.get("FAULT_TIMEOUT_S", "60"))  # the collective timeout


def emit(line: str) -> None:
    os.write(1, (line + "\n").encode())


def build(seed: int = 0):
    """tests/test_distributed.py's learner and episode source, one inner step, TASKS tasks."""
    from test_distributed import setup

    return setup(seed, inner_steps=1, tasks=TASKS)


def parameter_sha(learner) -> str:
    digest = hashlib.sha256()
    for name, param in sorted(learner.state_dict().items()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(mode: str, logdir: str) -> int:
    import torch

    torch.set_num_threads(1)
    from maml_fast import checkpoint_io
    from maml_fast.distributed import DistributedContext
    from maml_fast.trainer import Trainer

    ctx = DistributedContext.from_environment(device="cpu", timeout_s=TIMEOUT_S)
    learner, source = build()
    trainer = Trainer(learner, source, iterations=ITERATIONS, logdir=logdir, checkpoint_every=CHECKPOINT_EVERY,
                      log_every=2, progress=False, distributed=ctx, resume=True)
    emit(f"start {trainer.iteration}")
    if mode == "slow":
        step = trainer._step

        def slow_step():
            time.sleep(STEP_SLEEP_S)
            step()

        trainer._step = slow_step
    if mode == "full_disk" and ctx.is_main:
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        checkpoint_io.open = full
    try:
        result = trainer.train()
    except Exception as error:  # reported, then (rank 0 under full_disk) stay alive
        emit(f"error {type(error).__name__} {' '.join(str(error).split())}")
        if mode == "full_disk" and ctx.is_main:
            deadline = time.monotonic() + TIMEOUT_S
            while not (Path(logdir) / "release").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        os._exit(1)  # no destroy_process_group: it could wait on the other rank
    torch.save({n: t.detach().clone() for n, t in learner.state_dict().items()}, Path(logdir) / f"final.{ctx.rank}.pt")
    emit(f"done {result.iteration} {result.iterations_run} {parameter_sha(learner)}")
    ctx.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
