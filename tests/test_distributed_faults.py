"""Distributed faults (issue 14, item 5), 2 gloo processes on the CPU started as torchrun would
(tests/distributed_fault_child.py): a rank killed mid-training makes the other exit with a clear
error within a bounded time and the restarted run resumes from the last checkpoint, ending where an
uninterrupted run ends; a CheckpointWriteError on rank 0 stops the other rank instead of leaving it
at a barrier."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from maml_fast.checkpoint_io import load_checkpoint
from maml_fast.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distributed_fault_child as child  # noqa: E402

CHILD = Path(__file__).resolve().parent / "distributed_fault_child.py"
EXIT_BOUND_S = 20.0  # a surviving rank must have stopped this long after the fault (timeout: 60 s)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Ranks:
    """The 2 processes of one run; stdout of rank r in logdir/rank<r>.<launch>.out."""

    def __init__(self, mode: str, logdir: Path, launch: int, timeout_s: float = 60):
        self.outs = [logdir / f"rank{r}.{launch}.out" for r in range(2)]
        port = free_port()
        env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "FAULT_TIMEOUT_S": str(timeout_s), "PYTHONPATH": os.pathsep.join(sys.path)}
        self.procs = []
        for rank in range(2):
            with open(self.outs[rank], "wb") as out:
                self.procs.append(subprocess.Popen([sys.executable, str(CHILD), mode, str(logdir)], stdout=out,
                                                   stderr=subprocess.STDOUT, env={**env, "RANK": str(rank),
                                                                                  "LOCAL_RANK": str(rank)}))

    def lines(self, rank: int) -> list[str]:
        return self.outs[rank].read_text(errors="replace").splitlines()

    def wait_for_line(self, rank: int, prefix: str, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in self.lines(rank) if line.startswith(prefix)]
            if found:
                return found[0]
            time.sleep(0.05)
        return None

    def signal_rank_1_and_wait_for_rank_0(self, signum: int, what: str) -> tuple[int, str, float]:
        """Send `signum` to rank 1; rank 0 must exit within EXIT_BOUND_S. Returns its exit code, its
        error line and the seconds it took."""
        os.kill(self.procs[1].pid, signum)
        sent = time.monotonic()
        try:
            code = self.procs[0].wait(timeout=EXIT_BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 still runs {EXIT_BOUND_S} s after rank 1 {what} (a hang): {self.lines(0)}")
        finally:
            if signum == signal.SIGSTOP:
                os.kill(self.procs[1].pid, signal.SIGCONT)
        took = time.monotonic() - sent
        error = self.wait_for_line(0, "error ", 1)
        assert code == 1 and error is not None, self.lines(0)
        assert error.startswith("error DistributedError rank 0 of 2:"), error
        return code, error, took

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def runs():
    started: list[Ranks] = []
    yield started
    for ranks in started:
        ranks.kill_all()


def uninterrupted_single_process() -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    learner, source = child.build()
    Trainer(learner, source, iterations=child.ITERATIONS, progress=False).train()
    return {n: t.detach().clone() for n, t in learner.state_dict().items()}


def test_a_killed_rank_stops_the_other_and_the_run_resumes(tmp_path, runs):
    runs.append(ranks := Ranks("slow", tmp_path, 0))
    checkpoint = tmp_path / "checkpoint.pt"
    deadline = time.monotonic() + 60
    while not (tmp_path / "checkpoint.prev.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.02)  # two checkpoints written: training is well under way
    assert checkpoint.exists(), "\n".join(ranks.lines(0) + ranks.lines(1))
    time.sleep(0.1)
    _, error, stopped_after = ranks.signal_rank_1_and_wait_for_rank_0(signal.SIGKILL, "was killed")
    assert "another rank has died" in error and "resume from the last checkpoint" in error, error
    print(f"rank 0 stopped {stopped_after:.2f} s after rank 1 was killed: {error}")
    resumed_from = load_checkpoint(checkpoint)["iteration"]
    assert 0 < resumed_from < child.ITERATIONS

    runs.append(again := Ranks("fast", tmp_path, 1))
    for rank in range(2):
        assert again.procs[rank].wait(timeout=90) == 0, again.lines(rank)
    for rank in range(2):
        assert f"start {resumed_from}" in again.lines(rank)
        done = again.wait_for_line(rank, "done ", 1).split()
        assert done[1:3] == [str(child.ITERATIONS), str(child.ITERATIONS - resumed_from)]
    sha = {again.wait_for_line(rank, "done ", 1).split()[3] for rank in range(2)}
    assert len(sha) == 1  # the ranks stay identical
    # bit for bit what the same 2 ranks give without the kill
    (straight_dir := tmp_path / "uninterrupted").mkdir()
    runs.append(straight := Ranks("fast", straight_dir, 2))
    assert straight.procs[0].wait(timeout=90) == 0 and straight.procs[1].wait(timeout=90) == 0, straight.lines(0)
    assert straight.wait_for_line(0, "done ", 1).split()[3] in sha
    final = torch.load(tmp_path / "final.0.pt", weights_only=True)
    for name, expected in uninterrupted_single_process().items():  # 2 ranks = 1 process up to rounding
        torch.testing.assert_close(final[name], expected, rtol=1e-10, atol=1e-13, msg=name)


def test_a_hung_rank_stops_the_other_after_the_timeout(tmp_path, runs):
    """A rank that stops answering (SIGSTOP) without dying: the other stops at the collective timeout."""
    runs.append(ranks := Ranks("slow", tmp_path, 0, timeout_s=3))
    assert ranks.wait_for_line(1, "start ", 60) is not None and ranks.wait_for_line(0, "start ", 60) is not None
    time.sleep(0.3)
    _, error, stopped_after = ranks.signal_rank_1_and_wait_for_rank_0(signal.SIGSTOP, "stopped answering")
    assert "for longer than 3 s" in error, error
    print(f"rank 0 stopped {stopped_after:.2f} s after rank 1 hung: {error}")


def test_a_checkpoint_write_error_on_rank_0_stops_every_rank(tmp_path, runs):
    runs.append(ranks := Ranks("full_disk", tmp_path, 0))
    try:
        error = ranks.wait_for_line(0, "error ", 45)
        assert error is not None and error.startswith("error CheckpointWriteError"), ranks.lines(0)
        assert "No space left on device" in error
        # rank 1 was not left waiting at a barrier (its collective timeout is 60 s): it stopped too
        started = time.monotonic()
        error = ranks.wait_for_line(1, "error ", EXIT_BOUND_S)
        assert error is not None, f"rank 1 still waits {EXIT_BOUND_S} s after rank 0 failed: {ranks.lines(1)}"
        assert error.startswith("error CheckpointWriteError rank 0 failed writing the checkpoint "), error
        assert f"{tmp_path / 'checkpoint.pt'} at iteration {child.CHECKPOINT_EVERY}" in error, error
        print(f"rank 1 stopped {time.monotonic() - started:.2f} s after rank 0's error: {error}")
    finally:
        (tmp_path / "release").touch()
    assert ranks.procs[1].wait(timeout=30) == 1 and ranks.procs[0].wait(timeout=30) == 1
