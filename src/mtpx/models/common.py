"""Building blocks shared by the hybrid (Gated DeltaNet + attention) families: the (1 + w) and gated RMSNorms,
rotary tables, the gated delta rule in its chunked (prefill) and per-token (step) forms, the causal conv of a step,
and `Pass`, what one forward call carries besides activations. Reference math only, like the family files."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mtpx.config import ModelConfig
from mtpx.models.linear import row_invariant
from mtpx.models.ops import fusible
from mtpx.state import SequenceState

GDN_CHUNK = 64


def initialised(weight: torch.Tensor, init: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`init(weight)`, except on the meta device (a model built to load weights into): there random and log ops
    import torch._dynamo, and with it triton where installed: ~1 s of every model load on this machine."""
    return weight if weight.device.type == "meta" else init(weight)


class RMSNorm(nn.Module):
    """RMSNorm whose weight is stored as an offset from 1 (Qwen3.5's zero-centred form)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


@fusible
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * (1.0 + weight.float())).type_as(x)


class GatedRMSNorm(nn.Module):
    """Norm over the value head dim, then multiply by silu(gate). Plain weight (not 1 + w)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(x, gate, self.weight, self.eps)


@fusible
def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * xf.to(dtype)
    return (out * F.silu(gate.float())).to(dtype)


@dataclass
class Pass:
    """What one forward call needs besides activations: caches, mode, rotary tables."""
    states: list[SequenceState] | None
    mode: str  # "prefill" | "step"
    cos: torch.Tensor  # [B, T, rotary_dim]
    sin: torch.Tensor

    @property
    def step_over_caches(self) -> bool:
        return self.mode == "step" and self.states is not None


_ROTARY: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (theta, dim, dtype, device) -> cos, sin by position


def rotary_tables(cfg: ModelConfig, starts: list[int], length: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, length, rotary_dim] for positions starts[b] + 0..length-1, cut from a table computed once (a
    decode step would otherwise spend a dozen small ops on them)."""
    dim, end = cfg.rotary_dim, max(starts) + length
    key = (cfg.rope_theta, dim, dtype, str(device))
    cos, sin = _ROTARY.get(key, (None, None))
    if cos is None or cos.shape[0] < end:
        size = max(end, 2 * (cos.shape[0] if cos is not None else 0), 4096)
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
        freqs = torch.arange(size, device=device)[:, None].float() * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = _ROTARY[key] = emb.cos().to(dtype), emb.sin().to(dtype)
    if len(starts) == 1:
        return cos[None, starts[0]:end], sin[None, starts[0]:end]
    pos = torch.tensor(starts, device=device)[:, None] + torch.arange(length, device=device)[None, :]
    return cos[pos], sin[pos]


@fusible
def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, head_dim]; rotates the first rotary_dim dims (rotate-half convention)."""
    rd = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]
    rot, rest = x[..., :rd], x[..., rd:]
    half = rd // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([rot * cos + rotated * sin, rest], dim=-1)


@torch.autocast("cpu", enabled=False)  # the recurrence stays in fp32 under mixed-precision training
def chunk_gated_delta_rule(q, k, v, g, beta, state, chunk: int = GDN_CHUNK):
    """Parallel-within-chunk form of the gated delta rule (fp32).
    q, k: [H, T, dk] (normalized, q scaled); v: [H, T, dv]; g (log decay), beta: [H, T]; state: [H, dk, dv].
    Returns outputs [H, T, dv] and the final state."""
    H, T, dk = k.shape
    pad = (-T) % chunk
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
    n = (T + pad) // chunk
    q, k, v = (t.reshape(H, n, chunk, -1) for t in (q, k, v))
    g, beta = g.reshape(H, n, chunk), beta.reshape(H, n, chunk)
    G = g.cumsum(-1)
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~lower, float("-inf")).exp()  # e^{G_i - G_j}, i >= j
    kb = k * beta[..., None]
    A = ((kb @ k.transpose(-1, -2)) * decay).tril(-1)
    system = A + torch.eye(chunk, dtype=A.dtype, device=A.device)
    U = torch.linalg.solve_triangular(system, v * beta[..., None], upper=False, unitriangular=True)
    W = torch.linalg.solve_triangular(system, kb * G.exp()[..., None], upper=False, unitriangular=True)
    intra = (q @ k.transpose(-1, -2)) * decay
    q_decayed = q * G.exp()[..., None]
    k_to_end = k * (G[..., -1:] - G).exp()[..., None]
    outs = []
    for i in range(n):
        u = U[:, i] - W[:, i] @ state
        outs.append(q_decayed[:, i] @ state + intra[:, i] @ u)
        state = state * G[:, i, -1].exp()[:, None, None] + k_to_end[:, i].transpose(-1, -2) @ u
    out = torch.cat(outs, dim=1)[:, :T]
    return out, state


def recurrent_gated_delta_step(q, k, v, g, beta, state):
    """One token of the gated delta rule. q, k: [H, dk]; v: [H, dv]; g, beta: [H]; state [H, dk, dv] (fp32)."""
    state = state * g.exp()[:, None, None]  # a new tensor: the old one may be a snapshot kept for rollback
    kv_mem = torch.bmm(k[:, None, :], state).squeeze(1)
    delta = (v - kv_mem) * beta[:, None]
    state.baddbmm_(k[:, :, None], delta[:, None, :])  # += k ⊗ delta in one pass over the state
    return torch.bmm(q[:, None, :], state).squeeze(1), state


@fusible
def gdn_gates(a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor,
              dt_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated DeltaNet's log decay g and write strength beta (fp32) from the a, b projections."""
    return -A_log.float().exp() * F.softplus(a.float() + dt_bias.float()), b.sigmoid().float()


@fusible
def gdn_heads(mixed: torch.Tensor, nk: int, dk: int, nv: int, dv: int):
    """Split conv output [T, conv_dim] into normalized fp32 q, k [T, nv, dk] and v [T, nv, dv]."""
    T = mixed.shape[0]
    q, k, v = mixed.float().split([nk * dk, nk * dk, nv * dv], dim=-1)
    q, k = q.view(T, nk, dk), k.view(T, nk, dk)
    q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6) / math.sqrt(dk)
    k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    if nv != nk:  # each key head serves nv/nk consecutive value heads
        q, k = q.repeat_interleave(nv // nk, dim=1), k.repeat_interleave(nv // nk, dim=1)
    return q, k, v.view(T, nv, dv)


@fusible
def causal_conv_step(seq: torch.Tensor, w: torch.Tensor, T: int) -> torch.Tensor:
    """The causal conv of T positions from their inputs seq [conv_dim, K - 1 + T], as explicit multiply-adds:
    elementwise, so each position's value ignores T. Returns silu(conv) [T, conv_dim] in seq's dtype."""
    xf, wf = seq.float(), w.float()
    acc = xf[:, :T] * wf[:, :1]
    for j in range(1, w.shape[1]):
        acc = acc + xf[:, j:j + T] * wf[:, j:j + 1]
    return F.silu(acc).t().to(seq.dtype)


def run_stack(cfg: ModelConfig, layers, x: torch.Tensor, states: list[SequenceState] | None, mode: str,
              rotary: Callable = rotary_tables) -> torch.Tensor:
    """Run decoder layers over x [B, T, H] with per-sequence caches (or none), advancing the caches by T. `rotary`:
    the family's cos / sin tables, as rotary_tables(cfg, starts, length, dtype, device) gives them."""
    B, T, _ = x.shape
    if states is not None:
        assert len(states) == B
        for s in states:
            s.check_room(T)
    starts = [s.length for s in states] if states is not None else [0] * B
    cos, sin = rotary(cfg, starts, T, x.dtype, x.device)
    p = Pass(states, mode, cos, sin)
    with row_invariant(mode == "step"):
        for layer in layers:
            x = layer(x, p)
    if states is not None:
        for s in states:
            s.length += T
            if mode != "step":  # prefill keeps no per-position states: nothing before this point can be restored
                s.mark()
    return x
