"""`mtpx bench cache-size`: the bytes each token adds to a sequence's caches, from a model's configuration alone (no
weights are read or made): what mtpx allocates against the full K/V of the same attention.

For DeepSeek-V3's Multi-head Latent Attention mtpx caches, per layer and token, the compressed latent and the shared
RoPE key (kv_lora_rank + qk_rope_head_dim values); full K/V would hold every head's key (qk_nope + qk_rope) and value
(v_head_dim). For GQA layers (GLM-4.5, Qwen's gated attention) the cache is the full K/V. Gated DeltaNet layers keep a
fixed state per sequence instead, reported apart. The sizes are those of the caches the model itself allocates
(`new_state` on the meta device), so they follow the code, not a second formula.

    mtpx bench cache-size --shape deepseek-v3 --shape deepseek-v3-small --out cache.json
    mtpx bench cache-size --model path/to/checkpoint
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from mtpx.config import ModelConfig, RoutedMoEConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def full_kv_values_per_token(cfg: ModelConfig) -> int:
    """Key and value elements per token of every attention layer of the main stack, keys and values expanded."""
    n_attention = sum(t == "full_attention" for t in cfg.layer_types) or cfg.num_hidden_layers
    if isinstance(cfg, RoutedMoEConfig) and cfg.is_mla:
        per_layer = cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    else:
        per_layer = 2 * cfg.num_key_value_heads * cfg.head_dim
    return n_attention * per_layer


def cache_sizes(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Per-token cache bytes mtpx allocates (main stack, MTP layer), full K/V bytes, and the fixed per-sequence state."""
    from mtpx.models.registry import family
    with torch.device("meta"):
        model = family(cfg)(cfg, 1).to(dtype)

    def grows(new_state) -> tuple[int, int]:
        one, two = new_state(1, device="meta").nbytes(), new_state(2, device="meta").nbytes()
        return two - one, one - (two - one)
    per_token, fixed = grows(model.new_state)
    mtp_per_token, _ = grows(model.new_mtp_state)
    full = full_kv_values_per_token(cfg) * torch.empty((), dtype=dtype).element_size()
    return {"model_type": cfg.model_type, "dtype": str(dtype).removeprefix("torch."),
            "attention": "MLA" if isinstance(cfg, RoutedMoEConfig) and cfg.is_mla else "GQA",
            "cache_bytes_per_token": per_token, "full_kv_bytes_per_token": full,
            "cache_over_full_kv": per_token / full, "mtp_cache_bytes_per_token": mtp_per_token,
            "fixed_state_bytes": fixed}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", action="append", default=[], help="a `mtpx bench gen-checkpoint` shape (repeatable)")
    p.add_argument("--model", action="append", default=[], help="a checkpoint directory or .gguf (repeatable)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="cache dtype (default: bf16)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here (default: print it)")


def main(args: argparse.Namespace) -> int:
    from mtpx.bench.gen_checkpoint import shape_config
    from mtpx.errors import RequestError
    if not args.shape and not args.model:
        raise RequestError("give at least one --shape or --model")
    configs = {s: shape_config(s) for s in args.shape}
    for m in args.model:
        from mtpx.llm import resolve_model_path
        from mtpx.loading import load_checkpoint
        configs[m] = load_checkpoint(resolve_model_path(m)).config
    command = "mtpx bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["bench"] \
        else " ".join(shlex.quote(a) for a in sys.argv)
    report = {"meta": {"command": command},
              "shapes": {name: cache_sizes(cfg, DTYPES[args.dtype]) for name, cfg in configs.items()}}
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    for name, r in report["shapes"].items():
        print(f"{name}: {r['attention']}, {r['cache_bytes_per_token']} B/token cached vs {r['full_kv_bytes_per_token']} "
              f"B/token full K/V ({r['cache_over_full_kv']:.3f}); MTP layer {r['mtp_cache_bytes_per_token']} B/token; "
              f"fixed state {r['fixed_state_bytes']} B", file=sys.stderr if args.out is None else sys.stdout)
    if args.out is None:
        print(text)
    return 0
