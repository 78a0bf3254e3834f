"""Task sources for meta-learning: sinusoid regression and few-shot image classification episodes.

    tasks = SinusoidTasks(num_shots=10, num_query=10, device="cuda", seed=0)
    batch = tasks.sample(25)                                   # TaskBatch, x and y [25, 10, 1]

    sampler = EpisodeSampler(Omniglot(split="train", rotations=True), ways=5, shots=1, queries=15,
                             meta_batch_size=32, device="cuda", seed=0)
    batch = sampler.sample()                                   # support_x [32, 5, 1, 28, 28]
    for batch in sampler_for_test_split.fixed_episodes(600, seed=0): ...
"""
from maml_fast.data.episodes import ClassImageDataset, EpisodeSampler, SeededTaskSource, images_as_float
from maml_fast.data.miniimagenet import MiniImageNet
from maml_fast.data.omniglot import (
    Omniglot,
    OmniglotCharacters,
    download_omniglot,
    load_omniglot_characters,
    read_omniglot_npz,
    read_omniglot_pngs,
    split_characters,
)
from maml_fast.data.sinusoid import SinusoidTasks

__all__ = [
    "ClassImageDataset",
    "EpisodeSampler",
    "MiniImageNet",
    "Omniglot",
    "OmniglotCharacters",
    "SeededTaskSource",
    "SinusoidTasks",
    "download_omniglot",
    "images_as_float",
    "load_omniglot_characters",
    "read_omniglot_npz",
    "read_omniglot_pngs",
    "split_characters",
]
