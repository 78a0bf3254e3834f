"""The networks of the MAML paper (Finn et al., 2017), as plain `nn.Sequential` modules, the
ResNet-12 of MetaOptNet / learn2learn (`resnet12`) and the Wide ResNet of learn2learn's model zoo
(`wide_resnet`, `wrn28_10`), whose residual blocks lower through torch.fx.

BatchNorm layers are built with ``track_running_stats=False``: MAML normalises with each task's batch
statistics (transductive), as the paper's code does. ``norm="layer"`` on conv features is
``GroupNorm(1, C)``: per-example normalisation over (C, H, W) with a per-channel affine, like the
reference code's ``tf.contrib.layers.layer_norm``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_choice, check_int

_NORMS = ("batch", "layer", "none")


def _conv_norm(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels, track_running_stats=False)
    if norm == "layer":
        return nn.GroupNorm(1, channels)
    return nn.Identity()


def _conv(in_channels: int, channels: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    """A residual network's conv: no bias (a BatchNorm follows it, or a residual sum into one), size kept
    up to the stride."""
    return nn.Conv2d(in_channels, channels, kernel, stride=stride, padding=kernel // 2, bias=False)


def _pooled_head(features: int, num_classes: int) -> list[nn.Module]:
    """Global mean pool, flatten, linear classifier."""
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(features, num_classes)]


def _feature_norm(norm: str, features: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm1d(features, track_running_stats=False)
    if norm == "layer":
        return nn.LayerNorm(features)
    return nn.Identity()


def conv4(in_channels: int = 1, num_classes: int = 5, hidden: int = 64, downsample: str = "stride",
          norm: str = "batch", image_size: int | None = None) -> nn.Sequential:
    """Four 3x3 conv blocks (conv, norm, ReLU) and a linear head.

    ``downsample="stride"`` (Omniglot): stride-2 convs, then a global mean pool -> ``hidden`` features.
    ``downsample="maxpool"`` (MiniImageNet): stride-1 convs each followed by 2x2 max-pool, then flatten;
    ``image_size`` (default 84) sets the flattened size.
    """
    check_int("in_channels", in_channels, 1)
    check_int("num_classes", num_classes, 1)
    check_int("hidden", hidden, 1)
    check_choice("downsample", downsample, ("stride", "maxpool"))
    check_choice("norm", norm, _NORMS)
    layers: list[nn.Module] = []
    channels = in_channels
    for _ in range(4):
        stride = 2 if downsample == "stride" else 1
        layers += [nn.Conv2d(channels, hidden, 3, stride=stride, padding=1), _conv_norm(norm, hidden), nn.ReLU()]
        if downsample == "maxpool":
            layers.append(nn.MaxPool2d(2))
        channels = hidden
    if downsample == "stride":
        layers += _pooled_head(hidden, num_classes)
    else:
        size = 84 if image_size is None else image_size
        check_int("image_size", size, 1)
        for _ in range(4):
            size //= 2
        if size < 1:
            raise ValueError(f"image_size={image_size} is too small for four 2x2 max-pools")
        layers += [nn.Flatten(), nn.Linear(hidden * size * size, num_classes)]
    return nn.Sequential(*layers)


def mlp(sizes: tuple[int, ...] | list[int], norm: str = "none") -> nn.Sequential:
    """Fully connected net: Linear, norm, ReLU between consecutive ``sizes``; the last layer is linear."""
    if len(sizes) < 2:
        raise ValueError(f"sizes needs at least an input and an output size, got {sizes!r}")
    for size in sizes:
        check_int("sizes", size, 1)
    check_choice("norm", norm, _NORMS)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers += [_feature_norm(norm, fan_out), nn.ReLU()]
    return nn.Sequential(*layers)


def omniglot_fc(num_classes: int = 5, norm: str = "batch", in_features: int = 28 * 28) -> nn.Sequential:
    """The paper's non-convolutional Omniglot net: 256-128-64-64 hidden units (inputs flattened)."""
    return nn.Sequential(nn.Flatten(), *mlp((in_features, 256, 128, 64, 64, num_classes), norm=norm))


def sinusoid_mlp(hidden: int = 40) -> nn.Sequential:
    """The paper's regression net: 1-40-40-1 with ReLU."""
    return mlp((1, hidden, hidden, 1))


class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al., 2018) for conv features ``[B, C, H, W]``: in training, drops
    ``block_size x block_size`` squares with a probability that removes about ``drop_prob`` of the
    units, and rescales the kept ones so that the mean is kept (the scale counts the kept units of the
    whole tensor). ``tasks`` > 1 treats x as the task-batched grouped layout ``[B, T*C, H, W]``: then
    every task is rescaled by its own count, the same function as applying the layer per task."""

    def __init__(self, drop_prob: float = 0.1, block_size: int = 5):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob!r}")
        self.drop_prob, self.block_size = float(drop_prob), check_int("block_size", block_size, 1)

    def forward(self, x: torch.Tensor, tasks: int = 1) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        height, width = x.shape[-2:]
        block = min(self.block_size, height, width)
        # Centres are drawn where a whole block fits; gamma makes the expected dropped fraction drop_prob.
        valid = (height - block + 1) * (width - block + 1)
        gamma = self.drop_prob * height * width / (block * block * valid)
        centres = torch.zeros_like(x)
        centres[..., block // 2:height - (block - 1) // 2, block // 2:width - (block - 1) // 2] = (
            torch.rand_like(x[..., :height - block + 1, :width - block + 1]) < gamma).to(x.dtype)
        dropped = F.max_pool2d(centres, block, stride=1, padding=block // 2)[..., :height, :width]
        keep = 1.0 - dropped
        per_task = keep.reshape(keep.shape[0], tasks, -1).transpose(0, 1).reshape(tasks, -1)
        scale = per_task.shape[1] / per_task.sum(1).clamp_min(1.0)
        shape = (1, tasks) + (1,) * (x.dim() - 2)
        return x * keep * scale.reshape(shape).repeat_interleave(x.shape[1] // tasks, dim=1)


class ResidualBlock(nn.Module):
    """ResNet-12's block: three 3x3 conv + BatchNorm (LeakyReLU 0.1 between them), a 1x1 conv + BatchNorm
    shortcut, the sum through LeakyReLU, a 2x2 max-pool, then DropBlock (or nothing)."""

    def __init__(self, in_channels: int, channels: int, drop_prob: float, block_size: int):
        super().__init__()
        self.conv1 = _conv(in_channels, channels, 3)
        self.bn1 = _conv_norm("batch", channels)
        self.relu1 = nn.LeakyReLU(0.1)
        self.conv2 = _conv(channels, channels, 3)
        self.bn2 = _conv_norm("batch", channels)
        self.relu2 = nn.LeakyReLU(0.1)
        self.conv3 = _conv(channels, channels, 3)
        self.bn3 = _conv_norm("batch", channels)
        self.shortcut = nn.Sequential(_conv(in_channels, channels, 1), _conv_norm("batch", channels))
        self.relu3 = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)
        self.drop = DropBlock(drop_prob, block_size) if drop_prob > 0 else nn.Identity()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.drop(self.pool(self.relu3(out + self.shortcut(x))))


def resnet12(in_channels: int = 3, num_classes: int = 5, channels: tuple[int, ...] = (64, 160, 320, 640),
             drop_prob: float = 0.0, block_size: int = 5) -> nn.Sequential:
    """ResNet-12 as in MetaOptNet and learn2learn: four residual blocks (64-160-320-640 channels by
    default, each halving the image), a global mean pool and a linear head. ``drop_prob`` > 0 adds
    DropBlock (``block_size``) after each block. Any image size of at least 16 works (84 for MiniImageNet)."""
    check_int("in_channels", in_channels, 1)
    check_int("num_classes", num_classes, 1)
    if len(channels) != 4:
        raise ValueError(f"channels must give the width of the 4 blocks, got {channels!r}")
    for width in channels:
        check_int("channels", width, 1)
    blocks = []
    for width in channels:
        blocks.append(ResidualBlock(in_channels, width, drop_prob, block_size))
        in_channels = width
    return nn.Sequential(*blocks, *_pooled_head(channels[-1], num_classes))


class WideBlock(nn.Module):
    """A Wide ResNet block (Zagoruyko & Komodakis, 2016, type B(3,3)), pre-activation: BatchNorm-ReLU,
    3x3 conv (with the block's stride), BatchNorm-ReLU, dropout (or nothing), 3x3 conv, plus the input;
    where the shape changes, the shortcut is a 1x1 conv of the first BatchNorm-ReLU's output."""

    def __init__(self, in_channels: int, channels: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = _conv_norm("batch", in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = _conv(in_channels, channels, 3, stride)
        self.bn2 = _conv_norm("batch", channels)
        self.relu2 = nn.ReLU()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = _conv(channels, channels, 3)
        same_shape = in_channels == channels and stride == 1
        self.shortcut = None if same_shape else _conv(in_channels, channels, 1, stride)

    def forward(self, x):
        h = self.relu1(self.bn1(x))
        out = self.conv2(self.drop(self.relu2(self.bn2(self.conv1(h)))))
        return out + (x if self.shortcut is None else self.shortcut(h))


def wide_resnet(in_channels: int = 3, num_classes: int = 5, depth: int = 28, widen: int = 10,
                dropout: float = 0.0) -> nn.Sequential:
    """Wide ResNet WRN-``depth``-``widen`` (Zagoruyko & Komodakis, 2016): a 3x3 conv of 16 channels, three
    groups of (depth - 4) / 6 `WideBlock` s of 16k, 32k and 64k channels (k = ``widen``; the second and
    third groups halve the image), BatchNorm-ReLU, a global mean pool and a linear head. ``dropout`` > 0
    adds dropout between each block's convs. Any image size works (84 for MiniImageNet)."""
    check_int("in_channels", in_channels, 1)
    check_int("num_classes", num_classes, 1)
    if check_int("depth", depth, 10) % 6 != 4:
        raise ValueError(f"depth must be 6n + 4 (n >= 1 blocks per group), got {depth!r}")
    check_int("widen", widen, 1)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    layers: list[nn.Module] = [_conv(in_channels, 16, 3)]
    channels = 16
    for group, stride in enumerate((1, 2, 2)):
        width = 16 * widen * 2 ** group
        for block in range((depth - 4) // 6):
            layers.append(WideBlock(channels, width, stride if block == 0 else 1, float(dropout)))
            channels = width
    layers += [_conv_norm("batch", channels), nn.ReLU(), *_pooled_head(channels, num_classes)]
    return nn.Sequential(*layers)


def wrn28_10(in_channels: int = 3, num_classes: int = 5, dropout: float = 0.0) -> nn.Sequential:
    """WRN-28-10 (learn2learn's model zoo): `wide_resnet` with depth 28 and widen 10, 36.5M parameters."""
    return wide_resnet(in_channels, num_classes, depth=28, widen=10, dropout=dropout)
