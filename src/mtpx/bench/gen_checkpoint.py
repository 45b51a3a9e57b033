"""`mtpx bench gen-checkpoint`: random-weight checkpoints of real model shapes, to measure cost scaling where
decoding is bandwidth-bound. Weights are N(0, 0.02) in bf16 (norms at their initial value, Gated DeltaNet decay
parameters as transformers initialises them), with an MTP layer in the family's own on-disk layout and a byte-level
BPE tokenizer trained on the interpreter's standard library (vocab padded to the config's vocab_size), so mtpx,
transformers and llama.cpp (after `mtpx convert --to gguf`) all run them. The MTP layer is untrained: benchmark
speculation on these with `--spec-synth-rates`.

Shapes (the `-small` ones scaled to hidden 1024 and 12 layers, to run at several tok/s on a 2-core CPU in ~2 GB):
- `qwen3.5-0.8b`: the Qwen3.5-0.8B text body (hidden 1024, 24 layers in 3 linear : 1 full attention, FFN 3584, 8 query
  / 2 KV heads of 256, Gated DeltaNet 16 key / 16 value heads of 128, conv 4, partial rotary 0.25, rope θ 1e7) with a
  32k vocabulary and an untied lm_head: 584M parameters with its MTP layer.
- `qwen3.5-moe-small`: Qwen3.5-35B-A3B's layout (routed experts, 8 per token, plus a shared expert, on every layer,
  MTP layer MoE too) scaled down to the 0.8B body: hidden 1024, 24 layers, 64 experts of FFN 256 (35B-A3B: 256 of
  512 at hidden 2048), shared expert FFN 256.
- `glm4.5-air-small`: GLM-4.5-Air (hidden 4096, 46 layers, 96 query / 8 KV heads of 128, partial rotary 0.5, q/k/v
  bias, first layer dense with FFN 10944, then 128 experts of FFN 1408, 8 per token, + 1 shared) at a quarter of its
  width: 24 / 2 heads of 128, dense FFN 2736, 64 experts of FFN 352, 8 per token + 1 shared; 12 layers.
- `deepseek-v3-small`: DeepSeek-V3 (hidden 7168, 61 layers, MLA with 128 heads, q / kv LoRA ranks 1536 / 512, head
  dims 128 + 64 RoPE / 128 value, 3 dense layers then 256 experts of FFN 2048 in 8 groups (4 used), 8 per token + 1
  shared, YaRN ×40) with 16 heads of the same head dims, ranks 384 / 256, 1 dense layer (FFN 2560) then 64 experts
  of FFN 256 in 8 groups (4 used), 8 per token + 1 shared, the same YaRN; 12 layers.
- `qwen3-next-small`: Qwen3-Next-80B-A3B (hidden 2048, 48 layers 3 Gated DeltaNet : 1 gated attention, 16 query /
  2 KV heads of 256, Gated DeltaNet 16 key / 32 value heads of 128, 512 experts of FFN 512, 10 per token + a shared
  expert of 512) at half its width: 8 / 2 heads of 256, Gated DeltaNet 8 / 16 heads of 128, 64 experts of FFN 256, 10
  per token + a shared expert of 256; 12 layers.
- `qwen3.6-27b`, `glm4.5-air`, `deepseek-v3`, `qwen3-next-80b`: the real configurations (for `mtpx plan --shape`,
  cache sizes, and machines with the memory to generate them).
- `tiny`: a few-MB model for tests.
"""
from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

from mtpx.config import ROUTED_TYPES, ModelConfig, RoutedMoEConfig
from mtpx.errors import MtpxError

BODY_08B = dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=8,
                num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=16,
                linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
                partial_rotary_factor=0.25, rope_theta=1e7, rms_norm_eps=1e-6, max_position_embeddings=32768,
                layer_types=["linear_attention"] * 3 + ["full_attention"])
# 32k vocabulary, untied head (as the 0.8B body); real vocabularies in the full-size shapes
SMALL = dict(vocab_size=32000, tie_word_embeddings=False, hidden_size=1024, num_hidden_layers=12)
GLM_AIR = dict(model_type="glm4_moe", num_attention_heads=96, num_key_value_heads=8, head_dim=128,
               partial_rotary_factor=0.5, attention_bias=True, use_qk_norm=False, first_k_dense_replace=1,
               num_experts_per_tok=8, n_shared_experts=1, n_group=1, topk_group=1, routed_scaling_factor=1.0,
               norm_topk_prob=True, rope_theta=1e6, rms_norm_eps=1e-5, max_position_embeddings=131072)
DEEPSEEK_V3 = dict(model_type="deepseek_v3", qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                   head_dim=192, num_experts_per_tok=8, n_shared_experts=1, n_group=8, topk_group=4,
                   routed_scaling_factor=2.5, norm_topk_prob=True, rope_interleave=True, partial_rotary_factor=1.0,
                   rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=163840,
                   rope_yarn={"factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
                              "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
QWEN3_NEXT = dict(model_type="qwen3_next", num_key_value_heads=2, head_dim=256, linear_key_head_dim=128,
                  linear_value_head_dim=128, linear_conv_kernel_dim=4, partial_rotary_factor=0.25, rope_theta=1e7,
                  rms_norm_eps=1e-6, max_position_embeddings=262144,
                  layer_types=["linear_attention"] * 3 + ["full_attention"])
ROUTED_AND_NEXT = {
    "glm4.5-air-small": dict(GLM_AIR, **SMALL, num_attention_heads=24, num_key_value_heads=2,
                             intermediate_size=2736, num_experts=64, moe_intermediate_size=352),
    "glm4.5-air": dict(GLM_AIR, vocab_size=151552, tie_word_embeddings=False, hidden_size=4096,
                       num_hidden_layers=46, intermediate_size=10944, num_experts=128, moe_intermediate_size=1408),
    "deepseek-v3-small": dict(DEEPSEEK_V3, **SMALL, num_attention_heads=16, num_key_value_heads=16,
                              q_lora_rank=384, kv_lora_rank=256, first_k_dense_replace=1, intermediate_size=2560,
                              num_experts=64, moe_intermediate_size=256),
    "deepseek-v3": dict(DEEPSEEK_V3, vocab_size=129280, tie_word_embeddings=False, hidden_size=7168,
                        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536,
                        kv_lora_rank=512, first_k_dense_replace=3, intermediate_size=18432, num_experts=256,
                        moe_intermediate_size=2048),
    "qwen3-next-small": dict(QWEN3_NEXT, **SMALL, num_attention_heads=8, linear_num_key_heads=8,
                             linear_num_value_heads=16, intermediate_size=2560, num_experts=64,
                             num_experts_per_tok=10, moe_intermediate_size=256, shared_expert_intermediate_size=256),
    "qwen3-next-80b": dict(QWEN3_NEXT, vocab_size=151936, tie_word_embeddings=False, hidden_size=2048,
                           num_hidden_layers=48, num_attention_heads=16, linear_num_key_heads=16,
                           linear_num_value_heads=32, intermediate_size=5120, num_experts=512,
                           num_experts_per_tok=10, moe_intermediate_size=512, shared_expert_intermediate_size=512),
}
SHAPES = {
    "qwen3.5-0.8b": dict(model_type="qwen3_5_text", vocab_size=32000, tie_word_embeddings=False, **BODY_08B),
    "qwen3.5-moe-small": dict(model_type="qwen3_5_moe_text", vocab_size=32000, tie_word_embeddings=False,
                              num_experts=64, num_experts_per_tok=8, moe_intermediate_size=256,
                              shared_expert_intermediate_size=256, **BODY_08B),
    # Qwen3.5 / Qwen3.6-27B's text config (dense; its MTP layer is one full-attention layer)
    "qwen3.6-27b": dict(model_type="qwen3_5_text", vocab_size=248320, tie_word_embeddings=False, hidden_size=5120,
                        intermediate_size=17408, num_hidden_layers=64, num_attention_heads=24, num_key_value_heads=4,
                        head_dim=256, linear_num_key_heads=16, linear_num_value_heads=48, linear_key_head_dim=128,
                        linear_value_head_dim=128, linear_conv_kernel_dim=4, partial_rotary_factor=0.25,
                        rope_theta=1e7, rms_norm_eps=1e-6, max_position_embeddings=262144,
                        layer_types=["linear_attention"] * 3 + ["full_attention"]),
    # Qwen3.5 / Qwen3.6-35B-A3B's text config (MoE: 256 routed experts, 8 a token, and a shared one)
    "qwen3.6-35b-a3b": dict(model_type="qwen3_5_moe_text", vocab_size=248320, tie_word_embeddings=False,
                            hidden_size=2048, num_hidden_layers=40, num_attention_heads=16, num_key_value_heads=2,
                            head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
                            linear_value_head_dim=128, linear_conv_kernel_dim=4, partial_rotary_factor=0.25,
                            rope_theta=1e7, rms_norm_eps=1e-6, max_position_embeddings=262144, num_experts=256,
                            num_experts_per_tok=8, moe_intermediate_size=512, shared_expert_intermediate_size=512,
                            layer_types=["linear_attention"] * 3 + ["full_attention"]),
    **ROUTED_AND_NEXT,
    "tiny": dict(model_type="qwen3_5_text", vocab_size=512, tie_word_embeddings=False, hidden_size=64,
                 intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                 max_position_embeddings=2048, layer_types=["linear_attention"] * 3 + ["full_attention"]),
}


def shape_config(shape: str, layers: int | None = None, vocab_size: int | None = None,
                 tied: bool | None = None) -> ModelConfig:
    if shape not in SHAPES:
        raise MtpxError(f"unknown shape {shape!r}: use one of {', '.join(sorted(SHAPES))}")
    spec = dict(SHAPES[shape])
    n = layers or spec["num_hidden_layers"]
    pattern = spec.get("layer_types", ["full_attention"])
    spec["layer_types"] = [pattern[i % len(pattern)] for i in range(n)]
    spec["num_hidden_layers"] = n
    if vocab_size:
        spec["vocab_size"] = vocab_size
    if tied is not None:
        spec["tie_word_embeddings"] = tied
    if spec["model_type"] in ROUTED_TYPES:
        spec["shared_expert_intermediate_size"] = spec["moe_intermediate_size"] * spec["n_shared_experts"]
        cfg = RoutedMoEConfig(**spec)
    else:
        cfg = ModelConfig(**spec)
    cfg.validate()
    return cfg


def parameter_shapes(cfg: ModelConfig, mtp_layers: int = 1) -> dict[str, tuple[int, ...]]:
    """Internal parameter names and shapes of the family's model (models/registry.py) with `mtp_layers`."""
    from mtpx.models.registry import family
    with torch.device("meta"):
        model = family(cfg)(cfg, mtp_layers)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], g: torch.Generator, std: float,
                  plain_norms: bool = False) -> torch.Tensor:
    """`plain_norms`: the family's RMSNorms multiply by w (GLM, DeepSeek), not by 1 + w (Qwen)."""
    if name.endswith("e_score_correction_bias"):
        return torch.zeros(shape)  # fp32, as the checkpoints store it
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=torch.bfloat16)
    if name.endswith("A_log"):  # decay rates as transformers initialises them: A ~ U(0, 16)
        return torch.empty(shape).uniform_(1e-4, 16, generator=g).log().to(torch.bfloat16)
    if name.endswith("dt_bias") or name.endswith("linear_attn.norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    if name.endswith("norm.weight") or name.endswith("norm_embedding.weight") or name.endswith("norm_hidden.weight"):
        # RMSNorms at their initial value: w = 1, or the offset w = 0 of a (1 + w) norm
        return (torch.ones if plain_norms else torch.zeros)(shape, dtype=torch.bfloat16)
    return torch.empty(shape).normal_(0.0, std, generator=g).to(torch.bfloat16)


def random_weights(cfg: ModelConfig, mtp: bool, g: torch.Generator, std: float) -> tuple[dict, int, int]:
    """(tensors in the family's checkpoint names and layouts, parameters, MTP parameters), made one layer at a time
    (so that only one layer's tensors exist twice while experts are split per module)."""
    from mtpx.loading.disk_layout import disk_tensors, is_mtp_disk_name
    plain = cfg.MTP_IN_LAYERS  # GLM / DeepSeek: plain RMSNorms
    groups: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, shape in parameter_shapes(cfg, 1 if mtp else 0).items():
        groups.setdefault(".".join(name.split(".")[:3]) if ".layers." in name else name, {})[name] = shape
    tensors, n_params, n_mtp = {}, 0, 0
    # released MoE checkpoints of these families store each expert as its own module (Qwen3.5 MoE's are stacked)
    per_expert = cfg.model_type in ROUTED_TYPES or cfg.model_type == "qwen3_next"
    for group in groups.values():
        made = {n: random_tensor(n, s, g, std, plain).contiguous() for n, s in group.items()}
        n_params += sum(t.numel() for t in made.values())
        n_mtp += sum(t.numel() for n, t in made.items() if n.startswith("mtp."))
        tensors.update(disk_tensors(cfg, made, per_expert))
    if mtp and cfg.MTP_IN_LAYERS:  # DeepSeek-V3 / GLM-4.5 store copies of the embedding and head in the nextn layer
        L = cfg.num_hidden_layers
        embed = tensors["model.embed_tokens.weight"]
        tensors[f"model.layers.{L}.embed_tokens.weight"] = embed.clone()
        tensors[f"model.layers.{L}.shared_head.head.weight"] = tensors.get("lm_head.weight", embed).clone()
    assert not mtp or any(is_mtp_disk_name(cfg, n) for n in tensors)
    return tensors, n_params, n_mtp


def stdlib_text(max_bytes: int = 6_000_000) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for f in sorted(root.glob("*.py")):
        text = f.read_text(encoding="utf-8", errors="ignore")
        parts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return "\n<|endoftext|>".join(parts)


def write_tokenizer(out: Path, vocab_size: int, source: Path | None = None) -> int:
    """Copy a tokenizer from `source`, or train a byte-level BPE on stdlib source; returns its vocabulary size."""
    import shutil

    from tokenizers import Tokenizer as HFTokenizer

    from mtpx.train.trainer import train_tokenizer, write_tokenizer_config
    if source is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (Path(source) / name).exists():
                shutil.copy(Path(source) / name, out / name)
        if not (out / "tokenizer_config.json").exists():
            write_tokenizer_config(out)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            corpus = Path(tmp) / "corpus.txt"
            corpus.write_text(stdlib_text(max(200_000, min(6_000_000, vocab_size * 200))), encoding="utf-8")
            train_tokenizer([corpus], vocab_size, out)
    n = HFTokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise ValueError(f"tokenizer has {n} tokens, more than the model's vocab_size {vocab_size}")
    return n


def generate_checkpoint(out: Path, shape: str = "qwen3.5-0.8b", *, layers: int | None = None,
                        vocab_size: int | None = None, tied: bool | None = None, mtp: bool = True, seed: int = 0,
                        std: float = 0.02, tokenizer_from: Path | None = None, log=print) -> dict:
    from safetensors.torch import save_file

    from mtpx.tokenizer import Tokenizer
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = shape_config(shape, layers, vocab_size, tied)
    n_tok = write_tokenizer(out, cfg.vocab_size, tokenizer_from)
    tok = Tokenizer.from_dir(out)
    eos = tok.token_to_id("<|im_end|>")
    cfg.eos_token_id = [eos] if eos is not None else []
    tensors, n_params, mtp_params = random_weights(cfg, mtp, torch.Generator().manual_seed(seed), std)
    if mtp:
        cfg.mtp_num_hidden_layers = 1
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = "bfloat16"
    hf["initializer_range"] = std
    (out / "config.json").write_text(json.dumps(hf, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": cfg.eos_token_id}, indent=1))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "README.md").write_text(
        f"# random-weight {shape}\n\nGenerated by `mtpx bench gen-checkpoint --shape {shape}` (seed {seed}): "
        f"N(0, {std}) bf16 weights, untrained. {n_params / 1e6:.1f}M parameters "
        f"({mtp_params / 1e6:.1f}M in the MTP layer); tokenizer: {n_tok} byte-level BPE tokens padded to "
        f"{cfg.vocab_size}. For benchmarking only: its output is noise, and its MTP layer drafts noise (use "
        f"`--spec-synth-rates`).\n")
    info = {"path": str(out), "shape": shape, "parameters": n_params, "mtp_parameters": mtp_params,
            "bytes": sum(t.numel() * t.element_size() for t in tensors.values()), "tokenizer_tokens": n_tok,
            "config": hf}
    log(f"wrote {out}: {shape}, {n_params / 1e6:.1f}M parameters ({mtp_params / 1e6:.1f}M MTP), "
        f"{info['bytes'] / 2**30:.2f} GiB bf16, tokenizer {n_tok} tokens (vocab {cfg.vocab_size})")
    return info


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", default="qwen3.5-0.8b", choices=sorted(SHAPES))
    p.add_argument("--out", required=True, type=Path, help="output checkpoint directory (keep it out of git)")
    p.add_argument("--layers", type=int, default=None, help="override the number of main layers")
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--tied", action=argparse.BooleanOptionalAction, default=None, help="tie lm_head to the embedding")
    p.add_argument("--no-mtp", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--std", type=float, default=0.02)
    p.add_argument("--tokenizer-from", type=Path, default=None, help="copy tokenizer files from this directory")


def main(args: argparse.Namespace) -> int:
    generate_checkpoint(args.out, args.shape, layers=args.layers, vocab_size=args.vocab_size, tied=args.tied,
                        mtp=not args.no_mtp, seed=args.seed, std=args.std, tokenizer_from=args.tokenizer_from,
                        log=lambda m: print(m, file=sys.stderr))
    return 0
