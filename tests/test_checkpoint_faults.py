"""Checkpoints that survive: the last two kept, corrupted or truncated ones passed over with a warning
(or a clear error when none loads), a full disk stopping the run with the earlier checkpoints
intact, and training killed with SIGKILL at 20 moments (checkpoint writes included) ending bit for
bit where an uninterrupted run ends."""
from __future__ import annotations

import errno
import io
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from maml_fast import checkpoint_io, cli
from maml_fast.checkpoint_io import CheckpointError, CheckpointWarning, CheckpointWriteError
from maml_fast.evaluation import read_jsonl
from maml_fast.trainer import Trainer, load_checkpoint

from test_trainer import sinusoid_setup, trainer_for

REPO = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).with_name("checkpoint_fault_child.py")
sys.path.insert(0, str(CHILD.parent))
import checkpoint_fault_child as child  # noqa: E402

#: Fields of a metrics record that are wall-clock measurements (everything else must match exactly).
TIMING_FIELDS = ("elapsed_s", "steps_per_s")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one CPU thread (conftest's `one_thread`)."""


# ------------------------------------------------------------------------------------ helpers
def corrupt(path: Path, how: str, seed: int = 0) -> None:
    """Damage a checkpoint file: "truncate" (to half), "empty", "garbage" (random bytes), or "flip"
    (one bit inside the largest tensor's data: torch.load alone loads that without complaint)."""
    data = bytearray(path.read_bytes())
    rng = random.Random(seed)
    if how == "truncate":
        data = data[: len(data) // 2]
    elif how == "empty":
        data = bytearray()
    elif how == "garbage":
        data = bytearray(rng.randbytes(len(data)))
    elif how == "flip":
        with zipfile.ZipFile(path) as archive:
            member = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        header = data[member.header_offset:member.header_offset + 30]
        start = member.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30],
                                                                                                   "little")
        data[start + rng.randrange(member.file_size)] ^= 1 << rng.randrange(8)
    else:
        raise ValueError(how)
    path.write_bytes(bytes(data))


def iteration_of(path: Path) -> int:
    return load_checkpoint(path)["iteration"]


def assert_equal_nested(a, b, where="checkpoint", skip=("elapsed_s",)):
    """Bitwise equality of two checkpoints (tensors by torch.equal, dtype included)."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            if key not in skip:
                assert_equal_nested(a[key], b[key], f"{where}[{key!r}]", skip)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_nested(x, y, f"{where}[{i}]", skip)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    else:
        assert a == b, where


def records_without_timing(logdir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in read_jsonl(logdir / "metrics.jsonl")]


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


# ------------------------------------------------------------------------------------ two kept
def test_the_last_two_checkpoints_are_kept(tmp_path):
    trainer_for(sinusoid_setup, tmp_path, 10, checkpoint_every=4).train()
    assert iteration_of(tmp_path / "checkpoint.pt") == 10  # the end
    assert iteration_of(tmp_path / "checkpoint.prev.pt") == 8
    assert temporaries(tmp_path) == []


@pytest.mark.parametrize("how", ["truncate", "flip", "empty", "garbage"])
def test_corrupted_latest_warns_and_resumes_from_the_previous(how, tmp_path):
    straight = trainer_for(sinusoid_setup, tmp_path / "straight", 12, checkpoint_every=4)
    straight.train()
    logdir = tmp_path / "run"
    first = trainer_for(sinusoid_setup, logdir, 12, checkpoint_every=4)
    first.total_iterations = 8
    first.train()
    corrupt(logdir / "checkpoint.pt", how)
    with pytest.warns(CheckpointWarning, match=r"checkpoint\.pt is corrupted or truncated.*resuming from the "
                                               r"previous checkpoint .*checkpoint\.prev\.pt \(iteration 4\)"):
        resumed = trainer_for(sinusoid_setup, logdir, 12, checkpoint_every=4, resume=True)
    assert resumed.iteration == 4
    resumed.total_iterations = 8
    resumed.train()  # overwrites the corrupted checkpoint.pt, keeps the good checkpoint.prev.pt
    assert (iteration_of(logdir / "checkpoint.pt"), iteration_of(logdir / "checkpoint.prev.pt")) == (8, 4)
    resumed.total_iterations = 12
    resumed.train()
    assert (iteration_of(logdir / "checkpoint.pt"), iteration_of(logdir / "checkpoint.prev.pt")) == (12, 8)
    assert_equal_nested(load_checkpoint(logdir / "checkpoint.pt"), load_checkpoint(tmp_path / "straight" / "checkpoint.pt"))


def test_a_flipped_bit_is_caught_by_the_crc_check(tmp_path, monkeypatch):
    """torch.load alone loads a checkpoint with a flipped bit in a tensor (wrong numbers, no error):
    the CRC check is what catches it."""
    trainer_for(sinusoid_setup, tmp_path, 4, checkpoint_every=4).train()
    path = tmp_path / "checkpoint.pt"
    good = torch.load(path, weights_only=True)
    corrupt(path, "flip")
    bad = torch.load(path, weights_only=True)  # no error ...
    with pytest.raises(AssertionError):  # ... but other numbers
        assert_equal_nested(good, bad)
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt is corrupted or truncated.*CRC-32"):
        load_checkpoint(path)


def test_neither_checkpoint_loads_is_a_clear_error(tmp_path):
    trainer_for(sinusoid_setup, tmp_path, 8, checkpoint_every=4).train()
    corrupt(tmp_path / "checkpoint.pt", "truncate")
    corrupt(tmp_path / "checkpoint.prev.pt", "flip")
    with pytest.raises(CheckpointError) as error:
        trainer_for(sinusoid_setup, tmp_path, 8, resume=True)
    message = str(error.value)
    assert f"{tmp_path / 'checkpoint.pt'} is corrupted" in message
    assert f"{tmp_path / 'checkpoint.prev.pt'} is corrupted" in message and "--no-resume" in message
    # only a corrupted checkpoint.pt (no checkpoint.prev.pt): the error says so
    (tmp_path / "checkpoint.prev.pt").unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint\.prev\.pt: does not exist.*--no-resume"):
        trainer_for(sinusoid_setup, tmp_path, 8, resume=True)
    # starting over replaces them
    trainer_for(sinusoid_setup, tmp_path, 8, checkpoint_every=4, resume=False).train()
    assert (iteration_of(tmp_path / "checkpoint.pt"), iteration_of(tmp_path / "checkpoint.prev.pt")) == (8, 4)


def test_a_fresh_run_never_falls_back_into_an_earlier_run(tmp_path):
    trainer_for(sinusoid_setup, tmp_path, 8, checkpoint_every=4).train()  # an earlier run: 8 and 4
    fresh = trainer_for(sinusoid_setup, tmp_path, 6, checkpoint_every=3, resume=False)
    fresh.total_iterations = 3
    fresh.train()  # its first checkpoint: the earlier run's checkpoint.prev.pt goes, its checkpoint.pt is replaced
    assert iteration_of(tmp_path / "checkpoint.pt") == 3 and not (tmp_path / "checkpoint.prev.pt").exists()
    corrupt(tmp_path / "checkpoint.pt", "truncate")
    with pytest.raises(CheckpointError):  # not a resume from the earlier run's iteration 4
        trainer_for(sinusoid_setup, tmp_path, 6, resume=True)


def test_a_checkpoint_missing_mid_rotation_resumes_from_the_previous(tmp_path):
    """Where hard links are not supported, checkpoint.pt is renamed to checkpoint.prev.pt before the
    new one is in place: a kill in between leaves only checkpoint.prev.pt."""
    trainer_for(sinusoid_setup, tmp_path, 8, checkpoint_every=4).train()
    (tmp_path / "checkpoint.pt").unlink()
    with pytest.warns(CheckpointWarning, match=r"checkpoint\.pt: does not exist"):
        assert trainer_for(sinusoid_setup, tmp_path, 8, resume=True).iteration == 4


def test_rotation_without_hard_links(tmp_path, monkeypatch):
    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(checkpoint_io.os, "link", no_links)
    trainer_for(sinusoid_setup, tmp_path, 12, checkpoint_every=4).train()
    assert (iteration_of(tmp_path / "checkpoint.pt"), iteration_of(tmp_path / "checkpoint.prev.pt")) == (12, 8)


# ------------------------------------------------------------------------------------ full disk
class _FullDisk(io.RawIOBase):
    """A file whose writes fail with ENOSPC once `room` bytes are written (the first bytes land)."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def writable(self):
        return True

    def write(self, data):
        if len(data) > self.room:
            self.file.write(bytes(data[: self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def flush(self):
        self.file.flush()

    def fileno(self):
        return self.file.fileno()

    def close(self):
        self.file.close()
        super().close()


def fill_the_disk_after(monkeypatch, room: int) -> None:
    """From now on the checkpoint writer's files hold `room` bytes, then the disk is full."""
    monkeypatch.setattr(checkpoint_io, "open", lambda path, mode="r", *a, **k: _FullDisk(open(path, mode, *a, **k), room),
                        raising=False)


@pytest.mark.parametrize("room", [0, 3000])
def test_full_disk_keeps_the_checkpoints_and_stops_with_a_clear_error(room, tmp_path, monkeypatch):
    trainer = trainer_for(sinusoid_setup, tmp_path, 12, checkpoint_every=4)
    trainer.total_iterations = 8
    trainer.train()
    before = {name: (tmp_path / name).read_bytes() for name in ("checkpoint.pt", "checkpoint.prev.pt")}
    fill_the_disk_after(monkeypatch, room)
    trainer.total_iterations = 12
    with pytest.raises(CheckpointWriteError) as error:
        trainer.train()
    message = str(error.value)
    assert f"could not write checkpoint {tmp_path / 'checkpoint.pt'}" in message
    assert "No space left on device" in message and error.value.errno == errno.ENOSPC
    assert f"{tmp_path / 'checkpoint.pt'} and {tmp_path / 'checkpoint.prev.pt'} are intact" in message
    assert trainer.iteration == 12  # it stopped at the first checkpoint after the disk filled
    monkeypatch.undo()
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert temporaries(tmp_path) == []  # the partial temporary file is gone (its space freed)
    assert trainer_for(sinusoid_setup, tmp_path, 12, resume=True).iteration == 8


def test_full_disk_through_the_cli(tmp_path, monkeypatch, capsys):
    logdir = tmp_path / "sine"
    common = ["train", "--preset", "sinusoid", "--logdir", str(logdir), "--checkpoint-every", "5", "--log-every", "5",
              "--no-progress", "--no-eval", "--meta-batch-size", "2"]
    assert cli.main([*common, "--iterations", "5"]) == 0
    good = (logdir / "checkpoint.pt").read_bytes()
    fill_the_disk_after(monkeypatch, 100)
    with pytest.raises(SystemExit) as stop:
        cli.main([*common, "--iterations", "10"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"could not write checkpoint {logdir / 'checkpoint.pt'}" in err and "No space left on device" in err
    assert "Traceback" not in err
    assert (logdir / "checkpoint.pt").read_bytes() == good


# ------------------------------------------------------------------------------------ the CLI
def test_cli_train_and_eval_with_corrupted_checkpoints(tmp_path, capsys):
    logdir = tmp_path / "sine"
    train = ["train", "--preset", "sinusoid", "--logdir", str(logdir), "--checkpoint-every", "5", "--log-every", "5",
             "--no-progress", "--no-eval", "--meta-batch-size", "2"]
    evaluate = ["eval", "--eval-episodes", "4", "--eval-inner-steps", "1"]
    assert cli.main([*train, "--iterations", "10"]) == 0
    capsys.readouterr()
    corrupt(logdir / "checkpoint.pt", "truncate")

    # eval of the corrupted file: a clear error naming it, no traceback
    with pytest.raises(SystemExit) as stop:
        cli.main([*evaluate, "--checkpoint", str(logdir / "checkpoint.pt")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"{logdir / 'checkpoint.pt'} is corrupted or truncated" in err
    assert "Traceback" not in err and "UnpicklingError" not in err.split("(")[0]
    # eval of the logdir: the previous checkpoint, with a warning
    with pytest.warns(CheckpointWarning, match=r"checkpoint\.pt is corrupted"):
        assert cli.main([*evaluate, "--logdir", str(logdir)]) == 0
    assert "checkpoint.prev.pt (iteration 5)" in capsys.readouterr().out

    # train resumes from the previous checkpoint with a warning
    with pytest.warns(CheckpointWarning, match=r"checkpoint\.pt is corrupted"):
        assert cli.main([*train, "--iterations", "15"]) == 0
    out = capsys.readouterr().out
    assert "resumed at iteration 5" in out and "trained 15 iterations (10 now" in out

    # neither loads: train and eval name both files and the way out
    corrupt(logdir / "checkpoint.pt", "garbage")
    corrupt(logdir / "checkpoint.prev.pt", "empty")
    for argv in ([*train, "--iterations", "20"], [*evaluate, "--logdir", str(logdir)]):
        with pytest.raises(SystemExit) as stop:
            cli.main(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2, argv
        assert str(logdir / "checkpoint.pt") in err and str(logdir / "checkpoint.prev.pt") in err
        assert "--no-resume" in err and "Traceback" not in err
    assert cli.main([*train, "--iterations", "5", "--no-resume"]) == 0
    assert iteration_of(logdir / "checkpoint.pt") == 5


# ------------------------------------------------------------------------------------ kills
class Zygote:
    """tests/checkpoint_fault_child.py: forks the training processes (see there)."""

    def __init__(self, stderr_path: Path):
        self.stderr = open(stderr_path, "wb")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                   OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
        self.process = subprocess.Popen([sys.executable, str(CHILD)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.stderr, cwd=REPO, env=env)
        self.buffer = b""

    def line(self, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.process.stdout], [], [], left)[0]:
                raise TimeoutError("no answer from the training process")
            chunk = os.read(self.process.stdout.fileno(), 65536)
            if not chunk:
                raise EOFError("the zygote exited")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def run(self, job: dict, kill_after_report=None) -> tuple[int, list[str]]:
        """Run one job; returns (its os.waitpid status, the child's lines). `kill_after_report`: a
        function returning how long to wait after the child's "at" line before sending it SIGKILL."""
        self.process.stdin.write((json.dumps(job) + "\n").encode())
        self.process.stdin.flush()
        pid, lines = None, []
        while True:
            line = self.line()
            word, _, rest = line.partition(" ")
            if word == "pid":
                pid = int(rest)
            elif word == "exit":
                return int(rest.split()[1]), lines
            else:
                lines.append(line)
                if word == "at" and kill_after_report is not None:
                    time.sleep(kill_after_report())
                    os.kill(pid, signal.SIGKILL)

    def close(self):
        try:
            self.process.stdin.close()
            self.process.wait(timeout=30)
            self.process.stdout.close()
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self.stderr.close()


def _killed(status: int) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill test forks its training processes")
def test_sigkill_at_20_moments_resumes_bit_for_bit(tmp_path):
    """An uninterrupted run, then the same run killed with SIGKILL 20 times (seeded moments: 6 at a
    random time, 14 inside checkpoint or metrics writes, each event twice), resumed after every
    kill, with checkpoint.pt corrupted after 4 of the kills (resume falls back to checkpoint.prev.pt).
    After every kill both checkpoint files load; at the end the checkpoint (parameters, optimizer,
    scheduler, sampler and RNG states, counters) and metrics.jsonl (but for its wall-clock fields)
    equal the uninterrupted run's, and no temporary file is left."""
    rng = random.Random(14)
    zygote = Zygote(tmp_path / "children.stderr")
    stderr = lambda: (tmp_path / "children.stderr").read_text()[-3000:]  # noqa: E731
    try:
        straight = tmp_path / "straight"
        start = time.monotonic()
        status, lines = zygote.run({"logdir": str(straight)})
        assert status == 0, stderr()
        seconds_per_iteration = (time.monotonic() - start) / child.RUN["iterations"]

        logdir = tmp_path / "killed"
        events = [("timed", None)] * 6 + [(event, None) for event in child.KILL_EVENTS for _ in range(2)]
        rng.shuffle(events)
        events.insert(0, events.pop(events.index(("timed", None))))  # the first kill: after a checkpoint exists
        corrupt_after = set(rng.sample(range(3, len(events) - 3), 4))  # (or at the next kill where possible)
        corrupted = pending = 0
        expect_fallback = None
        history = []
        for index, (event, _) in enumerate(events):
            job = {"logdir": str(logdir)}
            timed = event == "timed"
            if timed:
                job["report_at"] = None  # set from the start line below
            else:
                job["kill"] = [event, rng.choice([1, 2]) if event != "metrics_rewrite" else 1]
            if timed:
                # the start iteration is the checkpoint's: known before the child starts
                found = checkpoint_io.read_latest_checkpoint(logdir) if expect_fallback is None else None
                begin = 0 if found is None else found[1]["iteration"]
                if expect_fallback is not None:
                    begin = expect_fallback
                job["report_at"] = min(begin + rng.randint(3 if index else 10, 14), child.RUN["iterations"] - 3)
                delay = lambda: rng.uniform(0, 2 * seconds_per_iteration)  # noqa: E731
            status, lines = zygote.run(job, kill_after_report=delay if timed else None)
            history.append((event, lines))
            assert _killed(status), f"kill {index} ({event}) did not happen: status {status}, {lines}\n{stderr()}"
            starts = [int(line.split()[1]) for line in lines if line.startswith("start ")]
            assert len(starts) == (0 if event == "metrics_rewrite" else 1), lines  # (that one dies resuming)
            if expect_fallback is not None:
                assert starts in ([], [expect_fallback]), (index, lines)
                assert any(line.startswith("warn ") and "checkpoint.pt is corrupted" in line for line in lines), lines
            else:
                assert not any(line.startswith("warn ") for line in lines), lines
            # a kill never leaves a checkpoint that does not load (but for the one corrupted here, when
            # the child died before its first save replaced it: then the next one falls back again)
            latest, previous = logdir / "checkpoint.pt", logdir / "checkpoint.prev.pt"
            pending += index in corrupt_after
            if expect_fallback is not None and latest.read_bytes() == damaged:
                assert iteration_of(previous) == expect_fallback
                continue
            expect_fallback = None
            if latest.exists():
                at = iteration_of(latest)
                if previous.exists():
                    assert iteration_of(previous) <= at
                if pending and previous.exists() and iteration_of(previous) < at:
                    expect_fallback = iteration_of(previous)
                    corrupt(latest, rng.choice(["truncate", "flip"]), seed=index)
                    damaged = latest.read_bytes()
                    corrupted, pending = corrupted + 1, pending - 1
        status, lines = zygote.run({"logdir": str(logdir)})
        assert status == 0, f"{lines}\n{stderr()}"
        assert len(history) == 20 and corrupted == 4
    finally:
        zygote.close()

    assert_equal_nested(load_checkpoint(logdir / "checkpoint.pt"), load_checkpoint(straight / "checkpoint.pt"))
    assert load_checkpoint(logdir / "checkpoint.pt")["iteration"] == child.RUN["iterations"]
    assert records_without_timing(logdir) == records_without_timing(straight)
    assert temporaries(logdir) == []
