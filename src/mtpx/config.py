"""Model configuration: one dataclass, read from a Hugging Face `config.json` (flat or nested) or GGUF metadata."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mtpx.errors import ModelLoadError

DENSE_TYPES = {"qwen3_5_text", "qwen3_5"}
MOE_TYPES = {"qwen3_5_moe_text", "qwen3_5_moe"}
SUPPORTED_TYPES = DENSE_TYPES | MOE_TYPES


@dataclass
class ModelConfig:
    model_type: str = "qwen3_5_text"
    vocab_size: int = 248320
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    layer_types: list[str] = field(default_factory=list)
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    # MoE (num_experts == 0 means dense)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    # MTP; None = infer from the weights
    mtp_num_hidden_layers: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    # "model." for flat checkpoints, "model.language_model." for the nested (multimodal) layout
    weight_prefix: str = "model."

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_TYPES:
            raise ModelLoadError(
                f"unsupported model_type {model_type!r}; mtpx supports {sorted(SUPPORTED_TYPES)}"
            )
        nested = model_type in ("qwen3_5", "qwen3_5_moe")
        text = dict(raw.get("text_config") or {}) if nested else dict(raw)
        if nested and not text:
            raise ModelLoadError(f"config.json has model_type {model_type!r} but no text_config")
        is_moe = model_type in MOE_TYPES
        kw: dict[str, Any] = {"model_type": model_type, "weight_prefix": "model.language_model." if nested else "model."}
        for f in cls.__dataclass_fields__:
            if f in text and f not in ("model_type", "eos_token_id", "layer_types", "weight_prefix"):
                kw[f] = text[f]
        if "tie_word_embeddings" in raw and nested:
            kw["tie_word_embeddings"] = raw["tie_word_embeddings"]
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        if "rope_theta" in rope:
            kw["rope_theta"] = rope["rope_theta"]
        if "partial_rotary_factor" in rope:
            kw["partial_rotary_factor"] = rope["partial_rotary_factor"]
        if rope.get("rope_type", "default") not in ("default", None):
            raise ModelLoadError(f"unsupported rope_type {rope.get('rope_type')!r} (only 'default' RoPE is implemented)")
        if "head_dim" not in text and "hidden_size" in text and "num_attention_heads" in text:
            kw["head_dim"] = text["hidden_size"] // text["num_attention_heads"]
        n_layers = kw.get("num_hidden_layers", cls.num_hidden_layers)
        layer_types = text.get("layer_types")
        if layer_types is None:
            interval = text.get("full_attention_interval", 4)
            layer_types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n_layers)]
        if len(layer_types) != n_layers or not set(layer_types) <= {"full_attention", "linear_attention"}:
            raise ModelLoadError(f"layer_types must list {n_layers} entries of full_attention/linear_attention")
        kw["layer_types"] = list(layer_types)
        eos = text.get("eos_token_id", raw.get("eos_token_id"))
        kw["eos_token_id"] = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if is_moe:
            for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
                if not kw.get(key):
                    raise ModelLoadError(f"MoE config ({model_type}) is missing {key!r}")
            kw.setdefault("shared_expert_intermediate_size", kw["moe_intermediate_size"])
        else:
            kw["num_experts"] = 0
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ModelLoadError("linear_num_value_heads must be a multiple of linear_num_key_heads")
        if self.rotary_dim % 2:
            raise ModelLoadError(f"rotary dim {self.rotary_dim} (head_dim × partial_rotary_factor) must be even")

    def to_hf_dict(self) -> dict[str, Any]:
        """A flat `config.json` that transformers and vLLM read (model_type qwen3_5_text / qwen3_5_moe_text)."""
        d = asdict(self)
        for k in ("weight_prefix", "rope_theta", "partial_rotary_factor", "bos_token_id"):
            d.pop(k)
        d["model_type"] = "qwen3_5_moe_text" if self.is_moe else "qwen3_5_text"
        d["architectures"] = ["Qwen3_5MoeForCausalLM" if self.is_moe else "Qwen3_5ForCausalLM"]
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta,
                                "partial_rotary_factor": self.partial_rotary_factor}
        d["hidden_act"] = "silu"
        d["eos_token_id"] = self.eos_token_id[0] if len(self.eos_token_id) == 1 else self.eos_token_id
        if self.bos_token_id is not None:
            d["bos_token_id"] = self.bos_token_id
        if not self.is_moe:
            for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size"):
                d.pop(k)
        if self.mtp_num_hidden_layers is None:
            d.pop("mtp_num_hidden_layers")
        return d


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path.name} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror}") from None
