"""GGUF files (llama.cpp) of the Qwen3.5 family (and Qwen3-Next, arch `qwen3next`), MTP block included, read into a
`Checkpoint` in internal (HF) names; archs `glm4moe` / `deepseek2` are loading/gguf_routed.py's.
Longer than 400 lines because the name map, the metadata map and the tensor re-layouts are one reader's parts.

llama.cpp's layout for arch `qwen35` / `qwen35moe`, as its converter (`convert_hf_to_gguf.py`) writes it:

- `{arch}.block_count` counts the main layers *and* the MTP layers; `{arch}.nextn_predict_layers` is the MTP count.
  The MTP block is `blk.{n_main}.*`: a full-attention decoder layer under the usual names plus
  `nextn.{eh_proj, enorm, hnorm, shared_head_norm}` (= `mtp.{fc, pre_fc_norm_embedding, pre_fc_norm_hidden, norm}`).
- Full-attention vs linear-attention layers: `{arch}.attention.recurrent_layers` (one bool per block), else
  `{arch}.full_attention_interval` (layer i is full attention when (i + 1) % interval == 0).
- Transforms applied by the converter, undone here: RMSNorm weights are stored with the +1 folded in (except the
  gated norm of the linear-attention layers, `ssm_norm`); `A_log` is stored as `ssm_a = -exp(A_log)`; `dt_bias` is
  `ssm_dt.bias`; conv1d is stored squeezed [channels, kernel]; routed experts are split into `ffn_{gate,up,down}_exps`
  (or fused as `ffn_gate_up_exps`); when there are more value heads than key heads, every value-head-indexed
  dimension is reordered from grouped-by-key-head to tiled order (`_tiled_to_grouped` undoes it).

Tensors are dequantized lazily (F32, F16, BF16 natively; Q8_0, Q4_0/1, Q5_0/1, K-quants, IQ4 through
`gguf.quants.dequantize`); `build_model` casts them to the run dtype. Quantized matrices can also be read as they
are (Checkpoint.quantized, loading/gguf_blocks.py: Q4_0/1, Q4_K as int4, Q8_0, Q5_0/1, Q5_K, Q6_K as int8 blocks,
exactly) for runs with int4 / int8 weights (archs qwen35 / qwen35moe).
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mtpx.config import ModelConfig
from mtpx.errors import ModelLoadError
from mtpx.loading.checkpoint import Checkpoint, sampling_defaults
from mtpx.loading.gguf_blocks import Kept, Refused, kept_gate_up, kept_loader
from mtpx.models.qwen3_next import split_projections
from mtpx.tokenizer import Tokenizer

ARCHS = {"qwen35": False, "qwen35moe": True, "qwen3next": True}  # GGUF architecture -> is MoE
# Qwen3-Next (arch qwen3next) is stored like qwen35moe except its Gated DeltaNet input projections: fused per key head
# as in its HF checkpoints (ssm_in = in_proj_qkvz, ssm_ba = in_proj_ba, models/qwen3_next.py), value heads in HF
# (grouped) order throughout, no RoPE sections
NEXT_NAMES = {"linear_attn.in_proj_qkvz.weight": "ssm_in.weight", "linear_attn.in_proj_ba.weight": "ssm_ba.weight"}
ROUTED_ARCHS = ("glm4moe", "deepseek2")  # read by loading/gguf_routed.py

# Pre-tokenizer regexes as the Qwen tokenizer.json files write them (llama.cpp names them "qwen2" / "qwen35").
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp pre-tokenizer name -> regex of a Split pre-tokenizer (None: GPT-2's ByteLevel regex)
PRE_TOKENIZERS: dict[str, str | None] = {"gpt-2": None, "qwen2": QWEN2_SPLIT, "deepseek-r1-qwen": QWEN2_SPLIT,
                                         "qwen35": QWEN35_SPLIT}

# GGUF token types (llama.cpp's llama_token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# HF suffix (after `model.layers.N.` / `mtp.layers.N.`) <-> GGUF suffix (after `blk.N.`), one to one.
LAYER_NAMES: dict[str, str] = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "linear_attn.in_proj_qkv.weight": "attn_qkv.weight",
    "linear_attn.in_proj_z.weight": "attn_gate.weight",
    "linear_attn.in_proj_a.weight": "ssm_alpha.weight",
    "linear_attn.in_proj_b.weight": "ssm_beta.weight",
    "linear_attn.conv1d.weight": "ssm_conv1d.weight",
    "linear_attn.A_log": "ssm_a",
    "linear_attn.dt_bias": "ssm_dt.bias",
    "linear_attn.norm.weight": "ssm_norm.weight",
    "linear_attn.out_proj.weight": "ssm_out.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.experts.down_proj": "ffn_down_exps.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
}
# `mlp.experts.gate_up_proj` [E, 2I, H] is stored split: ffn_gate_exps [E, I, H] + ffn_up_exps [E, I, H]
GATE_UP_EXPERTS = "mlp.experts.gate_up_proj"
GLOBAL_NAMES: dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
# MTP-wide tensors, stored in the first MTP block (blk.{n_main})
MTP_NAMES: dict[str, str] = {
    "mtp.fc.weight": "nextn.eh_proj.weight",
    "mtp.pre_fc_norm_embedding.weight": "nextn.enorm.weight",
    "mtp.pre_fc_norm_hidden.weight": "nextn.hnorm.weight",
    "mtp.norm.weight": "nextn.shared_head_norm.weight",
}
# Optional MTP tensors that duplicate the main embedding / output head (llama.cpp reuses the main ones when absent)
MTP_OPTIONAL_SHARED = {"nextn.embed_tokens.weight": "token_embd.weight",
                       "nextn.shared_head_head.weight": "output.weight"}

# llama.cpp's sampling metadata (general.sampling.*) -> SamplingParams fields
GGUF_SAMPLING = {"temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                 "penalty_repeat": "repetition_penalty"}
NATIVE_TYPES = ("F32", "F16", "BF16")
DEQUANT_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")
SUPPORTED_TYPES = NATIVE_TYPES + DEQUANT_TYPES


def is_offset_norm(gguf_suffix: str) -> bool:
    """RMSNorm weights that the model multiplies as (1 + w) and GGUF stores as (1 + w)."""
    return gguf_suffix.endswith("norm.weight") and gguf_suffix != "ssm_norm.weight"


# ---------------------------------------------------------------- value-head order (grouped <-> tiled)

def _permute_heads(t: torch.Tensor, dim: int, outer: int, inner: int, head_dim: int) -> torch.Tensor:
    """View `dim` as [outer, inner, head_dim] and swap outer/inner."""
    shape = list(t.shape)
    dim = dim % len(shape)
    t = t.reshape(shape[:dim] + [outer, inner, head_dim] + shape[dim + 1:]).transpose(dim, dim + 1)
    return t.reshape(shape).contiguous()


def grouped_to_tiled(t: torch.Tensor, dim: int, nk: int, nv: int, head_dim: int) -> torch.Tensor:
    """HF order (value heads grouped by key head: k0v0, k0v1, k1v0, ...) -> llama.cpp order (k0v0, k1v0, k0v1, ...)."""
    return t if nk == nv else _permute_heads(t, dim, nk, nv // nk, head_dim)


def _tiled_to_grouped(t: torch.Tensor, dim: int, nk: int, nv: int, head_dim: int) -> torch.Tensor:
    return t if nk == nv else _permute_heads(t, dim, nv // nk, nk, head_dim)


def linear_attn_reorder(hf_suffix: str, t: torch.Tensor, cfg: ModelConfig, to_gguf: bool) -> torch.Tensor:
    """Apply (to_gguf) or undo the value-head reordering on a linear-attention tensor in HF shape."""
    nk, nv, dk, dv = (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                      cfg.linear_value_head_dim)
    if nk == nv:
        return t
    f = grouped_to_tiled if to_gguf else _tiled_to_grouped
    name = hf_suffix.removeprefix("linear_attn.")
    if name in ("in_proj_qkv.weight", "conv1d.weight"):
        qk = 2 * nk * dk
        return torch.cat([t[:qk], f(t[qk:], 0, nk, nv, dv)], dim=0)
    if name == "in_proj_z.weight":
        return f(t, 0, nk, nv, dv)
    if name in ("in_proj_a.weight", "in_proj_b.weight", "A_log", "dt_bias"):
        return f(t, 0, nk, nv, 1)
    if name == "out_proj.weight":
        return f(t, 1, nk, nv, dv)
    return t


# ---------------------------------------------------------------- reading

def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception as e:  # corrupt metadata
        raise ModelLoadError(f"GGUF metadata {key!r} cannot be read: {e}") from None


def _f32_value(v: float) -> float:
    """Metadata floats are float32: give back the shortest decimal that rounds to the same float32 (1e-06, not
    9.999999974752427e-07)."""
    return float(str(np.float32(v)))


def _raw_loader(t) -> Callable[[], torch.Tensor]:
    """Tensor in its numpy (row-major, HF-like) shape, dequantized: F32/F16/BF16 keep their dtype, quants -> F32."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize
    shape = tuple(int(x) for x in reversed(t.shape))
    qtype = t.tensor_type
    data = t.data

    def load() -> torch.Tensor:
        if qtype == Q.F32 or qtype == Q.F16:
            out = torch.from_numpy(np.array(data))
        elif qtype == Q.BF16:
            out = torch.from_numpy(np.array(data).view(np.int16)).view(torch.bfloat16)
        else:
            out = torch.from_numpy(np.ascontiguousarray(dequantize(data, qtype)))
        return out.reshape(shape)
    return load


def _check_types(reader) -> Counter:
    counts = Counter(t.tensor_type.name for t in reader.tensors)
    bad = {name: [t.name for t in reader.tensors if t.tensor_type.name == name] for name in counts
           if name not in SUPPORTED_TYPES}
    if bad:
        listed = "; ".join(f"{q} ({len(ns)} tensor(s), e.g. {ns[0]})" for q, ns in bad.items())
        raise ModelLoadError(f"unsupported GGUF quant type(s): {listed}; mtpx reads {', '.join(SUPPORTED_TYPES)}")
    return counts


def gguf_config(reader, path: Path) -> tuple[ModelConfig, str, int]:
    """Metadata -> ModelConfig; returns (config, arch, number of main layers)."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHS:
        raise ModelLoadError(f"unsupported GGUF architecture {arch!r} in {path.name}; mtpx reads "
                             f"{', '.join(sorted(ARCHS) + list(ROUTED_ARCHS))}")
    is_moe = ARCHS[arch]

    def key(k: str, default: Any = None, required: bool = True) -> Any:
        v = _field(reader, f"{arch}.{k}", default)
        if v is None and required:
            raise ModelLoadError(f"GGUF {path.name} lacks metadata {arch}.{k}")
        return v

    n_blocks = int(key("block_count"))
    n_mtp = int(key("nextn_predict_layers", 0))
    n_main = n_blocks - n_mtp
    if n_main <= 0:
        raise ModelLoadError(f"{arch}.block_count={n_blocks} leaves no main layers next to {n_mtp} MTP layer(s)")
    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // heads))
    if int(key("attention.value_length", head_dim)) != head_dim:
        raise ModelLoadError("attention.key_length and attention.value_length differ: not a Qwen3.5 model")
    scaling = key("rope.scaling.type", None, required=False)
    if scaling not in (None, "none"):
        raise ModelLoadError(f"unsupported RoPE scaling {scaling!r} (only plain RoPE is implemented)")
    recurrent = key("attention.recurrent_layers", None, required=False)
    if recurrent is not None:
        if len(recurrent) < n_main:
            raise ModelLoadError(f"{arch}.attention.recurrent_layers lists {len(recurrent)} layers, fewer than "
                                 f"the {n_main} main layers")
        layer_types = ["linear_attention" if r else "full_attention" for r in recurrent[:n_main]]
    else:
        interval = int(key("full_attention_interval", 4))
        layer_types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n_main)]
    n_v_heads = int(key("ssm.time_step_rank"))
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise ModelLoadError(f"GGUF {path.name} has no token_embd.weight")
    kw: dict[str, Any] = dict(
        model_type="qwen3_next" if arch == "qwen3next" else "qwen3_5_moe_text" if is_moe else "qwen3_5_text",
        vocab_size=int(embd.shape[1]), hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length", 0, required=not is_moe)),
        num_hidden_layers=n_main, num_attention_heads=heads,
        num_key_value_heads=int(key("attention.head_count_kv")), head_dim=head_dim,
        rms_norm_eps=_f32_value(key("attention.layer_norm_rms_epsilon")),
        rope_theta=_f32_value(key("rope.freq_base", 10000.0)),
        partial_rotary_factor=int(key("rope.dimension_count", head_dim)) / head_dim,
        max_position_embeddings=int(key("context_length", 32768)),
        tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        layer_types=layer_types,
        linear_conv_kernel_dim=int(key("ssm.conv_kernel")),
        linear_key_head_dim=int(key("ssm.state_size")),
        linear_value_head_dim=int(key("ssm.inner_size")) // n_v_heads,
        linear_num_key_heads=int(key("ssm.group_count")),
        linear_num_value_heads=n_v_heads,
        mtp_num_hidden_layers=n_mtp if _field(reader, f"{arch}.nextn_predict_layers") is not None else None,
    )
    if is_moe:
        kw.update(num_experts=int(key("expert_count")), num_experts_per_tok=int(key("expert_used_count")),
                  moe_intermediate_size=int(key("expert_feed_forward_length")))
        shexp = key("expert_shared_feed_forward_length", None, required=False)
        if shexp is None:
            t = next((t for t in reader.tensors if t.name == "blk.0.ffn_up_shexp.weight"), None)
            shexp = int(t.shape[1]) if t is not None else kw["moe_intermediate_size"]
        kw["shared_expert_intermediate_size"] = int(shexp)
    eos = [_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    kw["eos_token_id"] = list(dict.fromkeys(int(e) for e in eos if e is not None))
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    kw["bos_token_id"] = int(bos) if bos is not None else None
    cfg = ModelConfig(**kw)
    cfg.validate()
    return cfg, arch, n_main


def _map_tensors(reader, cfg: ModelConfig, n_main: int, quantized: dict | None = None) -> tuple[dict, dict]:
    """GGUF tensors -> internal names, loaders (with the converter's transforms undone) and shapes; `quantized`
    gets the loaders of quantized matrices kept as they are (gguf_blocks.kept_loader)."""
    by_name = {t.name: t for t in reader.tensors}
    next_layout = cfg.model_type == "qwen3_next"
    gguf_to_hf_layer = {g: h for h, g in LAYER_NAMES.items()}
    if next_layout:
        gguf_to_hf_layer.update({g: h for h, g in NEXT_NAMES.items()})
    tensors: dict[str, Callable[[], torch.Tensor]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    gate_up: dict[str, dict[str, Any]] = {}

    def add(hf: str, t, gguf_suffix: str) -> None:
        raw = _raw_loader(t)
        shape = tuple(int(x) for x in reversed(t.shape))
        hf_suffix = hf.split(".", 3)[-1] if hf.startswith(("model.layers.", "mtp.layers.")) else hf
        if gguf_suffix == "ssm_conv1d.weight":
            shape = (shape[0], 1, shape[1])
        elif gguf_suffix == "ffn_gate_inp_shexp.weight" and len(shape) == 1:
            shape = (1, shape[0])  # ggml drops trailing size-1 dims: llama-quantize writes it as 1-D
        if quantized is not None and not next_layout and (kept := kept_loader(t, shape, hf_suffix, cfg)):
            quantized[hf] = kept

        def load(raw=raw, gguf_suffix=gguf_suffix, hf_suffix=hf_suffix, shape=shape) -> torch.Tensor:
            x = raw()
            if is_offset_norm(gguf_suffix):
                x = x.float() - 1.0
            elif gguf_suffix == "ssm_a":
                x = torch.log(-x.double()).float()
            if hf_suffix.startswith("linear_attn.") and not next_layout:
                x = linear_attn_reorder(hf_suffix, x.reshape(shape[0], -1) if x.dim() > 1 else x, cfg,
                                        to_gguf=False)
            return x.reshape(shape)
        tensors[hf] = load
        shapes[hf] = shape

    for name, t in by_name.items():
        if name in GLOBAL_NAMES.values():
            hf = next(h for h, g in GLOBAL_NAMES.items() if g == name)
            add(hf, t, name)
            continue
        m = re.match(r"^blk\.(\d+)\.(.+)$", name)
        if not m:
            raise ModelLoadError(f"unexpected GGUF tensor {name} {list(reversed([int(x) for x in t.shape]))}")
        bid, suffix = int(m[1]), m[2]
        if bid < n_main:
            prefix, layer_type = f"model.layers.{bid}.", cfg.layer_types[bid]
        else:
            prefix, layer_type = f"mtp.layers.{bid - n_main}.", "full_attention"
            if suffix.startswith("nextn."):
                if suffix in MTP_OPTIONAL_SHARED:
                    _check_same(t, by_name.get(MTP_OPTIONAL_SHARED[suffix])
                                or by_name.get("token_embd.weight"), name)
                    continue
                hf = next((h for h, g in MTP_NAMES.items() if g == suffix), None)
                if hf is None or bid != n_main:
                    raise ModelLoadError(f"unexpected GGUF MTP tensor {name}")
                add(hf, t, suffix)
                continue
        if suffix in ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_gate_up_exps.weight"):
            gate_up.setdefault(prefix, {})[suffix] = t
            continue
        if suffix == "attn_qkv.weight" and layer_type == "full_attention":
            _split_fused_qkv(prefix, t, cfg, tensors, shapes, quantized)
            continue
        hf_suffix = gguf_to_hf_layer.get(suffix)
        if hf_suffix is None:
            raise ModelLoadError(f"unexpected GGUF tensor {name} {list(reversed([int(x) for x in t.shape]))}")
        add(prefix + hf_suffix, t, suffix)

    keep = quantized is not None and not next_layout
    for prefix, parts in gate_up.items():
        hf = prefix + GATE_UP_EXPERTS
        if "ffn_gate_up_exps.weight" in parts:
            t = parts["ffn_gate_up_exps.weight"]
            tensors[hf] = _raw_loader(t)
            shapes[hf] = tuple(int(x) for x in reversed(t.shape))
            if keep and (kept := kept_loader(t, shapes[hf], GATE_UP_EXPERTS, cfg)):
                quantized[hf] = kept
            continue
        if set(parts) != {"ffn_gate_exps.weight", "ffn_up_exps.weight"}:
            raise ModelLoadError(f"{prefix}: routed experts need both ffn_gate_exps and ffn_up_exps, found "
                                 f"{sorted(parts)}")
        g, u = (_raw_loader(parts[k]) for k in ("ffn_gate_exps.weight", "ffn_up_exps.weight"))
        if keep:
            kept = kept_gate_up(*(kept_loader(parts[k], tuple(int(x) for x in reversed(parts[k].shape)),
                                              GATE_UP_EXPERTS, cfg)
                                  for k in ("ffn_gate_exps.weight", "ffn_up_exps.weight")), cfg.num_experts)
            if kept:
                quantized[hf] = kept

        def load_gate_up(g=g, u=u) -> torch.Tensor:
            a, b = g(), u()
            if a.dtype != b.dtype:
                a, b = a.float(), b.float()
            return torch.cat([a, b], dim=1)
        tensors[hf] = load_gate_up
        ge, gi, gh = (int(x) for x in reversed(parts["ffn_gate_exps.weight"].shape))
        shapes[hf] = (ge, 2 * gi, gh)
    if next_layout:
        split_projections(cfg, tensors, shapes)
    return tensors, shapes


def _split_fused_qkv(prefix: str, t, cfg: ModelConfig, tensors: dict, shapes: dict,
                     quantized: dict | None = None) -> None:
    """A full-attention layer stored with fused `attn_qkv` (rows: q+gate, k, v) -> q_proj, k_proj, v_proj."""
    raw = _raw_loader(t)
    q = 2 * cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    spans = {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv)}
    kept = kept_loader(t, (q + 2 * kv, cfg.hidden_size), "self_attn.qkv", cfg) if quantized is not None else None
    for n, (a, b) in spans.items():
        tensors[f"{prefix}self_attn.{n}.weight"] = lambda raw=raw, a=a, b=b: raw()[a:b].clone()
        shapes[f"{prefix}self_attn.{n}.weight"] = (b - a, cfg.hidden_size)
        if kept:
            quantized[f"{prefix}self_attn.{n}.weight"] = kept if isinstance(kept, Refused) else \
                Kept(lambda kept=kept, a=a, b=b: kept().take_rows(slice(a, b)), kept.qtype)


def _check_same(t, main, name: str) -> None:
    if main is None or t.tensor_type != main.tensor_type or not np.array_equal(np.asarray(t.data),
                                                                               np.asarray(main.data)):
        raise ModelLoadError(f"GGUF tensor {name}: an MTP embedding / output head of its own is not supported "
                             "(mtpx's MTP layer shares the main model's)")


# ---------------------------------------------------------------- tokenizer

def gguf_tokenizer(reader) -> Tokenizer | None:
    """Rebuild a byte-level BPE `tokenizers` tokenizer from tokenizer.ggml.* metadata."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    model = _field(reader, "tokenizer.ggml.model")
    if model is None:
        return None
    if model != "gpt2":
        raise ModelLoadError(f"unsupported GGUF tokenizer model {model!r}: mtpx rebuilds byte-level BPE ('gpt2') "
                             "tokenizers only")
    pre = _field(reader, "tokenizer.ggml.pre")
    if pre not in PRE_TOKENIZERS:
        raise ModelLoadError(f"unsupported GGUF pre-tokenizer {pre!r}; mtpx rebuilds {sorted(PRE_TOKENIZERS)}")
    tokens = list(_field(reader, "tokenizer.ggml.tokens") or [])
    types = list(_field(reader, "tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
    merges = list(_field(reader, "tokenizer.ggml.merges") or [])
    if len(types) != len(tokens):
        raise ModelLoadError(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    vocab = {tok: i for i, (tok, ty) in enumerate(zip(tokens, types)) if ty != TOKEN_UNUSED}
    pairs = []
    for m in merges:
        cut = m.find(" ", 1)
        if cut < 0:
            raise ModelLoadError(f"malformed BPE merge {m!r} in tokenizer.ggml.merges")
        pairs.append((m[:cut], m[cut + 1:]))
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    regex = PRE_TOKENIZERS[pre]
    if regex is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(tokens[i], special=True, normalized=False)
                for i, ty in enumerate(types) if ty == TOKEN_CONTROL]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, ty in enumerate(types) if ty == TOKEN_USER_DEFINED]
    if specials:
        tok.add_special_tokens(specials)
    if user:
        tok.add_tokens(user)

    def text(key: str) -> str | None:
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None
    template = _field(reader, "tokenizer.chat_template")
    return Tokenizer(tok, template, text("bos"), text("eos"))


# ---------------------------------------------------------------- entry point

def load_gguf_checkpoint(path: Path) -> Checkpoint:
    from gguf import GGUFReader
    path = Path(path)
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # bad magic, truncated file, ...
        raise ModelLoadError(f"cannot read GGUF file {path.name}: {e}") from None
    arch = _field(reader, "general.architecture")
    if arch in ROUTED_ARCHS:
        from mtpx.loading.gguf_routed import routed_config, routed_tensors
        cfg, n_main = routed_config(reader, arch, path)
        counts = _check_types(reader)
        tensors, shapes = routed_tensors(reader, cfg, arch, n_main)
    else:
        cfg, arch, n_main = gguf_config(reader, path)
        counts = _check_types(reader)
        tensors, shapes = _map_tensors(reader, cfg, n_main, quantized := {})
    tokenizer = gguf_tokenizer(reader)
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise ModelLoadError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                             f"{cfg.vocab_size}")
    extra = {"format": "gguf", "gguf_arch": arch, "tensor_types": dict(counts)}
    sampling = {name: _field(reader, f"general.sampling.{key}") for key, name in GGUF_SAMPLING.items()}
    defaults = sampling_defaults({k: v for k, v in sampling.items() if v is not None}, path.name)
    return Checkpoint(cfg, tensors, shapes, tokenizer, path, extra, defaults,
                      quantized=quantized if arch not in ROUTED_ARCHS else {})
