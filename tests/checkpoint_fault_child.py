"""The training processes that tests/test_checkpoint_faults.py kills: a zygote that forks them.

    python tests/checkpoint_fault_child.py        # then one JSON job per line on stdin

The zygote imports torch and maml_fast once and computes nothing, so forking it is safe and a
training process starts in milliseconds instead of seconds. Per job it forks one child, which
trains the tiny sinusoid run of `run_job` in ``job["logdir"]`` (resuming from its checkpoint, as
``maml-fast train`` does by default) and exits 0 when the run completes. The lines written to stdout:

    pid <pid>                  the zygote: a child started
    start <iteration>          the child: training starts (resumed) at this iteration
    warn <message>             the child: a warning while resuming (e.g. a CheckpointWarning)
    at <iteration>             the child: iteration ``job["report_at"]`` is done (the test kills it soon after)
    exit <pid> <status>        the zygote: the child ended (an os.waitpid status)

``job["kill"] = [event, k]`` makes the child SIGKILL itself at the k-th occurrence of `event`, a
moment inside the checkpoint or metrics writes that a timed kill would rarely hit (`KILL_EVENTS`).
"""
from __future__ import annotations

import io
import json
import os
import random
import signal
import sys
import traceback
import warnings

#: Moments a child can kill itself at (see `_arm`).
KILL_EVENTS = (
    "checkpoint_partial",     # torch.save has written half of the temporary file
    "before_keep_previous",   # the temporary file is complete and fsynced; nothing renamed yet
    "after_link",             # checkpoint.pt is hard-linked as the next checkpoint.prev.pt, not yet renamed
    "before_replace",         # checkpoint.prev.pt is in place; the new checkpoint.pt not yet
    "after_replace",          # the new checkpoint.pt is in place; the folder not yet fsynced
    "metrics_partial",        # half of a metrics.jsonl record is written
    "metrics_rewrite",        # resuming: the trimmed metrics.jsonl is written, not yet renamed
)

#: The run: the sinusoid preset made tiny, log and checkpoint intervals not multiples of each other.
RUN = dict(iterations=400, meta_batch_size=3, hidden=12, log_every=5, checkpoint_every=8, dtype="float64")


def emit(line: str) -> None:
    os.write(1, (line + "\n").encode())  # one unbuffered write: lines of processes do not interleave


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(event: str, k: int) -> None:
    """Make this process SIGKILL itself at the k-th occurrence of `event`."""
    import torch

    from maml_fast import checkpoint_io, trainer

    count = [0]

    def hit() -> bool:
        count[0] += 1
        return count[0] == k

    if event == "checkpoint_partial":
        real_save = torch.save

        def save(obj, file, *args, **kwargs):
            if not hit():
                return real_save(obj, file, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            file.write(data[: len(data) // 2])
            file.flush()
            os.fsync(file.fileno())
            _die()

        torch.save = save
    elif event == "before_keep_previous":
        real_keep = checkpoint_io.CheckpointFiles._keep_latest_as_previous

        def keep(self):
            if hit():
                _die()
            return real_keep(self)

        checkpoint_io.CheckpointFiles._keep_latest_as_previous = keep
    elif event == "after_link":
        real_link = os.link

        def link(src, dst, *args, **kwargs):
            real_link(src, dst, *args, **kwargs)
            if hit():
                _die()

        os.link = link
    elif event in ("before_replace", "metrics_rewrite"):
        real_replace = os.replace
        target = "checkpoint.pt" if event == "before_replace" else "metrics.jsonl"

        def replace(src, dst, *args, **kwargs):
            if os.path.basename(dst) == target and hit():
                _die()
            return real_replace(src, dst, *args, **kwargs)

        os.replace = replace
    elif event == "after_replace":
        real_fsync_folder = checkpoint_io._fsync_folder

        def fsync_folder(folder):
            if hit():
                _die()
            return real_fsync_folder(folder)

        checkpoint_io._fsync_folder = fsync_folder
    elif event == "metrics_partial":
        real_write = trainer.Trainer._write_record

        def write_record(self, record):
            if self.logdir is not None and hit():
                line = json.dumps(record) + "\n"
                with open(self.logdir / trainer.METRICS_NAME, "a") as file:
                    file.write(line[: len(line) // 2])
                    file.flush()
                    os.fsync(file.fileno())
                _die()
            return real_write(self, record)

        trainer.Trainer._write_record = write_record
    else:
        raise ValueError(f"unknown kill event {event!r}; known: {KILL_EVENTS}")


def run_job(job: dict) -> int:
    from maml_fast.presets import build_learner, build_source, get_preset
    from maml_fast.trainer import Trainer, read_latest_checkpoint

    if job.get("kill"):
        _arm(*job["kill"])
    config = get_preset("sinusoid").replace(**RUN)
    # Python reseeds `random` in every forked child; nothing in training draws from it, but the
    # checkpoint carries its state, which is compared too: start every run from the same one.
    random.seed(config.seed)
    learner = build_learner(config)
    source = build_source(config, "train")
    trainer = Trainer(learner, source, iterations=config.iterations, meta_lr=config.meta_lr,
                      logdir=job["logdir"], log_every=config.log_every, checkpoint_every=config.checkpoint_every,
                      progress=False, config=config.to_dict())
    with warnings.catch_warnings(record=True) as caught:  # as maml-fast train: resume from the newest good one
        warnings.simplefilter("always")
        found = read_latest_checkpoint(job["logdir"])
    for warning in caught:
        emit("warn " + str(warning.message).replace("\n", " "))
    if found is not None:
        trainer.load_checkpoint(*found)
    emit(f"start {trainer.iteration}")
    report_at = job.get("report_at")
    if report_at is not None:
        step = trainer._step

        def reporting_step():
            step()
            if trainer.iteration == report_at:
                emit(f"at {trainer.iteration}")

        trainer._step = reporting_step
    trainer.train()
    trainer.close()
    return 0


def main() -> None:
    import torch
    from torch.utils import tensorboard  # noqa: F401  (imported once here, not in every child)

    import maml_fast  # noqa: F401
    from maml_fast import presets, trainer  # noqa: F401

    torch.set_num_threads(1)
    while True:
        line = sys.stdin.readline()
        if not line or not line.strip():
            return
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = run_job(job)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        emit(f"pid {pid}")
        _, status = os.waitpid(pid, 0)
        emit(f"exit {pid} {status}")


if __name__ == "__main__":
    main()
