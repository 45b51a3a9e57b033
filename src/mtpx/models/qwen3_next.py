"""Qwen3-Next (`qwen3_next`, Qwen3-Next-80B-A3B): the architecture Qwen3.5 MoE grew from, run by models/qwen3_5.py.

The math is Qwen3.5 MoE's (Gated DeltaNet and gated attention layers, (1 + w) norms, softmax-routed experts plus a
sigmoid-gated shared expert, the `mtp.*` MTP layer); only the Gated DeltaNet input projections are laid out
differently. Qwen3-Next fuses them per key head:
- `in_proj_qkvz` [nk * (2 dk + 2 r dv), H]: for each key head, its q (dk rows), k (dk), its r = nv / nk value heads'
  v (r dv) and z (r dv);
- `in_proj_ba` [nk * 2 r, H]: for each key head, its value heads' b (r) then a (r).
`split_projections` rewrites them into Qwen3.5's `in_proj_qkv` (all q, all k, all v), `in_proj_z`, `in_proj_b`,
`in_proj_a`, value heads in the same (grouped by key head) order: a permutation of rows, so every runner of the
Qwen3.5 family (fused CPU kernels, CUDA graphs) runs Qwen3-Next unchanged.
"""
from __future__ import annotations

import re
from typing import Callable

import torch

from mtpx.config import ModelConfig
from mtpx.errors import ModelLoadError

_QKVZ = re.compile(r"^(.*\.linear_attn\.)in_proj_qkvz\.weight$")


def split_qkvz(w: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """in_proj_qkvz [nk * (2 dk + 2 r dv), H] -> in_proj_qkv [2 nk dk + nv dv, H], in_proj_z [nv dv, H]."""
    nk, dk, nv, dv = (cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.linear_num_value_heads,
                      cfg.linear_value_head_dim)
    r = nv // nk
    q, k, v, z = w.reshape(nk, 2 * dk + 2 * r * dv, -1).split([dk, dk, r * dv, r * dv], dim=1)
    h = w.shape[-1]
    return torch.cat([q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)]), z.reshape(-1, h).contiguous()


def split_ba(w: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """in_proj_ba [nk * 2 r, H] -> in_proj_b [nv, H], in_proj_a [nv, H]."""
    nk, nv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    b, a = w.reshape(nk, 2 * (nv // nk), -1).chunk(2, dim=1)
    return b.reshape(nv, -1).contiguous(), a.reshape(nv, -1).contiguous()


def split_projections(cfg: ModelConfig, tensors: dict[str, Callable[[], torch.Tensor]],
                      shapes: dict[str, tuple[int, ...]]) -> None:
    """Rewrite every Gated DeltaNet layer's in_proj_qkvz / in_proj_ba (lazy loaders) into Qwen3.5's projections."""
    nk, dk, nv, dv, h = (cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.linear_num_value_heads,
                         cfg.linear_value_head_dim, cfg.hidden_size)
    for name in [n for n in tensors if _QKVZ.match(n)]:
        prefix = _QKVZ.match(name)[1]
        ba = prefix + "in_proj_ba.weight"
        want = {name: (2 * nk * dk + 2 * nv * dv, h), ba: (2 * nv, h)}
        for n, shape in want.items():
            if n not in shapes:
                raise ModelLoadError(f"checkpoint is missing tensor {n} {list(shape)}")
            if tuple(shapes[n]) != shape:
                raise ModelLoadError(f"tensor {n} has shape {list(shapes[n])}, expected {list(shape)}")
        qkvz, ba_loader = tensors.pop(name), tensors.pop(ba)
        del shapes[name], shapes[ba]
        tensors[prefix + "in_proj_qkv.weight"] = lambda f=qkvz: split_qkvz(f(), cfg)[0]
        tensors[prefix + "in_proj_z.weight"] = lambda f=qkvz: split_qkvz(f(), cfg)[1]
        tensors[prefix + "in_proj_b.weight"] = lambda f=ba_loader: split_ba(f(), cfg)[0]
        tensors[prefix + "in_proj_a.weight"] = lambda f=ba_loader: split_ba(f(), cfg)[1]
        shapes[prefix + "in_proj_qkv.weight"] = (2 * nk * dk + nv * dv, h)
        shapes[prefix + "in_proj_z.weight"] = (nv * dv, h)
        shapes[prefix + "in_proj_b.weight"] = shapes[prefix + "in_proj_a.weight"] = (nv, h)


def join_projections(qkv: torch.Tensor, z: torch.Tensor, b: torch.Tensor, a: torch.Tensor,
                     cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of split_qkvz / split_ba: Qwen3.5's projections -> in_proj_qkvz, in_proj_ba."""
    nk, dk, nv, dv = (cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.linear_num_value_heads,
                      cfg.linear_value_head_dim)
    r, h = nv // nk, qkv.shape[-1]
    q, k, v = qkv.split([nk * dk, nk * dk, nv * dv])
    parts = [t.reshape(nk, -1, h) for t in (q, k, v, z)]
    qkvz = torch.cat(parts, dim=1).reshape(-1, h)
    ba = torch.cat([b.reshape(nk, r, h), a.reshape(nk, r, h)], dim=1).reshape(-1, h)
    return qkvz, ba
