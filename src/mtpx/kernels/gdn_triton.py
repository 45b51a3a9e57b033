"""The gated delta rule over a static step pass's positions, as one Triton kernel (CUDA).

Token by token as PyTorch ops, the recurrence of a static pass (runners/static.py) is ~8 kernels per position per
Gated DeltaNet layer, which makes a verify pass cost well over a one-position step on a GPU. Here each program keeps one head's state block in registers and walks the positions: decay, read, delta, write,
output, and the state after every position into the rollback snapshots. The position count is a runtime argument
that Triton does not specialise on, so every pass width runs the same machine code and a position's bits never
depend on how many positions its pass holds (the invariant that keeps greedy speculation exact).
Triton is imported only when this runs: PyTorch's CUDA builds ship it; the CPU build needs none. Tests run the kernel
in Triton's interpreter on the CPU (TRITON_INTERPRET=1, set by tests/conftest.py where there is no GPU).
"""
from __future__ import annotations

import functools

import torch


def available(device: torch.device, mode: str = "1") -> bool:
    """Whether static passes on `device` can use the kernel: on CUDA unless mode is "0"; off CUDA only with mode
    "interpret", in Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)."""
    if mode == "0" or (device.type != "cuda" and mode != "interpret"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["T"])
    def recurrence(q, k, v, g, beta, state, snaps, out, T, W, H: tl.constexpr, DK: tl.constexpr,
                   DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
        h = tl.program_id(0)
        cols = tl.program_id(1) * BV + tl.arange(0, BV)
        rows = tl.arange(0, BK)
        col_ok, row_ok = cols < DV, rows < DK
        block = rows[:, None] * DV + cols[None, :]
        ok = row_ok[:, None] & col_ok[None, :]
        S = tl.load(state + h * DK * DV + block, mask=ok, other=0.0)
        tl.store(snaps + h * DK * DV + block, S, mask=ok)
        t = 0
        while t < T:  # a while loop: Triton's interpreter cannot range() over a runtime int under NumPy 2.4
            S = S * tl.exp(tl.load(g + t * H + h))
            k_t = tl.load(k + (t * H + h) * DK + rows, mask=row_ok, other=0.0)
            v_t = tl.load(v + (t * H + h) * DV + cols, mask=col_ok, other=0.0)
            delta = (v_t - tl.sum(k_t[:, None] * S, axis=0)) * tl.load(beta + t * H + h)
            S = S + k_t[:, None] * delta[None, :]
            q_t = tl.load(q + (t * H + h) * DK + rows, mask=row_ok, other=0.0)
            tl.store(out + (t * H + h) * DV + cols, tl.sum(q_t[:, None] * S, axis=0), mask=col_ok)
            tl.store(snaps + ((t + 1) * H + h) * DK * DV + block, S, mask=ok)
            t += 1
        while t < W:  # padding rows: zeros, as the token loop gave
            tl.store(out + (t * H + h) * DV + cols, tl.zeros([BV], dtype=tl.float32), mask=col_ok)
            t += 1
        tl.store(state + h * DK * DV + block, S, mask=ok)

    return recurrence


def gated_delta_recurrence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                           state: torch.Tensor, snapshots: torch.Tensor, T: int) -> torch.Tensor:
    """The first T of W positions through the gated delta rule, in place.
    q, k: [W, H, dk] (normalized, q scaled); v: [W, H, dv]; g (log decay), beta: [W, H]; all fp32.
    state [H, dk, dv] (fp32) becomes the state after T positions; snapshots [>= T + 1, H, dk, dv] receive the state
    before the pass and after each position. Returns the outputs [W, H, dv], zero past T."""
    import triton
    if state.dtype != torch.float32 or snapshots.dtype != torch.float32:
        raise TypeError("the gated delta recurrence keeps its state in fp32")
    if q.device.type != "cuda" and not triton.knobs.runtime.interpret:
        raise RuntimeError("the Triton kernel runs off CUDA only in Triton's interpreter: set TRITON_INTERPRET=1 "
                           "before triton is imported")
    W, H, dk = k.shape
    dv = v.shape[-1]
    q, k, v, g, beta = (t.float().contiguous() for t in (q, k, v, g, beta))
    out = torch.empty(W, H, dv, dtype=torch.float32, device=q.device)
    BK = triton.next_power_of_2(dk)
    BV = min(triton.next_power_of_2(dv), 16)
    grid = (H, triton.cdiv(dv, BV))
    _kernel()[grid](q, k, v, g, beta, state, snapshots, out, T, W, H, dk, dv, BK, BV)
    return out
