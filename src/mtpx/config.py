"""Model configuration: one dataclass, read from a Hugging Face `config.json` (flat or nested) or GGUF metadata."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from mtpx.errors import ModelLoadError

DENSE_TYPES = {"qwen3_5_text", "qwen3_5"}
MOE_TYPES = {"qwen3_5_moe_text", "qwen3_5_moe", "qwen3_next"}  # qwen3_next: Qwen3.5 MoE, projections laid out apart
ROUTED_TYPES = {"glm4_moe", "deepseek_v3", "glm4_moe_lite"}  # RoutedMoEConfig: attention + sigmoid-routed MoE, MTP as extra layers
SUPPORTED_TYPES = DENSE_TYPES | MOE_TYPES | ROUTED_TYPES


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

    # where the checkpoint stores the MTP layers: under `mtp.layers.N.` (Qwen3.5), or (True) as decoder layers
    # appended to the main stack, `model.layers.{num_hidden_layers + N}.` (GLM-4.5, DeepSeek-V3)
    MTP_IN_LAYERS: ClassVar[bool] = False
    MTP_KEY: ClassVar[str] = "mtp_num_hidden_layers"  # the config.json key of the MTP layer count

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_TYPES:
            raise ModelLoadError(
                f"unsupported model_type {model_type!r}; mtpx supports {sorted(SUPPORTED_TYPES)}"
            )
        if model_type in ROUTED_TYPES:
            return RoutedMoEConfig.from_routed_dict(raw)
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
        if model_type == "qwen3_next":
            _check_qwen3_next(text)
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
        """A flat `config.json` that transformers and vLLM read (model_type qwen3_5_text / qwen3_5_moe_text, or
        qwen3_next)."""
        d = asdict(self)
        for k in ("weight_prefix", "rope_theta", "partial_rotary_factor", "bos_token_id"):
            d.pop(k)
        if self.model_type == "qwen3_next":  # its own model_type: its fused projections are not Qwen3.5's layout
            d["model_type"], d["architectures"] = "qwen3_next", ["Qwen3NextForCausalLM"]
        else:
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


def _check_qwen3_next(raw: dict[str, Any]) -> None:
    """The Qwen3-Next options mtpx runs: every layer MoE, normalised top-k weights, SiLU."""
    if raw.get("decoder_sparse_step", 1) != 1 or raw.get("mlp_only_layers"):
        raise ModelLoadError("qwen3_next with dense layers (decoder_sparse_step != 1 or mlp_only_layers) is not "
                             "supported")
    if raw.get("norm_topk_prob", True) is not True:
        raise ModelLoadError("qwen3_next with norm_topk_prob false is not supported")
    if raw.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"unsupported hidden_act {raw['hidden_act']!r} (only 'silu')")


@dataclass
class RoutedMoEConfig(ModelConfig):
    """GLM-4.5 (glm4_moe) and DeepSeek-V3 (deepseek_v3): attention layers only, the first `first_k_dense_replace`
    with a dense MLP, the rest MoE with shared experts and a sigmoid router (e_score_correction_bias, grouped top-k);
    MTP ("nextn") layers appended to the main stack. DeepSeek-V3's attention is MLA (kv_lora_rank > 0)."""
    MTP_IN_LAYERS: ClassVar[bool] = True
    MTP_KEY: ClassVar[str] = "num_nextn_predict_layers"
    attention_bias: bool = False
    use_qk_norm: bool = False
    first_k_dense_replace: int = 0
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    n_shared_experts: int = 1
    # MLA (DeepSeek-V3): q_lora_rank None = a direct q_proj
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False
    # YaRN RoPE scaling (DeepSeek-V3): factor, original_max_position_embeddings, beta_fast, beta_slow, mscale,
    # mscale_all_dim, attention_factor, truncate; None = plain RoPE
    rope_yarn: dict | None = None
    # the MTP layer has an embedding of its own (a checkpoint's copy that differs from the main one); set at load
    mtp_own_embedding: bool = False

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def rotary_dim(self) -> int:
        return self.qk_rope_head_dim if self.is_mla else int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_routed_dict(cls, raw: dict[str, Any]) -> "RoutedMoEConfig":
        model_type = raw["model_type"]
        mla = model_type in ("deepseek_v3", "glm4_moe_lite")  # glm4_moe_lite (GLM-4.7-Flash): DeepSeek-V3's MLA
        kw: dict[str, Any] = {"model_type": model_type, "partial_rotary_factor": 1.0 if mla else 0.5,
                              "rope_interleave": mla}
        skip = {"model_type", "eos_token_id", "layer_types", "weight_prefix", "num_experts", "mtp_num_hidden_layers",
                "shared_expert_intermediate_size", "mtp_own_embedding"}
        for f in cls.__dataclass_fields__:
            if f in raw and f not in skip:
                kw[f] = raw[f]
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "moe_intermediate_size",
                    "num_experts_per_tok"):
            if not raw.get(key):
                raise ModelLoadError(f"config.json ({model_type}) is missing {key!r}")
        kw["num_experts"] = raw.get("n_routed_experts", raw.get("num_local_experts"))
        if not kw["num_experts"]:
            raise ModelLoadError(f"config.json ({model_type}) is missing 'n_routed_experts'")
        if raw.get("mlp_layer_types") is not None:  # glm4_moe_lite: dense layers first, then MoE
            kinds = list(raw["mlp_layer_types"])
            dense = next((i for i, k in enumerate(kinds) if k != "dense"), len(kinds))
            if set(kinds[dense:]) - {"sparse"}:
                raise ModelLoadError(f"mlp_layer_types {kinds}: mtpx runs dense layers first, then sparse (MoE) ones")
            kw["first_k_dense_replace"] = dense
        kw.setdefault("first_k_dense_replace", 1 if model_type != "deepseek_v3" else 3)  # transformers' defaults
        kw.setdefault("num_key_value_heads", raw["num_attention_heads"])
        kw.setdefault("intermediate_size", raw["moe_intermediate_size"])
        kw["shared_expert_intermediate_size"] = raw["moe_intermediate_size"] * kw.get("n_shared_experts", 1)
        scoring = raw.get("scoring_func", "sigmoid")
        method = raw.get("topk_method", "noaux_tc")
        if scoring != "sigmoid" or method != "noaux_tc":
            raise ModelLoadError(f"unsupported router type: scoring_func={scoring!r}, topk_method={method!r} (mtpx "
                                 "implements the sigmoid router with e_score_correction_bias, 'noaux_tc')")
        if raw.get("hidden_act", "silu") != "silu":
            raise ModelLoadError(f"unsupported hidden_act {raw['hidden_act']!r} (only 'silu')")
        if raw.get("moe_layer_freq", 1) != 1:
            raise ModelLoadError(f"unsupported moe_layer_freq {raw['moe_layer_freq']!r} (only 1)")
        if mla:
            kw["head_dim"] = raw.get("qk_nope_head_dim", 0) + raw.get("qk_rope_head_dim", 0)
            kw["num_key_value_heads"] = raw["num_attention_heads"]
            for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if not raw.get(key):
                    raise ModelLoadError(f"config.json ({model_type}) is missing {key!r}")
        elif "head_dim" not in raw:
            kw["head_dim"] = raw["hidden_size"] // raw["num_attention_heads"]
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        for key in ("rope_theta", "partial_rotary_factor"):
            if key in rope:
                kw[key] = rope[key]
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "yarn":
            if not rope.get("factor") or not rope.get("original_max_position_embeddings"):
                raise ModelLoadError("yarn RoPE scaling needs 'factor' and 'original_max_position_embeddings'")
            kw["rope_yarn"] = {k: rope[k] for k in ("factor", "original_max_position_embeddings", "beta_fast",
                                                    "beta_slow", "mscale", "mscale_all_dim", "attention_factor",
                                                    "truncate") if rope.get(k) is not None}
        elif rope_type not in ("default", None):
            raise ModelLoadError(f"unsupported rope_type {rope_type!r} (mtpx implements 'default' and 'yarn')")
        kw["layer_types"] = ["full_attention"] * raw["num_hidden_layers"]
        n_mtp = raw.get("num_nextn_predict_layers", raw.get("num_mtp_layers"))
        kw["mtp_num_hidden_layers"] = None if n_mtp is None else int(n_mtp)
        eos = raw.get("eos_token_id")
        kw["eos_token_id"] = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        super().validate()
        if self.num_experts % self.n_group or not 0 < self.topk_group <= self.n_group:
            raise ModelLoadError(f"n_routed_experts={self.num_experts} must split into n_group={self.n_group} groups "
                                 f"and 0 < topk_group={self.topk_group} <= n_group")
        if self.num_experts_per_tok > self.num_experts:
            raise ModelLoadError("num_experts_per_tok exceeds n_routed_experts")

    def to_hf_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("weight_prefix", "layer_types", "mtp_own_embedding",
                                                                 "rope_yarn",
                                                                 "num_experts", "shared_expert_intermediate_size",
                                                                 "mtp_num_hidden_layers", "bos_token_id")}
        d["architectures"] = [{"glm4_moe": "Glm4MoeForCausalLM", "glm4_moe_lite": "Glm4MoeLiteForCausalLM"}.get(
            self.model_type, "DeepseekV3ForCausalLM")]
        d["n_routed_experts"] = self.num_experts
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta,
                                "partial_rotary_factor": self.partial_rotary_factor}
        if self.rope_yarn:
            d["rope_parameters"].update(rope_type="yarn", **self.rope_yarn)
        d["eos_token_id"] = self.eos_token_id[0] if len(self.eos_token_id) == 1 else self.eos_token_id
        if self.mtp_num_hidden_layers is not None:
            d["num_nextn_predict_layers"] = self.mtp_num_hidden_layers
        if self.bos_token_id is not None:
            d["bos_token_id"] = self.bos_token_id
        return d


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path.name} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror}") from None
