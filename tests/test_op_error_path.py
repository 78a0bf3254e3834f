"""The compiled ops' error path (tests/op_error_probe.py): every ``torch.ops.maml_fast.*`` operator,
called directly with each bad value its C++ checks reject, raises the ValueError / TypeError naming
the argument, in a process of its own that exits normally (a segfault would be a negative returncode)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from maml_fast import _extension

sys.path.insert(0, str(Path(__file__).parent))
import op_error_probe as probe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(_extension.LOAD_ERROR is not None, reason=str(_extension.LOAD_ERROR))

#: The cases of the issue's report (benchmarks/RESULTS.md): a segfault on the H100 image.
REPORTED = ["batch_norm_relu:eps=-1", "batch_norm_relu:wrong weight shape", "fast_weight_update:mismatched grad shape"]


def _schemas() -> set[str]:
    """The operators csrc/ defines (``m.def("name(...``)."""
    names = set()
    for source in (REPO / "csrc").glob("*.cpp"):
        names |= set(re.findall(r'm\.def\(\s*"(\w+)\(', source.read_text()))
    return names


def test_every_compiled_op_has_cases():
    defined = _schemas()
    assert len(defined) == 18
    registered = {name for name in defined if hasattr(torch.ops.maml_fast, name)}
    assert registered == defined
    assert {case.op for case in probe.CASES.values()} == defined
    # and every check kind of csrc/ is exercised: both error types, for every op with arguments of each
    assert {case.error for case in probe.CASES.values()} == {"ValueError", "TypeError"}


def test_every_cpu_case_raises_in_a_process_that_exits_normally():
    reports = probe.probe(("cpu",), isolation="fork")
    assert len(reports) == sum("cpu" in case.devices for case in probe.CASES.values()) >= 70
    assert all(r["status"] == "ok" for r in reports), probe.summary(reports)
    assert all(r["raised"] == r["expected"] for r in reports)


def test_the_reported_cases_in_fresh_interpreters(capsys):
    """As a user calls them: one new interpreter per call (through the script's command line; its
    CUDA cases run where the CUDA kernels can, else are skipped with the reason)."""
    code = probe.main(["--devices", "cpu", "cuda", "--isolation", "spawn", "--jobs", "3", "--only", *REPORTED])
    out = capsys.readouterr().out
    assert code == 0, out
    if probe.cuda_skip_reason() is None:
        assert "ok: 6" in out, out
    else:
        assert "ok: 3" in out and "skipped: 3" in out and f"skipped because: {probe.cuda_skip_reason()}" in out, out


@pytest.mark.parametrize("isolation", ["fork", "spawn"])
def test_the_probe_reports_a_crash(isolation, monkeypatch, capsys):
    """A case whose process dies by a signal is a failure, reported with the signal and the command
    that reruns it (the probe's case processes send themselves SIGSEGV here)."""
    monkeypatch.setenv(probe.SELF_TEST_VARIABLE, "SIGSEGV")
    reports = probe.probe(("cpu",), isolation=isolation, names=REPORTED[:1])
    assert reports[0]["status"] == "crashed" and reports[0]["signal"] == "SIGSEGV"
    text = probe.summary(reports)
    assert "crashed: 1" in text and "--case batch_norm_relu:eps=-1 --device cpu" in text
    assert "Segmentation fault" in reports[0]["stderr"]  # faulthandler's Python stack
    monkeypatch.setenv(probe.SELF_TEST_VARIABLE, "SIGABRT")
    assert probe.main(["--only", REPORTED[0]]) == 1
    assert "SIGABRT" in capsys.readouterr().out


def test_the_probe_reports_a_missing_or_wrong_error(monkeypatch):
    """A case that raises nothing, or the wrong exception, or one whose message does not name the
    argument, fails too."""
    good = probe.CASES[REPORTED[0]]
    monkeypatch.setitem(probe.CASES, "valid", probe.Case("batch_norm_relu", "valid", "eps", "ValueError",
                                                          lambda torch, d: good.build(torch, d)[:3] + (1e-5,)))
    monkeypatch.setitem(probe.CASES, "wrong type", probe.Case("batch_norm_relu", "x", "eps", "TypeError", good.build))
    monkeypatch.setitem(probe.CASES, "wrong name", probe.Case("batch_norm_relu", "x", "weight", "ValueError", good.build))
    reports = {r["case"]: r for r in probe.probe(("cpu",), names=["valid", "wrong type", "wrong name"])}
    assert reports["valid"]["status"] == "failed" and reports["valid"]["problem"] == "no exception"
    assert reports["wrong type"]["problem"] == "wrong exception"
    assert reports["wrong name"]["problem"] == "message does not name it"
