"""Task-batched matrix product as one Triton kernel, and its launcher: the linear layer's primitive.

    c[t] = a[t] @ b[t] (+ bias[t] broadcast over rows),   a [T, M, K], b [T, K, N], c [T, M, N]

The grid is (M tiles, tasks, N tiles); every operand is read and the output written through its strides,
so the transposes of the linear layer's three products are free (x ``[B, T*F]``, weight ``[T, O, F]``):

    forward  y_t  = x_t @ W_t^T + b_t   a = x viewed [T, B, F],    b = W^T [T, F, O]
    dgrad    gx_t = gy_t @ W_t          a = gy viewed [T, B, O],   b = W [T, O, F]
    wgrad    gW_t = gy_t^T @ x_t        a = gy^T [T, O, B],        b = x viewed [T, B, F]

Accumulation, TF32/IEEE choice, the fp64 dot fallback, output poisoning and the 32-bit index checks
are those of kernels/conv2d.py (shared from there).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .conv2d import BlockConfig, _check_tensor, _device_guard, _empty, _kernel_flags, _mma, _pow2_clamp, INTERPRETED


@triton.jit
def _bmm_kernel(
    a_ptr, b_ptr, bias_ptr, c_ptr,
    M, N, K,
    sat, sam, sak,
    sbt, sbk, sbn,
    sbiast, sbiasn,
    sct, scm, scn,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC_DTYPE: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    task = tl.program_id(1)
    pid_n = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_rows = a_ptr + task * sat + offs_m * sam
    b_cols = b_ptr + task * sbt + offs_n * sbn

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_rows[:, None] + offs_k[None, :] * sak, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_cols[None, :] + offs_k[:, None] * sbk, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = _mma(a, b, acc, USE_DOT, PRECISION)

    if HAS_BIAS:   # added to the fp32/fp64 accumulator, before rounding to the output dtype
        bias = tl.load(bias_ptr + task * sbiast + offs_n * sbiasn, mask=mask_n, other=0.0)
        acc += bias.to(ACC_DTYPE)[None, :]
    c = c_ptr + task * sct + offs_m[:, None] * scm + offs_n[None, :] * scn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def block_config(m: int, n: int, k: int, dtype: torch.dtype) -> BlockConfig:
    """Tile sizes (a heuristic, no autotuning). Every block dim is >= 16 (tl.dot's minimum); under the
    interpreter, whose cost is per program and op, tiles cover the problem (the linear layers of MAML
    nets are small: a few hundred rows, tens of columns)."""
    if INTERPRETED:
        return BlockConfig(_pow2_clamp(m, 16, 256), _pow2_clamp(n, 16, 64), _pow2_clamp(k, 16, 64), 4, 1)
    if dtype == torch.float64:  # fp64 DMMA tiles are small and fp64 registers twice as wide
        return BlockConfig(_pow2_clamp(m, 16, 32), _pow2_clamp(n, 16, 32), 16, 4, 2)
    block_m, block_n = _pow2_clamp(m, 16, 128), _pow2_clamp(n, 16, 64)
    return BlockConfig(block_m, block_n, _pow2_clamp(k, 16, 32), 8 if block_m * block_n >= 8192 else 4, 3)


def batched_matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, batch_major: bool = False,
                   config: BlockConfig | None = None) -> torch.Tensor:
    """c ``[T, M, N]`` = a ``[T, M, K]`` @ b ``[T, K, N]`` per task (+ bias ``[T, N]`` on every row).

    ``batch_major=True`` allocates c as ``[M, T, N]`` (returned transposed): the grouped layout
    ``[M, T*N]`` of an activation is then a free view of it."""
    _check_tensor("a", a, 3, a.dtype, a.device)
    _check_tensor("b", b, 3, a.dtype, a.device)
    tasks, m, k = a.shape
    if b.shape[0] != tasks or b.shape[1] != k:
        raise ValueError(f"b must have shape [{tasks}, {k}, N] to multiply a of shape {tuple(a.shape)}, "
                         f"got {tuple(b.shape)}")
    n = b.shape[2]
    if bias is not None:
        _check_tensor("bias", bias, 2, a.dtype, a.device)
        if tuple(bias.shape) != (tasks, n):
            raise ValueError(f"bias must have shape {(tasks, n)}, got {tuple(bias.shape)}")
    acc, use_dot, precision = _kernel_flags(a.dtype, a.device)
    c = _empty((m, tasks, n), a).transpose(0, 1) if batch_major else _empty((tasks, m, n), a)
    if c.numel() == 0:
        return c
    cfg = config or block_config(m, n, k, a.dtype)
    grid = (triton.cdiv(m, cfg.block_m), tasks, triton.cdiv(n, cfg.block_n))
    with _device_guard(a.device):
        _bmm_kernel[grid](
            a, b, bias if bias is not None else c, c, m, n, k,
            *a.stride(), *b.stride(), *(bias.stride() if bias is not None else (0, 0)), *c.stride(),
            HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            ACC_DTYPE=acc, USE_DOT=use_dot, PRECISION=precision,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return c
