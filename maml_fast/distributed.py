"""Data-parallel meta-training: the tasks of each meta-batch split across processes.

Every rank draws the *same* full meta-batch (the samplers share a seed), runs the inner loops and
query losses of its own contiguous slice of tasks (`TaskBatch.split_tasks`), and the meta-gradient is
all-reduced. The meta-loss is the mean over all T tasks, and rank r's loss is the mean over its T_r
tasks, so rank r's contribution is weighted by T_r / T: the summed gradient then equals the one of
a single process on the whole meta-batch, and every rank applies the same optimizer step.

Launch with torchrun (one process per GPU; NCCL on GPUs, gloo on CPUs):

    torchrun --nproc-per-node 8 -m maml_fast train --preset miniimagenet-5w1s --meta-batch-size 32
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m maml_fast train ...

`DistributedContext.from_environment()` reads torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) and initialises the process group; pass the context to `Trainer`.

Faults: every collective goes through the context, and one that fails (a rank died: its sockets
close, so the others fail at once; or a rank stopped answering: the process group's timeout,
``timeout_s``, default `DEFAULT_TIMEOUT_S`) raises `DistributedError` naming this rank, the
operation and the way out (restart the run: it resumes from the last checkpoint). Work done by rank 0
alone (checkpoint writes, validation) is followed by a collective that carries its success, so an
error there (e.g. `CheckpointWriteError`) stops every rank instead of leaving them at a barrier.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist


DEFAULT_TIMEOUT_S = 600.0  # a collective that waits longer than this for another rank fails

T = TypeVar("T")


class DistributedError(RuntimeError):
    """A collective failed: another rank died, stopped answering or failed on its own."""


def task_range(num_tasks: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous slice ``[start, stop)`` of `num_tasks` tasks: sizes differ by at most 1."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size), got rank={rank}, world_size={world_size}")
    if num_tasks < world_size:
        raise ValueError(f"the meta-batch has {num_tasks} tasks but there are {world_size} ranks: every rank needs "
                         "at least one task (raise --meta-batch-size or use fewer processes)")
    base, extra = divmod(num_tasks, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@dataclass
class DistributedContext:
    """One process's place in a data-parallel run (``world_size == 1``: a plain single-process run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    group: object = None  # the process group (None: the default group)
    timeout_s: float | None = None  # the process group's collective timeout (for messages)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environment(cls, device: str | torch.device | None = None, backend: str | None = None,
                         timeout_s: float | None = None) -> "DistributedContext":
        """Join the process group torchrun describes in the environment; without WORLD_SIZE > 1, a
        single-process context. `device` default: ``cuda:LOCAL_RANK`` when CUDA is there, else CPU;
        `backend` default: "nccl" for CUDA devices, "gloo" otherwise."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if world_size <= 1:
            return cls(0, 1, 0, device)
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s)
        if not dist.is_initialized():
            backend = backend or ("nccl" if device.type == "cuda" else "gloo")
            kwargs = {"timeout": datetime.timedelta(seconds=timeout_s)}
            if device.type == "cuda":
                kwargs["device_id"] = device
            dist.init_process_group(backend, rank=rank, world_size=world_size, **kwargs)
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, device, timeout_s=timeout_s)

    @classmethod
    def from_process_group(cls, device: str | torch.device = "cpu", group=None,
                           timeout_s: float | None = None) -> "DistributedContext":
        """A context for an already initialised process group (e.g. under torch.multiprocessing.spawn);
        `timeout_s`: the timeout it was initialised with (only named in error messages)."""
        return cls(dist.get_rank(group), dist.get_world_size(group), dist.get_rank(group), torch.device(device), group,
                   timeout_s)

    def _collective(self, what: str, call: Callable[[], T]) -> T:
        """Run a collective; its failure becomes a `DistributedError` that says what happened."""
        try:
            return call()
        except DistributedError:
            raise
        except (RuntimeError, OSError) as error:  # DistBackendError, gloo's "Connection closed by peer", timeouts
            timeout = f"{self.timeout_s:g} s" if self.timeout_s is not None else "the process group's timeout"
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: {what} failed, so another rank has died, stopped "
                f"answering (for longer than {timeout}) or left the run ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}). This rank stops too; start the run again "
                "to resume from the last checkpoint"
            ) from error

    def run_on_main(self, what: str, call: Callable[[], T], error_type: type[Exception] | None = None) -> T | None:
        """`call()` on rank 0 while the other ranks wait; returns its result there (None elsewhere).
        If it raises on rank 0, every rank raises (rank 0 its own error; the others `error_type`, default
        `DistributedError`, saying rank 0 failed): no rank is left waiting at a barrier."""
        if not self.active:
            return call()
        result, failure = None, None
        if self.is_main:
            try:
                result = call()
            except Exception as error:  # reported to every rank, then raised here
                failure = error
        failed = self.any(failure is not None, what=f"waiting for rank 0 {what}")  # doubles as the barrier
        if failure is not None:
            raise failure
        if failed:
            raise (error_type or DistributedError)(
                f"rank 0 failed {what} (its own error says why); rank {self.rank} of {self.world_size} stops too")
        return result

    def task_range(self, num_tasks: int) -> tuple[int, int]:
        return task_range(num_tasks, self.rank, self.world_size)

    def all_reduce_sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum `tensors` over the ranks in place, as one flat all-reduce per dtype."""
        if not self.active or not tensors:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for tensor in tensors:
            by_dtype.setdefault(tensor.dtype, []).append(tensor)
        for group in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            self._collective("the meta-gradient all-reduce",
                             lambda: dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group))
            offset = 0
            for tensor in group:
                tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
                offset += tensor.numel()

    def any(self, flag: bool, what: str = "an all-reduce of a flag") -> bool:
        """True on every rank if `flag` is True on any rank (a collective: every rank must call it)."""
        if not self.active:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        self._collective(what, lambda: dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group))
        return bool(value.item() > 0)

    def all_reduce_max_(self, tensor: torch.Tensor, what: str) -> None:
        if self.active:
            self._collective(what, lambda: dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group))

    def barrier(self, what: str = "a barrier") -> None:
        if self.active:
            self._collective(what, lambda: dist.barrier(group=self.group))

    def shutdown(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()
