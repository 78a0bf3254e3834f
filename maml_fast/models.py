"""The networks of the MAML paper (Finn et al., 2017), as plain `nn.Sequential` modules.

BatchNorm layers are built with ``track_running_stats=False``: MAML normalises with each task's batch
statistics (transductive), as the paper's code does. ``norm="layer"`` on conv features is
``GroupNorm(1, C)``: per-example normalisation over (C, H, W) with a per-channel affine, like the
reference code's ``tf.contrib.layers.layer_norm``.
"""
from __future__ import annotations

from torch import nn

from .checks import check_choice, check_int

_NORMS = ("batch", "layer", "none")


def _conv_norm(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels, track_running_stats=False)
    if norm == "layer":
        return nn.GroupNorm(1, channels)
    return nn.Identity()


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
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, num_classes)]
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
