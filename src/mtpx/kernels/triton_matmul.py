"""Weight-only int8 and int4 matmuls for the GPU, as Triton kernels: y [M, N] = x [M, K] @ w^T with w kept quantized in
GPU memory and dequantized inside the kernel, in the CPU path's formats (models/linear.py Int8Weight, Int4Weight).

One kernel serves every row count, decode (1 row), verify (k + 1) and prefill alike: each program computes a tile of
BLOCK_M rows × BLOCK_N columns, walking K in the same fixed order, and padding rows are zeros. A row's result
therefore never depends on how many rows the call holds, which keeps greedy speculation exact on the GPU. The
codes and the activations meet in fp32 `tl.dot`s ("ieee": no TF32 rounding, and the same arithmetic in Triton's
interpreter, which has no bf16 dot); an int8 row's scale is applied to its sum, an int4 group's scale and offset to
the group's partial sum. Decoding reads each weight once per call, so the fp32 dot costs no bandwidth.
Triton is imported only when a kernel runs: the CPU build needs none. Tests run these kernels in Triton's
interpreter on the CPU (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import functools

import torch

BLOCK_M, BLOCK_N = 16, 64
INT4_GROUP = 32


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def int8_matmul(x, q, scale, out, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            xs = tl.load(x + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
            ws = tl.load(q + rn[None, :] * K + rk[:, None], mask=(rn[None, :] < N) & (rk[:, None] < K), other=0)
            acc += tl.dot(xs.to(tl.float32), ws.to(tl.float32), input_precision="ieee")
        s = tl.load(scale + rn, mask=rn < N, other=0.0)
        tl.store(out + rm[:, None] * N + rn[None, :], (acc * s[None, :]).to(out.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit
    def int4_matmul(x, codes, scale_offset, out, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    GROUP: tl.constexpr):
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows, cols = rm[:, None] < M, rn[None, :] < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        n_groups = K // GROUP
        for g in range(0, n_groups):
            rk = g * GROUP + tl.arange(0, GROUP)
            xs = tl.load(x + rm[:, None] * K + rk[None, :], mask=rows, other=0.0)
            byte = tl.load(codes + rn[None, :] * (K // 2) + rk[:, None] // 2, mask=cols, other=0)
            code = (byte >> ((rk[:, None] % 2) * 4)) & 15  # [GROUP, BLOCK_N]: even k in the low nibble
            partial = tl.dot(xs.to(tl.float32), code.to(tl.float32), input_precision="ieee")
            xsum = tl.sum(xs.to(tl.float32), axis=1)  # w = code * scale + offset: offset · Σx
            so = scale_offset + rn * (n_groups * 2) + g * 2
            scale = tl.load(so, mask=rn < N, other=0.0)
            offset = tl.load(so + 1, mask=rn < N, other=0.0)
            acc += partial * scale[None, :] + xsum[:, None] * offset[None, :]
        tl.store(out + rm[:, None] * N + rn[None, :], acc.to(out.dtype.element_ty), mask=rows & cols)

    return triton, int8_matmul, int4_matmul


def _grid(M: int, N: int) -> tuple[int, int]:
    return (-(-N // BLOCK_N), -(-M // BLOCK_M))


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] (bf16) @ (q [N, K] int8 * scale [N] fp32)^T -> [M, N] in x's dtype."""
    _, kernel, _ = _kernels()
    M, K = x.shape
    N = q.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    kernel[_grid(M, N)](x.contiguous(), q, scale, out, M, N, K, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=32)
    return out


def int4_matmul(x: torch.Tensor, codes: torch.Tensor, scale_offset: torch.Tensor) -> torch.Tensor:
    """x [M, K] (bf16) @ w^T, w [N, K] as 4-bit codes [N, K / 2] (two a byte, even k low) with an fp32 scale and
    offset per group of 32 along K [N, K / 32, 2] (w = code * scale + offset) -> [M, N] in x's dtype."""
    _, _, kernel = _kernels()
    M, K = x.shape
    N = codes.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    kernel[_grid(M, N)](x.contiguous(), codes, scale_offset, out, M, N, K, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                        GROUP=INT4_GROUP)
    return out
