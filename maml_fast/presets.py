"""Experiment configurations: the paper's experiments as presets, and builders for their parts.

An `ExperimentConfig` holds everything that defines a run (data, network, inner and outer loop,
evaluation); `PRESETS` has the MAML paper's experiments (Finn et al. 2017, section 5 and appendix A)
with the hyperparameters of the paper and of its reference code (cbfinn/maml):

================== ====== ===== ======= ===== ======= ====== ========= ====== =====================
preset             ways   shots queries tasks K train K eval inner lr  iters  network
================== ====== ===== ======= ===== ======= ====== ========= ====== =====================
sinusoid           --     10    10      25    1       10     0.01      70000  MLP 1-40-40-1, MSE
omniglot-5w1s      5      1     1       32    1       3      0.4       60000  conv4 64, stride 2
omniglot-5w5s      5      5     5       32    1       3      0.4       60000  conv4 64, stride 2
omniglot-20w1s     20     1     1       16    5       5      0.1       60000  conv4 64, stride 2
omniglot-20w5s     20     5     5       16    5       5      0.1       60000  conv4 64, stride 2
miniimagenet-5w1s  5      1     15      4     5       10     0.01      60000  conv4 32, max-pool
miniimagenet-5w5s  5      5     15      2     5       10     0.01      60000  conv4 32, max-pool
omniglot-5w1s-cpu  5      1     5       8     1       3      0.4       4500   conv4 64 (CPU budget)
================== ====== ===== ======= ===== ======= ====== ========= ====== =====================

All use Adam with meta lr 1e-3 (the CPU preset: 2e-3). Like the reference code, the classification presets take the inner
gradient of sum(CE)/K (``inner_loss="reference"``, i.e. N x the mean cross-entropy, so α = 0.4 here
is α = 2.0 on the mean loss for 5 ways), do not adapt the BatchNorm affine parameters in the inner
loop, clip the meta-gradient to ±10 for MiniImageNet, and train Omniglot on 1100 of the paper
split's 1200 training characters with 90/180/270-degree rotations as extra classes (100 characters
held out for validation, 423 for testing). MiniImageNet 5-shot uses the paper's meta-batch of 2 tasks
(the reference code's usage line says 4). ``omniglot-5w1s-cpu`` is not from the paper: it is the
5-way 1-shot experiment sized to train in minutes on a 2-core CPU (see its entry).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import models
from .checks import check_choice, check_int, check_number
from .maml import MAML
from .task_batch import TaskBatch

DATASOURCES = ("sinusoid", "omniglot", "miniimagenet")
# The residual image networks by name, each built as factory(in_channels, num_classes).
RESIDUAL_NETWORKS = {"resnet12": models.resnet12, "wrn28_10": models.wrn28_10}
NETWORKS = ("conv4", *RESIDUAL_NETWORKS)
NORMS = ("batch", "layer", "none")
EVAL_SPLITS = ("test", "val")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
OMNIGLOT_VAL_CHARACTERS = 100  # the reference code holds out 100 of the 1200 training characters


@dataclass
class ExperimentConfig:
    """Everything that defines a run. Field names and the reference flag each one replaces:

    ``datasource`` (datasource), ``ways`` (num_classes), ``shots`` (update_batch_size, in training:
    train_update_batch_size), ``queries`` (query examples per class; sinusoid: query points),
    ``meta_batch_size`` (meta_batch_size), ``inner_steps`` (num_updates), ``inner_lr`` (update_lr, in
    training: train_update_lr), ``meta_lr`` (meta_lr), ``iterations`` (metatrain_iterations),
    ``pretrain_iterations`` (pretrain_iterations), ``norm`` (norm), ``hidden`` (num_filters; hidden
    units of the sinusoid MLP), ``conv`` (conv), ``max_pool`` (max_pool), ``first_order`` (stop_grad),
    ``baseline`` (baseline: None or "oracle"), ``eval_inner_steps`` (test_num_updates),
    ``eval_split`` (test_set: "test" = True, "val" = False), ``eval_shots`` / ``eval_inner_lr``
    (update_batch_size / update_lr at test time when they differ from training).
    """

    name: str = "custom"
    datasource: str = "omniglot"
    data_root: str | None = None  # Omniglot: None = the copy bundled with maml_fast
    ways: int = 5
    shots: int = 1
    queries: int = 1
    meta_batch_size: int = 32
    inner_steps: int = 1
    inner_lr: float = 0.4
    inner_loss: str = "reference"  # "reference": grad of sum(CE)/K as cbfinn/maml; "mean": of the mean
    meta_lr: float = 1e-3
    iterations: int = 60_000
    pretrain_iterations: int = 0
    cosine: bool = False  # cosine decay of the meta lr to min_lr_ratio * meta_lr over all iterations
    min_lr_ratio: float = 0.0
    clip_value: float | None = None
    clip_norm: float | None = None
    conv: bool = True
    network: str = "conv4"  # image networks: "conv4" (the paper's) or one of RESIDUAL_NETWORKS
    hidden: int = 64
    max_pool: bool = False
    norm: str = "batch"
    first_order: bool = False
    adapt_bn_affine: bool = False
    step_metrics: bool = True  # also the query metrics before/between inner steps (an extra forward each)
    baseline: str | None = None  # "oracle": sinusoid with amplitude and phase as inputs (pretrained)
    pixels: str = "grayscale"  # Omniglot: "grayscale" (anti-aliased) or "binary" (the reference resize)
    eval_inner_steps: int = 3
    eval_split: str = "test"
    eval_episodes: int = 600
    eval_shots: int | None = None  # None: as in training
    eval_queries: int | None = None  # None: as in training
    eval_inner_lr: float | None = None  # None: as in training
    eval_batch_size: int | None = None  # tasks per evaluation batch; None: meta_batch_size
    backend: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    log_every: int = 100
    checkpoint_every: int = 1000
    description: str = ""
    notes: dict = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    def validate(self) -> "ExperimentConfig":
        """Raise ValueError naming the field for a value out of range (called on construction and replace)."""
        for name, choices in (("datasource", DATASOURCES), ("norm", NORMS), ("eval_split", EVAL_SPLITS),
                              ("inner_loss", ("reference", "mean")), ("baseline", (None, "oracle")),
                              ("pixels", ("grayscale", "binary")), ("dtype", tuple(DTYPES)), ("network", NETWORKS)):
            check_choice(name, getattr(self, name), choices)
        for name in ("ways", "shots", "queries", "meta_batch_size", "hidden", "eval_episodes", "log_every",
                     "checkpoint_every"):
            check_int(name, getattr(self, name), 1)
        for name in ("inner_steps", "eval_inner_steps", "iterations", "pretrain_iterations"):
            check_int(name, getattr(self, name))
        for name in ("eval_shots", "eval_queries", "eval_batch_size"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        for name in ("inner_lr", "meta_lr"):
            check_number(name, getattr(self, name))
        check_number("eval_inner_lr", self.eval_inner_lr, optional=True)
        check_number("clip_value", self.clip_value, positive=True, optional=True)
        check_number("clip_norm", self.clip_norm, positive=True, optional=True)
        check_number("min_lr_ratio", self.min_lr_ratio)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.baseline == "oracle" and self.datasource != "sinusoid":
            raise ValueError("baseline='oracle' is only defined for datasource='sinusoid' (as in the reference code)")
        if self.iterations + self.pretrain_iterations == 0:
            raise ValueError("iterations and pretrain_iterations are both 0: there is nothing to train")
        if self.datasource == "miniimagenet" and not self.conv:
            raise ValueError("conv=False (the fully connected net) is only defined for omniglot and sinusoid")
        if self.network in RESIDUAL_NETWORKS and (self.datasource == "sinusoid" or not self.conv):
            raise ValueError(f"network={self.network!r} is an image network: it needs datasource omniglot or "
                             "miniimagenet and conv=True")
        return self

    def replace(self, **changes) -> "ExperimentConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ExperimentConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @property
    def classification(self) -> bool:
        return self.datasource != "sinusoid"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


_CLASSIFICATION = dict(inner_loss="reference", adapt_bn_affine=False, meta_lr=1e-3, norm="batch")

PRESETS: dict[str, ExperimentConfig] = {
    "sinusoid": ExperimentConfig(
        name="sinusoid", datasource="sinusoid", ways=1, shots=10, queries=10, meta_batch_size=25, inner_steps=1,
        inner_lr=0.01, inner_loss="mean", meta_lr=1e-3, iterations=70_000, hidden=40, norm="none", conv=False,
        eval_inner_steps=10, eval_episodes=600, log_every=1000, checkpoint_every=5000,
        description="sinusoid regression, K=10 (paper 5.1): MLP 1-40-40-1, MSE, alpha 0.01, 25 tasks"),
    "omniglot-5w1s": ExperimentConfig(
        name="omniglot-5w1s", datasource="omniglot", ways=5, shots=1, queries=1, meta_batch_size=32, inner_steps=1,
        inner_lr=0.4, iterations=60_000, hidden=64, eval_inner_steps=3, **_CLASSIFICATION,
        description="Omniglot 5-way 1-shot (paper): conv4 64, alpha 0.4, 1 step (3 at test), 32 tasks"),
    "omniglot-5w5s": ExperimentConfig(
        name="omniglot-5w5s", datasource="omniglot", ways=5, shots=5, queries=5, meta_batch_size=32, inner_steps=1,
        inner_lr=0.4, iterations=60_000, hidden=64, eval_inner_steps=3, **_CLASSIFICATION,
        description="Omniglot 5-way 5-shot (paper): conv4 64, alpha 0.4, 1 step (3 at test), 32 tasks"),
    "omniglot-20w1s": ExperimentConfig(
        name="omniglot-20w1s", datasource="omniglot", ways=20, shots=1, queries=1, meta_batch_size=16,
        inner_steps=5, inner_lr=0.1, iterations=60_000, hidden=64, eval_inner_steps=5, **_CLASSIFICATION,
        description="Omniglot 20-way 1-shot (paper): conv4 64, alpha 0.1, 5 steps, 16 tasks"),
    "omniglot-20w5s": ExperimentConfig(
        name="omniglot-20w5s", datasource="omniglot", ways=20, shots=5, queries=5, meta_batch_size=16,
        inner_steps=5, inner_lr=0.1, iterations=60_000, hidden=64, eval_inner_steps=5, **_CLASSIFICATION,
        description="Omniglot 20-way 5-shot (paper): conv4 64, alpha 0.1, 5 steps, 16 tasks"),
    "miniimagenet-5w1s": ExperimentConfig(
        name="miniimagenet-5w1s", datasource="miniimagenet", ways=5, shots=1, queries=15, meta_batch_size=4,
        inner_steps=5, inner_lr=0.01, iterations=60_000, hidden=32, max_pool=True, eval_inner_steps=10,
        clip_value=10.0, **_CLASSIFICATION,
        description="MiniImageNet 5-way 1-shot (paper): conv4 32 + max-pool, alpha 0.01, 5 steps (10 at test), "
                    "15 queries per class, 4 tasks, meta-gradient clipped to +-10"),
    "miniimagenet-5w5s": ExperimentConfig(
        name="miniimagenet-5w5s", datasource="miniimagenet", ways=5, shots=5, queries=15, meta_batch_size=2,
        inner_steps=5, inner_lr=0.01, iterations=60_000, hidden=32, max_pool=True, eval_inner_steps=10,
        clip_value=10.0, **_CLASSIFICATION,
        description="MiniImageNet 5-way 5-shot (paper): conv4 32 + max-pool, alpha 0.01, 5 steps (10 at test), "
                    "15 queries per class, 2 tasks, meta-gradient clipped to +-10"),
    # Not from the MAML paper: its MiniImageNet experiments with the ResNet-12 that most later few-shot work
    # meta-trains (MetaOptNet's layout, as learn2learn ships it) and with learn2learn's WRN-28-10,
    # second-order MAML through every block.
    **{f"miniimagenet-5w{shots}s-{network}": ExperimentConfig(
        name=f"miniimagenet-5w{shots}s-{network}", datasource="miniimagenet", network=network, ways=5, shots=shots,
        queries=15, meta_batch_size=tasks, inner_steps=5, inner_lr=0.01, iterations=60_000,
        eval_inner_steps=10, clip_value=10.0, **_CLASSIFICATION,
        description=f"MiniImageNet 5-way {shots}-shot, {layout}: alpha 0.01, 5 steps (10 at test), "
                    f"15 queries per class, {tasks} tasks, meta-gradient clipped to +-10")
       for network, layout in (("resnet12", "ResNet-12 (64-160-320-640)"), ("wrn28_10", "WRN-28-10 (160-320-640)"))
       for shots, tasks in ((1, 4), (5, 2))},
    # Not from the paper: the 5-way 1-shot experiment sized for ~8 minutes on a 2-core CPU
    # (`maml-fast train --preset omniglot-5w1s-cpu --time-limit 8`: about 95-96% held-out accuracy). Small
    # meta-batches run far more meta-steps per second there (the activations stay in cache), 5 query
    # examples per class give each step a less noisy meta-gradient than 1, the pre-update query
    # forward used only for logging is skipped, and a doubled meta lr decays (cosine) to 0 over 4500
    # iterations. Backend "auto" takes the compiled C++ ops on the CPU (faster there: benchmarks/RESULTS.md).
    "omniglot-5w1s-cpu": ExperimentConfig(
        name="omniglot-5w1s-cpu", datasource="omniglot", ways=5, shots=1, queries=5, meta_batch_size=8,
        inner_steps=1, inner_lr=0.4, iterations=4500, hidden=64, eval_inner_steps=3, cosine=True,
        step_metrics=False, log_every=100, checkpoint_every=500,
        **{**_CLASSIFICATION, "meta_lr": 2e-3},
        description="Omniglot 5-way 1-shot sized for a 2-core CPU (minutes): 8 tasks, 5 queries per class, "
                    "meta lr 2e-3 with cosine decay"),
}


def get_preset(name: str) -> ExperimentConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name].replace()


# ----------------------------------------------------------------------------------------- builders
def build_model(config: ExperimentConfig) -> nn.Module:
    """The network of `config` (float32 on the CPU; the caller moves it)."""
    if config.datasource == "sinusoid":
        inputs = 3 if config.baseline == "oracle" else 1
        return models.mlp((inputs, config.hidden, config.hidden, 1), norm=config.norm)
    if config.datasource == "omniglot" and not config.conv:
        return models.omniglot_fc(config.ways, norm=config.norm)
    channels, size = (1, 28) if config.datasource == "omniglot" else (3, 84)
    if config.network in RESIDUAL_NETWORKS:
        return RESIDUAL_NETWORKS[config.network](channels, config.ways)
    return models.conv4(channels, config.ways, hidden=config.hidden, norm=config.norm, image_size=size,
                        downsample="maxpool" if config.max_pool else "stride")


def build_learner(config: ExperimentConfig, device: torch.device | str = "cpu") -> MAML:
    """The `MAML` learner of `config` on `device`, initialised from ``config.seed``."""
    torch.manual_seed(config.seed)
    model = build_model(config).to(device=torch.device(device), dtype=config.torch_dtype)
    return MAML(model, inner_lr=config.inner_lr, inner_steps=config.inner_steps,
                eval_inner_steps=config.eval_inner_steps, first_order=config.first_order, backend=config.backend,
                adapt_bn_affine=config.adapt_bn_affine, inner_loss=config.inner_loss,
                loss="cross_entropy" if config.classification else "mse", step_metrics=config.step_metrics)


def _check_root(config: ExperimentConfig) -> Path | None:
    if config.data_root is None:
        if config.datasource == "miniimagenet":
            raise FileNotFoundError(
                "MiniImageNet needs --data-root: a folder with images/ and train.csv, val.csv, test.csv "
                "(the Ravi & Larochelle layout)")
        return None
    root = Path(config.data_root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data root {root} does not exist (--data-root)")
    return root


def _dataset(config: ExperimentConfig, split: str):
    from . import data
    root = _check_root(config)
    if config.datasource == "omniglot":
        return data.Omniglot(root, split=split, protocol="paper", rotations=(split == "train"), pixels=config.pixels,
                             paper_val_characters=OMNIGLOT_VAL_CHARACTERS)
    return data.MiniImageNet(root, split=split)


def build_source(config: ExperimentConfig, split: str, device: torch.device | str = "cpu", seed: int | None = None,
                 dataset=None):
    """The task source for ``split`` ("train", "val" or "test"): an `EpisodeSampler` over the split's
    classes, or `SinusoidTasks` (an `OracleSinusoid` for the oracle baseline). Training uses
    ``shots``/``queries``/``meta_batch_size``; the held-out splits the ``eval_*`` values when set."""
    from . import data
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    training = split == "train"
    shots = config.shots if training or config.eval_shots is None else config.eval_shots
    queries = config.queries if training or config.eval_queries is None else config.eval_queries
    batch = config.meta_batch_size if training or config.eval_batch_size is None else config.eval_batch_size
    seed = config.seed if seed is None else seed
    if not training:
        seed += 1  # a stream of its own (fixed_episodes does not use it anyway)
    if config.datasource == "sinusoid":
        source = data.SinusoidTasks(shots, queries, device=device, seed=seed, meta_batch_size=batch,
                                    dtype=config.torch_dtype)
        return OracleSinusoid(source) if config.baseline == "oracle" else source
    dataset = _dataset(config, split) if dataset is None else dataset
    return data.EpisodeSampler(dataset, config.ways, shots, queries, batch, device=device, seed=seed,
                               dtype=config.torch_dtype)


class OracleSinusoid:
    """The reference code's "oracle" sinusoid baseline: every input is ``[x, amplitude, phase]``.

    Amplitude and phase are recovered exactly from each task's (noise-free) points by least squares
    on ``A sin(x - φ) = a sin x - b cos x`` with ``a = A cos φ``, ``b = A sin φ``. Same interface as
    the source it wraps (``sample``, ``fixed_episodes``, ``state_dict``, ``load_state_dict``)."""

    def __init__(self, source):
        self.source = source
        self.meta_batch_size = source.meta_batch_size

    @staticmethod
    def _with_task_inputs(batch: TaskBatch) -> TaskBatch:
        x = torch.cat([batch.support_x, batch.query_x], 1).squeeze(-1)
        y = torch.cat([batch.support_y, batch.query_y], 1).squeeze(-1)
        basis = torch.stack([torch.sin(x), -torch.cos(x)], -1)  # [T, n, 2]
        coef = torch.linalg.lstsq(basis, y.unsqueeze(-1)).solution.squeeze(-1)  # [T, 2]: a, b
        amplitude, phase = coef.norm(dim=-1), torch.atan2(coef[:, 1], coef[:, 0])

        def widen(inputs):
            extra = torch.stack([amplitude, phase], -1).unsqueeze(1).expand(-1, inputs.shape[1], -1)
            return torch.cat([inputs, extra.to(inputs.dtype)], -1)

        return TaskBatch(widen(batch.support_x), batch.support_y, widen(batch.query_x), batch.query_y)

    def sample(self, meta_batch_size: int | None = None) -> TaskBatch:
        return self._with_task_inputs(self.source.sample(meta_batch_size))

    def fixed_episodes(self, num_episodes: int, seed: int = 0, meta_batch_size: int | None = None):
        for batch in self.source.fixed_episodes(num_episodes, seed, meta_batch_size):
            yield self._with_task_inputs(batch)

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)


def effective_config(config: ExperimentConfig) -> ExperimentConfig:
    """Apply the reference code's rule for the oracle baseline: it is pretrained only
    (pretrain_iterations += metatrain_iterations; metatrain_iterations = 0)."""
    if config.baseline == "oracle" and config.iterations:
        return config.replace(pretrain_iterations=config.pretrain_iterations + config.iterations, iterations=0)
    return config
