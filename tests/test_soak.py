"""Soak (issue 14, item 6), short: a CPU training run with validation every 20 iterations and a
checkpoint every 10 keeps its resident memory flat after warm-up (benchmarks/soak.py; the long run
is ``python benchmarks/soak.py --minutes 20``). A deliberate leak shows the measurement catches one."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.soak import soak  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc/self/status (Linux)")

GROWTH_BOUND_MIB = 8.0  # measured: 0.1 MiB over 6 s after warm-up (~300 iterations, 15 validations, 30 checkpoints)


def test_resident_memory_stays_flat_during_training_with_eval_and_checkpoints(tmp_path):
    record = soak(8, tmp_path / "run", warmup_s=2.5, sample_s=0.2)
    summary = record["summary"]
    print(summary)
    assert summary["validations"] >= 3 and summary["checkpoints_written"] >= 5, summary  # the run did exercise them
    assert summary["max_growth_after_warmup_mib"] < GROWTH_BOUND_MIB, summary


def test_the_measurement_catches_a_leak(tmp_path):
    # 4 MiB kept per step (the first ~60 MiB refill memory freed after loading the data, without growing RSS)
    summary = soak(4, tmp_path / "run", warmup_s=1.5, sample_s=0.2, leak_bytes_per_step=4 << 20)["summary"]
    assert summary["max_growth_after_warmup_mib"] > GROWTH_BOUND_MIB, summary
