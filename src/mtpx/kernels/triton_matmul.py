"""Weight-only int8 and int4 matmuls for the GPU, as Triton kernels: y [M, N] = x [M, K] @ w^T with w kept quantized in
GPU memory and dequantized inside the kernel, in the CPU path's formats (models/linear.py Int8Weight,
models/grouped.py Int4Weight and Int8BlockWeight).

One kernel serves every row count, decode (1 row), verify (k + 1) and prefill alike: each program computes a tile of
BLOCK_M rows × BLOCK_N columns, walking K in the same fixed order, and padding rows are zeros. A row's result
therefore never depends on how many rows the call holds, which keeps greedy speculation exact on the GPU. The
codes and the activations meet in fp32 `tl.dot`s ("ieee": no TF32 rounding, and the same arithmetic in Triton's
interpreter, which has no bf16 dot); an int8 row's scale is applied to its sum, a group's scale and offset (int4,
int8 blocks) to the group's partial sum. Decoding reads each weight once per call, so the fp32 dot costs no bandwidth.
Triton is imported only when a kernel runs: the CPU build needs none. Tests run these kernels in Triton's
interpreter on the CPU (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import functools

import torch

BLOCK_M, BLOCK_N = 16, 64
INT4_GROUP, INT8_GROUP = 32, 16


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
    def grouped_matmul(x, codes, groups, supers, out, M, N, K, SHIFT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       GROUP: tl.constexpr, INT4: tl.constexpr):
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows, cols = rm[:, None] < M, rn[None, :] < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        n_groups = K // GROUP
        for g in range(0, n_groups):
            rk = g * GROUP + tl.arange(0, GROUP)
            xs = tl.load(x + rm[:, None] * K + rk[None, :], mask=rows, other=0.0)
            if INT4:
                byte = tl.load(codes + rn[None, :] * (K // 2) + rk[:, None] // 2, mask=cols, other=0)
                code = (byte >> ((rk[:, None] % 2) * 4)) & 15  # [GROUP, BLOCK_N]: even k in the low nibble
            else:
                code = tl.load(codes + rn[None, :] * K + rk[:, None], mask=cols, other=0)
            partial = tl.dot(xs.to(tl.float32), code.to(tl.float32), input_precision="ieee")
            xsum = tl.sum(xs.to(tl.float32), axis=1)  # w = code * scale + offset: offset · Σx
            group = rn * n_groups + g
            sc = tl.load(groups + group * 2, mask=rn < N, other=0).to(tl.float32)
            m = tl.load(groups + group * 2 + 1, mask=rn < N, other=0).to(tl.float32)
            d = tl.load(supers + (group >> SHIFT) * 2, mask=rn < N, other=0.0).to(tl.float32)
            dmin = tl.load(supers + (group >> SHIFT) * 2 + 1, mask=rn < N, other=0.0).to(tl.float32)
            acc += partial * (d * sc)[None, :] + xsum[:, None] * (dmin * m)[None, :]
        tl.store(out + rm[:, None] * N + rn[None, :], acc.to(out.dtype.element_ty), mask=rows & cols)

    return triton, int8_matmul, grouped_matmul


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


def _grouped(x: torch.Tensor, codes: torch.Tensor, groups: torch.Tensor, supers: torch.Tensor, group: int,
             int4: bool) -> torch.Tensor:
    _, _, kernel = _kernels()
    M, K = x.shape
    N, n_groups = groups.shape[:2]
    shift = (n_groups // supers.shape[1]).bit_length() - 1
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    kernel[_grid(M, N)](x.contiguous(), codes, groups, supers, out, M, N, K, shift, BLOCK_M=BLOCK_M,
                        BLOCK_N=BLOCK_N, GROUP=group, INT4=int4)
    return out


def int4_matmul(x: torch.Tensor, codes: torch.Tensor, groups: torch.Tensor, supers: torch.Tensor) -> torch.Tensor:
    """x [M, K] (bf16) @ w^T, w [N, K] as 4-bit codes [N, K / 2] (two a byte, even k low) in groups of 32 along K,
    each group's int8 (sc, m) in groups [N, K / 32, 2] and its super-block's fp16 (d, dmin) in supers [N, S, 2]
    (w = code * d * sc + dmin * m; models/grouped.py) -> [M, N] in x's dtype."""
    return _grouped(x, codes, groups, supers, INT4_GROUP, True)


def int8_blocks_matmul(x: torch.Tensor, codes: torch.Tensor, groups: torch.Tensor,
                       supers: torch.Tensor) -> torch.Tensor:
    """int4_matmul's arithmetic for int8 codes [N, K] in groups of 16 (groups [N, K / 16, 2])."""
    return _grouped(x, codes, groups, supers, INT8_GROUP, False)
