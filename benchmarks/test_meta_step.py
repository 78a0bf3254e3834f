"""pytest-benchmark suite: one second-order meta-step per configuration and peer, side by side in one
process. Run: ``python -m pytest benchmarks/ --benchmark-json=benchmarks/results/<name>.json``."""
import pytest
import torch

from .configs import CONFIGS, PEERS, available_peers, meta_step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The loop peer on MiniImageNet and ResNet-12 takes many seconds per step on a CPU: fewer rounds there.
ROUNDS = {"omniglot_5w1s": 5, "omniglot_20w1s": 2, "miniimagenet_5w1s": 2, "resnet12_5w1s_32px": 1,
          "resnet12_narrow_5w1s_32px": 2}


@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_meta_step(benchmark, config_name, peer):
    if peer not in available_peers(DEVICE):
        pytest.skip(f"backend {peer!r} is not available on {DEVICE}")
    benchmark.group = config_name
    benchmark.extra_info.update(device=DEVICE, torch=torch.__version__)
    step = meta_step(peer, CONFIGS[config_name], DEVICE)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)

    def timed():
        step()
        sync()
    benchmark.pedantic(timed, rounds=ROUNDS[config_name], warmup_rounds=1)
