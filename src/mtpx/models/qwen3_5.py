"""Qwen3.5 / Qwen3.6 text models (dense and MoE) and their MTP layer.

Hybrid stack: Gated DeltaNet (linear attention) layers and gated full-attention layers, (1 + w) RMSNorm, SwiGLU or
routed + shared experts. Parameter names are the Hugging Face ones (`model.layers.N...`, `lm_head`, `mtp.*`).

Two forward modes share every layer:
- "prefill": many positions at once (chunked gated delta rule, causal attention); also used for training.
- "step": a few positions (decode = 1, verify = k + 1). Every position is computed by exactly the ops a one-token
  decode would run (per-query attention, per-token recurrence), and every matmul gives each row the bits it would
  get alone (models/linear.py), so a position's result does not depend on how many positions the call holds:
  greedy speculation is bit-exact.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mtpx import kernels
from mtpx.config import ModelConfig
from mtpx.kernels import gdn_triton
from mtpx.models.graphs import WIDTH, StaticState, is_static, step_op
from mtpx.models.linear import Linear, linear, project, project_joined, row_invariant, step_rows, step_weight
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
        if step_rows() and kernels.fused_step_ops(x):
            return kernels.rms_norm(x, self.weight, self.eps, True)
        return rms_norm(x, self.weight, self.eps)


@step_op
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


@step_op
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
    # a static step pass (models/graphs.py): the WIDTH rows' positions [WIDTH] (device), which cache entries each row
    # sees [WIDTH, cache length], and how many rows are real
    positions: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None
    n_real: int = 0

    def fused(self, x: torch.Tensor) -> bool:
        """A step over caches that the fused CPU kernels can run (kernels.step_ops)."""
        return self.mode == "step" and self.states is not None and self.positions is None and kernels.fused_step_ops(x)


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


@step_op
def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, head_dim]; rotates the first rotary_dim dims (rotate-half convention)."""
    rd = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]
    rot, rest = x[..., :rd], x[..., rd:]
    half = rd // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([rot * cos + rotated * sin, rest], dim=-1)


class Attention(nn.Module):
    """Gated full attention: q/k RMSNorm, partial RoPE, GQA, output multiplied by sigmoid(gate)."""
    FUSED_PROJECTIONS = ("q_proj", "k_proj", "v_proj")

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = Linear(h, 2 * self.n_heads * self.head_dim)
        self.k_proj = Linear(h, self.n_kv * self.head_dim)
        self.v_proj = Linear(h, self.n_kv * self.head_dim)
        self.o_proj = Linear(self.n_heads * self.head_dim, h)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, p: Pass) -> torch.Tensor:
        B, T, _ = x.shape
        if p.fused(x):
            qkv = project_joined(self, self.FUSED_PROJECTIONS, x)
            out = torch.stack([kernels.attention_step(qkv[b], self.q_norm.weight, self.k_norm.weight, p.cos[b],
                                                      p.sin[b], *p.states[b].kv[self.layer_idx], p.states[b].length,
                                                      self.n_heads, self.n_kv, self.head_dim, self.q_norm.eps)
                               for b in range(B)])
            return self.o_proj(out)
        q, k, v = project(self, self.FUSED_PROJECTIONS, x)
        q, gate = q.reshape(B, T, self.n_heads, 2 * self.head_dim).chunk(2, dim=-1)
        gate = gate.reshape(B, T, -1)
        q = self.q_norm(q).transpose(1, 2)
        k = self.k_norm(k.reshape(B, T, self.n_kv, self.head_dim)).transpose(1, 2)
        v = v.reshape(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, p.cos, p.sin), apply_rotary(k, p.cos, p.sin)
        if p.positions is not None:
            out = self._static(q, k, v, p)
        elif p.states is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            out = torch.cat([self._cached(q[b], k[b], v[b], p.states[b], p.mode) for b in range(B)])
        out = out.transpose(1, 2).reshape(B, T, -1) * torch.sigmoid(gate)
        return self.o_proj(out)

    def _static(self, q, k, v, p: Pass) -> torch.Tensor:
        """A static pass: every row's k, v written at its position, every query over the whole cache under a mask
        (fixed shapes; keys past a row's position weigh exactly 0)."""
        K, V = p.states[0].kv[self.layer_idx]
        K.index_copy_(1, p.positions, k[0])
        V.index_copy_(1, p.positions, v[0])
        return F.scaled_dot_product_attention(q, K[None], V[None], attn_mask=p.key_mask, enable_gqa=True)

    def _cached(self, q, k, v, state: SequenceState, mode: str) -> torch.Tensor:
        T, start = q.shape[1], state.length
        K, V = state.kv[self.layer_idx]
        K[:, start:start + T] = k
        V[:, start:start + T] = v
        if mode == "step":
            # one query at a time, over exactly the keys a one-token decode would see: batch-invariant
            outs = [F.scaled_dot_product_attention(q[None, :, t:t + 1].contiguous(), K[None, :, :start + t + 1],
                                                   V[None, :, :start + t + 1], enable_gqa=True) for t in range(T)]
            return torch.cat(outs, dim=2)
        if start == 0:
            return F.scaled_dot_product_attention(q[None], K[None, :, :T], V[None, :, :T], is_causal=True, enable_gqa=True)
        mask = torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(start)
        return F.scaled_dot_product_attention(q[None], K[None, :, :start + T], V[None, :, :start + T],
                                              attn_mask=mask, enable_gqa=True)


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


@step_op
def gdn_gates(a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor,
              dt_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated DeltaNet's log decay g and write strength beta (fp32) from the a, b projections."""
    return -A_log.float().exp() * F.softplus(a.float() + dt_bias.float()), b.sigmoid().float()


@step_op
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


@step_op
def causal_conv_step(seq: torch.Tensor, w: torch.Tensor, T: int) -> torch.Tensor:
    """The causal conv of T positions from their inputs seq [conv_dim, K - 1 + T], as explicit multiply-adds:
    elementwise, so each position's value ignores T. Returns silu(conv) [T, conv_dim] in seq's dtype."""
    xf, wf = seq.float(), w.float()
    acc = xf[:, :T] * wf[:, :1]
    for j in range(1, w.shape[1]):
        acc = acc + xf[:, j:j + T] * wf[:, j:j + 1]
    return F.silu(acc).t().to(seq.dtype)


class GatedDeltaNet(nn.Module):
    """Linear-attention layer: causal depthwise conv over q/k/v, gated delta rule, gated RMSNorm."""
    FUSED_PROJECTIONS = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.nk, self.nv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.key_dim, self.value_dim = self.nk * self.dk, self.nv * self.dv
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.kernel = cfg.linear_conv_kernel_dim
        h = cfg.hidden_size
        self.in_proj_qkv = Linear(h, self.conv_dim)
        self.in_proj_z = Linear(h, self.value_dim)
        self.in_proj_b = Linear(h, self.nv)
        self.in_proj_a = Linear(h, self.nv)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim, bias=False,
                                padding=self.kernel - 1)
        self.dt_bias = nn.Parameter(torch.ones(self.nv))
        self.A_log = nn.Parameter(initialised(torch.empty(self.nv), lambda w: w.uniform_(0.01, 16).log_()))
        self.norm = GatedRMSNorm(self.dv, cfg.rms_norm_eps)
        self.out_proj = Linear(self.value_dim, h)

    def forward(self, x: torch.Tensor, p: Pass) -> torch.Tensor:
        B, T, _ = x.shape
        w = self.conv1d.weight.squeeze(1)  # [conv_dim, kernel]
        if p.fused(x):
            proj = project_joined(self, self.FUSED_PROJECTIONS, x)
            return self.out_proj(torch.stack([self._fused_step(proj[i], w, p.states[i]) for i in range(B)]))
        qkv, z, b, a = project(self, self.FUSED_PROJECTIONS, x)  # qkv: [B, T, conv_dim], before the conv
        z = z.reshape(B, T, self.nv, self.dv)
        g, beta = gdn_gates(a, b, self.A_log, self.dt_bias)
        if p.states is None:  # no caches (training, LLM.logits): the whole batch at once
            core = self._uncached(qkv, g, beta, w).to(x.dtype)
            return self.out_proj(self.norm(core, z).reshape(B, T, self.value_dim))
        if p.positions is not None:
            core = self._static_step(qkv[0], g[0], beta[0], w, p.states[0], p.n_real)[None].to(x.dtype)
            return self.out_proj(self.norm(core, z).reshape(B, T, self.value_dim))
        outs = []
        for b in range(B):
            state = p.states[b] if p.states is not None else None
            if p.mode == "step":
                outs.append(self._step(qkv[b], g[b], beta[b], w, state))
            else:
                outs.append(self._prefill(qkv[b], g[b], beta[b], w, state))
        core = torch.stack(outs).to(x.dtype)  # [B, T, nv, dv]
        core = self.norm(core, z).reshape(B, T, self.value_dim)
        return self.out_proj(core)

    def _heads(self, mixed: torch.Tensor):
        """Split conv output [T, conv_dim] into normalized fp32 q, k [T, nv, dk] and v [T, nv, dv]."""
        return gdn_heads(mixed, self.nk, self.dk, self.nv, self.dv)

    def _uncached(self, qkv, g, beta, w):
        B, T, _ = qkv.shape
        mixed = F.silu(F.conv1d(qkv.transpose(1, 2).float(), w[:, None].float(), groups=self.conv_dim,
                                padding=self.kernel - 1)[..., :T]).transpose(1, 2).to(qkv.dtype)
        q, k, v = self._heads(mixed.reshape(B * T, -1))
        heads = lambda t: t.reshape(B, T, self.nv, -1).permute(0, 2, 1, 3).reshape(B * self.nv, T, -1)
        gh, bh = (t.permute(0, 2, 1).reshape(B * self.nv, T) for t in (g, beta))
        out, _ = chunk_gated_delta_rule(heads(q), heads(k), heads(v), gh, bh,
                                        q.new_zeros(B * self.nv, self.dk, self.dv))
        return out.reshape(B, self.nv, T, self.dv).transpose(1, 2)

    def _prefill(self, qkv, g, beta, w, state: SequenceState | None):
        past = state.conv[self.layer_idx] if state is not None else qkv.new_zeros(self.conv_dim, self.kernel - 1)
        seq = torch.cat([past, qkv.t()], dim=1)  # [conv_dim, kernel - 1 + T]
        mixed = F.silu(F.conv1d(seq[None].float(), w[:, None].float(), groups=self.conv_dim)[0]).t().to(qkv.dtype)
        q, k, v = self._heads(mixed)
        rec = state.recurrent[self.layer_idx] if state is not None else q.new_zeros(self.nv, self.dk, self.dv)
        out, rec = chunk_gated_delta_rule(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                          g.t(), beta.t(), rec)
        if state is not None:
            state.conv[self.layer_idx] = seq[:, -(self.kernel - 1):]
            state.recurrent[self.layer_idx] = rec
        return out.transpose(0, 1)

    def _step(self, qkv, g, beta, w, state: SequenceState):
        T = qkv.shape[0]
        seq = torch.cat([state.conv[self.layer_idx], qkv.t()], dim=1)  # [conv_dim, K - 1 + T]
        mixed = causal_conv_step(seq, w, T)
        rec, outs, states = state.recurrent[self.layer_idx], [], []
        for t in range(T):
            # per token: reductions over a few elements may be vectorised differently for different T
            q, k, v = self._heads(mixed[t:t + 1])
            o, rec = recurrent_gated_delta_step(q[0], k[0], v[0], g[t], beta[t], rec)
            states.append(rec)
            outs.append(o)
        self._advance(state, seq, states)
        return torch.stack(outs)

    def _static_step(self, qkv, g, beta, w, state: StaticState, T: int) -> torch.Tensor:
        """A static pass (models/graphs.py): all WIDTH rows through the conv and head split (fixed shapes), the T
        real ones through the recurrence (one Triton kernel on CUDA, else token by token); the states after each
        position go to the snapshot buffers, the current ones are updated in place. Returns [WIDTH, nv, dv], zero
        past T."""
        i, K = self.layer_idx, self.kernel
        seq = torch.cat([state.conv[i], qkv.t()], dim=1)  # [conv_dim, K - 1 + WIDTH]
        q, k, v = self._heads(causal_conv_step(seq, w, qkv.shape[0]))
        state.snap_conv[i][:T + 1].copy_(seq.unfold(1, K - 1, 1)[:, :T + 1].transpose(0, 1))  # window after t tokens
        if gdn_triton.available(qkv.device):  # the whole recurrence in one kernel
            out = gdn_triton.gated_delta_recurrence(q, k, v, g, beta, state.recurrent[i], state.snap_recurrent[i], T)
            state.conv[i].copy_(state.snap_conv[i][T])
            return out
        rec = state.recurrent[i]
        state.snap_recurrent[i][0].copy_(rec)
        outs = []
        for t in range(T):
            o, rec = recurrent_gated_delta_step(q[t], k[t], v[t], g[t], beta[t], rec)
            state.snap_recurrent[i][t + 1].copy_(rec)
            outs.append(o)
        state.conv[i].copy_(state.snap_conv[i][T])
        state.recurrent[i].copy_(rec)
        return torch.cat([torch.stack(outs), q.new_zeros(qkv.shape[0] - T, self.nv, self.dv)])

    def _fused_step(self, proj, w, state: SequenceState) -> torch.Tensor:
        """The step path in one kernel call (bf16 on CPU): conv, gates, delta rule and gated norm -> [T, value_dim]."""
        before = state.recurrent[self.layer_idx]
        out, seq, after, replay = kernels.gdn_step(proj, state.conv[self.layer_idx], w, self.A_log, self.dt_bias,
                                                   self.norm.weight, before, self.nk, self.dk, self.dv, self.norm.eps)
        self.keep_fused_states(state, before, seq, after, replay)
        return out

    def keep_fused_states(self, state: SequenceState, before: torch.Tensor, seq: torch.Tensor, after: torch.Tensor,
                          replay: torch.Tensor) -> None:
        """Record what a fused step (kernels.gdn_step) returned, for rollback. The states between positions are
        rebuilt only if a rollback asks for one: writing each (1 MiB per layer for Qwen3.5-0.8B) costs a verify pass
        more than the rare replay does."""
        lazy = [functools.partial(kernels.gdn_replay, before, replay, t + 1) for t in range(replay.shape[0] - 1)]
        self._advance(state, seq, lazy + [after])

    def _advance(self, state: SequenceState, seq: torch.Tensor, states: list) -> None:
        """Keep the (conv, recurrent) state after every position for rollback (a recurrent state may be a function
        that computes it); the last one becomes current."""
        T, K = len(states), self.kernel
        state.snapshots[self.layer_idx].extend((seq[:, t + 1:t + K], states[t]) for t in range(T))
        state.conv[self.layer_idx], state.recurrent[self.layer_idx] = seq[:, T:], states[-1]


class MLP(nn.Module):
    FUSED_PROJECTIONS = ("gate_proj", "up_proj")

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate)
        self.up_proj = Linear(hidden, intermediate)
        self.down_proj = Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if step_rows() and kernels.fused_step_ops(x):
            return self.down_proj(kernels.silu_mul(project_joined(self, self.FUSED_PROJECTIONS, x)))
        gate, up = project(self, self.FUSED_PROJECTIONS, x)
        return self.down_proj(silu_mul(gate, up))


@step_op
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = linear(x, self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        top, idx = torch.topk(probs, self.top_k, dim=-1)
        return (top / top.sum(-1, keepdim=True)).to(logits.dtype), idx


class Experts(nn.Module):
    """Routed experts as stacked weights: gate_up_proj [E, 2I, H], down_proj [E, H, I]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, i, h = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.gate_up_proj = nn.Parameter(initialised(torch.empty(e, 2 * i, h), lambda w: w.normal_(0, 0.02)))
        self.down_proj = nn.Parameter(initialised(torch.empty(e, h, i), lambda w: w.normal_(0, 0.02)))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        # experts in ascending order, each over the rows routed to it: a row's sum order never depends on the others
        for e in torch.unique(idx).tolist():
            rows, slot = torch.where(idx == e)
            gate, up = linear(x[rows], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = linear(F.silu(gate) * up, self.down_proj[e]) * weights[rows, slot, None]
            out = out.index_add(0, rows, y.to(out.dtype))
        return out


class SparseMoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
        self.shared_expert_gate = Linear(cfg.hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, idx = self.gate(x)
        routed = self.experts(x, weights, idx)
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return (routed + shared).reshape(shape)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_type: str, layer_idx: int):
        super().__init__()
        self.layer_type = layer_type
        if layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(cfg, layer_idx)
        else:
            self.self_attn = Attention(cfg, layer_idx)
        self.mlp = SparseMoE(cfg) if cfg.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, p: Pass) -> torch.Tensor:
        if p.fused(x) and x.shape[0] == 1 and (weights := self.step_weights()) is not None:
            return self._layer_step(x[0], p, weights)[None]
        mixer = self.linear_attn if self.layer_type == "linear_attention" else self.self_attn
        x = x + mixer(self.input_layernorm(x), p)
        return x + self.mlp(self.post_attention_layernorm(x))

    def step_weights(self) -> tuple | None:
        """The layer's weights as the whole-layer step kernels take them (kernels/layer_step.cpp), or None where
        those cannot run it (MoE, projections not fused by pack_for_cpu, a weight the kernel cannot read). Cached
        per MLP projection: pack_for_cpu and quantize() replace it, and with it the cache."""
        fused = self.mlp.__dict__.get("_fused")
        cached = self.__dict__.get("_step_weights")
        if cached is None or cached[0] is not fused:
            cached = self.__dict__["_step_weights"] = (fused, self._collect_step_weights() if fused else None)
        return cached[1]

    def _collect_step_weights(self) -> tuple | None:
        mlp = [self.post_attention_layernorm.weight, step_weight(self.mlp), step_weight(self.mlp.down_proj)]
        if self.layer_type == "linear_attention":
            g = self.linear_attn
            mixer = [self.input_layernorm.weight, step_weight(g), g.conv1d.weight.squeeze(1).contiguous(),
                     g.A_log, g.dt_bias, g.norm.weight, step_weight(g.out_proj)]
        else:
            a = self.self_attn
            mixer = [self.input_layernorm.weight, step_weight(a), a.q_norm.weight, a.k_norm.weight,
                     step_weight(a.o_proj)]
        weights = tuple(mixer + mlp)
        return None if any(w is None for w in weights) else weights

    def mixer_dims(self) -> tuple[int, int, int]:
        """The head sizes the whole-layer kernels take: (heads, kv heads, head dim) or (key heads, key dim, value
        dim)."""
        if self.layer_type == "linear_attention":
            g = self.linear_attn
            return g.nk, g.dk, g.dv
        a = self.self_attn
        return a.n_heads, a.n_kv, a.head_dim

    def _layer_step(self, x: torch.Tensor, p: Pass, weights: tuple) -> torch.Tensor:
        """This layer over the T positions x [T, H] of one sequence in one kernel call (kernels/layer_step.cpp)."""
        state = p.states[0]
        if self.layer_type == "linear_attention":
            g, i = self.linear_attn, self.linear_attn.layer_idx
            before = state.recurrent[i]
            out, seq, after, replay = kernels.gdn_layer_step(x, weights, state.conv[i], before, g.nk, g.dk, g.dv,
                                                             self.input_layernorm.eps)
            g.keep_fused_states(state, before, seq, after, replay)
            return out
        a = self.self_attn
        return kernels.attention_layer_step(x, weights, p.cos[0], p.sin[0], *state.kv[a.layer_idx], state.length,
                                            a.n_heads, a.n_kv, a.head_dim, self.input_layernorm.eps)


def run_stack(cfg: ModelConfig, layers: nn.ModuleList, x: torch.Tensor, states: list[SequenceState] | None,
              mode: str) -> torch.Tensor:
    """Run decoder layers over x [B, T, H] with per-sequence caches (or none), advancing the caches by T."""
    B, T, _ = x.shape
    if states is not None:
        assert len(states) == B
        for s in states:
            s.check_room(T)
    starts = [s.length for s in states] if states is not None else [0] * B
    cos, sin = rotary_tables(cfg, starts, T, x.dtype, x.device)
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


def run_static_stack(cfg: ModelConfig, layers: nn.ModuleList, x: torch.Tensor, state: StaticState,
                     n_real: int) -> torch.Tensor:
    """run_stack for a static step pass (models/graphs.py): x [1, WIDTH, H] of which n_real rows are real, positions
    read from the state's device tensor; StaticState.run_step does the host-side bookkeeping."""
    positions = state.position + torch.arange(WIDTH, device=x.device)
    cos, sin = (table[positions][None] for table in state.rotary)
    key_mask = torch.arange(state.cache_len, device=x.device)[None, :] <= positions[:, None]
    p = Pass([state], "step", cos, sin, positions, key_mask, n_real)
    with row_invariant(False):  # every matmul has WIDTH rows: row-invariant by its fixed shape
        for layer in layers:
            x = layer(x, p)
    return x


class MTP(nn.Module):
    """The multi-token-prediction layer(s): `x = fc([norm_e(embed(t_{i+1})); norm_h(h_i)])` → decoder layer(s) with
    their own KV cache → `norm`. Uses the main model's embedding and lm_head."""

    def __init__(self, cfg: ModelConfig, n_layers: int):
        super().__init__()
        h = cfg.hidden_size
        self.fc = Linear(2 * h, h)
        self.pre_fc_norm_embedding = RMSNorm(h, cfg.rms_norm_eps)
        self.pre_fc_norm_hidden = RMSNorm(h, cfg.rms_norm_eps)
        self.layer_types = ["full_attention"] * n_layers
        self.layers = nn.ModuleList(DecoderLayer(cfg, "full_attention", i) for i in range(n_layers))
        self.norm = RMSNorm(h, cfg.rms_norm_eps)

    def forward(self, cfg: ModelConfig, embeds: torch.Tensor, hidden: torch.Tensor,
                states: list[SequenceState] | None, mode: str) -> torch.Tensor:
        if mode == "step" and is_static(states):  # one pass (one graph) per sequence
            return torch.cat([s.run_step("mtp", functools.partial(self._static, cfg, s), embeds[b:b + 1],
                                         hidden[b:b + 1]) for b, s in enumerate(states)])
        with row_invariant(mode == "step"):  # the step path's fused ops for the norms and fc too
            return self.norm(run_stack(cfg, self.layers, self._inputs(embeds, hidden), states, mode))

    def _inputs(self, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden)], dim=-1))

    def _static(self, cfg: ModelConfig, state: StaticState, embeds: torch.Tensor, hidden: torch.Tensor,
                n_real: int) -> torch.Tensor:
        with row_invariant(False):
            x = self._inputs(embeds, hidden)
        return self.norm(run_static_stack(cfg, self.layers, x, state, n_real))


class Qwen35Model(nn.Module):
    """Main model + optional MTP layer. `forward` returns final-normed hidden states; `logits` applies lm_head."""

    def __init__(self, cfg: ModelConfig, mtp_layers: int = 0):
        super().__init__()
        self.cfg = cfg
        self.model = nn.Module()
        embed = initialised(torch.empty(cfg.vocab_size, cfg.hidden_size), nn.init.normal_)  # nn.Embedding's init
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=embed)
        self.model.layers = nn.ModuleList(DecoderLayer(cfg, t, i) for i, t in enumerate(cfg.layer_types))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.mtp = MTP(cfg, mtp_layers) if mtp_layers > 0 else None

    def new_state(self, max_len: int, device=None) -> SequenceState:
        p = self.lm_head.weight
        return SequenceState(self.cfg, self.cfg.layer_types, max_len, p.dtype, device or p.device)

    def new_mtp_state(self, max_len: int, device=None) -> SequenceState:
        p = self.lm_head.weight
        return SequenceState(self.cfg, self.mtp.layer_types, max_len, p.dtype, device or p.device)

    def new_static_state(self, stack: str, max_len: int) -> StaticState:
        """Caches for static step passes (CUDA graphs) of the main stack ("main") or the MTP layers ("mtp")."""
        p = self.lm_head.weight
        cos, sin = rotary_tables(self.cfg, [0], max_len + WIDTH, p.dtype, p.device)
        types = self.cfg.layer_types if stack == "main" else self.mtp.layer_types
        return StaticState(self.cfg, types, max_len, p.dtype, p.device, (cos[0], sin[0]))

    def forward(self, tokens: torch.Tensor, states: list[SequenceState] | None = None,
                mode: str = "prefill") -> torch.Tensor:
        if mode == "step" and is_static(states):  # one pass (one graph) per sequence
            return torch.cat([s.run_step("main", functools.partial(self._static, s), tokens[b:b + 1])
                              for b, s in enumerate(states)])
        if mode == "step" and states is not None and len(states) == 1 and (stack := self._step_stack()) is not None:
            return self._stack_step(stack, tokens, states[0])
        x = self.model.embed_tokens(tokens)
        with row_invariant(mode == "step"):
            return self.model.norm(run_stack(self.cfg, self.model.layers, x, states, mode))

    def _step_stack(self) -> tuple | None:
        """The main stack as one kernel object (kernels.StackStep) with what a call needs, for step passes of one
        sequence; None where a layer has no whole-layer kernel (DecoderLayer.step_weights) or the weights are not
        bf16 on a CPU. Rebuilt when a layer's weights change, like step_weights."""
        layers = self.model.layers
        cached = self.__dict__.get("_stack")
        # what step_weights keys on, checked here without six step_weights calls a step
        fused = [layer.mlp.__dict__.get("_fused") for layer in layers]
        if cached is None or any(a is not b for a, b in zip(cached[0], fused)):
            if not kernels.fused_step_ops(self.model.embed_tokens.weight):
                return None
            weights = [layer.step_weights() for layer in layers]
            stack = None
            if all(w is not None for w in weights):
                stack = kernels.step_stack(
                    self.model.embed_tokens.weight, self.model.norm.weight, self.cfg.rms_norm_eps,
                    [(layer.layer_type, w, layer.mixer_dims()) for layer, w in zip(layers, weights)])
            attention = [layer.self_attn.layer_idx for layer in layers if layer.layer_type == "full_attention"]
            gdn = [layer.linear_attn for layer in layers if layer.layer_type == "linear_attention"]
            cached = self.__dict__["_stack"] = (fused, (stack, attention, gdn) if stack is not None else None)
        return cached[1]

    def _stack_step(self, stack: tuple, tokens: torch.Tensor, state: SequenceState) -> torch.Tensor:
        """run_stack's step pass of one sequence, the whole stack in one kernel call: the same kernels in the same
        order as the per-layer path (so the same bits), without the Python between the layers."""
        kernel, attention, gdn = stack
        T = tokens.shape[1]
        state.check_room(T)
        cos, sin = rotary_tables(self.cfg, [state.length], T, self.lm_head.weight.dtype, tokens.device)
        before = [state.recurrent[g.layer_idx] for g in gdn]
        out = kernel.run(tokens[0], cos[0], sin[0], state.length, [t for i in attention for t in state.kv[i]],
                         [state.conv[g.layer_idx] for g in gdn], before)
        for j, g in enumerate(gdn):
            g.keep_fused_states(state, before[j], *out[1 + 3 * j:4 + 3 * j])
        state.length += T
        return out[0][None]

    def _static(self, state: StaticState, tokens: torch.Tensor, n_real: int) -> torch.Tensor:
        x = self.model.embed_tokens(tokens)
        return self.model.norm(run_static_stack(self.cfg, self.model.layers, x, state, n_real))

    def logits(self, hidden: torch.Tensor, step: bool = False) -> torch.Tensor:
        """lm_head; `step=True` for rows of a step forward (decode / verify / draft), so they are row-invariant."""
        with row_invariant(step):
            return self.lm_head(hidden)

    def mtp_greedy_drafts(self, hidden: torch.Tensor, tokens: torch.Tensor, state: SequenceState, k: int,
                          head: list[torch.Tensor] | None = None, head_ids: torch.Tensor | None = None,
                          penalty: tuple | None = None) -> list[int] | None:
        """k greedy drafts of the MTP layer for one sequence in one kernel call (kernels/layer_step.cpp), from its n
        pending pairs (hidden [n, H], tokens [n]); advances the MTP state by n + k - 1. `head`: the draft head's
        weight as kernel_weight gives it (default lm_head), `head_ids`: the token ids of its rows, `penalty`: drafts
        by penalised logits (kernels.mtp_greedy_drafts). None where the kernel cannot run this (not bf16 on CPU, more
        than one MTP layer, a weight it cannot read): the caller then drafts step by step, with the same result."""
        mtp = self.mtp
        if len(mtp.layers) != 1 or not kernels.fused_step_ops(hidden) or isinstance(state, StaticState):
            return None
        layer = mtp.layers[0]
        weights, fc = layer.step_weights(), step_weight(mtp.fc)
        head = head if head is not None else step_weight(self.lm_head)
        if weights is None or fc is None or head is None:
            return None
        n = tokens.shape[0]
        state.check_room(n + k - 1)
        cos, sin = rotary_tables(self.cfg, [state.length], n + k - 1, hidden.dtype, hidden.device)
        a = layer.self_attn
        drafts = kernels.mtp_greedy_drafts(
            hidden, tokens, self.model.embed_tokens.weight, mtp.pre_fc_norm_embedding.weight,
            mtp.pre_fc_norm_hidden.weight, fc, weights, mtp.norm.weight, head, head_ids, cos[0], sin[0],
            *state.kv[a.layer_idx], state.length, k, a.n_heads, a.n_kv, a.head_dim, self.cfg.rms_norm_eps, penalty)
        state.length += n + k - 1
        return drafts

    def mtp_forward(self, hidden: torch.Tensor, next_tokens: torch.Tensor,
                    states: list[SequenceState] | None = None, mode: str = "prefill") -> torch.Tensor:
        """MTP output (after mtp.norm) for pairs (h_i, t_{i+1}); `logits()` of it predicts t_{i+2}."""
        return self.mtp(self.cfg, self.model.embed_tokens(next_tokens), hidden, states, mode)
