"""Qwen3.5 / Qwen3.6 text models (dense and MoE) and their MTP layer.

Hybrid stack: Gated DeltaNet (linear attention) layers and gated full-attention layers, (1 + w) RMSNorm, SwiGLU or
routed + shared experts. Parameter names are the Hugging Face ones (`model.layers.N...`, `lm_head`, `mtp.*`).

Two forward modes share every layer:
- "prefill": many positions at once (chunked gated delta rule, causal attention); also used for training.
- "step": a few positions (decode = 1, verify = k + 1). Every position is computed by exactly the ops a one-token
  decode would run (per-query attention, per-token recurrence), and every matmul gives each row the bits it would
  get alone (models/linear.py), so a position's result does not depend on how many positions the call holds:
  greedy speculation is bit-exact.

This file is the reference math only. How a pass runs on a given machine (fused CPU kernels, static passes and CUDA
graphs) is a runner's business (mtpx/runners/), chosen once when the model is loaded; every runner is tested against
this code.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from mtpx.config import ModelConfig
from mtpx.models.common import (GatedRMSNorm, Pass, RMSNorm, TreeRows, apply_rotary, causal_conv_step,
                                causal_conv_tree, chunk_gated_delta_rule, gdn_gates, gdn_heads, initialised,
                                recurrent_gated_delta_step, rotary_tables, run_stack)
from mtpx.models.linear import Linear, QuantizedWeight, linear, project, row_invariant
from mtpx.models.ops import fusible
from mtpx.state import SequenceState


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
        q, k, v = project(self, self.FUSED_PROJECTIONS, x)
        q, gate = q.reshape(B, T, self.n_heads, 2 * self.head_dim).chunk(2, dim=-1)
        gate = gate.reshape(B, T, -1)
        q = self.q_norm(q).transpose(1, 2)
        k = self.k_norm(k.reshape(B, T, self.n_kv, self.head_dim)).transpose(1, 2)
        v = v.reshape(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, p.cos, p.sin), apply_rotary(k, p.cos, p.sin)
        out = self.attend(q, k, v, p)  # [B, heads, T, head_dim]
        out = out.transpose(1, 2).reshape(B, T, -1) * torch.sigmoid(gate)
        return self.o_proj(out)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Pass) -> torch.Tensor:
        """Attention of the pass's queries over their sequences' caches (written here), or causal without caches."""
        if p.states is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return torch.cat([self._tree(q[b], k[b], v[b], p.states[b], p.tree(b)) if p.tree(b) is not None
                          else self._cached(q[b], k[b], v[b], p.states[b], p.mode) for b in range(q.shape[0])])

    def _tree(self, q, k, v, state: SequenceState, tree: TreeRows) -> torch.Tensor:
        """Attention of the rows of a draft tree (see TreeRows)."""
        K, V = state.kv[self.layer_idx]
        T = q.shape[1]
        if tree.in_place:
            state.row_kv[self.layer_idx] = (k, v)
            outs = []
            for t in range(T):  # in order: a row's entry replaces a finished sibling branch's
                w = tree.writes[t]
                K[:, w], V[:, w] = k[:, t], v[:, t]
                outs.append(F.scaled_dot_product_attention(q[None, :, t:t + 1].contiguous(), K[None, :, :w + 1],
                                                           V[None, :, :w + 1], enable_gqa=True))
            return torch.cat(outs, dim=2)
        rows = torch.tensor(tree.writes, device=q.device)
        K.index_copy_(1, rows, k)
        V.index_copy_(1, rows, v)
        end = tree.end
        mask = torch.zeros(T, end, dtype=torch.bool, device=q.device)
        mask[:, :tree.prefix] = True
        for t, keys in enumerate(tree.keys):
            mask[t, list(keys)] = True
        return F.scaled_dot_product_attention(q[None], K[None, :, :end], V[None, :, :end], attn_mask=mask,
                                              enable_gqa=True)

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

    @property
    def conv_weight(self) -> torch.Tensor:
        return self.conv1d.weight.squeeze(1)  # [conv_dim, kernel]

    def forward(self, x: torch.Tensor, p: Pass) -> torch.Tensor:
        B, T, _ = x.shape
        qkv, z, b, a = project(self, self.FUSED_PROJECTIONS, x)  # qkv: [B, T, conv_dim], before the conv
        z = z.reshape(B, T, self.nv, self.dv)
        g, beta = gdn_gates(a, b, self.A_log, self.dt_bias)
        core = self.mix(qkv, g, beta, p).to(x.dtype)  # [B, T, nv, dv]
        return self.out_proj(self.norm(core, z).reshape(B, T, self.value_dim))

    def mix(self, qkv: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, p: Pass) -> torch.Tensor:
        """Conv and gated delta rule of the pass's positions, over each sequence's states (advanced here) or, without
        caches, over the whole batch at once: [B, T, nv, dv] fp32."""
        w = self.conv_weight
        if p.states is None:
            return self._uncached(qkv, g, beta, w)
        run = self._step if p.mode == "step" else self._prefill
        return torch.stack([self._tree_step(qkv[b], g[b], beta[b], w, p.states[b], p.tree(b)) if p.tree(b) is not None
                            else run(qkv[b], g[b], beta[b], w, p.states[b]) for b in range(qkv.shape[0])])

    def heads(self, mixed: torch.Tensor):
        """Split conv output [T, conv_dim] into normalized fp32 q, k [T, nv, dk] and v [T, nv, dv]."""
        return gdn_heads(mixed, self.nk, self.dk, self.nv, self.dv)

    def _uncached(self, qkv, g, beta, w):
        B, T, _ = qkv.shape
        mixed = F.silu(F.conv1d(qkv.transpose(1, 2).float(), w[:, None].float(), groups=self.conv_dim,
                                padding=self.kernel - 1)[..., :T]).transpose(1, 2).to(qkv.dtype)
        q, k, v = self.heads(mixed.reshape(B * T, -1))
        heads = lambda t: t.reshape(B, T, self.nv, -1).permute(0, 2, 1, 3).reshape(B * self.nv, T, -1)
        gh, bh = (t.permute(0, 2, 1).reshape(B * self.nv, T) for t in (g, beta))
        out, _ = chunk_gated_delta_rule(heads(q), heads(k), heads(v), gh, bh,
                                        q.new_zeros(B * self.nv, self.dk, self.dv))
        return out.reshape(B, self.nv, T, self.dv).transpose(1, 2)

    def _prefill(self, qkv, g, beta, w, state: SequenceState | None):
        past = state.conv[self.layer_idx] if state is not None else qkv.new_zeros(self.conv_dim, self.kernel - 1)
        seq = torch.cat([past, qkv.t()], dim=1)  # [conv_dim, kernel - 1 + T]
        mixed = F.silu(F.conv1d(seq[None].float(), w[:, None].float(), groups=self.conv_dim)[0]).t().to(qkv.dtype)
        q, k, v = self.heads(mixed)
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
            q, k, v = self.heads(mixed[t:t + 1])
            o, rec = recurrent_gated_delta_step(q[0], k[0], v[0], g[t], beta[t], rec)
            states.append(rec)
            outs.append(o)
        self.record_states(state, seq, states)
        return torch.stack(outs)

    def _tree_step(self, qkv, g, beta, w, state: SequenceState, tree: TreeRows):
        """_step for the rows of a draft tree: each row's conv window and recurrent state continue its parent's, so
        a row computes what a one-token decode after its path would (the same ops as _step)."""
        i = self.layer_idx
        cols = torch.cat([state.conv[i], qkv.t()], dim=1)  # [conv_dim, K - 1 + T]: conv state, then each row
        windows = tree.windows(self.kernel)
        mixed = causal_conv_tree(cols, w, windows)
        current, outs, states = state.recurrent[i], [], []
        for t, parent in enumerate(tree.parents):
            q, k, v = self.heads(mixed[t:t + 1])
            o, rec = recurrent_gated_delta_step(q[0], k[0], v[0], g[t], beta[t],
                                                states[parent] if parent >= 0 else current)
            states.append(rec)
            outs.append(o)
        convs = [cols[:, window[1:]] for window in windows]
        state.snapshots[i].extend(zip(convs, states))
        state.conv[i], state.recurrent[i] = convs[-1], states[-1]
        return torch.stack(outs)

    def record_states(self, state: SequenceState, seq: torch.Tensor, states: list) -> None:
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
        gate, up = project(self, self.FUSED_PROJECTIONS, x)
        return self.down_proj(silu_mul(gate, up))


@fusible
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
    STACKS = ("gate_up_proj", "down_proj")
    # {stack name: [E weights]} of stacks held in another format (models/linear.py QuantizedWeight), used in place of
    # the stack's slices; set by whoever converts them (use_quantized)
    quantized: dict[str, list[QuantizedWeight]] | None = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, i, h = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.num_experts = e
        self.gate_up_proj = nn.Parameter(initialised(torch.empty(e, 2 * i, h), lambda w: w.normal_(0, 0.02)))
        self.down_proj = nn.Parameter(initialised(torch.empty(e, h, i), lambda w: w.normal_(0, 0.02)))

    def use_quantized(self, name: str, stacked: QuantizedWeight) -> None:
        """Run the stack `name` from `stacked`, its rows [E * N, K] in the stack's order, one block of rows per
        expert; the stack's own tensor is released."""
        stack = getattr(self, name)
        if stacked.shape[0] % self.num_experts:
            raise ValueError(f"{name}: {stacked.shape[0]} rows do not split into {self.num_experts} experts")
        self.quantized = {**(self.quantized or {}), name: stacked.row_blocks(self.num_experts)}
        setattr(self, name, nn.Parameter(torch.empty(0, dtype=stack.dtype, device=stack.device), requires_grad=False))

    def expert(self, e: int) -> tuple:
        """Expert e's (gate_up, down) weights: tensors, or QuantizedWeights where the stack is held so."""
        q = self.quantized or {}
        return tuple(q[n][e] if n in q else getattr(self, n)[e] for n in self.STACKS)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        # experts in ascending order, each over the rows routed to it: a row's sum order never depends on the others
        for e in torch.unique(idx).tolist():
            rows, slot = torch.where(idx == e)
            gate_up, down = self.expert(e)
            gate, up = linear(x[rows], gate_up).chunk(2, dim=-1)
            y = linear(F.silu(gate) * up, down) * weights[rows, slot, None]
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

    @property
    def mixer(self) -> nn.Module:
        return self.linear_attn if self.layer_type == "linear_attention" else self.self_attn

    def forward(self, x: torch.Tensor, p: Pass) -> torch.Tensor:
        x = x + self.mixer(self.input_layernorm(x), p)
        return x + self.mlp(self.post_attention_layernorm(x))


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
        with row_invariant(mode == "step"):
            return self.norm(run_stack(cfg, self.layers, self.inputs(embeds, hidden), states, mode))

    def inputs(self, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden)], dim=-1))


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

    def forward(self, tokens: torch.Tensor, states: list[SequenceState] | None = None,
                mode: str = "prefill") -> torch.Tensor:
        x = self.model.embed_tokens(tokens)
        with row_invariant(mode == "step"):
            return self.model.norm(run_stack(self.cfg, self.model.layers, x, states, mode))

    def logits(self, hidden: torch.Tensor, step: bool = False) -> torch.Tensor:
        """lm_head; `step=True` for rows of a step forward (decode / verify / draft), so they are row-invariant."""
        with row_invariant(step):
            return self.lm_head(hidden)

    def mtp_greedy_drafts(self, hidden: torch.Tensor, tokens: torch.Tensor, state: SequenceState, k: int,
                          head=None, penalty: tuple | None = None) -> list[int] | torch.Tensor | None:
        """k greedy MTP drafts in one call, where a runner provides such a call (models/interface.py); None here:
        the drafter then drafts step by step through mtp_forward and logits, with the same result."""
        return None

    def mtp_forward(self, hidden: torch.Tensor, next_tokens: torch.Tensor,
                    states: list[SequenceState] | None = None, mode: str = "prefill") -> torch.Tensor:
        """MTP output (after mtp.norm) for pairs (h_i, t_{i+1}); `logits()` of it predicts t_{i+2}."""
        return self.mtp(self.cfg, self.model.embed_tokens(next_tokens), hidden, states, mode)
