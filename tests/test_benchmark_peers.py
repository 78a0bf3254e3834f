"""Every benchmark peer computes what it is timed as computing: the learner each peer of
benchmarks/configs.py runs (`make_learner`: maml_fast's backends, and the torch.func recipe of
benchmarks/functorch_peer.py) gives the same second-order meta-loss and meta-gradient as the independent
float64 reference (`reference_maml`), on both benchmark configurations shrunk to test size (same network
family, downsampling, channels and inner-step structure). A peer that cannot run on the CPU is skipped
with its reasons ("triton" runs under the test session's interpreter, tests/conftest.py).

Except the functorch peer on those networks: its meta-gradient through BatchNorm is not MAML's (see
`test_functorch_peer_meta_gradient_through_batch_norm_is_not_mamls`, which asserts that as it stands);
without BatchNorm it is exact.

The graphed peers ("<backend>+graph") are timed on CUDA only; on the CPU their wiring runs through
`EmulatedGraphBackend` and takes the eager peer's steps."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import maml_fast as mf
from maml_fast.cuda_graph import EmulatedGraphBackend
import reference_maml as ref
from benchmarks.configs import (CONFIGS, GRAPH_WARMUP, GRAPHED_PEERS, PEERS, base_peer, make_learner, meta_step,
                                unavailable_reason)
from conftest import cpu_backend_param, cuda_initialisations
from test_exactness import TOL, rel_err

# The conv4 configurations at test size (the ResNet-12 ones are checked against the loop in test_resnet12.py;
# the per-task reference of reference_maml.py runs nn.Sequential networks).
SMALL = {
    "omniglot_5w1s": dict(tasks=2, ways=3, queries_per_class=2, image_size=8, hidden=4),
    "miniimagenet_5w1s": dict(tasks=2, ways=3, queries_per_class=2, inner_steps=2, image_size=16, hidden=4),
}


def meta_gradient_errors(config_name, peer, norm="batch"):
    """(meta-loss error, {parameter: meta-gradient error}) of `peer`'s learner against the reference,
    float64, relative; on the configuration's network (conv4 with BatchNorm) or the same without norm."""
    config = dataclasses.replace(CONFIGS[config_name], **SMALL[config_name])
    net = config.make_net(dtype=torch.float64)
    if norm != "batch":
        torch.manual_seed(0)
        net = mf.models.conv4(config.channels, config.ways, config.hidden, config.downsample,
                              image_size=config.image_size, norm=norm).double()
    batch = config.make_batch(dtype=torch.float64)
    theta = {n: p.detach().clone().requires_grad_() for n, p in net.named_parameters()}
    expected, _, _ = ref.meta_objective(net, theta, ref.Config(steps=config.inner_steps, inner_lr=config.inner_lr),
                                        batch)
    expected_grads = dict(zip(theta, torch.autograd.grad(expected, list(theta.values()))))

    learner = make_learner(peer, net, config)
    loss = learner(batch).loss
    loss.backward()
    # the conv biases before each BatchNorm have a zero meta-gradient: their rounding noise is judged
    # against 1e-3 of the largest gradient (as in test_exactness.py)
    floor = 1e-3 * max(float(g.norm()) for g in expected_grads.values())
    return rel_err(loss.detach(), expected.detach()), {n: rel_err(p.grad, expected_grads[n], floor)
                                                       for n, p in net.named_parameters()}


@pytest.mark.parametrize("peer", [cpu_backend_param(name) for name in PEERS if name != "functorch"])
@pytest.mark.parametrize("config_name", list(SMALL))
def test_peer_meta_gradient_matches_reference(config_name, peer):
    loss_error, errors = meta_gradient_errors(config_name, peer)
    assert loss_error <= TOL
    assert all(error <= TOL for error in errors.values()), errors


@pytest.mark.parametrize("config_name", list(SMALL))
def test_functorch_recipe_matches_reference_without_batch_norm(config_name):
    """The torch.func recipe itself is exact second-order MAML: on the benchmark networks without their
    BatchNorm layers its meta-gradient is the reference's."""
    loss_error, errors = meta_gradient_errors(config_name, "functorch", norm="none")
    assert loss_error <= TOL
    assert all(error <= TOL for error in errors.values()), errors


@pytest.mark.parametrize("config_name", list(SMALL))
def test_functorch_peer_meta_gradient_through_batch_norm_is_not_mamls(config_name):
    """What the functorch peer computes on the benchmark networks (conv4 with BatchNorm), as it stands
    (torch 2.14.1): the meta-loss is the reference's, the meta-gradient is not; even the conv bias that
    each BatchNorm cancels gets a non-zero meta-gradient. It is torch.func.grad inside vmap that gets
    the second-order term through BatchNorm wrong: maml_fast's "vmap" backend (vmap of the forward
    only, torch.autograd.grad outside) agrees with the reference (above), and so did the same recipe
    with a Python loop over the tasks instead of vmap (checked by hand when this was found).
    So its benchmark times (benchmarks/RESULTS.md) are for a computation that differs from MAML's; this
    test fails as soon as the peer computes the same meta-gradient (e.g. a PyTorch fix)."""
    loss_error, errors = meta_gradient_errors(config_name, "functorch")
    assert loss_error <= TOL
    assert max(errors.values()) > 1e-4, errors
    assert errors["0.bias"] > 1e-2, "the cancelled first conv bias got (almost) its zero meta-gradient"


def _graphed_peer_param(peer):
    # Triton's kernels are launched outside torch's dispatcher, so the emulator (which records and replays
    # aten ops) cannot replay them; the CUDA run captures them for real.
    if base_peer(peer) == "triton":
        return pytest.param(peer, marks=pytest.mark.skip(reason="the CPU graph emulator records aten ops; Triton "
                                                                "kernels launch outside the dispatcher"))
    return pytest.param(peer, marks=cpu_backend_param(base_peer(peer)).marks)


@pytest.mark.parametrize("peer", [_graphed_peer_param(peer) for peer in GRAPHED_PEERS])
def test_graphed_peer_takes_the_eager_peers_steps(peer):
    """A graphed peer's step (GraphedMetaStep: eager warm-ups, one capture, then replays), on the CPU
    emulator, gives the same meta-loss as its eager peer's MetaStep step after step (float64, same net,
    batch and Adam), and what is timed on CUDA is replays of one graph. Not timed here: the CPU refuses
    the graphed peers with a reason."""
    config = dataclasses.replace(CONFIGS["omniglot_5w1s"], **SMALL["omniglot_5w1s"])
    eager = meta_step(base_peer(peer), config, dtype=torch.float64)
    graphed = meta_step(peer, config, dtype=torch.float64, capture_backend=EmulatedGraphBackend())
    for _ in range(GRAPH_WARMUP + 3):
        expected = eager()["meta_loss"].clone()
        assert rel_err(graphed()["meta_loss"], expected) <= 1e-12
    stats = graphed.func.stats
    assert (stats.warmup_steps, stats.captures, stats.replays, stats.eager_steps) == (GRAPH_WARMUP, 1, 3, 0)
    assert "CUDA graphs need a CUDA device" in unavailable_reason(peer, "cpu")


def test_the_benchmark_scripts_touch_no_cuda_on_import():
    """Importing the table and the profiler and listing the CPU's peers initialise no CUDA (the GPU check
    and the test collection import them)."""
    assert cuda_initialisations("import benchmarks.bench_table, benchmarks.profile_step\n"
                                "from benchmarks.configs import available_peers\navailable_peers('cpu')") == []


def test_tables_record_the_allocator_settings(monkeypatch):
    """glibc's MALLOC_* and torch's THP_MEM_ALLOC_ENABLE move CPU step times by 10% and more: every table
    says which were set; other variables stay out."""
    from benchmarks.bench_table import environment
    for name in [n for n in os.environ if n.startswith("MALLOC_")] + ["THP_MEM_ALLOC_ENABLE", "GLIBC_TUNABLES", "LD_PRELOAD"]:
        monkeypatch.delenv(name, raising=False)
    assert environment("cpu")["allocator_env"] == {}
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "4294967295")
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    monkeypatch.setenv("MAML_FAST_UNRELATED", "x")
    assert environment("cpu")["allocator_env"] == {"MALLOC_TRIM_THRESHOLD_": "4294967295", "THP_MEM_ALLOC_ENABLE": "1"}


def test_steady_allocator_is_applied_and_recorded(tmp_path):
    """`bench_table --steady-allocator` pins glibc's thresholds before timing and says so in the table (a
    process of its own: mallopt changes the whole process)."""
    from benchmarks.bench_table import STEADY_MALLOPT
    out = tmp_path / "table.json"
    subprocess.run([sys.executable, "-m", "benchmarks.bench_table", "--steady-allocator", "--configs", "omniglot_5w1s",
                    "--peers", "torch", "--tasks", "2", "--rounds", "1", "--threads", "1", "--device", "cpu",
                    "--out", str(out)], check=True, cwd=Path(__file__).resolve().parents[1], capture_output=True)
    table = json.loads(out.read_text())
    assert table["environment"]["mallopt"] == STEADY_MALLOPT
    assert table["configs"]["omniglot_5w1s"]["median_s"]["torch"] > 0
