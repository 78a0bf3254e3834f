"""Checkpoint files of a training run: written atomically, the last two good ones kept, verified on read.

    logdir/checkpoint.pt        the newest checkpoint
    logdir/checkpoint.prev.pt   the one before it

Writing (`CheckpointFiles.save`): ``torch.save`` to a temporary file next to checkpoint.pt and
fsync it; then, when the current checkpoint.pt is known good (this run wrote it or resumed from it),
it becomes checkpoint.prev.pt (a hard link renamed into place, so checkpoint.pt never goes missing);
then the temporary file is renamed over checkpoint.pt and the folder is fsynced. A kill at any moment
leaves a complete checkpoint.pt (the old or the new one) and a complete checkpoint.prev.pt. A failed
write (a full disk: ``OSError`` ENOSPC) removes the temporary file, leaves both files as they were
and raises `CheckpointWriteError` naming the file and the cause.

Reading (`load_checkpoint`): the CRC-32 of every member of the zip container that ``torch.save``
writes is verified before ``torch.load``, so a truncated or corrupted file (a flipped bit in a
tensor included, which ``torch.load`` alone would load as wrong numbers) fails with
`CheckpointError` naming the file, never with a raw ``UnpicklingError``. `read_latest_checkpoint`
takes checkpoint.pt, else (with a `CheckpointWarning` naming the file and why) checkpoint.prev.pt,
else raises `CheckpointError` naming both files and ``--no-resume``.
"""
from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path

import torch

LATEST_NAME = "checkpoint.pt"
PREVIOUS_NAME = "checkpoint.prev.pt"
CHECKPOINT_FORMAT = "maml_fast.trainer/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (corrupted, truncated, or not a Trainer checkpoint); the
    message names the file(s) and the way out."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); the message names the file, the
    cause and which checkpoints are intact. ``errno`` is the cause's."""


class CheckpointWarning(UserWarning):
    """The newest checkpoint could not be loaded and an older one is used instead."""


# ------------------------------------------------------------------------------------ writing
def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _fsync_folder(folder: Path) -> None:
    """Make renames in `folder` durable (where the platform allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_temporary(obj, path: Path) -> Path:
    """``torch.save(obj)`` into a fsynced temporary file next to `path` (removed again on failure)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_save(obj, path: str | Path) -> Path:
    """``torch.save`` to a temporary file next to `path`, fsync it, then rename it over `path`: a
    reader sees the old file or the complete new one, never a partial file."""
    path = Path(path)
    tmp = _write_temporary(obj, path)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def _os_cause(error: BaseException) -> BaseException:
    """The OSError behind `error` (torch.save reports a failed file write as a RuntimeError whose
    context is the OSError), else `error` itself."""
    seen, current = set(), error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return error


def _describe(error: BaseException) -> str:
    """The error's type and the first line of its message (torch's messages go on for paragraphs)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = text if len(text) <= 200 else text[:197] + "..."
    return text if isinstance(error, OSError) else f"{type(error).__name__}: {text}"


class CheckpointFiles:
    """checkpoint.pt and checkpoint.prev.pt of `folder` (see the module doc).

    ``latest_is_good`` / ``previous_is_good``: whether the current checkpoint.pt / checkpoint.prev.pt
    is a good checkpoint of this run (one it wrote or resumed from; `mark_resumed` sets them). The
    next `save` keeps a good checkpoint.pt as checkpoint.prev.pt; a checkpoint.pt that is not (a fresh
    run's predecessor, or a corrupted one that a resume passed over) is overwritten, with a good
    checkpoint.prev.pt left as it is and one of another run removed first (a fallback must never land
    in another run)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.latest = self.folder / LATEST_NAME
        self.previous = self.folder / PREVIOUS_NAME
        self.latest_is_good = False
        self.previous_is_good = False

    def mark_resumed(self, path: str | Path) -> None:
        """This run continues from `path`: checkpoint.pt (then checkpoint.prev.pt, written before it,
        is this run's too), checkpoint.prev.pt (checkpoint.pt was passed over: it is overwritten by
        the next save) or any other file (both are treated as another run's)."""
        path = Path(path)
        same = lambda a, b: a.is_file() and b.is_file() and os.path.samefile(a, b)  # noqa: E731
        if same(path, self.latest):
            self.latest_is_good = self.previous_is_good = True
        elif same(path, self.previous):
            self.latest_is_good, self.previous_is_good = False, True
        else:
            self.latest_is_good = self.previous_is_good = False

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the temporary files that a process killed mid-write left behind."""
        removed = []
        for path in self.folder.glob(".checkpoint*.pt.tmp-*"):  # also the Trainer's checkpoint_<N>.pt copies
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
        return removed

    def _keep_latest_as_previous(self) -> None:
        """checkpoint.prev.pt := checkpoint.pt, with checkpoint.pt in place throughout (a hard link
        renamed over checkpoint.prev.pt; where links are not supported, a rename, after which a
        reader finds only checkpoint.prev.pt until the new checkpoint.pt is in place)."""
        link = _temporary(self.previous)
        link.unlink(missing_ok=True)
        try:
            os.link(self.latest, link)
        except OSError:
            os.replace(self.latest, self.previous)
            return
        try:
            os.replace(link, self.previous)
        except BaseException:
            link.unlink(missing_ok=True)
            raise

    def save(self, state: dict, *, describe_intact=None) -> Path:
        """Write `state` as checkpoint.pt, keeping the current one (when good) as checkpoint.prev.pt.
        Raises `CheckpointWriteError` when the write fails; both files are then as before."""
        try:
            tmp = _write_temporary(state, self.latest)
        except Exception as error:
            cause = _os_cause(error)
            intact = [str(p) for p in (self.latest, self.previous) if p.is_file()]
            raise CheckpointWriteError(
                getattr(cause, "errno", None) or 0,
                f"could not write checkpoint {self.latest}: {_describe(cause)}. Training stopped; "
                + (f"{' and '.join(intact)} {'are' if len(intact) > 1 else 'is'} intact "
                   "(resume with the same command once the cause is fixed)" if intact
                   else "no earlier checkpoint exists")) from error
        try:
            if self.latest_is_good and self.latest.is_file():
                self._keep_latest_as_previous()
                self.previous_is_good = True
            elif not self.previous_is_good:
                self.previous.unlink(missing_ok=True)  # another run's: a fallback must not land there
            os.replace(tmp, self.latest)
        except Exception as error:
            tmp.unlink(missing_ok=True)
            raise CheckpointWriteError(
                getattr(_os_cause(error), "errno", None) or 0,
                f"could not put checkpoint {self.latest} in place: {_describe(_os_cause(error))}") from error
        _fsync_folder(self.folder)
        self.latest_is_good = True
        return self.latest


# ------------------------------------------------------------------------------------ reading
def _verify(path: Path) -> None:
    """Raise unless `path` is a zip container (torch.save's format; a truncated one has lost its
    directory at the end) whose every member matches its CRC-32."""
    if not zipfile.is_zipfile(path):
        raise ValueError("not a complete torch.save zip archive" + (" (the file is empty)" if path.stat().st_size == 0
                                                                   else ""))
    with zipfile.ZipFile(path) as archive:
        bad = archive.testzip()
    if bad is not None:
        raise ValueError(f"member {bad} fails its CRC-32 check")


def load_checkpoint(path: str | Path) -> dict:
    """Read a `Trainer` checkpoint (on the CPU), verified (see the module doc) and of the Trainer's
    format. FileNotFoundError when `path` does not exist; `CheckpointError` naming it otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        _verify(path)
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # zipfile.BadZipFile, RuntimeError, UnpicklingError, EOFError, OSError, ...
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated and cannot be loaded "
                              f"({_describe(error)})") from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a maml_fast Trainer checkpoint (format {CHECKPOINT_FORMAT})")
    return checkpoint


def read_latest_checkpoint(folder: str | Path, *, resume_flag: str = "--no-resume") -> tuple[Path, dict] | None:
    """The newest checkpoint of `folder` that loads, as (path, checkpoint): checkpoint.pt, else
    checkpoint.prev.pt (with a `CheckpointWarning` naming checkpoint.pt and why it was passed over);
    None when neither exists. `CheckpointError` naming both files and `resume_flag` (how to start
    over instead) when files exist but none loads."""
    files = CheckpointFiles(folder)
    failures = []
    for path in (files.latest, files.previous):
        if not path.is_file():
            failures.append(f"{path}: does not exist")
            continue
        try:
            checkpoint = load_checkpoint(path)
        except (CheckpointError, OSError) as error:
            failures.append(str(error))
            continue
        if failures and path == files.previous:
            warnings.warn(f"{failures[0]}; resuming from the previous checkpoint {path} "
                          f"(iteration {checkpoint.get('iteration')}) instead", CheckpointWarning, stacklevel=2)
        return path, checkpoint
    if not files.latest.is_file() and not files.previous.is_file():
        return None
    raise CheckpointError(f"no checkpoint in {files.folder} can be loaded: " + "; ".join(failures)
                          + f". Start over with {resume_flag} (the run's checkpoints will be replaced), or move "
                          f"{files.latest.name} and {files.previous.name} away")
