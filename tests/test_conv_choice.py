"""The measured per-primitive conv choice of the "fused" backend (maml_fast/backends/conv_choice.py):
the committed table, the routing of a primitive to the Triton kernels where a table says so (on the CPU
through Triton's interpreter, tests/conftest.py), and the table written from the benchmark's output."""
from __future__ import annotations

import json

import pytest
import torch

from maml_fast.backends import conv_choice
from maml_fast.backends import triton as triton_backend
from maml_fast.backends.fused import FUSED, ChannelsLastConvPrimitives
from maml_fast.ops import conv2d as conv_ops
from maml_fast.precision import tf32

from conftest import cuda_initialisations

# tasks, batch, in, out, size 7 (prime), stride 2: the tiny layer of the routing test
TASKS, BATCH, CIN, COUT, SIZE = 2, 3, 3, 5, 7
GEO = conv_ops.ConvGeometry(TASKS, (2, 2), (1, 1), (SIZE, SIZE), (3, 3))
KEY = conv_choice.shape_key(TASKS, BATCH, CIN, COUT, GEO)


def test_committed_table_loads_and_defaults_to_cudnn():
    table = json.loads(conv_choice.TABLE_PATH.read_text())
    assert set(table) == {"devices", "sources"}
    x = torch.randn(BATCH, TASKS * CIN, SIZE, SIZE)
    for primitive in conv_choice.PRIMITIVES:
        assert conv_choice.implementation(primitive, x, CIN, COUT, GEO) == "cudnn"


def test_precision_key_follows_dtype_and_the_tf32_switch():
    with tf32(True):
        assert conv_choice.precision_key(torch.float32) == "tf32"
        assert conv_choice.precision_key(torch.bfloat16) == "bf16"
    with tf32(False):
        assert conv_choice.precision_key(torch.float32) == "fp32"
    assert conv_choice.precision_key(torch.float64) == "fp64"


def _table(primitive: str, winner: str = "triton", precision: str = "fp32", key: str = KEY) -> dict:
    return {"cpu": {primitive: {precision: {key: {"winner": winner, "cudnn_ms": 1.0, "triton_ms": 0.5}}}}}


@pytest.mark.parametrize("primitive", conv_choice.PRIMITIVES)
def test_a_table_choosing_triton_routes_the_primitive_there(monkeypatch, primitive):
    """fp32 on the CPU: with the primitive's shape chosen for Triton, the fused backend's primitive runs on
    the Triton kernels (counted), channels-last where it returns activations, with the result of its
    default path; another shape, precision or primitive stays on the default path."""
    reasons = triton_backend.TRITON.unavailable_reasons(torch.device("cpu"))
    if reasons:
        pytest.skip("; ".join(reasons))
    monkeypatch.setattr(triton_backend.load_kernels(), "POISON_OUTPUTS", True)
    calls = []
    triton_prims = ChannelsLastConvPrimitives.triton
    original = getattr(type(triton_prims), primitive)
    monkeypatch.setattr(type(triton_prims), primitive,
                        lambda self, *a, **k: calls.append(primitive) or original(self, *a, **k))
    torch.manual_seed(0)
    x = torch.randn(BATCH, TASKS * CIN, SIZE, SIZE)
    weight = torch.randn(TASKS, COUT, CIN, 3, 3)
    grad_out = torch.randn(BATCH, TASKS * COUT, *GEO.output_hw())
    args = {"forward": (x, weight), "input_grad": (grad_out, weight), "weight_grad": (x, grad_out)}[primitive]
    run = lambda: getattr(FUSED.conv, primitive)(*args, GEO)  # noqa: E731
    with tf32(False):
        expected = run()
        assert calls == []
        with conv_choice.using(_table(primitive)):
            routed = run()
        assert calls == [primitive]
        for other in (_table(primitive, winner="cudnn"), _table(primitive, precision="bf16"),
                      _table(primitive, key=KEY.replace("B3", "B4")),
                      _table(next(p for p in conv_choice.PRIMITIVES if p != primitive))):
            with conv_choice.using(other):
                run()
        assert calls == [primitive]
    if primitive != "weight_grad":
        assert routed.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(routed, expected, rtol=1e-5, atol=1e-5)


def test_the_table_is_written_from_the_benchmark_output(tmp_path):
    """Per device, primitive, precision and shape: the implementation of the smaller median per call;
    a shape where Triton has no result (it failed its accuracy check) stays on cuDNN; devices that
    this run did not measure keep their entries."""
    def bench(impl, primitive, precision, shape, median):
        return {"params": {"impl": impl}, "stats": {"median": median},
                "extra_info": {"device": "GPU X", "primitive": primitive, "precision": precision,
                               "shape_key": shape, "repeat": 10}}
    runs = {"benchmarks": [bench("cudnn", "forward", "fp32", KEY, 2e-3), bench("triton", "forward", "fp32", KEY, 1e-3),
                           bench("cudnn", "forward", "bf16", KEY, 1e-3), bench("triton", "forward", "bf16", KEY, 3e-3),
                           bench("cudnn", "weight_grad", "tf32", KEY, 1e-3)],
            "datetime": "2030-01-01T00:00:00", "commit_info": {"id": "abc"}}
    results, table = tmp_path / "conv_primitives.json", tmp_path / "choices.json"
    results.write_text(json.dumps(runs))
    table.write_text(json.dumps({"devices": {"GPU Y": {"forward": {}}}, "sources": {}}))
    conv_choice.record_benchmark(results, table)
    written = json.loads(table.read_text())
    forward = written["devices"]["GPU X"]["forward"]
    assert forward["fp32"][KEY] == {"winner": "triton", "cudnn_ms": pytest.approx(0.2), "triton_ms": pytest.approx(0.1)}
    assert forward["bf16"][KEY]["winner"] == "cudnn"
    assert written["devices"]["GPU X"]["weight_grad"]["tf32"][KEY]["winner"] == "cudnn"
    assert written["devices"]["GPU Y"] == {"forward": {}}
    assert written["sources"]["GPU X"]["commit"] == "abc"


def test_the_fused_conv_choice_touches_no_gpu():
    """Importing the backends and running a fused conv on the CPU (with the committed table) initialises
    no CUDA."""
    code = ("import torch\nfrom maml_fast.backends import get_backend\nfrom maml_fast.ops import conv2d as c\n"
            "geo = c.ConvGeometry(2, (1, 1), (1, 1), (5, 5), (3, 3))\n"
            "get_backend('fused').conv.forward(torch.randn(1, 4, 5, 5), torch.randn(2, 3, 2, 3, 3), geo)\n")
    assert cuda_initialisations(code) == []
