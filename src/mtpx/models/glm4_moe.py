"""GLM-4.5 / 4.6 / 4.7 / Air (`glm4_moe`) and their MTP ("nextn") layer; the MoE, router and MTP parts are shared
with DeepSeek-V3 (models/deepseek_v3.py).

Attention only: GQA with optional q/k RMSNorm and q/k/v bias, partial RoPE (rotate-half); the first
`first_k_dense_replace` layers have a dense SwiGLU MLP, the others routed experts plus shared experts, routed by a
sigmoid router with `e_score_correction_bias` (which picks the experts but does not weight them), grouped top-k
(`n_group`, `topk_group`), `norm_topk_prob` and `routed_scaling_factor`. RMSNorms multiply by w (not 1 + w).

The MTP layer is stored as one more decoder layer after the main stack (`model.layers.{L}`, renamed `mtp.layers.0`
at load) with `enorm`, `hnorm`, `eh_proj`, `shared_head.norm`: h' = eh_proj([enorm(embed(t_{i+1})); hnorm(h_i)]),
then the decoder layer with its own KV cache, then shared_head.norm; logits through the (shared) output head.

Modes as in models/qwen3_5.py: "step" computes each position as a one-token step would (attention one query at a time
over the cache, matmuls row-invariant, experts in ascending order), so greedy speculation is bit-exact. Reference
math only: runners leave these modules alone.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mtpx.config import RoutedMoEConfig
from mtpx.models.common import Pass, apply_rotary, initialised, rotary_tables, run_stack
from mtpx.models.linear import Linear, linear, project, row_invariant
from mtpx.models.ops import fusible
from mtpx.models.qwen3_5 import MLP, Experts
from mtpx.state import SequenceState


class RMSNorm(nn.Module):
    """RMSNorm with a plain weight (GLM / DeepSeek / Llama form)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return plain_rms_norm(x, self.weight, self.eps)


@fusible
def plain_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


_YARN_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def yarn_inv_freq(theta: float, dim: int, yarn: dict) -> tuple[torch.Tensor, float]:
    """YaRN's inverse frequencies and cos / sin factor (as transformers' _compute_yarn_parameters)."""
    factor, original = yarn["factor"], yarn["original_max_position_embeddings"]
    beta_fast, beta_slow = yarn.get("beta_fast") or 32, yarn.get("beta_slow") or 1

    def scale(s: float, m: float = 1.0) -> float:
        return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0
    attention = yarn.get("attention_factor")
    if attention is None:
        m, m_all = yarn.get("mscale"), yarn.get("mscale_all_dim")
        attention = scale(factor, m) / scale(factor, m_all) if m and m_all else scale(factor)

    def correction(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    low, high = correction(beta_fast), correction(beta_slow)
    if yarn.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / ((high - low) or 0.001)).clamp(0, 1)
    pos = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolate = 1 - ramp
    return (1.0 / (factor * pos)) * (1 - extrapolate) + (1.0 / pos) * extrapolate, float(attention)


def yarn_softmax_scale(cfg: RoutedMoEConfig) -> float:
    """The attention softmax scale's YaRN factor (mscale_all_dim), 1 without YaRN."""
    yarn = cfg.rope_yarn or {}
    m_all = yarn.get("mscale_all_dim")
    if not m_all or yarn["factor"] <= 1:
        return 1.0
    return (0.1 * m_all * math.log(yarn["factor"]) + 1.0) ** 2


def routed_rotary_tables(cfg: RoutedMoEConfig, starts: list[int], length: int, dtype: torch.dtype, device):
    """cos, sin [B, length, rotary_dim] of plain RoPE (models/common.rotary_tables) or, with cfg.rope_yarn, YaRN's."""
    if not cfg.rope_yarn:
        return rotary_tables(cfg, starts, length, dtype, device)
    end = max(starts) + length
    key = (tuple(sorted(cfg.rope_yarn.items())), cfg.rope_theta, cfg.rotary_dim, dtype, str(device))
    cos, sin = _YARN_TABLES.get(key, (None, None))
    if cos is None or cos.shape[0] < end:
        size = max(end, 2 * (cos.shape[0] if cos is not None else 0), 4096)
        inv_freq, attention = yarn_inv_freq(cfg.rope_theta, cfg.rotary_dim, cfg.rope_yarn)
        freqs = torch.arange(size, device=device)[:, None].float() * inv_freq.to(device)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = _YARN_TABLES[key] = (emb.cos() * attention).to(dtype), (emb.sin() * attention).to(dtype)
    pos = torch.tensor(starts, device=device)[:, None] + torch.arange(length, device=device)[None, :]
    return cos[pos], sin[pos]


def add_bias(layer: Linear) -> None:
    """Give a (bias-free) Linear a `bias` parameter, added by its owner after the (possibly fused) projection."""
    layer.bias = nn.Parameter(torch.zeros(layer.out_features))


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Pass, idx: int,
                     scale: float | None = None) -> torch.Tensor:
    """q [B, heads, T, d], k / v [B, kv heads, T, d] over each sequence's K / V cache `idx` (written here), or causal
    without caches. Step mode: one query at a time over exactly the keys a one-token decode would see."""
    if p.states is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=scale)
    outs = []
    for b, state in enumerate(p.states):
        T, start = q.shape[2], state.length
        K, V = state.kv[idx]
        K[:, start:start + T] = k[b]
        V[:, start:start + T] = v[b]
        if p.mode == "step":
            outs.append(torch.cat([F.scaled_dot_product_attention(
                q[b, None, :, t:t + 1].contiguous(), K[None, :, :start + t + 1], V[None, :, :start + t + 1],
                enable_gqa=True, scale=scale) for t in range(T)], dim=2))
            continue
        mask = torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(start)
        outs.append(F.scaled_dot_product_attention(q[b, None], K[None, :, :start + T], V[None, :, :start + T],
                                                   attn_mask=mask, enable_gqa=True, scale=scale))
    return torch.cat(outs)


class Attention(nn.Module):
    """GQA attention: optional q/k/v bias and per-head q/k RMSNorm, partial RoPE."""
    FUSED_PROJECTIONS = ("q_proj", "k_proj", "v_proj")

    def __init__(self, cfg: RoutedMoEConfig, cache_idx: int):
        super().__init__()
        self.cache_idx = cache_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = Linear(h, self.n_heads * self.head_dim)
        self.k_proj = Linear(h, self.n_kv * self.head_dim)
        self.v_proj = Linear(h, self.n_kv * self.head_dim)
        self.o_proj = Linear(self.n_heads * self.head_dim, h)
        self.bias = cfg.attention_bias
        if self.bias:
            for name in self.FUSED_PROJECTIONS:
                add_bias(getattr(self, name))
        self.qk_norm = cfg.use_qk_norm
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def cache_shapes(self, max_len: int) -> list[tuple[int, ...]]:
        return [(self.n_kv, max_len, self.head_dim)] * 2

    def forward(self, x: torch.Tensor, p: Pass) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = project(self, self.FUSED_PROJECTIONS, x)
        if self.bias:
            q, k, v = q + self.q_proj.bias, k + self.k_proj.bias, v + self.v_proj.bias
        q = q.reshape(B, T, self.n_heads, self.head_dim)
        k = k.reshape(B, T, self.n_kv, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q.transpose(1, 2), p.cos, p.sin), apply_rotary(k.transpose(1, 2), p.cos, p.sin)
        v = v.reshape(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        out = cached_attention(q, k, v, p, self.cache_idx)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class Router(nn.Module):
    """Sigmoid scores; experts chosen by score + e_score_correction_bias within the top `topk_group` groups (a
    group's score: the sum of its two best), weighted by their plain scores (normalised where norm_topk_prob) times
    routed_scaling_factor. fp32 throughout, like transformers."""

    def __init__(self, cfg: RoutedMoEConfig):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.norm, self.scale = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        if self.n_group > 1:
            n, e = choice.shape
            groups = choice.view(n, self.n_group, e // self.n_group).topk(2, dim=-1)[0].sum(-1)
            keep = torch.zeros_like(groups).scatter_(1, groups.topk(self.topk_group, dim=-1)[1], 1.0).bool()
            choice = choice.masked_fill(~keep.repeat_interleave(e // self.n_group, dim=1), float("-inf"))
        idx = choice.topk(self.top_k, dim=-1)[1]
        weights = scores.gather(1, idx)
        if self.norm:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scale, idx


class MoE(nn.Module):
    """Routed experts (stacked weights, as models/qwen3_5.Experts) plus ungated shared experts."""

    def __init__(self, cfg: RoutedMoEConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size) \
            if cfg.n_shared_experts else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, idx = self.gate(x)
        out = self.experts(x, weights, idx)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.reshape(shape)


class DecoderLayer(nn.Module):
    """`layer_idx`: the position in the checkpoint's stack (dense below first_k_dense_replace); `cache_idx`: which
    cache of the sequence state it uses."""

    def __init__(self, cfg: RoutedMoEConfig, layer_idx: int, cache_idx: int, attention=Attention):
        super().__init__()
        self.self_attn = attention(cfg, cache_idx)
        moe = layer_idx >= cfg.first_k_dense_replace
        self.mlp = MoE(cfg) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, p: Pass) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), p)
        return x + self.mlp(self.post_attention_layernorm(x))


class NextNLayer(DecoderLayer):
    """An MTP module as GLM-4.5 / DeepSeek-V3 store it: a decoder layer plus enorm, hnorm, eh_proj, shared_head.norm
    (and, where the checkpoint's copy differs from the main model's, an embedding of its own)."""

    def __init__(self, cfg: RoutedMoEConfig, layer_idx: int, attention=Attention):
        super().__init__(cfg, layer_idx, 0, attention)
        h = cfg.hidden_size
        self.enorm = RMSNorm(h, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(h, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * h, h)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(h, cfg.rms_norm_eps)
        if cfg.mtp_own_embedding:
            embed = initialised(torch.empty(cfg.vocab_size, h), nn.init.normal_)
            self.embed_tokens = nn.Embedding(cfg.vocab_size, h, _weight=embed)


class MTP(nn.Module):
    """The first nextn layer (the one every MTP drafter of these families uses): its KV cache is cache 0 of the MTP
    state."""

    def __init__(self, cfg: RoutedMoEConfig, attention=Attention):
        super().__init__()
        self.layers = nn.ModuleList([NextNLayer(cfg, cfg.num_hidden_layers, attention)])

    def forward(self, cfg: RoutedMoEConfig, embeds: torch.Tensor, hidden: torch.Tensor,
                states: list[SequenceState] | None, mode: str) -> torch.Tensor:
        layer = self.layers[0]
        with row_invariant(mode == "step"):
            x = layer.eh_proj(torch.cat([layer.enorm(embeds), layer.hnorm(hidden)], dim=-1))
            return layer.shared_head.norm(run_stack(cfg, [layer], x, states, mode, routed_rotary_tables))


class Glm4MoeModel(nn.Module):
    """Main model + optional MTP layer (models/interface.py's CausalLM). DeepSeek-V3 is this with MLA attention."""
    ATTENTION = Attention

    def __init__(self, cfg: RoutedMoEConfig, mtp_layers: int = 0):
        super().__init__()
        self.cfg = cfg
        self.model = nn.Module()
        embed = initialised(torch.empty(cfg.vocab_size, cfg.hidden_size), nn.init.normal_)
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=embed)
        self.model.layers = nn.ModuleList(DecoderLayer(cfg, i, i, self.ATTENTION)
                                          for i in range(cfg.num_hidden_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.mtp = MTP(cfg, self.ATTENTION) if mtp_layers > 0 else None

    def _state(self, layers, max_len: int, device) -> SequenceState:
        p = self.lm_head.weight
        shapes = {layer.self_attn.cache_idx: layer.self_attn.cache_shapes(max_len) for layer in layers}
        return SequenceState.with_caches(shapes, max_len, p.dtype, device or p.device)

    def new_state(self, max_len: int, device=None) -> SequenceState:
        return self._state(self.model.layers, max_len, device)

    def new_mtp_state(self, max_len: int, device=None) -> SequenceState:
        return self._state(self.mtp.layers, max_len, device)

    def forward(self, tokens: torch.Tensor, states: list[SequenceState] | None = None,
                mode: str = "prefill") -> torch.Tensor:
        x = self.model.embed_tokens(tokens)
        with row_invariant(mode == "step"):
            return self.model.norm(run_stack(self.cfg, self.model.layers, x, states, mode, routed_rotary_tables))

    def logits(self, hidden: torch.Tensor, step: bool = False) -> torch.Tensor:
        with row_invariant(step):
            return self.lm_head(hidden)

    def mtp_greedy_drafts(self, hidden: torch.Tensor, tokens: torch.Tensor, state: SequenceState, k: int,
                          head=None, penalty: tuple | None = None) -> list[int] | None:
        return None  # no one-call draft chain here: the drafter loops over mtp_forward and logits

    def mtp_forward(self, hidden: torch.Tensor, next_tokens: torch.Tensor,
                    states: list[SequenceState] | None = None, mode: str = "prefill") -> torch.Tensor:
        layer = self.mtp.layers[0]
        embed = layer.embed_tokens if hasattr(layer, "embed_tokens") else self.model.embed_tokens
        return self.mtp(self.cfg, embed(next_tokens), hidden, states, mode)
