"""Few-shot episodes: whole meta-batches of N-way K-shot tasks, drawn on the device with one gather.

A dataset for `EpisodeSampler` is anything with ``images``, a tensor
``[num_classes, examples_per_class, *example_shape]`` (uint8, read as intensity ``value / 255``, or
floating, used as is), and ``num_classes`` (see `ClassImageDataset`). `Omniglot` and `MiniImageNet`
store uint8 to keep the whole set on the device cheaply (full MiniImageNet: 1.3 GB instead of 5 GB);
episodes come out floating.

Task sources (`EpisodeSampler`, `SinusoidTasks`) share one interface, so a trainer can use either:
``sample()``, ``fixed_episodes(num_episodes, seed)``, ``state_dict()`` / ``load_state_dict()``.

``sample(out=batch)`` draws the next meta-batch into `batch`'s tensors in place (fixed shapes, torch
ops on the source's device and its device generator, no host read): the trainer's graphed step keeps
one such batch as the captured graph's static inputs, so a replay reads each new episode where the
sampler wrote it, with no per-step copy or allocation.
"""
from __future__ import annotations

from typing import Iterator

import torch

from maml_fast.checks import check_int
from maml_fast.task_batch import _FIELDS, TaskBatch


def images_as_float(images: torch.Tensor, dtype: torch.dtype = torch.float32,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Images as `dtype`: uint8 is read as intensity ``value / 255`` (so [0, 1]); floating is cast.
    With `out` (of `images`' shape), the result is written there (its dtype wins)."""
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"images must be uint8 or floating, got {images.dtype}")
    out = images.to(dtype) if out is None else out.copy_(images)  # (uint8: a copy, so div_ is safe)
    return out.div_(255) if images.dtype == torch.uint8 else out


class ClassImageDataset:
    """Images grouped by class, what `EpisodeSampler` reads from a dataset (and holds itself)."""

    images: torch.Tensor  # [num_classes, examples_per_class, *example_shape], uint8 or floating

    @property
    def num_classes(self) -> int:
        return self.images.shape[0]

    @property
    def examples_per_class(self) -> int:
        return self.images.shape[1]


class SeededTaskSource:
    """Shared part of the task sources: a seeded generator on the device, resumable and repeatable.

    A subclass draws the random numbers of `num_tasks` tasks as a tuple of tensors whose first dim is
    the task (`_draw`), says the shapes and dtypes of a meta-batch (`_layout`) and writes any task
    slice of its draws into a `TaskBatch` of that layout in place (`_build`); drawing all tasks first
    lets `fixed_episodes` give episode i the same content whatever the batch size. A fresh batch is
    an `empty_batch` filled by `_build`, so drawing into a caller's batch (``sample(out=)``) is the
    same code. The random stream depends on the seed and on the device type (CPU and CUDA generators differ).
    """

    def __init__(self, device: torch.device | str | None, seed: int, meta_batch_size: int | None) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.meta_batch_size = None if meta_batch_size is None else check_int("meta_batch_size", meta_batch_size, 1)
        self.device = torch.device("cpu" if device is None else device)
        self.seed = seed
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(seed)

    def _draw(self, generator: torch.Generator, num_tasks: int) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def _layout(self, num_tasks: int) -> tuple[tuple[tuple[int, ...], torch.dtype], ...]:
        """(shape, dtype) of support_x, support_y, query_x and query_y for `num_tasks` tasks."""
        raise NotImplementedError

    def _build(self, *draws: torch.Tensor, out: TaskBatch) -> TaskBatch:
        raise NotImplementedError

    def _batch_size(self, meta_batch_size: int | None) -> int:
        if meta_batch_size is not None:
            return check_int("meta_batch_size", meta_batch_size, 1)
        if self.meta_batch_size is None:
            raise ValueError("meta_batch_size is not set: pass it here or to the constructor")
        return self.meta_batch_size

    def empty_batch(self, meta_batch_size: int | None = None) -> TaskBatch:
        """Uninitialised buffers of one meta-batch (the constructor's meta_batch_size by default) on
        the source's device, for ``sample(out=)``."""
        layout = self._layout(self._batch_size(meta_batch_size))
        # (no value check: the contents are garbage until a sample writes them, finite by construction)
        return TaskBatch(*(torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in layout),
                         check_values=False)

    def sample(self, meta_batch_size: int | None = None, *, out: TaskBatch | None = None) -> TaskBatch:
        """The next meta-batch from the training stream (the constructor's meta_batch_size by default).
        With `out` (e.g. from `empty_batch`: this source's shapes and dtypes, contiguous, on its
        device) it is written into out's tensors in place and `out` is returned: torch ops on the
        device only, no host read or host-to-device copy (capture-safe)."""
        if out is None:
            num_tasks = self._batch_size(meta_batch_size)
            return self._build(*self._draw(self._generator, num_tasks), out=self.empty_batch(num_tasks))
        self._check_out(out, meta_batch_size)
        return self._build(*self._draw(self._generator, out.num_tasks), out=out)

    def _check_out(self, out: TaskBatch, meta_batch_size: int | None) -> None:
        if not isinstance(out, TaskBatch):
            raise TypeError(f"out must be a maml_fast.TaskBatch (e.g. from empty_batch()), got {type(out).__name__}")
        if meta_batch_size is not None and check_int("meta_batch_size", meta_batch_size, 1) != out.num_tasks:
            raise ValueError(f"meta_batch_size={meta_batch_size} but out holds {out.num_tasks} tasks")
        for name, (shape, dtype) in zip(_FIELDS, self._layout(out.num_tasks)):
            tensor = getattr(out, name)
            same_device = tensor.device.type == self.device.type and self.device.index in (None, tensor.device.index)
            contiguous = tensor.is_contiguous()
            if tuple(tensor.shape) != shape or tensor.dtype != dtype or not same_device or not contiguous:
                raise ValueError(f"out.{name} must be a contiguous {dtype} tensor of shape {shape} on {self.device} "
                                 f"(what this source draws), got {'' if contiguous else 'a non-contiguous '}"
                                 f"{tensor.dtype} tensor of shape {tuple(tensor.shape)} on {tensor.device}")

    def fixed_episodes(self, num_episodes: int, seed: int = 0, meta_batch_size: int | None = None) -> Iterator[TaskBatch]:
        """The same `num_episodes` tasks on every call (e.g. 600 for the paper's evaluation), in
        meta-batches (the last one may be smaller). Uses its own generator seeded with `seed`, so it
        neither reads nor advances the training stream."""
        num_episodes = check_int("num_episodes", num_episodes, 1)
        batch_size = self._batch_size(meta_batch_size)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)
        draws = self._draw(generator, num_episodes)
        for start in range(0, num_episodes, batch_size):
            part = [draw[start : start + batch_size] for draw in draws]
            yield self._build(*part, out=self.empty_batch(part[0].shape[0]))

    def state_dict(self) -> dict:
        """The training stream's position: `load_state_dict` of it makes the next `sample` repeat."""
        return {"generator": self._generator.get_state(), "device_type": self.device.type}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "generator" not in state:
            raise ValueError("state must be a dict from state_dict(), with a 'generator' entry")
        if state.get("device_type", self.device.type) != self.device.type:
            raise ValueError(
                f"state was saved from a {state['device_type']} generator but this one is on "
                f"{self.device.type}: the streams differ by device type, so it cannot resume there"
            )
        self._generator.set_state(state["generator"])


class EpisodeSampler(SeededTaskSource, ClassImageDataset):
    """N-way K-shot meta-batches from a `ClassImageDataset`, built on `device` with one gather.

    Each task picks `ways` distinct classes and gives them labels 0..ways-1 in a random order, then
    picks `shots + queries` distinct examples of each class: the first `shots` go to the support set,
    the rest to the query set, so support and query never share an example. Both sets are ordered by
    label (all examples of label 0 first): ``support_x [T, ways*shots, *example_shape]``,
    ``support_y [T, ways*shots]`` (int64), ``query_x [T, ways*queries, ...]``, ``query_y``.
    """

    # Every episode's labels are 0..ways-1 (fixed buffers): a learner checks their range once per
    # batch shape, not every step (`maml_fast.Trainer`).
    labels_by_construction = True

    def __init__(
        self,
        dataset: ClassImageDataset,
        ways: int,
        shots: int,
        queries: int,
        meta_batch_size: int,
        device: torch.device | str | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        images = getattr(dataset, "images", None)
        if not isinstance(images, torch.Tensor) or images.dim() < 3:
            raise TypeError(
                "dataset.images must be a tensor [num_classes, examples_per_class, *example_shape], got "
                + (f"shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__)
            )
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise TypeError(f"dataset.images must be uint8 or floating, got {images.dtype}")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        super().__init__(images.device if device is None else device, seed, meta_batch_size)
        self.ways = check_int("ways", ways, 1)
        self.shots = check_int("shots", shots, 1)
        self.queries = check_int("queries", queries, 1)
        num_classes, examples_per_class = images.shape[:2]
        if ways > num_classes:
            raise ValueError(f"ways={ways} is more than the dataset's {num_classes} classes")
        if shots + queries > examples_per_class:
            names = getattr(dataset, "class_names", None)
            which = (f"class {names[0]!r} (and each of the other {num_classes - 1}) has" if names
                     else f"each of the dataset's {num_classes} classes has")
            raise ValueError(
                f"shots + queries = {shots} + {queries} = {shots + queries} is more than the "
                f"{examples_per_class} examples {which} (support and query examples are distinct)"
            )
        self.dtype = dtype
        self.images = images.to(self.device).contiguous()
        self._image_rows = self.images.flatten(0, 1)  # a view: row c * examples_per_class + e
        labels = torch.arange(ways, device=self.device)
        self._support_labels = labels.repeat_interleave(shots)
        self._query_labels = labels.repeat_interleave(queries)

    def _draw(self, generator: torch.Generator, num_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Sampling without replacement, all tasks at once: the indices of the k largest of iid uniform
        # keys are a uniform random k-subset in random order (float64 keys, so ties never happen).
        # Row t of `classes` is task t's classes in label order: the class-to-label map is random too.
        def random_subsets(rows: int, population: int, size: int) -> torch.Tensor:
            keys = torch.rand(rows, population, generator=generator, device=self.device, dtype=torch.float64)
            return keys.topk(size, dim=1).indices

        classes = random_subsets(num_tasks, self.num_classes, self.ways)
        examples = random_subsets(num_tasks * self.ways, self.examples_per_class, self.shots + self.queries)
        return classes, examples.view(num_tasks, self.ways, self.shots + self.queries)

    def _layout(self, num_tasks: int) -> tuple[tuple[tuple[int, ...], torch.dtype], ...]:
        example_shape, support, query = tuple(self.images.shape[2:]), self.ways * self.shots, self.ways * self.queries
        return (((num_tasks, support, *example_shape), self.dtype), ((num_tasks, support), torch.int64),
                ((num_tasks, query, *example_shape), self.dtype), ((num_tasks, query), torch.int64))

    def _build(self, classes: torch.Tensor, examples: torch.Tensor, *, out: TaskBatch) -> TaskBatch:
        example_shape = self.images.shape[2:]
        rows = classes.unsqueeze(-1) * self.examples_per_class + examples  # [T, ways, shots + queries]
        # One gather per set for the whole meta-batch, as rows of the flattened images (index_select is
        # much faster than 2-d advanced indexing on CPU), in the sets' order: task, label, example.
        for x, picked in ((out.support_x, rows[:, :, : self.shots]), (out.query_x, rows[:, :, self.shots :])):
            images_as_float(self._image_rows.index_select(0, picked.reshape(-1)), out=x.view(-1, *example_shape))
        out.support_y.copy_(self._support_labels.expand_as(out.support_y))
        out.query_y.copy_(self._query_labels.expand_as(out.query_y))
        return out
