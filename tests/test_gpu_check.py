"""The prepared GPU check (benchmarks/gpu_check.sh) rehearsed on the CPU: ``GPU_CHECK_DRY_RUN=1`` runs every
stage with tiny sizes, skipping the CUDA-only ones with the reason. Every stage must report rc=0 or a stated
skip, the stages that can run on a CPU must have run, and what comes back from the device machine ($OUT) must
fit its limits (at most 8 files, plain names). Runs in CI: about a minute and a half on 2 cores."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("install", "bench_graphed", "op_error_probe", "profile", "paper", "tests", "sanitizer_memcheck",
          "sanitizer_racecheck", "conv_primitives", "bench_resnet12")
RUN_ON_THE_CPU = ("install", "bench_graphed", "op_error_probe", "profile", "paper", "tests")
BUDGET_S = 240


def test_the_dry_run_runs_every_stage_or_says_why_not(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, GPU_CHECK_DRY_RUN="1", OUT=str(out), PYTHON=sys.executable, GPU_CHECK_BUDGET_S=str(BUDGET_S),
               OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # as a user's shell has it (the session's setting is for the tests)
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=BUDGET_S + 120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    status = (out / "status.txt").read_text()
    reported = dict(re.findall(r"^(\w+) rc=(\d+ \d+s|skipped \(.+\))$", status, re.MULTILINE))
    assert set(reported) == set(STAGES), status
    bad = {name: rc for name, rc in reported.items() if not (rc.startswith("0 ") or rc.startswith("skipped ("))}
    assert not bad, status
    assert all(reported[name].startswith("0 ") for name in RUN_ON_THE_CPU), status
    assert "sanitizer_memcheck rc=skipped (dry run: CUDA only)" in status
    # the headline table was printed (the graphed peers listed as not timed, with the reason)
    assert "## omniglot_20w1s" in status and "# not timed: fused+graph: CUDA graphs need a CUDA device" in status
    assert "  paper RESULT" in status and "  probe crashed: 0" in status
    files = [path for path in out.rglob("*") if path.is_file()]
    assert len(files) <= 8 and all(re.fullmatch(r"[\w.-]+", path.name) for path in files), files
    assert {"status.txt", "build.log", "bench_graphed.json", "profile_miniimagenet.txt", "paper_omniglot_5w1s_eval.json",
            "tests.log"} <= {path.name for path in files}
