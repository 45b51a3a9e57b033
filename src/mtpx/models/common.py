"""Building blocks shared by the hybrid (Gated DeltaNet + attention) families: the (1 + w) and gated RMSNorms,
rotary tables, the gated delta rule in its chunked (prefill) and per-token (step) forms, the causal conv of a step,
`Pass`, what one forward call carries besides activations, and `TreeRows`, the layout of a step pass whose rows form
a draft tree. Reference math only, like the family files."""
from __future__ import annotations

import functools
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

    def tree(self, b: int) -> "TreeRows | None":
        """The draft tree the rows of sequence b form in this step pass; None: a chain (each row follows the last)."""
        return self.states[b].tree if self.step_over_caches else None

    @property
    def has_tree(self) -> bool:
        return self.step_over_caches and any(s.tree is not None for s in self.states)


@dataclass(frozen=True)
class TreeRows:
    """The rows of one sequence's step pass as nodes of a draft tree (speculative/tree.py lays them out). Row t
    continues the Gated DeltaNet state of row parents[t] (-1: the sequence's current state), is rotated for position
    positions[t], writes its key and value at cache position writes[t], and attends over the first `prefix` cached
    positions and then keys[t] (its ancestors' positions, its own last). Rows come parents first, depth first.

    `in_place`: every row writes at prefix + its depth and sees prefix..writes[t], i.e. its path lies in the cache
    exactly where a decode of that path would have put it; depth-first order keeps each row's ancestors there when
    its turn comes, so every row attends as a one-token decode step would (the verify pass). Otherwise rows write at
    distinct positions and see theirs through a mask (the MTP layer's drafting passes, which need not be exact)."""
    parents: tuple[int, ...]
    positions: tuple[int, ...]
    writes: tuple[int, ...]
    keys: tuple[tuple[int, ...], ...]
    prefix: int

    # each layer of a pass asks again: computed once (a frozen dataclass keeps cached values in its __dict__)
    @functools.cached_property
    def in_place(self) -> bool:
        return all(k == tuple(range(self.prefix, w + 1)) for k, w in zip(self.keys, self.writes))

    @functools.cached_property
    def end(self) -> int:
        """One past the last cache position the pass writes."""
        return max(self.writes) + 1

    @functools.cached_property
    def segments(self) -> list[tuple[int, int]]:
        """Runs [a, e) of rows each of which is the child of the row before it: chains a step kernel can take whole."""
        bounds = [t for t in range(1, len(self.parents)) if self.parents[t] != t - 1]
        return list(zip([0] + bounds, bounds + [len(self.parents)]))

    def windows(self, kernel: int) -> list[list[int]]:
        """Per row, the K columns of its causal conv window along its path, in an array of the K - 1 inputs the
        sequence's conv state holds followed by one column per row."""
        cached = self.__dict__.setdefault("_windows", {})
        if kernel not in cached:
            before = {-1: list(range(kernel - 1))}
            out = cached[kernel] = []
            for t, parent in enumerate(self.parents):
                window = before[parent] + [kernel - 1 + t]
                before[t] = window[1:]
                out.append(window)
        return cached[kernel]


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


def causal_conv_tree(cols: torch.Tensor, w: torch.Tensor, windows: list[list[int]]) -> torch.Tensor:
    """causal_conv_step for the rows of a draft tree: row t's window is the columns windows[t] of cols
    [conv_dim, K - 1 + T] (TreeRows.windows). The same multiply-adds in the same order, so a row gets the bits it
    would get in a chain along its path. Returns silu(conv) [T, conv_dim]."""
    x = cols.float()[:, torch.tensor(windows, device=cols.device)]  # [conv_dim, T, K]
    wf = w.float()
    acc = x[..., 0] * wf[:, :1]
    for j in range(1, w.shape[1]):
        acc = acc + x[..., j] * wf[:, j:j + 1]
    return F.silu(acc).t().to(cols.dtype)


def tree_rotary(cfg: ModelConfig, rotary: Callable, states: list[SequenceState], T: int, dtype: torch.dtype,
                device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, rotary_dim] of a step pass where some sequences' rows form a tree (each row at its own
    position), cut from the same tables as a chain's."""
    cos, sin = [], []
    for s in states:
        positions = s.tree.positions if s.tree is not None else range(s.length, s.length + T)
        low = min(positions)
        c, n = rotary(cfg, [low], max(positions) - low + 1, dtype, device)
        rows = torch.tensor([p - low for p in positions], device=device)
        cos.append(c[0, rows])
        sin.append(n[0, rows])
    return torch.stack(cos), torch.stack(sin)


def run_stack(cfg: ModelConfig, layers, x: torch.Tensor, states: list[SequenceState] | None, mode: str,
              rotary: Callable = rotary_tables) -> torch.Tensor:
    """Run decoder layers over x [B, T, H] with per-sequence caches (or none), advancing the caches by T. `rotary`:
    the family's cos / sin tables, as rotary_tables(cfg, starts, length, dtype, device) gives them. A state whose
    `tree` is set takes the pass's rows as that tree's nodes (TreeRows)."""
    B, T, _ = x.shape
    tree = states is not None and any(s.tree is not None for s in states)
    if states is not None:
        assert len(states) == B
        assert not tree or mode == "step", "draft trees run in step passes"
        for s in states:
            s.check_room(s.tree.end - s.length if s.tree is not None else T)
    starts = [s.length for s in states] if states is not None else [0] * B
    if tree:
        cos, sin = tree_rotary(cfg, rotary, states, T, x.dtype, x.device)
    else:
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
