"""Internal tensor names -> the names a family's Hugging Face checkpoint stores them under: the inverse of what
`load_checkpoint` does, for writers of checkpoint directories (`mtpx train-mtp`, `mtpx bench gen-checkpoint`).

- GLM-4.5 / DeepSeek-V3 (`cfg.MTP_IN_LAYERS`): MTP layer j is the decoder layer `model.layers.{L + j}`, L the main
  layer count (internal `mtp.layers.{j}`); Qwen3.5 / Qwen3-Next keep `mtp.*`.
- Qwen3-Next's Gated DeltaNet projections are fused per key head (`in_proj_qkvz`, `in_proj_ba`).
- Routed experts are stacked internally (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]); with
  `per_expert`, written one module per expert (`experts.{e}.{gate,up,down}_proj.weight`), as the released GLM,
  DeepSeek and Qwen3-Next checkpoints store them.
- Nested Qwen3.5 checkpoints keep their text weights under `cfg.weight_prefix` (`model.language_model.`).
"""
from __future__ import annotations

import re

import torch

from mtpx.config import ModelConfig
from mtpx.errors import ModelLoadError
from mtpx.models.qwen3_next import join_projections

_MTP_LAYER = re.compile(r"^mtp\.layers\.(\d+)\.(.*)$")
_PER_EXPERT = re.compile(r"\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")
_GDN = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")


def stores_per_expert(names) -> bool:
    """Whether a checkpoint's tensor names hold routed experts one module per expert."""
    return any(_PER_EXPERT.search(n) for n in names)


def is_mtp_disk_name(cfg: ModelConfig, name: str) -> bool:
    """Whether a tensor name of a checkpoint directory belongs to an MTP layer of its family."""
    if cfg.MTP_IN_LAYERS:
        m = re.match(r"^model\.layers\.(\d+)\.", name)
        return bool(m) and int(m[1]) >= cfg.num_hidden_layers
    return name.startswith("mtp.")


def disk_name(cfg: ModelConfig, name: str) -> str:
    """One internal name as the family's checkpoint directory spells it (no tensor splitting or fusing)."""
    m = _MTP_LAYER.match(name)
    if cfg.MTP_IN_LAYERS and m:
        return f"model.layers.{cfg.num_hidden_layers + int(m[1])}.{m[2]}"
    if cfg.weight_prefix != "model." and name.startswith("model."):
        return cfg.weight_prefix + name[len("model."):]
    return name


def disk_tensors(cfg: ModelConfig, tensors: dict[str, torch.Tensor], per_expert: bool) -> dict[str, torch.Tensor]:
    """Internal name -> tensor, rewritten into the family's checkpoint names and layouts."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}  # Qwen3-Next: a layer's four projections become two
    for name, t in tensors.items():
        head, _, leaf = name.rpartition(".linear_attn.")
        if cfg.model_type == "qwen3_next" and head and leaf.removesuffix(".weight") in _GDN:
            fused.setdefault(head + ".linear_attn.", {})[leaf.removesuffix(".weight")] = t
            continue
        if per_expert and name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
            base = disk_name(cfg, name.rsplit(".", 1)[0])
            if name.endswith("gate_up_proj"):
                gate, up = t.chunk(2, dim=1)
                for e in range(t.shape[0]):
                    out[f"{base}.{e}.gate_proj.weight"] = gate[e].contiguous()
                    out[f"{base}.{e}.up_proj.weight"] = up[e].contiguous()
            else:
                for e in range(t.shape[0]):
                    out[f"{base}.{e}.down_proj.weight"] = t[e].contiguous()
            continue
        out[disk_name(cfg, name)] = t
    for prefix, parts in fused.items():
        missing = [p for p in _GDN if p not in parts]
        if missing:
            raise ModelLoadError(f"{prefix}{missing[0]}.weight is missing: Qwen3-Next stores the four Gated DeltaNet "
                                 "input projections fused, so all four are needed")
        qkvz, ba = join_projections(*(parts[p] for p in _GDN), cfg)
        out[disk_name(cfg, prefix + "in_proj_qkvz.weight")] = qkvz
        out[disk_name(cfg, prefix + "in_proj_ba.weight")] = ba
    return out
