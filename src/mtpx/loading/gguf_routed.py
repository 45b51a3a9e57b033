"""GGUF files of the routed-MoE families (llama.cpp arch `glm4moe` = glm4_moe, `deepseek2` = deepseek_v3), read and
written in llama.cpp's names and metadata.

As llama.cpp's converter writes them: `{arch}.block_count` counts the main layers and the nextn (MTP) layers,
`{arch}.nextn_predict_layers` the latter; the MTP layer is `blk.{L}.*` (its decoder layer under the usual names) plus
`nextn.{eh_proj, enorm, hnorm, shared_head_norm}` and optionally `nextn.{embed_tokens, shared_head_head}`. Norms are
stored as they are (no 1 + w); `e_score_correction_bias` is `exp_probs_b.bias`; routed experts are stacked
`ffn_{gate,up,down}_exps`; DeepSeek's kv_b_proj is split into `attn_k_b` [heads, kv_lora_rank, nope] (transposed)
and `attn_v_b` [heads, v_head_dim, kv_lora_rank] (older files' `attn_kv_b` is read too), its attention is written
as MQA (head_count_kv 1, key_length kv_lora_rank + rope, value_length kv_lora_rank; key_length_mla / value_length_mla
the per-head sizes), YaRN as `rope.scaling.*`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import torch

from mtpx.config import RoutedMoEConfig
from mtpx.errors import ModelLoadError
from mtpx.loading.checkpoint import FP32_SUFFIXES, Checkpoint
from mtpx.loading.gguf import _f32_value, _field, _raw_loader

ARCHS = {"glm4moe": "glm4_moe", "deepseek2": "deepseek_v3"}
SIGMOID = 2  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID

# internal suffix (after model.layers.N. / mtp.layers.N., without .weight / .bias) -> GGUF suffix
COMMON = {
    "input_layernorm": "attn_norm", "self_attn.o_proj": "attn_output",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "self_attn.q_a_proj": "attn_q_a", "self_attn.q_a_layernorm": "attn_q_a_norm", "self_attn.q_b_proj": "attn_q_b",
    "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa", "self_attn.kv_a_layernorm": "attn_kv_a_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",
    "mlp.shared_experts.gate_proj": "ffn_gate_shexp", "mlp.shared_experts.up_proj": "ffn_up_shexp",
    "mlp.shared_experts.down_proj": "ffn_down_shexp",
    "enorm": "nextn.enorm", "hnorm": "nextn.hnorm", "eh_proj": "nextn.eh_proj",
    "shared_head.norm": "nextn.shared_head_norm", "embed_tokens": "nextn.embed_tokens",
    "shared_head.head": "nextn.shared_head_head",  # copies: build_model shares them with the main model's
}
POST_NORM = {"glm4moe": "post_attention_norm", "deepseek2": "ffn_norm"}
GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output.weight"}


def layer_names(arch: str) -> dict[str, str]:
    """Internal suffix -> GGUF suffix, one to one (weights and biases)."""
    names = {**COMMON, "post_attention_layernorm": POST_NORM[arch]}
    out = {f"{k}.weight": f"{v}.weight" for k, v in names.items()}
    out.update({f"{k}.bias": f"{v}.bias" for k, v in names.items() if k.startswith("self_attn.")})
    out["mlp.gate.e_score_correction_bias"] = "exp_probs_b.bias"
    out["mlp.experts.down_proj"] = "ffn_down_exps.weight"  # stacked [E, H, I]; gate_up_proj is stored as two
    return out


# ---------------------------------------------------------------- reading

def routed_config(reader, arch: str, path: Path) -> tuple[RoutedMoEConfig, int]:
    def key(k: str, default: Any = None, required: bool = True) -> Any:
        v = _field(reader, f"{arch}.{k}", default)
        if v is None and required:
            raise ModelLoadError(f"GGUF {path.name} lacks metadata {arch}.{k}")
        return v

    names = {t.name for t in reader.tensors}
    n_blocks, n_mtp = int(key("block_count")), int(key("nextn_predict_layers", 0))
    n_main = n_blocks - n_mtp
    if n_main <= 0:
        raise ModelLoadError(f"{arch}.block_count={n_blocks} leaves no main layers next to {n_mtp} MTP layer(s)")
    gating = int(key("expert_gating_func", SIGMOID))
    if gating != SIGMOID:
        raise ModelLoadError(f"unsupported router type: {arch}.expert_gating_func={gating} (mtpx implements the "
                             f"sigmoid router, {SIGMOID})")
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise ModelLoadError(f"GGUF {path.name} has no token_embd.weight")
    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    kw: dict[str, Any] = dict(
        model_type=ARCHS[arch], vocab_size=int(embd.shape[1]), hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")), num_hidden_layers=n_main, num_attention_heads=heads,
        rms_norm_eps=_f32_value(key("attention.layer_norm_rms_epsilon")),
        rope_theta=_f32_value(key("rope.freq_base", 10000.0)),
        max_position_embeddings=int(key("context_length", 4096)),
        tie_word_embeddings="output.weight" not in names, layer_types=["full_attention"] * n_main,
        num_experts=int(key("expert_count")), num_experts_per_tok=int(key("expert_used_count")),
        moe_intermediate_size=int(key("expert_feed_forward_length")),
        n_shared_experts=int(key("expert_shared_count", 0)),
        first_k_dense_replace=int(key("leading_dense_block_count", 0)),
        routed_scaling_factor=_f32_value(key("expert_weights_scale", 1.0)),
        norm_topk_prob=bool(key("expert_weights_norm", False)),
        n_group=int(key("expert_group_count", 1)), topk_group=int(key("expert_group_used_count", 1)),
        mtp_num_hidden_layers=n_mtp if _field(reader, f"{arch}.nextn_predict_layers") is not None else None,
    )
    kw["shared_expert_intermediate_size"] = kw["moe_intermediate_size"] * kw["n_shared_experts"]
    rope_dim = int(key("rope.dimension_count"))
    if arch == "deepseek2":
        rank, k_mla = int(key("attention.kv_lora_rank")), int(key("attention.key_length_mla"))
        q_rank = key("attention.q_lora_rank", None, required=False)
        kw.update(kv_lora_rank=rank, q_lora_rank=int(q_rank) if q_rank else None, qk_rope_head_dim=rope_dim,
                  qk_nope_head_dim=k_mla - rope_dim, v_head_dim=int(key("attention.value_length_mla")),
                  head_dim=k_mla, num_key_value_heads=heads, rope_interleave=True,
                  attention_bias="blk.0.attn_kv_a_mqa.bias" in names)
    else:
        head_dim = int(key("attention.key_length", hidden // heads))
        kw.update(head_dim=head_dim, num_key_value_heads=int(key("attention.head_count_kv")),
                  partial_rotary_factor=rope_dim / head_dim, attention_bias="blk.0.attn_q.bias" in names,
                  use_qk_norm="blk.0.attn_q_norm.weight" in names)
    scaling = key("rope.scaling.type", None, required=False)
    if scaling == "yarn":
        kw["rope_yarn"] = {"factor": _f32_value(key("rope.scaling.factor")),
                           "original_max_position_embeddings": int(key("rope.scaling.original_context_length"))}
        for name, k in (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow"),
                        ("attention_factor", "attn_factor")):
            if (v := key(f"rope.scaling.{k}", None, required=False)) is not None:
                kw["rope_yarn"][name] = _f32_value(v)
        if (log_mul := key("rope.scaling.yarn_log_multiplier", None, required=False)):
            # 0.1 * mscale_all_dim; mscale the same (their ratio, the cos / sin factor, is attn_factor where given)
            kw["rope_yarn"]["mscale_all_dim"] = kw["rope_yarn"]["mscale"] = round(float(log_mul) / 0.1, 6)
    elif scaling not in (None, "none"):
        raise ModelLoadError(f"unsupported RoPE scaling {scaling!r} (mtpx implements plain RoPE and yarn)")
    eos = [_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    kw["eos_token_id"] = list(dict.fromkeys(int(e) for e in eos if e is not None))
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    kw["bos_token_id"] = int(bos) if bos is not None else None
    cfg = RoutedMoEConfig(**kw)
    cfg.validate()
    return cfg, n_main


def routed_tensors(reader, cfg: RoutedMoEConfig, arch: str, n_main: int) -> tuple[dict, dict]:
    """GGUF tensors -> internal names (nextn layers as mtp.layers.N), loaders and shapes."""
    by_name = {t.name: t for t in reader.tensors}
    to_internal = {g: h for h, g in layer_names(arch).items()}
    tensors: dict[str, Callable[[], torch.Tensor]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    pending: dict[str, dict[str, Any]] = {}  # prefix -> parts of one internal tensor stored as two

    def add(name: str, t) -> None:
        tensors[name] = _raw_loader(t)
        shapes[name] = tuple(int(x) for x in reversed(t.shape))
    for gname, t in by_name.items():
        if gname in GLOBAL.values():
            add(next(h for h, g in GLOBAL.items() if g == gname), t)
            continue
        m = re.match(r"^blk\.(\d+)\.(.+)$", gname)
        if not m:
            raise ModelLoadError(f"unexpected GGUF tensor {gname}")
        bid, suffix = int(m[1]), m[2]
        prefix = f"model.layers.{bid}." if bid < n_main else f"mtp.layers.{bid - n_main}."
        if suffix in ("ffn_gate_exps.weight", "ffn_up_exps.weight", "attn_k_b.weight", "attn_v_b.weight"):
            pending.setdefault(prefix, {})[suffix] = t
            continue
        if suffix == "attn_kv_b.weight":
            add(prefix + "self_attn.kv_b_proj.weight", t)
            continue
        internal = to_internal.get(suffix)
        if internal is None or (bid < n_main and suffix.startswith("nextn.")):
            raise ModelLoadError(f"unexpected GGUF tensor {gname}")
        add(prefix + internal, t)
    for prefix, parts in pending.items():
        for a, b, target, join in (("ffn_gate_exps.weight", "ffn_up_exps.weight", "mlp.experts.gate_up_proj",
                                    _join_gate_up), ("attn_k_b.weight", "attn_v_b.weight",
                                                     "self_attn.kv_b_proj.weight", _join_kv_b)):
            if a not in parts and b not in parts:
                continue
            if a not in parts or b not in parts:
                raise ModelLoadError(f"{prefix}: {a} and {b} come together; found only one")
            la, lb = _raw_loader(parts[a]), _raw_loader(parts[b])
            tensors[prefix + target] = lambda la=la, lb=lb, join=join: join(la(), lb())
            sa, sb = (tuple(int(x) for x in reversed(parts[k].shape)) for k in (a, b))
            shapes[prefix + target] = (sa[0], sa[1] + sb[1], sa[2]) if target.endswith("gate_up_proj") \
                else (sa[0] * (sa[2] + sb[1]), sa[1])
    return tensors, shapes


def _same_dtype(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (a, b) if a.dtype == b.dtype else (a.float(), b.float())


def _join_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat(_same_dtype(gate, up), dim=1)


def _join_kv_b(k_b: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    """attn_k_b [heads, rank, nope] (transposed) + attn_v_b [heads, v, rank] -> kv_b_proj [heads * (nope + v), rank]."""
    k_b, v_b = _same_dtype(k_b, v_b)
    return torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(-1, k_b.shape[1])


# ---------------------------------------------------------------- writing

def export_arch(cfg: RoutedMoEConfig) -> str:
    return "deepseek2" if cfg.is_mla else "glm4moe"


def export_tensors(ckpt: Checkpoint, names: list[str], outtype_dtype: torch.dtype | None):
    """(GGUF name, float32 tensor) of each internal name, in order; bf16 / f16 rounding except fp32-kept tensors."""
    cfg = ckpt.config
    arch, n_main = export_arch(cfg), cfg.num_hidden_layers
    to_gguf = layer_names(arch)
    for hf in names:
        x = ckpt.tensors[hf]()
        if outtype_dtype is not None and not hf.endswith(FP32_SUFFIXES):
            x = x.to(outtype_dtype)
        x = x.float()
        if hf in GLOBAL:
            yield GLOBAL[hf], x.contiguous()
            continue
        m = re.match(r"^(model|mtp)\.layers\.(\d+)\.(.+)$", hf)
        if not m:
            raise ModelLoadError(f"tensor {hf} has no GGUF name")
        blk = f"blk.{int(m[2]) + (n_main if m[1] == 'mtp' else 0)}."
        suffix = m[3]
        if suffix == "mlp.experts.gate_up_proj":
            gate, up = x.chunk(2, dim=1)
            yield blk + "ffn_gate_exps.weight", gate.contiguous()
            yield blk + "ffn_up_exps.weight", up.contiguous()
        elif suffix == "self_attn.kv_b_proj.weight":
            kv = x.reshape(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
            k_b, v_b = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=1)
            yield blk + "attn_k_b.weight", k_b.transpose(1, 2).contiguous()
            yield blk + "attn_v_b.weight", v_b.contiguous()
        elif suffix in to_gguf:
            yield blk + to_gguf[suffix], x.contiguous()
        else:
            raise ModelLoadError(f"tensor {hf} has no GGUF name")


def export_shapes(cfg: RoutedMoEConfig, hf: str, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    if hf.endswith("mlp.experts.gate_up_proj"):
        return [(shape[0], shape[1] // 2, shape[2])] * 2
    if hf.endswith("self_attn.kv_b_proj.weight"):
        h, r = cfg.num_attention_heads, cfg.kv_lora_rank
        return [(h, r, cfg.qk_nope_head_dim), (h, cfg.v_head_dim, r)]
    return [tuple(shape)]


def write_metadata(w, cfg: RoutedMoEConfig, n_mtp: int) -> None:
    """Everything but the tokenizer and file type, as llama.cpp's converter writes it."""
    arch = export_arch(cfg)
    if cfg.is_mla and not cfg.rope_interleave:
        raise ModelLoadError("llama.cpp's deepseek2 reads interleaved RoPE only (rope_interleave false here)")
    w.add_block_count(cfg.num_hidden_layers + n_mtp)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    w.add_expert_weights_norm(cfg.norm_topk_prob)
    w.add_uint32(f"{arch}.expert_gating_func", SIGMOID)
    w.add_expert_group_count(cfg.n_group)
    w.add_expert_group_used_count(cfg.topk_group)
    w.add_rope_dimension_count(cfg.rotary_dim)
    if n_mtp:
        w.add_nextn_predict_layers(n_mtp)
    if cfg.is_mla:
        w.add_head_count_kv(1)  # MLA is written as MQA over the compressed cache, as llama.cpp's converter does
        w.add_vocab_size(cfg.vocab_size)
        if cfg.q_lora_rank:
            w.add_q_lora_rank(cfg.q_lora_rank)
        w.add_kv_lora_rank(cfg.kv_lora_rank)
        w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        w.add_value_length(cfg.kv_lora_rank)
        w.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
        w.add_value_length_mla(cfg.v_head_dim)
    else:
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if cfg.rope_yarn:
        import gguf
        from mtpx.models.glm4_moe import yarn_inv_freq
        y = cfg.rope_yarn
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(y["factor"])
        w.add_rope_scaling_orig_ctx_len(y["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_beta_fast(y.get("beta_fast") or 32)
        w.add_rope_scaling_yarn_beta_slow(y.get("beta_slow") or 1)
        if y.get("attention_factor") is not None or y.get("mscale", 1.0) != y.get("mscale_all_dim", 1.0):
            w.add_rope_scaling_attn_factors(yarn_inv_freq(cfg.rope_theta, cfg.rotary_dim, y)[1])
        if y.get("mscale_all_dim"):
            w.add_rope_scaling_yarn_log_mul(0.1 * y["mscale_all_dim"])
