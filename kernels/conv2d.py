"""Task-batched 2-d convolution primitives as Triton implicit-GEMM kernels, and their launchers.

Layout (the grouped layout of maml_fast): activations ``[B, T*C, H, W]`` with task t's channels in
block t, weights ``[T, O, C, kh, kw]``. Every tensor is read and written through its strides, so
contiguous NCHW, channels-last and expanded weights (stride 0 in the task dimension, the MAML
``θ.expand(T, ...)``) all work without a copy. Outputs are allocated contiguous NCHW (the layout the
rest of the program uses on CUDA) and ``[T, O, C, kh, kw]`` for weight gradients.

The task index is a grid dimension; each program computes one tile of one task's GEMM:

    forward  y[b, tO+o, oh, ow]  = Σ_{c,r,s}   x[b, tC+c, oh*sh-ph+r, ow*sw-pw+s] · w[t, o, c, r, s]
             GEMM  M = B*OH*OW (pixels), N = O, K = C*kh*kw.  Optional epilogue: bias, ReLU, and
             per-(M tile, channel) Σy and Σ(y - tile mean)² into a [2, tiles, T*O] workspace, which
             torch combines into BatchNorm's batch mean and variance (no second pass over y).
    dgrad    gx[b, tC+c, ih, iw] = Σ_{o,r,s}  gy[b, tO+o, (ih+ph-r)/sh, (iw+pw-s)/sw] · w[t, o, c, r, s]
             GEMM  M = input pixels of one stride phase, N = C, K = O*ceil(kh/sh)*ceil(kw/sw).
             With stride > 1 the input pixels are split into sh*sw phases ((ih+ph) mod sh, ...): all
             pixels of a phase use the same taps, so the K loop visits only those (no 1-in-sh*sw
             masked work). The phase is the third grid dimension.
    wgrad    gw[t, o, c, r, s]   = Σ_{b,oh,ow} gy[b, tO+o, oh, ow] · x[b, tC+c, oh*sh-ph+r, ow*sw-pw+s]
             GEMM  M = O, N = C*kh*kw, K = B*OH*OW, split into SPLIT_K slices (third grid dimension)
             so that few tasks still fill the GPU; the slices' partial sums go to an fp32/fp64
             workspace that one ``sum(0)`` reduces (deterministic, no atomics).

Accumulation is fp32 for fp16/bf16/fp32 inputs and fp64 for fp64 inputs. fp32 products use IEEE
fp32 unless PyTorch's cuDNN-conv TF32 flag is on (the same switch that makes cuDNN use TF32), and
``MAML_FAST_TRITON_FP32_PRECISION=ieee|tf32|tf32x3`` overrides that (tf32x3: three TF32 tensor-core
products, close to fp32 accuracy; IEEE fp32 has no tensor-core path and runs on FMA units).
Triton's ``tl.dot`` is used for every dtype (fp64: DMMA on sm_80+); ``MAML_FAST_TRITON_FP64_DOT=0``
replaces the fp64 ``tl.dot`` by a broadcast-multiply-sum (for a Triton build whose fp64 dot fails).

Tile sizes: on a GPU (fp16/bf16/fp32) ``triton.autotune`` picks each launch's from a short list per
kernel (`AUTOTUNE_CONFIGS`), keyed on the problem sizes; fp64, the interpreter and the forward with
BatchNorm statistics (whose workspace depends on the tile) take `block_config`'s heuristic. Set ``POISON_OUTPUTS =
True`` (or the environment variable ``MAML_FAST_TRITON_POISON=1``) to allocate outputs filled with NaN,
so a test sees any element a kernel fails to write.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from maml_fast.precision import conv_fp32_precision

POISON_OUTPUTS = os.environ.get("MAML_FAST_TRITON_POISON", "0") == "1"
# Whether this module's kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on", "y")
_INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------------------------- kernels
# The kernels use only builtins of triton.language (no tl.cdiv / tl.zeros, which are themselves
# @triton.jit functions): they then also run in the interpreter when triton was imported before
# TRITON_INTERPRET=1 was set. The fp64 fallback's tl.sum is the exception.
# The interpreter's tl.dot multiplies bf16 operands as their raw 16-bit patterns (numpy has no bf16):
# there they are widened first. A bf16 x bf16 product is exact in fp32, so this is the GPU's bf16 MMA
# with fp32 accumulation up to the order of the sums.
_WIDEN_BF16 = tl.constexpr(INTERPRETED)


@triton.jit
def _mma(a, b, acc, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b, with tl.dot or (USE_DOT=False) a broadcast-multiply-sum in acc's dtype."""
    if _WIDEN_BF16:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    if USE_DOT:
        # out_dtype: Triton 3.6 rejects a float64 accumulator with dot's float32 default.
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    else:
        acc += tl.sum(a[:, :, None].to(acc.dtype) * b[None, :, :].to(acc.dtype), axis=1)
    return acc


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, stats_ptr,
    B, C, H, W, O, OH, OW,
    sxb, sxc, sxh, sxw,
    swt, swo, swc, swh, sww,
    sbt, sbo,
    syb, syc, syh, syw,
    ssq, sst, ssc,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr, STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC_DTYPE: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    task = tl.program_id(1)
    num_n = (O + BLOCK_N - 1) // BLOCK_N
    pid_m = pid // num_n
    pid_n = pid % num_n
    M = B * OH * OW
    K = C * KH * KW

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < O
    ow = offs_m % OW
    oh = (offs_m // OW) % OH
    bb = offs_m // (OW * OH)
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    x_rows = x_ptr + task * C * sxc + bb * sxb
    w_task = w_ptr + task * swt

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        s = offs_k % KW
        r = (offs_k // KW) % KH
        c = offs_k // (KH * KW)
        ih = ih0[:, None] + r[None, :]
        iw = iw0[:, None] + s[None, :]
        a_mask = mask_m[:, None] & mask_k[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_rows[:, None] + c[None, :] * sxc + ih * sxh + iw * sxw, mask=a_mask, other=0.0)
        b_mask = mask_k[:, None] & mask_n[None, :]
        b = tl.load(w_task + offs_n[None, :] * swo + c[:, None] * swc + r[:, None] * swh + s[:, None] * sww,
                    mask=b_mask, other=0.0)
        acc = _mma(a, b, acc, USE_DOT, PRECISION)

    # Epilogue: bias, ReLU, and the tile's per-channel statistics (for BatchNorm), taken from the
    # accumulator (fp32/fp64) while y is still in registers.
    if HAS_BIAS:
        bias = tl.load(bias_ptr + task * sbt + offs_n * sbo, mask=mask_n, other=0.0)
        acc += bias.to(ACC_DTYPE)[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    y_rows = y_ptr + bb * syb + oh * syh + ow * syw
    y_cols = (task * O + offs_n) * syc
    tl.store(y_rows[:, None] + y_cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])
    if STATS:
        # Σy and the sum of squares about the tile's own mean (not Σy², whose E[y²] - E[y]² cancels in
        # fp32 when |mean| >> std). Rows past M hold bias (or relu(bias)) and must not count.
        # tl.reduce with the library's _sum_combine is tl.sum without calling a @triton.jit function
        # (see the note above); the interpreter recognises that combine function and uses numpy.
        rows = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M)
        tile_sum = tl.reduce(tl.where(mask_m[:, None], acc, 0.0), 0, tl.standard._sum_combine)
        centred = tl.where(mask_m[:, None], acc - (tile_sum / rows)[None, :], 0.0)
        stats = stats_ptr + pid_m * sst + (task * O + offs_n) * ssc
        tl.store(stats, tile_sum, mask=mask_n)
        tl.store(stats + ssq, tl.reduce(centred * centred, 0, tl.standard._sum_combine), mask=mask_n)


@triton.jit
def _conv_dgrad_kernel(
    g_ptr, w_ptr, gx_ptr,
    B, C, H, W, O, OH, OW,
    sgb, sgc, sgh, sgw,
    swt, swo, swc, swh, sww,
    sxb, sxc, sxh, sxw,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, KR: tl.constexpr, KS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC_DTYPE: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    task = tl.program_id(1)
    phase = tl.program_id(2)
    # Stride phase (ph, pw): input rows ih with (ih + PH) % SH == ph use only taps r = ph + j*SH.
    ph = phase // SW
    pw = phase % SW
    ih_first = (ph - PH % SH + SH) % SH          # the first input row of this phase
    iw_first = (pw - PW % SW + SW) % SW
    HP = (H - ih_first + SH - 1) // SH           # rows / cols of this phase
    WP = (W - iw_first + SW - 1) // SW
    qh = (ih_first + PH - ph) // SH              # oh = i + qh - jr for phase row i, tap slot jr
    qw = (iw_first + PW - pw) // SW

    num_n = (C + BLOCK_N - 1) // BLOCK_N
    pid_m = pid // num_n
    pid_n = pid % num_n
    M = B * HP * WP
    K = O * KR * KS

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < C
    WPD = tl.maximum(WP, 1)                      # a phase can be empty (input smaller than stride)
    HPD = tl.maximum(HP, 1)
    j = offs_m % WPD
    i = (offs_m // WPD) % HPD
    bb = offs_m // (WPD * HPD)
    g_rows = g_ptr + task * O * sgc + bb * sgb
    w_task = w_ptr + task * swt

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        js = offs_k % KS
        jr = (offs_k // KS) % KR
        o = offs_k // (KR * KS)
        r = ph + jr * SH
        s = pw + js * SW
        tap_ok = (offs_k < K) & (r < KH) & (s < KW)
        oh = i[:, None] + qh - jr[None, :]
        ow = j[:, None] + qw - js[None, :]
        a_mask = mask_m[:, None] & tap_ok[None, :] & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
        a = tl.load(g_rows[:, None] + o[None, :] * sgc + oh * sgh + ow * sgw, mask=a_mask, other=0.0)
        b_mask = tap_ok[:, None] & mask_n[None, :]
        b = tl.load(w_task + o[:, None] * swo + offs_n[None, :] * swc + r[:, None] * swh + s[:, None] * sww,
                    mask=b_mask, other=0.0)
        acc = _mma(a, b, acc, USE_DOT, PRECISION)

    ih = i * SH + ih_first
    iw = j * SW + iw_first
    x_rows = gx_ptr + bb * sxb + ih * sxh + iw * sxw
    x_cols = (task * C + offs_n) * sxc
    tl.store(x_rows[:, None] + x_cols[None, :], acc.to(gx_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _conv_wgrad_kernel(
    x_ptr, g_ptr, out_ptr,
    B, C, H, W, O, OH, OW, K_PER_SPLIT,
    sxb, sxc, sxh, sxw,
    sgb, sgc, sgh, sgw,
    sos, sot, som, son,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC_DTYPE: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    task = tl.program_id(1)
    split = tl.program_id(2)
    N = C * KH * KW
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    pid_m = pid // num_n
    pid_n = pid % num_n
    K = B * OH * OW
    k_start = split * K_PER_SPLIT
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)     # output channel o
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)     # (c, r, s)
    mask_m = offs_m < O
    mask_n = offs_n < N
    s = offs_n % KW
    r = (offs_n // KW) % KH
    c = offs_n // (KH * KW)
    g_cols = g_ptr + (task * O + offs_m) * sgc
    x_cols = x_ptr + (task * C + c) * sxc

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=ACC_DTYPE)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        ow = offs_k % OW
        oh = (offs_k // OW) % OH
        bb = offs_k // (OW * OH)
        a = tl.load(g_cols[:, None] + (bb * sgb + oh * sgh + ow * sgw)[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        ih = (oh * SH - PH)[:, None] + r[None, :]
        iw = (ow * SW - PW)[:, None] + s[None, :]
        b_mask = mask_k[:, None] & mask_n[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        b = tl.load(x_cols[None, :] + (bb * sxb)[:, None] + ih * sxh + iw * sxw, mask=b_mask, other=0.0)
        acc = _mma(a, b, acc, USE_DOT, PRECISION)

    out = out_ptr + split * sos + task * sot + offs_m[:, None] * som + offs_n[None, :] * son
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ------------------------------------------------------------------------------------ block sizes
@dataclass(frozen=True)
class BlockConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def _pow2_clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(max(int(value), 1))))


def block_config(kind: str, m: int, n: int, k: int, dtype: torch.dtype) -> BlockConfig:
    """Tile sizes for one GEMM view (a heuristic; see kernels/README.md). Every block dim is >= 16,
    which tl.dot needs on every NVIDIA target for every dtype. Under the interpreter, whose cost is
    per program and per op rather than per element, tiles are as large as the problem (up to 512
    rows): far fewer programs, the same code paths (tests force small tiles separately)."""
    if INTERPRETED:
        return BlockConfig(_pow2_clamp(m, 16, 512), _pow2_clamp(n, 16, 64), _pow2_clamp(k, 16, 64), 4, 1)
    if dtype == torch.float64:  # fp64 DMMA tiles are small and fp64 registers twice as wide
        return BlockConfig(_pow2_clamp(m, 16, 32), _pow2_clamp(n, 16, 32), 16, 4, 2)
    big_k = 64 if kind == "wgrad" else 32
    block_k = _pow2_clamp(k, 16, big_k)
    block_n = _pow2_clamp(n, 16, 64)
    block_m = _pow2_clamp(m, 16, 64 if kind == "wgrad" else 128)
    num_warps = 8 if block_m * block_n >= 8192 else 4
    return BlockConfig(block_m, block_n, block_k, num_warps, 3)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda" and not INTERPRETED:
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def split_k_heuristic(tiles: int, tasks: int, k: int, block_k: int, device: torch.device) -> int:
    """Split the wgrad reduction until about two programs per multiprocessor exist, keeping at least
    four K blocks per split and at most 64 splits."""
    programs = tiles * tasks
    target = 2 * _sm_count(device)
    if programs >= target:
        return 1
    wanted = -(-target // programs)
    most = max(1, k // (4 * block_k))
    return max(1, min(wanted, most, 64))


# Tile configurations triton.autotune times on a GPU, per kernel: a few around `block_config`'s choice for
# conv4's layers (N = 32 or 64 output channels, K = 9..576 for fwd/dgrad; M = 32/64, N = 9..576 for wgrad).
_FWD_CONFIGS = (BlockConfig(128, 64, 32, 8, 3), BlockConfig(128, 32, 32, 4, 3), BlockConfig(64, 64, 32, 4, 3),
                BlockConfig(64, 32, 64, 4, 3), BlockConfig(256, 32, 32, 8, 3), BlockConfig(128, 64, 16, 4, 4))
AUTOTUNE_CONFIGS = {
    "fwd": _FWD_CONFIGS,
    "dgrad": _FWD_CONFIGS,
    "wgrad": (BlockConfig(32, 64, 64, 4, 3), BlockConfig(64, 64, 64, 4, 3), BlockConfig(32, 128, 64, 4, 3),
              BlockConfig(64, 128, 32, 8, 3), BlockConfig(32, 32, 128, 4, 3)),
}
_KERNELS = {"fwd": _conv_fwd_kernel, "dgrad": _conv_dgrad_kernel, "wgrad": _conv_wgrad_kernel}
_GEOMETRY = ["KH", "KW", "SH", "SW", "PH", "PW", "PRECISION"]
_AUTOTUNE_KEYS = {   # problem sizes, the activation's channel stride (its layout) and the geometry
    "fwd": ["B", "C", "H", "W", "O", "OH", "OW", "sxc", "HAS_BIAS", "RELU", *_GEOMETRY],
    "dgrad": ["B", "C", "H", "W", "O", "OH", "OW", "sgc", *_GEOMETRY],
    "wgrad": ["B", "C", "H", "W", "O", "OH", "OW", "K_PER_SPLIT", "sxc", "sgc", *_GEOMETRY],
}


def _autotuned(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a launch lets triton.autotune pick its tiles: compiled kernels on a GPU (the interpreter
    cannot time them) and fp16/bf16/fp32 (fp64 keeps its small DMMA tiles)."""
    return device.type == "cuda" and not INTERPRETED and dtype != torch.float64


@functools.cache
def _autotuner(kind: str):
    """The kernel of `kind` under triton.autotune, made on the first GPU launch (timing is short: one
    tuning per key; a meta-step has a few dozen keys)."""
    configs = [triton.Config(dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k),
                             num_warps=c.num_warps, num_stages=c.num_stages) for c in AUTOTUNE_CONFIGS[kind]]
    bench = functools.partial(triton.testing.do_bench, warmup=10, rep=40)
    return triton.autotune(configs, key=_AUTOTUNE_KEYS[kind], do_bench=bench)(_KERNELS[kind])


def _launch(kind: str, cfg: BlockConfig | None, grid, *args, **constexprs):
    """Launch the kernel of `kind` with tiles `cfg`, or (None) through its autotuner. `grid` maps the
    block sizes (``meta["BLOCK_M"]``, ...) to the launch grid."""
    if cfg is None:
        _autotuner(kind)[grid](*args, **constexprs)
        return
    meta = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k)
    _KERNELS[kind][grid(meta)](*args, **constexprs, **meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# ----------------------------------------------------------------------------------- precision
def _kernel_flags(dtype: torch.dtype, device: torch.device):
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"Triton conv kernels support float16/bfloat16/float32/float64, got {dtype}")
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    use_dot = dtype != torch.float64 or os.environ.get("MAML_FAST_TRITON_FP64_DOT", "1") != "0"
    precision = "ieee"
    if dtype == torch.float32 and device.type == "cuda" and not INTERPRETED:
        forced = os.environ.get("MAML_FAST_TRITON_FP32_PRECISION", "")
        if forced and forced not in ("ieee", "tf32", "tf32x3"):
            raise ValueError(f"MAML_FAST_TRITON_FP32_PRECISION must be ieee, tf32 or tf32x3, got {forced!r}")
        precision = forced or conv_fp32_precision()
    return acc, use_dot, precision


# ------------------------------------------------------------------------------------ launchers
def _check_tensor(name: str, t: torch.Tensor, dim: int, dtype: torch.dtype, device: torch.device):
    if not isinstance(t, torch.Tensor) or t.dim() != dim:
        raise ValueError(f"{name} must be a {dim}-d tensor, got {getattr(t, 'shape', type(t))}")
    if t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype}, expected {dtype} (all conv operands share one dtype)")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    span = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if size > 0)
    if span > _INT32_MAX:
        raise ValueError(f"{name} spans {span} elements; the Triton conv kernels index with 32-bit offsets")


def _empty(shape, like: torch.Tensor, dtype=None, memory_format=torch.contiguous_format) -> torch.Tensor:
    out = torch.empty(shape, dtype=like.dtype if dtype is None else dtype, device=like.device,
                      memory_format=memory_format)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def _device_guard(device: torch.device):
    if device.type == "cuda" and not INTERPRETED:
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _pair(value) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(pair) != 2:
        raise ValueError(f"expected an int or a pair of ints, got {value!r}")
    return pair


def _out_size(size: int, k: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - k) // stride + 1


def conv2d_forward(x: torch.Tensor, weight: torch.Tensor, stride=1, padding=0,
                   bias: torch.Tensor | None = None, relu: bool = False,
                   config: BlockConfig | None = None, memory_format=torch.contiguous_format) -> torch.Tensor:
    """y ``[B, T*O, OH, OW]`` = per-task conv of x ``[B, T*C, H, W]`` with weight ``[T, O, C, kh, kw]``,
    with bias ``[T, O]`` and (``relu=True``) a ReLU fused into the epilogue. y is allocated in
    `memory_format`; `config` fixes the tiles (default: autotuned on a GPU, else `block_config`)."""
    y, _ = _launch_forward(x, weight, stride, padding, bias, relu, False, config, memory_format)
    return y


def conv2d_forward_with_stats(x: torch.Tensor, weight: torch.Tensor, stride=1, padding=0,
                              bias: torch.Tensor | None = None, relu: bool = False,
                              config: BlockConfig | None = None, memory_format=torch.contiguous_format):
    """``(y, mean, var)``: `conv2d_forward`'s y and, from the same kernel's epilogue, its per-channel
    mean and biased variance over batch and pixels, ``[T*O]`` each (BatchNorm's batch statistics).

    Each M tile writes its channels' Σy and Σ(y - tile mean)² to a ``[2, tiles, T*O]`` workspace;
    torch combines the tiles (Chan et al.'s pairwise update, here for all tiles at once):
    M2 = Σ_t M2_t + Σ_t n_t (mean_t - mean)². Deterministic, no atomics, no E[y²] - E[y]²
    cancellation. In fp64 for fp64 inputs, else fp32 (also the statistics' dtype), from the
    accumulator before y is rounded to its dtype."""
    y, stats = _launch_forward(x, weight, stride, padding, bias, relu, True, config, memory_format)
    return (y, *stats)


def _combine_tile_statistics(partial: torch.Tensor, rows: int, block_m: int):
    """(mean, var) from the per-tile ``[2, tiles, channels]`` Σy and centred Σ(y - mean_t)²."""
    tiles = partial.shape[1]
    counts = torch.full((tiles, 1), float(block_m), dtype=partial.dtype, device=partial.device)
    counts[-1].fill_(rows - (tiles - 1) * block_m)  # (a fill: no tensor made from host data)
    tile_sums, tile_m2 = partial.unbind(0)
    mean = tile_sums.sum(0) / rows
    spread = tile_sums / counts - mean
    return mean, (tile_m2.sum(0) + (counts * spread * spread).sum(0)) / rows


def _launch_forward(x, weight, stride, padding, bias, relu: bool, with_stats: bool, config, memory_format):
    """(y, (mean, var) or None)."""
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    _check_tensor("weight", weight, 5, weight.dtype, weight.device)
    tasks, out_ch, in_ch, kh, kw = weight.shape
    _check_tensor("x", x, 4, weight.dtype, weight.device)
    if x.shape[1] != tasks * in_ch:
        raise ValueError(f"x has {x.shape[1]} channels, expected tasks*in_channels = {tasks * in_ch}")
    if bias is not None:
        _check_tensor("bias", bias, 2, weight.dtype, weight.device)
        if tuple(bias.shape) != (tasks, out_ch):
            raise ValueError(f"bias must have shape {(tasks, out_ch)}, got {tuple(bias.shape)}")
    acc, use_dot, precision = _kernel_flags(x.dtype, x.device)
    batch, _, height, width = x.shape
    oh, ow = _out_size(height, kh, sh, ph), _out_size(width, kw, sw, pw)
    if oh < 1 or ow < 1:
        raise ValueError(f"input {height}x{width} is too small for kernel {kh}x{kw}, padding {(ph, pw)}")
    y = _empty((batch, tasks * out_ch, oh, ow), x, memory_format=memory_format)
    m, n, k = batch * oh * ow, out_ch, in_ch * kh * kw
    stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if y.numel() == 0:   # statistics of nothing are NaN, as torch's mean of an empty tensor
        undefined = torch.full((tasks * out_ch,), float("nan"), dtype=stats_dtype, device=x.device)
        return y, ((undefined, undefined.clone()) if with_stats else None)
    _check_tensor("y", y, 4, y.dtype, y.device)
    # The statistics' workspace has one row per M tile, so that launch fixes its tiles before it runs.
    cfg = config
    if cfg is None and (with_stats or not _autotuned(x.dtype, x.device)):
        cfg = block_config("fwd", m, n, k, x.dtype)
    tiles_m = triton.cdiv(m, cfg.block_m) if with_stats else 0
    bias_arg = bias if bias is not None else y
    bias_strides = bias.stride() if bias is not None else (0, 0)
    partial = _empty((2, tiles_m, tasks * out_ch), x, dtype=stats_dtype) if with_stats else None
    with _device_guard(x.device):
        _launch(
            "fwd", cfg, lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), tasks),
            x, weight, bias_arg, y, partial if with_stats else y,
            batch, in_ch, height, width, out_ch, oh, ow,
            *x.stride(), *weight.stride(), *bias_strides, *y.stride(),
            *(partial.stride() if with_stats else (0, 0, 0)),
            KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, HAS_BIAS=bias is not None, RELU=relu, STATS=with_stats,
            ACC_DTYPE=acc, USE_DOT=use_dot, PRECISION=precision,
        )
    return y, (_combine_tile_statistics(partial, m, cfg.block_m) if with_stats else None)


def conv2d_input_grad(grad_out: torch.Tensor, weight: torch.Tensor, input_hw, stride=1, padding=0,
                      config: BlockConfig | None = None, memory_format=torch.contiguous_format) -> torch.Tensor:
    """gx ``[B, T*C, H, W]`` (H, W = ``input_hw``, allocated in `memory_format`): the transposed per-task
    conv of grad_out ``[B, T*O, OH, OW]`` with weight ``[T, O, C, kh, kw]``."""
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    height, width = _pair(input_hw)
    _check_tensor("weight", weight, 5, weight.dtype, weight.device)
    tasks, out_ch, in_ch, kh, kw = weight.shape
    _check_tensor("grad_out", grad_out, 4, weight.dtype, weight.device)
    acc, use_dot, precision = _kernel_flags(grad_out.dtype, grad_out.device)
    batch = grad_out.shape[0]
    oh, ow = _out_size(height, kh, sh, ph), _out_size(width, kw, sw, pw)
    if tuple(grad_out.shape[1:]) != (tasks * out_ch, oh, ow):
        raise ValueError(f"grad_out must have shape [B, {tasks * out_ch}, {oh}, {ow}] for input {height}x{width}, "
                         f"got {tuple(grad_out.shape)}")
    gx = _empty((batch, tasks * in_ch, height, width), grad_out, memory_format=memory_format)
    if gx.numel() == 0:
        return gx
    _check_tensor("grad_input", gx, 4, gx.dtype, gx.device)
    kr, ks = triton.cdiv(kh, sh), triton.cdiv(kw, sw)
    m = batch * triton.cdiv(height, sh) * triton.cdiv(width, sw)   # the largest phase
    n, k = in_ch, out_ch * kr * ks
    cfg = config
    if cfg is None and not _autotuned(grad_out.dtype, grad_out.device):
        cfg = block_config("dgrad", m, n, k, grad_out.dtype)
    with _device_guard(grad_out.device):
        _launch(
            "dgrad", cfg,
            lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), tasks, sh * sw),
            grad_out, weight, gx,
            batch, in_ch, height, width, out_ch, oh, ow,
            *grad_out.stride(), *weight.stride(), *gx.stride(),
            KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, KR=kr, KS=ks,
            ACC_DTYPE=acc, USE_DOT=use_dot, PRECISION=precision,
        )
    return gx


def conv2d_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, kernel_hw, tasks: int, stride=1, padding=0,
                       config: BlockConfig | None = None, split_k: int | None = None) -> torch.Tensor:
    """gw ``[T, O, C, kh, kw]``: per-task correlation of x ``[B, T*C, H, W]`` with grad_out
    ``[B, T*O, OH, OW]``. ``split_k`` overrides the heuristic number of reduction slices."""
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    kh, kw = _pair(kernel_hw)
    _check_tensor("x", x, 4, x.dtype, x.device)
    _check_tensor("grad_out", grad_out, 4, x.dtype, x.device)
    acc, use_dot, precision = _kernel_flags(x.dtype, x.device)
    batch, total_in, height, width = x.shape
    if total_in % tasks or grad_out.shape[1] % tasks:
        raise ValueError(f"channel counts {total_in} (x) and {grad_out.shape[1]} (grad_out) must be multiples of tasks={tasks}")
    in_ch, out_ch = total_in // tasks, grad_out.shape[1] // tasks
    oh, ow = _out_size(height, kh, sh, ph), _out_size(width, kw, sw, pw)
    if tuple(grad_out.shape) != (batch, tasks * out_ch, oh, ow):
        raise ValueError(f"grad_out must have shape {(batch, tasks * out_ch, oh, ow)}, got {tuple(grad_out.shape)}")
    m, n, k = out_ch, in_ch * kh * kw, batch * oh * ow
    shape = (tasks, out_ch, in_ch, kh, kw)
    if k == 0:
        return torch.zeros(shape, dtype=x.dtype, device=x.device)
    cfg = config
    if cfg is None and not _autotuned(x.dtype, x.device):
        cfg = block_config("wgrad", m, n, k, x.dtype)
    # The split count sizes the workspace, so it is fixed before an autotuner picks the tiles: from the
    # heuristic's tiles, with slices a multiple of every listed BLOCK_K.
    guide = cfg or block_config("wgrad", m, n, k, x.dtype)
    align = guide.block_k if cfg else max(c.block_k for c in AUTOTUNE_CONFIGS["wgrad"])
    tiles = triton.cdiv(m, guide.block_m) * triton.cdiv(n, guide.block_n)
    splits = split_k if split_k is not None else split_k_heuristic(tiles, tasks, k, guide.block_k, x.device)
    splits = max(1, min(int(splits), triton.cdiv(k, align)))
    k_per_split = triton.cdiv(triton.cdiv(k, splits), align) * align
    splits = triton.cdiv(k, k_per_split)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if splits == 1:
        out = _empty(shape, x)
        target = out.view(1, tasks, out_ch, n)
    else:
        target = _empty((splits, tasks, out_ch, n), x, dtype=acc_dtype)
    with _device_guard(x.device):
        _launch(
            "wgrad", cfg,
            lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), tasks, splits),
            x, grad_out, target,
            batch, in_ch, height, width, out_ch, oh, ow, k_per_split,
            *x.stride(), *grad_out.stride(), *target.stride(),
            KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw,
            ACC_DTYPE=acc, USE_DOT=use_dot, PRECISION=precision,
        )
    if splits == 1:
        return out
    return target.sum(0).to(x.dtype).reshape(shape)
