"""Which implementation runs each conv primitive of the "fused" backend: cuDNN (the default) or the Triton
kernels, chosen by measurement per (GPU, primitive, precision, layer shape).

The measured winners are committed in ``conv_choices.json`` beside this file, written from the
per-primitive benchmark's pytest-benchmark output (benchmarks/test_conv_primitives.py, which times both
in the fused backend's layout) by

    python -m maml_fast.backends.conv_choice benchmarks/results/conv_primitives.json

A device, primitive, precision or shape without an entry runs on cuDNN, and so does every primitive where
Triton cannot run. Precision is that of the call: the input dtype, and for float32 PyTorch's cuDNN-conv
TF32 flag (`maml_fast.precision.tf32`, which the Triton kernels follow too): "fp32", "tf32", "bf16", ...
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
from pathlib import Path

import torch

from ..precision import conv_fp32_precision

TABLE_PATH = Path(__file__).with_name("conv_choices.json")
PRIMITIVES = ("forward", "input_grad", "weight_grad")
IMPLEMENTATIONS = ("cudnn", "triton")
_DTYPE_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def shape_key(tasks: int, batch: int, in_channels: int, out_channels: int, geo) -> str:
    """The layer shape a choice is recorded for (geo: `maml_fast.ops.conv2d.ConvGeometry`)."""
    pair = lambda p: f"{p[0]}x{p[1]}"  # noqa: E731
    return (f"T{tasks}-B{batch}-C{in_channels}-O{out_channels}-{pair(geo.input_hw)}-k{pair(geo.kernel_hw)}"
            f"-s{pair(geo.stride)}-p{pair(geo.padding)}")


def precision_key(dtype: torch.dtype) -> str:
    """"bf16", "fp16", "fp64" by dtype; float32 is "tf32" when cuDNN convolutions may use TF32, else "fp32"."""
    if dtype == torch.float32:
        return "tf32" if conv_fp32_precision() == "tf32" else "fp32"
    return _DTYPE_KEYS.get(dtype, str(dtype))


@functools.cache
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(device: torch.device) -> str:
    """The table's device key: the GPU's name ("NVIDIA H200") on CUDA, else the device type."""
    if device.type == "cuda":
        return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())
    return device.type


@functools.cache
def _committed() -> dict:
    return json.loads(TABLE_PATH.read_text())["devices"]


_override: dict | None = None


@contextlib.contextmanager
def using(devices: dict):
    """Consult `devices` (the ``"devices"`` part of a table) instead of the committed table inside the
    block (tests; the benchmark's cuDNN timings, with an empty table)."""
    global _override
    saved, _override = _override, devices
    try:
        yield
    finally:
        _override = saved


def implementation(primitive: str, t: torch.Tensor, in_channels: int, out_channels: int, geo) -> str:
    """"triton" or "cudnn" for `primitive` on activation-like `t` (x, or grad_out for the input grad:
    batch, dtype and device) of a layer with these channels per task and geometry."""
    table = _committed() if _override is None else _override
    winners = table.get(device_name(t.device)) if table else None
    if not winners:   # the common case: nothing measured on this device
        return "cudnn"
    entry = winners.get(primitive, {}).get(precision_key(t.dtype), {}).get(
        shape_key(geo.tasks, t.shape[0], in_channels, out_channels, geo))
    if entry is None or entry["winner"] != "triton":
        return "cudnn"
    from .triton import TRITON
    return "triton" if TRITON.is_available(t.device) else "cudnn"


# ------------------------------------------------------------------------------- writing the table
def winners_from_benchmark(data: dict) -> dict:
    """``{device: {primitive: {precision: {shape: {"winner", "cudnn_ms", "triton_ms"}}}}}`` from the
    pytest-benchmark JSON of benchmarks/test_conv_primitives.py: per shape, the implementation of the
    smaller median time per call (one that failed its accuracy check has no entry, so cannot win)."""
    times: dict = {}
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        cell = (times.setdefault(info["device"], {}).setdefault(info["primitive"], {})
                .setdefault(info["precision"], {}).setdefault(info["shape_key"], {}))
        cell[f"{bench['params']['impl']}_ms"] = bench["stats"]["median"] * 1e3 / info["repeat"]
    for primitives in times.values():
        for precisions in primitives.values():
            for shapes in precisions.values():
                for cell in shapes.values():
                    cell["winner"] = min(IMPLEMENTATIONS, key=lambda impl: cell.get(f"{impl}_ms", float("inf")))
    return times


def record_benchmark(benchmark_json: Path, table_path: Path = TABLE_PATH) -> dict:
    """Write the winners of `benchmark_json` into the table at `table_path`, replacing the entries of the
    devices it measured and keeping the others; returns the new winners."""
    data = json.loads(Path(benchmark_json).read_text())
    table = json.loads(Path(table_path).read_text()) if Path(table_path).exists() else {"devices": {}}
    winners = winners_from_benchmark(data)
    table["devices"].update(winners)
    commit = data.get("commit_info", {}).get("id")
    table.setdefault("sources", {}).update(
        {device: {"benchmark": Path(benchmark_json).name, "datetime": data.get("datetime"), "commit": commit}
         for device in winners})
    Path(table_path).write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return winners


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Record the per-primitive conv winners of a benchmark run.")
    parser.add_argument("benchmark_json", type=Path, help="--benchmark-json of benchmarks/test_conv_primitives.py")
    parser.add_argument("--table", type=Path, default=TABLE_PATH)
    args = parser.parse_args(argv)
    for device, primitives in record_benchmark(args.benchmark_json, args.table).items():
        for primitive, precisions in sorted(primitives.items()):
            for precision, shapes in sorted(precisions.items()):
                for shape, cell in sorted(shapes.items()):
                    print(device, primitive, precision, shape, cell["winner"],
                          *(f"{impl} {cell[f'{impl}_ms']:.4f} ms" for impl in IMPLEMENTATIONS if f"{impl}_ms" in cell))


if __name__ == "__main__":
    main()
