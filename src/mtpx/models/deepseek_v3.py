"""DeepSeek-V3 / V3.1 / R1 (`deepseek_v3`): Multi-head Latent Attention over a compressed KV cache, the MoE, router
and MTP ("nextn") layer of models/glm4_moe.py.

MLA: q = q_b_proj(q_a_layernorm(q_a_proj(x))) (or q_proj(x) without q_lora_rank), split per head into a no-RoPE part
and a RoPE part; kv_a_proj_with_mqa(x) gives the latent c (normed by kv_a_layernorm, kv_lora_rank wide) and one RoPE
key shared by all heads; kv_b_proj expands c into each head's no-RoPE key and value. The cache holds only
[c ; RoPE key] per position (kv_lora_rank + qk_rope_head_dim values), not full K / V.

Two forms of the same attention:
- prefill (and passes without caches): the expanded form, keys and values from kv_b_proj over the cached latents;
- step: the absorbed form, as a decode step computes it: each head's no-RoPE query is multiplied into the latent space
  (q_nope · W_UK), attention runs as multi-query attention over the cache itself ([c ; k_rope] keys, c values), and
  W_UV maps the result back. Each position is computed with one-query shapes, so its bits never depend on how many
  positions the pass holds.
RoPE is interleaved (rope_interleave, DeepSeek's layout) or rotate-half, plain or YaRN-scaled. Reference math only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtpx.config import RoutedMoEConfig
from mtpx.models.common import Pass, apply_rotary
from mtpx.models.glm4_moe import Glm4MoeModel, RMSNorm, add_bias, yarn_softmax_scale
from mtpx.models.linear import Linear, linear, project
from mtpx.models.ops import fusible


@fusible
def rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, rd] in interleaved pairs (x0, x1), (x2, x3), ...; cos / sin [B, T, rd] (cat(freqs, freqs)).
    Returns the rotated pairs de-interleaved (evens then odds), as transformers does: the same for queries and keys,
    so their products are those of the interleaved rotation."""
    half = cos.shape[-1] // 2
    c, s = cos[:, None, :, :half], sin[:, None, :, :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


class LatentProjection(nn.Module):
    """kv_b_proj: latent -> each head's no-RoPE key and value. Not a Linear: the absorbed step form reads its weight
    per head, so runners must leave it in its plain layout."""

    def __init__(self, rank: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class MLAttention(nn.Module):
    """Multi-head Latent Attention with the compressed cache (one tensor per layer: [max_len, kv_lora_rank + rope])."""

    def __init__(self, cfg: RoutedMoEConfig, cache_idx: int):
        super().__init__()
        self.cache_idx = cache_idx
        self.n_heads, self.rank = cfg.num_attention_heads, cfg.kv_lora_rank
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.scale = (self.nope + self.rope) ** -0.5 * yarn_softmax_scale(cfg)
        self.interleave = cfg.rope_interleave
        h, q_dim = cfg.hidden_size, self.n_heads * (self.nope + self.rope)
        if cfg.q_lora_rank:
            self.q_a_proj = Linear(h, cfg.q_lora_rank)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = Linear(cfg.q_lora_rank, q_dim)
            self.FUSED_PROJECTIONS = ("q_a_proj", "kv_a_proj_with_mqa")
        else:
            self.q_proj = Linear(h, q_dim)
            self.FUSED_PROJECTIONS = ("q_proj", "kv_a_proj_with_mqa")
        self.kv_a_proj_with_mqa = Linear(h, self.rank + self.rope)
        self.kv_a_layernorm = RMSNorm(self.rank, cfg.rms_norm_eps)
        self.kv_b_proj = LatentProjection(self.rank, self.n_heads * (self.nope + self.v_dim))
        self.o_proj = Linear(self.n_heads * self.v_dim, h)
        self.bias = cfg.attention_bias
        if self.bias:
            for layer in (self.FUSED_PROJECTIONS[0], "kv_a_proj_with_mqa", "o_proj"):
                add_bias(getattr(self, layer))

    def cache_shapes(self, max_len: int) -> list[tuple[int, ...]]:
        return [(max_len, self.rank + self.rope)]

    def rotate(self, x: torch.Tensor, p: Pass) -> torch.Tensor:
        return (rotary_interleaved if self.interleave else apply_rotary)(x, p.cos, p.sin)

    def forward(self, x: torch.Tensor, p: Pass) -> torch.Tensor:
        B, T, _ = x.shape
        q, kv = project(self, self.FUSED_PROJECTIONS, x)
        if self.bias:
            q, kv = q + getattr(self, self.FUSED_PROJECTIONS[0]).bias, kv + self.kv_a_proj_with_mqa.bias
        if hasattr(self, "q_b_proj"):
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.reshape(B, T, self.n_heads, self.nope + self.rope).transpose(1, 2)
        q_nope, q_rot = q.split([self.nope, self.rope], dim=-1)
        q_rot = self.rotate(q_rot, p)
        latent, k_rot = kv.split([self.rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_rot = self.rotate(k_rot[:, None], p)[:, 0]
        compressed = torch.cat([latent, k_rot], dim=-1)  # [B, T, rank + rope]: what the cache holds
        if p.states is None:
            out = self._expanded(q_nope, q_rot, compressed, 0)
        else:
            outs = []
            for b, state in enumerate(p.states):
                cache, start = state.kv[self.cache_idx][0], state.length
                cache[start:start + T] = compressed[b]
                run = self._absorbed if p.mode == "step" else self._expanded
                outs.append(run(q_nope[b:b + 1], q_rot[b:b + 1], cache[None, :start + T], start))
            out = torch.cat(outs)
        out = self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
        return out + self.o_proj.bias if self.bias else out

    def _expanded(self, q_nope, q_rot, compressed, start: int) -> torch.Tensor:
        """Keys and values expanded from the latents; queries [B, heads, T, *] at positions start.., over
        compressed [B, start + T, rank + rope]: [B, heads, T, v_dim]."""
        B, L, T = compressed.shape[0], compressed.shape[1], q_nope.shape[2]
        latent, k_rot = compressed.split([self.rank, self.rope], dim=-1)
        kv = self.kv_b_proj(latent).reshape(B, L, self.n_heads, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rot[:, None].expand(B, self.n_heads, L, self.rope)], dim=-1)
        q = torch.cat([q_nope, q_rot], dim=-1)
        mask = torch.ones(T, L, dtype=torch.bool, device=q.device).tril(start)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)

    def _absorbed(self, q_nope, q_rot, compressed, start: int) -> torch.Tensor:
        """One query at a time in the latent space (multi-query attention over the compressed cache itself), with
        exactly the shapes of a one-token decode step: [1, heads, T, v_dim]."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.rank)
        w_uk, w_uv = w[:, :self.nope], w[:, self.nope:]  # [heads, nope, rank], [heads, v_dim, rank]
        outs = []
        for t in range(q_nope.shape[2]):
            q_latent = torch.bmm(q_nope[0, :, t:t + 1], w_uk)  # [heads, 1, rank]
            q = torch.cat([q_latent, q_rot[0, :, t:t + 1]], dim=-1)[None]
            keys = compressed[:, None, :start + t + 1]  # [1, 1, L, rank + rope]
            o = F.scaled_dot_product_attention(q, keys, keys[..., :self.rank], scale=self.scale, enable_gqa=True)
            outs.append(torch.bmm(o[0], w_uv.transpose(1, 2)))  # [heads, 1, v_dim]
        return torch.cat(outs, dim=1)[None]


class DeepseekV3Model(Glm4MoeModel):
    """DeepSeek-V3: the GLM-4.5-style stack, MoE and MTP layer with MLA attention."""
    ATTENTION = MLAttention
