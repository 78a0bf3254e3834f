"""benchmarks/flop_floor.py: the FLOPs it counts are those of second-order MAML, and its floor and ratios
are that count over the measured rate.

The count is checked against MAML's structure rather than against itself: with one inner step, each
convolution or linear layer does its forward FLOPs f nine times per support example (forward; inner
input and weight gradients; their four double-backward products; the meta-backward of the forward) and
three times per query example (forward, input and weight gradient). A layer that reads the images (the
first conv, and a residual network's first shortcut) needs no input gradient: four and two times, and once
more per support example, since torch's double backward of such a convolution still computes the images'
gradient, which nothing uses (`flop_floor` counts it: a small over-estimate of the work). f comes from
counting the layers' own forwards; the convolutions have stride 1 (with stride 2 torch's double backward
computes a larger weight gradient and narrows it)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import flop_floor
from benchmarks.configs import CONFIGS


def forward_flops(net: torch.nn.Module, images: torch.Tensor) -> tuple[int, int]:
    """(FLOPs of the whole forward, FLOPs of the convolutions that read the images themselves)."""
    first = []
    hooks = [m.register_forward_hook(lambda m, args, out: first.append(m) if args[0] is images else None)
             for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(images)
    for hook in hooks:
        hook.remove()
    with FlopCounterMode(display=False) as first_counter, torch.no_grad():
        for module in first:
            module(images)
    return counter.get_total_flops(), first_counter.get_total_flops()


@pytest.mark.parametrize("name, sizes", [
    ("miniimagenet_5w1s", dict(tasks=1, ways=2, shots=1, queries_per_class=1, image_size=19, hidden=7)),
    ("miniimagenet_5w1s", dict(tasks=3, ways=3, shots=2, queries_per_class=1, image_size=19, hidden=5)),
    ("resnet12_5w1s_32px", dict(tasks=2, ways=5, shots=1, queries_per_class=3, image_size=16,
                                resnet_widths=(4, 6, 7, 10))),
])
def test_loop_step_flops_are_second_order_mamls(name, sizes):
    config = dataclasses.replace(CONFIGS[name], inner_steps=1, **sizes)
    # (two images: MAML's BatchNorm normalises with the batch's statistics, which one 1x1 map has not)
    whole, first_layers = (flops // 2 for flops in forward_flops(config.make_net(), torch.randn(
        2, config.channels, config.image_size, config.image_size)))
    support, query = config.ways * config.shots, config.ways * config.queries_per_class
    expected = config.tasks * (first_layers * (5 * support + 2 * query)
                               + (whole - first_layers) * (9 * support + 3 * query))
    counted = flop_floor.step_flops(config)
    assert sum(counted.values()) == expected, counted


def test_floor_and_ratios_are_the_count_over_the_rate():
    table = flop_floor.floor_table(6e9, 3e9, {"loop": 8.0, "fused": 3.0})
    assert table["floor_s"] == pytest.approx(2.0)
    assert table["peers"]["loop"]["most_any_step_can_be_faster"] == pytest.approx(4.0)
    assert table["peers"]["fused"]["most_any_step_can_be_faster"] == pytest.approx(1.5)
    assert table["peers"]["fused"]["flop_per_s"] == pytest.approx(2e9)


def test_the_rate_is_the_best_product_measured():
    rate = flop_floor.best_matmul_rate(shapes=[(64, 96, 32), (33, 17, 5)], repeats=2)
    assert len(rate["by_product"]) == 2 * len(flop_floor.matmul_products())
    assert rate["flop_per_s"] == max(rate["by_product"].values()) > 0


def test_main_writes_the_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(flop_floor, "MATMUL_SHAPES", ((64, 64, 64),))
    out = tmp_path / "floor.json"
    flop_floor.main(["--config", "omniglot_5w1s", "--tasks", "1", "--peers", "loop", "fused", "--rounds", "1",
                     "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["step_flops"] == sum(results["step_flops_by_op"].values()) > 0
    assert results["floor_s"] == pytest.approx(results["step_flops"] / results["matmul"]["flop_per_s"])
    assert set(results["peers"]) == {"loop", "fused"} and not results["failed"]
    assert "floor" in capsys.readouterr().out
