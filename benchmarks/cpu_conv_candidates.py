"""Other formulations of the CPU conv primitives at the fused backend's Omniglot 5w1s shapes (issue 13 item 3),
each beside the one `maml_fast.ops.conv2d.TorchConvPrimitives` runs (first column), for the three 64-channel
layers (3x3, stride 2, padding 1, T=32, B=5, channels-last activations and weights in, channels-last out).

    python -m benchmarks.cpu_conv_candidates [--rounds 7] [--out benchmarks/results/x.json]

Candidates (each includes the layout conversions it needs to take and give what the primitive does):
forward: ``im2col+bmm`` (unfold by a strided view, one torch.bmm per layer, MKL);
input_grad: ``conv_backward`` (aten.convolution_backward's input gradient instead of conv_transpose2d),
``phases`` (stride-phase decomposition: four stride-1 convs with 1x1/1x2/2x1/2x2 kernels, interleaved),
``bmm+col2im``; weight_grad: ``nchw`` (NCHW inputs: oneDNN's blocked kernel, plain weight out),
``im2col+bmm``, ``swapped`` (a forward conv with batch and channel roles swapped: x's channels as the batch,
gy as a dilated kernel). Single thread, process CPU time, rounds interleaved; best round in ms, and each
candidate's largest deviation from the current formulation.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from .bench_table import environment, time_peers

TASKS, BATCH, CHANNELS = 32, 5, 64
SIDES = (14, 7, 4)  # input side of the three 64-channel layers (each halves it: 7, 4, 2)
CL = torch.channels_last


def output_side(side: int) -> int:
    return (side + 2 - 3) // 2 + 1


def im2col(x: torch.Tensor, out: int) -> torch.Tensor:
    """``[T, B*out*out, 9*C]`` (columns ordered kh, kw, c: a channels-last weight's order) of channels-last x."""
    padded = F.pad(x, (1, 1, 1, 1)).contiguous(memory_format=CL)
    sb, sc, sh, sw = padded.stride()
    return padded.as_strided((TASKS, BATCH, out, out, 3, 3, CHANNELS),
                             (CHANNELS * sc, sb, 2 * sh, 2 * sw, sh, sw, sc)).reshape(TASKS, -1, 9 * CHANNELS)


def rows_by_task(t: torch.Tensor) -> torch.Tensor:
    """Channels-last ``[B, T*C, h, w]`` as ``[T, B*h*w, C]`` (a view)."""
    return t.permute(0, 2, 3, 1).reshape(-1, TASKS, CHANNELS).transpose(0, 1)


def candidates(side: int) -> dict[str, dict[str, callable]]:
    out = output_side(side)
    output_padding = side - ((out - 1) * 2 - 2 + 3)
    x = torch.randn(BATCH, TASKS * CHANNELS, side, side).contiguous(memory_format=CL)
    g = torch.randn(BATCH, TASKS * CHANNELS, out, out).contiguous(memory_format=CL)
    w = torch.randn(TASKS * CHANNELS, CHANNELS, 3, 3).contiguous(memory_format=CL)
    w_rows = w.permute(0, 2, 3, 1).reshape(TASKS, CHANNELS, 9 * CHANNELS)  # [T, O, (kh, kw, c)], a view
    w_shape_cl, w_shape = torch.empty_like(w), torch.empty(w.shape)

    def wgrad(g, x, shape):
        return torch.ops.aten.convolution_backward(g, x, shape, None, [2, 2], [1, 1], [1, 1], False, [0, 0], TASKS,
                                                   [False, True, False])[1]

    def from_rows(y):  # [T, B*h*w, C] -> channels-last [B, T*C, h, w]
        return y.transpose(0, 1).reshape(BATCH, out, out, -1).permute(0, 3, 1, 2)

    def dgrad_phases():
        # gx[2i+a, 2j+b]: even rows/cols take tap 1 of the kernel, odd ones taps 0 (from i+1) and 2 (from i).
        grad = torch.empty(BATCH, side, side, TASKS * CHANNELS).permute(0, 3, 1, 2)
        g_padded = F.pad(g, (0, 1, 0, 1)).contiguous(memory_format=CL)  # odd rows/cols read g[i + 1]
        taps = ([1], [2, 0])  # per phase, the kernel taps in the order of the window g[i], g[i + 1]
        w_t = w.view(TASKS, CHANNELS, CHANNELS, 3, 3).transpose(1, 2)  # [T, C, O, kh, kw]
        for a in (0, 1):
            for b in (0, 1):
                kernel = w_t[:, :, :, taps[a]][..., taps[b]].reshape(TASKS * CHANNELS, CHANNELS, len(taps[a]),
                                                                      len(taps[b]))
                phase = F.conv2d(g_padded, kernel.contiguous(memory_format=CL), groups=TASKS)
                grad[:, :, a::2, b::2] = phase[:, :, :(side - a + 1) // 2, :(side - b + 1) // 2]
        return grad

    def dgrad_col2im():
        cols = torch.bmm(rows_by_task(g), w_rows).view(TASKS, BATCH, out, out, 3, 3, CHANNELS)
        padded = torch.zeros(BATCH, side + 2, side + 2, TASKS, CHANNELS)
        for kh in range(3):
            for kw in range(3):
                padded[:, kh:kh + 2 * out - 1:2, kw:kw + 2 * out - 1:2] += cols[..., kh, kw, :].permute(1, 2, 3, 0, 4)
        return padded[:, 1:side + 1, 1:side + 1].reshape(BATCH, side, side, -1).permute(0, 3, 1, 2)

    def wgrad_swapped():
        # gw[o, c, kh, kw] = sum_{b,i,j} g[b, o, i, j] x_pad[b, c, 2i+kh, 2j+kw]: x's channels as the batch,
        # (t, b) as the channels, g as a dilation-2 kernel; the right padding only where a tap reaches it.
        right = max(0, 2 * out - side)
        xs = F.pad(x, (1, right, 1, right)).view(BATCH, TASKS, CHANNELS, side + 1 + right, side + 1 + right)
        xs = xs.permute(2, 1, 0, 3, 4).reshape(CHANNELS, TASKS * BATCH, side + 1 + right, side + 1 + right)
        kernel = g.view(BATCH, TASKS, CHANNELS, out, out).permute(1, 2, 0, 3, 4).reshape(TASKS * CHANNELS, BATCH,
                                                                                         out, out)
        gw = F.conv2d(xs.contiguous(memory_format=CL), kernel.contiguous(memory_format=CL), dilation=2, groups=TASKS)
        return gw.permute(1, 0, 2, 3).contiguous(memory_format=CL)  # [T*O, C, 3, 3]

    def weight_rows(rows):  # [T, O, (kh, kw, c)] -> [T*O, C, 3, 3] channels-last (a view)
        return rows.view(TASKS * CHANNELS, 3, 3, CHANNELS).permute(0, 3, 1, 2)

    return {
        "forward": {"grouped oneDNN": lambda: F.conv2d(x, w, None, 2, 1, 1, TASKS),
                    "im2col+bmm": lambda: from_rows(torch.bmm(im2col(x, out), w_rows.transpose(1, 2)))},
        "input_grad": {"conv_transpose2d": lambda: F.conv_transpose2d(g, w, None, 2, 1, output_padding, TASKS),
                       "conv_backward": lambda: torch.ops.aten.convolution_backward(
                           g, x, w, None, [2, 2], [1, 1], [1, 1], False, [0, 0], TASKS, [True, False, False])[0],
                       "phases": dgrad_phases, "bmm+col2im": dgrad_col2im},
        "weight_grad": {"channels-last": lambda: wgrad(g, x, w_shape_cl),
                        "nchw": lambda: wgrad(g.contiguous(), x.contiguous(), w_shape).contiguous(memory_format=CL),
                        "im2col+bmm": lambda: weight_rows(torch.bmm(rows_by_task(g).transpose(1, 2), im2col(x, out))),
                        "swapped": wgrad_swapped},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    results = {"environment": environment("cpu"), "tasks": TASKS, "batch": BATCH, "channels": CHANNELS, "ms": {},
               "max_abs_deviation": {}}
    print("| side in->out | primitive | formulation | ms | vs current | max abs deviation |\n|---|---|---|---:|---:|---:|")
    for side in SIDES:
        for primitive, steps in candidates(side).items():
            current_name = next(iter(steps))
            current = steps[current_name]()
            deviation = {name: (step() - current).abs().max().item() for name, step in steps.items()}
            times = time_peers(steps, args.rounds, args.rounds, sync=lambda: None, clock=time.process_time)
            best = {name: min(t) * 1e3 for name, t in times.items()}
            key = f"{side}->{output_side(side)}/{primitive}"
            results["ms"][key], results["max_abs_deviation"][key] = best, deviation
            for name, ms in best.items():
                print(f"| {side}->{output_side(side)} | {primitive} | {name} | {ms:.3f} | "
                      f"{ms / best[current_name]:.2f} | {deviation[name]:.1e} |")
    if args.out:
        with open(args.out, "w") as file:
            json.dump(results, file, indent=1)


if __name__ == "__main__":
    main()
