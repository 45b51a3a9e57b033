"""`mtpx bench gen-checkpoint`: random-weight checkpoints of real Qwen3.5 shapes, to measure cost scaling where
decoding is bandwidth-bound. Weights are N(0, 0.02) in bf16 (norm offsets 0, Gated DeltaNet decay parameters as
transformers initialises them), with an MTP layer and a byte-level BPE tokenizer trained on the interpreter's standard
library (vocab padded to the config's vocab_size), so mtpx, transformers and llama.cpp (after `mtpx convert --to
gguf`) all run them. The MTP layer is untrained: benchmark speculation on these with `--spec-synth-rates`.

Shapes:
- `qwen3.5-0.8b`: the Qwen3.5-0.8B text body (hidden 1024, 24 layers in 3 linear : 1 full attention, FFN 3584, 8 query
  / 2 KV heads of 256, Gated DeltaNet 16 key / 16 value heads of 128, conv 4, partial rotary 0.25, rope θ 1e7) with a
  32k vocabulary and an untied lm_head: 584M parameters with its MTP layer.
- `qwen3.5-moe-small`: Qwen3.5-35B-A3B's layout (routed experts, 8 per token, plus a shared expert, on every layer,
  MTP layer MoE too) scaled down to the 0.8B body: hidden 1024, 24 layers, 64 experts of FFN 256 (35B-A3B: 256 of
  512 at hidden 2048), shared expert FFN 256.
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

from mtpx.config import ModelConfig

BODY_08B = dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=8,
                num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=16,
                linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
                partial_rotary_factor=0.25, rope_theta=1e7, rms_norm_eps=1e-6, max_position_embeddings=32768,
                layer_types=["linear_attention"] * 3 + ["full_attention"])
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
    "tiny": dict(model_type="qwen3_5_text", vocab_size=512, tie_word_embeddings=False, hidden_size=64,
                 intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                 max_position_embeddings=2048, layer_types=["linear_attention"] * 3 + ["full_attention"]),
}


def shape_config(shape: str, layers: int | None = None, vocab_size: int | None = None,
                 tied: bool | None = None) -> ModelConfig:
    spec = dict(SHAPES[shape])
    n = layers or spec["num_hidden_layers"]
    pattern = spec["layer_types"]
    spec["layer_types"] = [pattern[i % len(pattern)] for i in range(n)]
    spec["num_hidden_layers"] = n
    if vocab_size:
        spec["vocab_size"] = vocab_size
    if tied is not None:
        spec["tie_word_embeddings"] = tied
    cfg = ModelConfig(**spec)
    cfg.validate()
    return cfg


def parameter_shapes(cfg: ModelConfig, mtp_layers: int = 1) -> dict[str, tuple[int, ...]]:
    from mtpx.models.qwen3_5 import Qwen35Model
    with torch.device("meta"):
        model = Qwen35Model(cfg, mtp_layers)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], g: torch.Generator, std: float) -> torch.Tensor:
    if name.endswith("A_log"):  # decay rates as transformers initialises them: A ~ U(0, 16)
        return torch.empty(shape).uniform_(1e-4, 16, generator=g).log().to(torch.bfloat16)
    if name.endswith("dt_bias") or name.endswith("linear_attn.norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    if name.endswith("norm.weight") or name.endswith("norm_embedding.weight") or name.endswith("norm_hidden.weight"):
        return torch.zeros(shape, dtype=torch.bfloat16)  # (1 + w) RMSNorms at their initial value
    return torch.empty(shape).normal_(0.0, std, generator=g).to(torch.bfloat16)


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
    shapes = parameter_shapes(cfg, 1 if mtp else 0)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shp in shapes.items():
        tensors[name] = random_tensor(name, shp, g, std).contiguous()
    n_params = sum(t.numel() for t in tensors.values())
    hf = cfg.to_hf_dict()
    if mtp:
        hf["mtp_num_hidden_layers"] = 1
    hf["torch_dtype"] = "bfloat16"
    hf["initializer_range"] = std
    (out / "config.json").write_text(json.dumps(hf, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": cfg.eos_token_id}, indent=1))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    mtp_params = sum(t.numel() for n, t in tensors.items() if n.startswith("mtp."))
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
