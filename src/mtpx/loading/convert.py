"""`mtpx convert --to gguf IN OUT [--outtype bf16|f16|q8_0|q4_0|q4_k|f32]`: a GGUF llama.cpp loads, MTP layer and all.
Longer than 400 lines because the tensor plan, the tensors, the tokenizer and the metadata of one file are written
together (the routed-MoE families' names and metadata are loading/gguf_routed.py's).

The file follows what llama.cpp's own converter writes for `Qwen3_5ForCausalLM` / `Qwen3_5MoeForCausalLM` (arch
`qwen35` / `qwen35moe`): the same metadata keys, tensor names and transforms (see `mtpx.loading.gguf`), the MTP block
as `blk.{n_main}.*` with `nextn.*`, and the same per-tensor types: 1-D tensors, norms, the router (`ffn_gate_inp*`)
and `ssm_conv1d` are F32; with q8_0 / q4_0, a tensor whose rows are not a multiple of 32 falls back to F16. q4_k
is llama.cpp's Q4_K_S mix made simple (file type MOSTLY_Q4_K_S): matrices in Q4_K (loading/kquants.py), the output
head and the embedding in Q6_K, rows that do not split into 256-blocks in Q8_0 (or F16 below 32-blocks); unlike
llama-quantize's Q4_K_S / _M it gives no layer's attn_v / ffn_down more bits.

Qwen3-Next is written as arch `qwen3next` with its fused `ssm_in` / `ssm_ba`; GLM-4.5 and DeepSeek-V3 as `glm4moe` /
`deepseek2` (loading/gguf_routed.py).

With bf16 / f16 every weight is first rounded to that type, also those stored as F32 (except the routers'
e_score_correction_bias, which mtpx keeps in fp32), so that loading the GGUF back in mtpx gives exactly the model the
checkpoint gives at that dtype.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from mtpx.config import ModelConfig, RoutedMoEConfig
from mtpx.errors import ModelLoadError
from mtpx.loading.checkpoint import Checkpoint, count_mtp_layers, load_checkpoint
from mtpx.loading.gguf import (GATE_UP_EXPERTS, GLOBAL_NAMES, LAYER_NAMES, MTP_NAMES, NEXT_NAMES, PRE_TOKENIZERS,
                               TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNUSED, TOKEN_USER_DEFINED, is_offset_norm,
                               linear_attn_reorder)
from mtpx.models.qwen3_next import join_projections
from mtpx.tokenizer import Tokenizer

OUTTYPES = ("bf16", "f16", "q8_0", "q4_0", "q4_k", "f32")
F32_SUFFIXES = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", "ssm_conv1d.weight")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--to", required=True, choices=["gguf"], help="output format")
    p.add_argument("input", help="checkpoint directory, .gguf file or 'demo' to convert")
    p.add_argument("output", help="output .gguf file")
    p.add_argument("--outtype", default="bf16", choices=OUTTYPES,
                   help="weight type: bf16 (default), f16, q8_0 (8-bit, about half the size), q4_0 (4-bit), q4_k "
                   "(llama.cpp's K-quants as in its Q4_K_S, simplified: Q4_K matrices, output head and embedding in "
                   "Q6_K), f32")
    p.add_argument("--no-mtp", action="store_true", help="leave the MTP layer out")
    p.add_argument("--name", default=None, help="general.name written into the file (default: the input's name)")


def main(args: argparse.Namespace) -> int:
    from mtpx.llm import resolve_model_path  # `demo` names the bundled checkpoint
    ckpt = load_checkpoint(resolve_model_path(args.input))
    out = Path(args.output)
    summary = write_gguf(ckpt, out, args.outtype, with_mtp=not args.no_mtp, name=args.name)
    for note in summary["notes"]:
        print(f"mtpx convert: warning: {note}", file=sys.stderr)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): arch {summary['arch']}, "
          f"{summary['n_main']} layers + {summary['n_mtp']} MTP, {summary['n_tensors']} tensors "
          f"({', '.join(f'{k} {v}' for k, v in sorted(summary['types'].items()))})", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- tensors

def _round_dtype(outtype: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "f16": torch.float16}.get(outtype)


def _export_names(ckpt: Checkpoint, with_mtp: bool) -> list[str]:
    """Internal names to export, in file order: embedding, blocks (MTP last), output norm and head."""
    cfg = ckpt.config
    n_main = cfg.num_hidden_layers
    names = [n for n in ckpt.tensors if with_mtp or not n.startswith("mtp.")]
    if cfg.tie_word_embeddings:
        names = [n for n in names if n != "lm_head.weight"]

    def order(n: str) -> tuple:
        m = re.match(r"^(model|mtp)\.layers\.(\d+)\.", n)
        if m:
            return (1, int(m[2]) + (n_main if m[1] == "mtp" else 0), n)
        if n in MTP_NAMES:
            return (1, n_main, n)
        return (0 if n == "model.embed_tokens.weight" else 2, 0, n)
    return sorted(names, key=order)


# Qwen3-Next: the internal (Qwen3.5) projection that carries the fused GGUF tensor, and the one folded into it
NEXT_JOINS = {"linear_attn.in_proj_qkv.weight": ("linear_attn.in_proj_z.weight", "linear_attn.in_proj_qkvz.weight"),
              "linear_attn.in_proj_b.weight": ("linear_attn.in_proj_a.weight", "linear_attn.in_proj_ba.weight")}
NEXT_FOLDED = {folded for folded, _ in NEXT_JOINS.values()}


def _gguf_names(hf: str, n_main: int, next_layout: bool = False) -> list[str]:
    """GGUF name(s) of an internal tensor (routed experts' gate_up_proj is stored as two tensors; with Qwen3-Next's
    layout, in_proj_qkv + in_proj_z as one, in_proj_b + in_proj_a as one)."""
    suffix = hf.split(".", 3)[-1]
    if next_layout and suffix in NEXT_FOLDED:
        return []
    if next_layout and suffix in NEXT_JOINS:
        return [f"blk.{int(hf.split('.')[2])}.{NEXT_NAMES[NEXT_JOINS[suffix][1]]}"]
    if hf in GLOBAL_NAMES:
        return [GLOBAL_NAMES[hf]]
    if hf in MTP_NAMES:
        return [f"blk.{n_main}.{MTP_NAMES[hf]}"]
    m = re.match(r"^(model|mtp)\.layers\.(\d+)\.(.+)$", hf)
    if not m or (m[3] not in LAYER_NAMES and m[3] != GATE_UP_EXPERTS):
        raise ModelLoadError(f"tensor {hf} has no GGUF name")
    bid = int(m[2]) + (n_main if m[1] == "mtp" else 0)
    if m[3] == GATE_UP_EXPERTS:
        return [f"blk.{bid}.ffn_gate_exps.weight", f"blk.{bid}.ffn_up_exps.weight"]
    return [f"blk.{bid}.{LAYER_NAMES[m[3]]}"]


def _gguf_shapes(hf: str, shape: tuple[int, ...], cfg: ModelConfig | None = None) -> list[tuple[int, ...]]:
    """Row-major shapes of the GGUF tensor(s) `_gguf_names` gives, from the internal shape."""
    if cfg is not None and cfg.model_type == "qwen3_next":
        suffix = hf.split(".", 3)[-1]
        if suffix in NEXT_FOLDED:
            return []
        if suffix == "linear_attn.in_proj_qkv.weight":
            return [(shape[0] + cfg.linear_num_value_heads * cfg.linear_value_head_dim, shape[1])]
        if suffix == "linear_attn.in_proj_b.weight":
            return [(2 * shape[0], shape[1])]
    if hf.endswith(GATE_UP_EXPERTS):
        e, two_i, h = shape
        return [(e, two_i // 2, h)] * 2
    if hf.endswith("linear_attn.conv1d.weight"):
        return [(shape[0], shape[2])]
    return [tuple(shape)]


def gguf_tensors(ckpt: Checkpoint, outtype: str, with_mtp: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Internal (HF) tensors -> (GGUF name, float32 tensor in llama.cpp's layout and transforms), one at a time."""
    cfg = ckpt.config
    n_main = cfg.num_hidden_layers
    rounding = _round_dtype(outtype)
    next_layout = cfg.model_type == "qwen3_next"

    def load(name: str) -> torch.Tensor:
        x = ckpt.tensors[name]()
        return (x.to(rounding) if rounding is not None else x).float()
    for hf in _export_names(ckpt, with_mtp):
        gnames = _gguf_names(hf, n_main, next_layout)
        if not gnames:
            continue
        suffix = hf.split(".", 3)[-1]
        if next_layout and suffix in NEXT_JOINS:
            base = hf[:-len(suffix)]
            b = base + "linear_attn.in_proj_b.weight"
            if suffix == "linear_attn.in_proj_qkv.weight":
                qkvz, _ = join_projections(load(hf), load(base + "linear_attn.in_proj_z.weight"), load(b),
                                           load(base + "linear_attn.in_proj_a.weight"), cfg)
                yield gnames[0], qkvz.contiguous()
            else:
                _, ba = join_projections(load(base + "linear_attn.in_proj_qkv.weight"),
                                         load(base + "linear_attn.in_proj_z.weight"), load(hf),
                                         load(base + "linear_attn.in_proj_a.weight"), cfg)
                yield gnames[0], ba.contiguous()
            continue
        x = load(hf)
        if hf.endswith(GATE_UP_EXPERTS):
            gate, up = x.chunk(2, dim=1)
            yield gnames[0], gate.contiguous()
            yield gnames[1], up.contiguous()
            continue
        gname = gnames[0]
        suffix = hf.split(".", 3)[-1] if hf.startswith(("model.layers.", "mtp.layers.")) else hf
        if suffix.startswith("linear_attn.") and not next_layout:
            x = linear_attn_reorder(suffix, x, cfg, to_gguf=True)
        gsuffix = gname.split(".", 2)[-1] if gname.startswith("blk.") else gname
        if gsuffix == "ssm_conv1d.weight":
            x = x.squeeze(1)
        elif gsuffix == "ssm_a":
            x = -torch.exp(x)
        elif is_offset_norm(gsuffix):
            x = x + 1.0
        yield gname, x.contiguous()


def tensor_plan(ckpt: Checkpoint, outtype: str, with_mtp: bool = True) -> list[tuple[str, tuple[int, ...], object]]:
    """(GGUF name, row-major shape, GGML type) of every tensor, in file order, without loading any data."""
    n_main = ckpt.config.num_hidden_layers
    plan = []
    for hf in _export_names(ckpt, with_mtp):
        for gname, shape in zip(_gguf_names(hf, n_main, ckpt.config.model_type == "qwen3_next"),
                                _gguf_shapes(hf, ckpt.shapes[hf], ckpt.config)):
            plan.append((gname, shape, tensor_type(gname, shape, outtype)))
    return plan


def tensor_type(gname: str, shape: tuple[int, ...], outtype: str):
    """The GGML type llama.cpp's converter picks for this tensor."""
    from gguf import GGMLQuantizationType as Q
    if len(shape) <= 1 or gname.endswith("_norm.weight") or gname.endswith(F32_SUFFIXES) \
            or not gname.endswith(".weight"):
        return Q.F32
    if outtype in ("q8_0", "q4_0", "q4_k") and shape[-1] % 32:
        return Q.F16  # as llama.cpp's converter does when rows don't split into 32-blocks
    if outtype == "q4_k":
        if shape[-1] % 256:
            return Q.Q8_0
        return Q.Q6_K if gname in ("output.weight", "token_embd.weight") else Q.Q4_K
    return {"bf16": Q.BF16, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "f32": Q.F32}[outtype]


def encode_tensor(gname: str, x: torch.Tensor, qtype) -> np.ndarray:
    """Float32 tensor -> numpy data of GGML type `qtype` (quantized types as uint8 rows of blocks)."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize
    if qtype == Q.F32:
        return x.numpy().astype(np.float32, copy=False)
    if qtype == Q.F16:
        data = x.to(torch.float16).numpy()
        if not np.isfinite(data).all():
            raise ModelLoadError(f"tensor {gname} overflows float16; use --outtype bf16")
        return data
    if qtype == Q.BF16:
        return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
    if qtype in (Q.Q4_K, Q.Q6_K):  # on the GPU where there is one: a 27B-shaped file then takes seconds
        from mtpx.loading import kquants
        return kquants.quantize(x, qtype.name, "cuda" if torch.cuda.is_available() else None, gname)
    return quantize(x.numpy(), qtype)


# ---------------------------------------------------------------- tokenizer

def detect_pre_tokenizer(spec: dict) -> str:
    """tokenizer.json's pre_tokenizer -> the llama.cpp pre-tokenizer name that splits text the same way."""
    pt = spec.get("pre_tokenizer")
    if pt and pt.get("type") == "ByteLevel" and pt.get("use_regex", True) and not pt.get("add_prefix_space"):
        return "gpt-2"
    if pt and pt.get("type") == "Sequence":
        parts = pt.get("pretokenizers") or []
        if (len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel"
                and not parts[1].get("use_regex", True) and not parts[1].get("add_prefix_space")
                and str(parts[0].get("behavior")).lower() == "isolated" and not parts[0].get("invert")):
            regex = (parts[0].get("pattern") or {}).get("Regex")
            for name in ("qwen35", "qwen2"):
                if regex == PRE_TOKENIZERS[name]:
                    return name
    raise ModelLoadError(f"the tokenizer's pre-tokenizer ({json.dumps(pt)[:200]}) has no llama.cpp equivalent mtpx "
                         "knows (GPT-2 ByteLevel, Qwen2 or Qwen3.5 split regex): llama.cpp would tokenize differently")


def tokenizer_metadata(tok: Tokenizer, cfg: ModelConfig) -> dict:
    """What llama.cpp needs of a byte-level BPE tokenizer: tokens padded to the vocab size, types, merges, ids."""
    hf = tok.backend
    spec = json.loads(hf.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ModelLoadError(f"tokenizer model {model.get('type')!r} is not BPE: only byte-level BPE tokenizers "
                             "are exported")
    pre = detect_pre_tokenizer(spec)
    n = cfg.vocab_size
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [TOKEN_UNUSED] * n
    for text, i in hf.get_vocab(with_added_tokens=True).items():
        if i >= n:
            raise ModelLoadError(f"token {text!r} has id {i}, beyond the model's vocab_size {n}")
        tokens[i], types[i] = text, TOKEN_NORMAL
    for i, added in hf.get_added_tokens_decoder().items():
        text = added.content
        looks_special = text.startswith("<|") and text.endswith("|>")
        tokens[i] = text
        types[i] = TOKEN_CONTROL if added.special or looks_special else TOKEN_USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    ids: dict[str, int] = {}
    eos = hf.token_to_id(tok.eos_token) if tok.eos_token else None
    eos_ids = list(dict.fromkeys(([eos] if eos is not None else []) + list(cfg.eos_token_id)))
    if eos_ids:
        ids["eos"] = eos_ids[0]
    if len(eos_ids) > 1:
        ids["eot"] = eos_ids[1]
    bos = hf.token_to_id(tok.bos_token) if tok.bos_token else cfg.bos_token_id
    if bos is not None:
        ids["bos"] = bos
    return {"pre": pre, "tokens": tokens, "types": types, "merges": merges, "ids": ids,
            "chat_template": tok.chat_template}


# ---------------------------------------------------------------- file

def mrope_sections(rotary_dim: int) -> list[int]:
    """llama.cpp's qwen35 graph applies interleaved M-RoPE and requires `rope.dimension_sections`. For text every
    section carries the same position, so any split works as long as each rotary pair falls in the t/h/w sections
    and they sum to at most the rotary pairs (ggml asserts it). This gives [11, 11, 10, 0] for Qwen3.5's 64 rotary
    dims (32 pairs), the sections the real models and llama.cpp's converter use."""
    pairs = rotary_dim // 2
    return [(pairs + 2) // 3, (pairs + 1) // 3, pairs // 3, 0]


def _attention_interval(layer_types: list[str]) -> int:
    for k in range(1, len(layer_types) + 1):
        if all((t == "full_attention") == ((i + 1) % k == 0) for i, t in enumerate(layer_types)):
            return k
    return 4  # irregular pattern: attention.recurrent_layers carries it


def _qwen35_metadata(w, cfg: ModelConfig, arch: str, n_mtp: int, ftype) -> None:
    n_main = cfg.num_hidden_layers
    w.add_block_count(n_main + n_mtp)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if cfg.is_moe:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_file_type(ftype)
    if cfg.is_moe:
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    if n_mtp:
        w.add_nextn_predict_layers(n_mtp)
    w.add_ssm_conv_kernel(cfg.linear_conv_kernel_dim)
    w.add_ssm_state_size(cfg.linear_key_head_dim)
    w.add_ssm_group_count(cfg.linear_num_key_heads)
    w.add_ssm_time_step_rank(cfg.linear_num_value_heads)
    w.add_ssm_inner_size(cfg.linear_value_head_dim * cfg.linear_num_value_heads)
    w.add_array(f"{arch}.attention.recurrent_layers",
                [t == "linear_attention" for t in cfg.layer_types] + [False] * n_mtp)
    w.add_full_attention_interval(_attention_interval(cfg.layer_types))
    w.add_rope_dimension_count(cfg.rotary_dim)
    if arch != "qwen3next":  # Qwen3-Next's RoPE is plain, not M-RoPE
        w.add_rope_dimension_sections(mrope_sections(cfg.rotary_dim))


def _routed_names(hf: str, ckpt: Checkpoint) -> list[str]:
    """GGUF names of an internal tensor of a routed-MoE family, without loading it."""
    from mtpx.loading.gguf_routed import export_arch, layer_names
    cfg = ckpt.config
    m = re.match(r"^(model|mtp)\.layers\.(\d+)\.(.+)$", hf)
    if not m:
        from mtpx.loading.gguf_routed import GLOBAL
        return [GLOBAL[hf]]
    blk = f"blk.{int(m[2]) + (cfg.num_hidden_layers if m[1] == 'mtp' else 0)}."
    if m[3] == "mlp.experts.gate_up_proj":
        return [blk + "ffn_gate_exps.weight", blk + "ffn_up_exps.weight"]
    if m[3] == "self_attn.kv_b_proj.weight":
        return [blk + "attn_k_b.weight", blk + "attn_v_b.weight"]
    return [blk + layer_names(export_arch(cfg))[m[3]]]


def write_gguf(ckpt: Checkpoint, out: Path, outtype: str = "bf16", with_mtp: bool = True,
               name: str | None = None) -> dict:
    import gguf
    if outtype not in OUTTYPES:
        raise ModelLoadError(f"unknown --outtype {outtype!r}; choose from {', '.join(OUTTYPES)}")
    cfg = ckpt.config
    if cfg.rotary_dim > cfg.head_dim:
        raise ModelLoadError("rotary dim exceeds head_dim")
    notes = []
    if cfg.linear_key_head_dim != cfg.linear_value_head_dim:
        # llama.cpp's qwen35 loader takes both head sizes from ssm.state_size; mtpx reads such files back fine
        notes.append(f"linear_key_head_dim ({cfg.linear_key_head_dim}) != linear_value_head_dim "
                     f"({cfg.linear_value_head_dim}): llama.cpp's qwen35 loader assumes they are equal and will "
                     "refuse this file")
    if ckpt.tokenizer is None:
        raise ModelLoadError(f"{ckpt.path} has no tokenizer: llama.cpp needs one inside the GGUF")
    tok = tokenizer_metadata(ckpt.tokenizer, cfg)
    n_main = cfg.num_hidden_layers
    n_mtp = count_mtp_layers(ckpt.shapes) if with_mtp else 0
    arch = "qwen3next" if cfg.model_type == "qwen3_next" else "qwen35moe" if cfg.is_moe else "qwen35"
    if isinstance(cfg, RoutedMoEConfig):
        from mtpx.loading.gguf_routed import export_arch
        arch = export_arch(cfg)
    ftype = {"bf16": gguf.LlamaFileType.MOSTLY_BF16, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
             "q4_k": gguf.LlamaFileType.MOSTLY_Q4_K_S, "f32": gguf.LlamaFileType.ALL_F32}[outtype]

    w = gguf.GGUFWriter(str(out), arch)
    w.add_type("model")
    w.add_name(name or (ckpt.path.stem if ckpt.path.is_file() else ckpt.path.resolve().name))
    routed = isinstance(cfg, RoutedMoEConfig)
    if routed:  # glm4moe / deepseek2: loading/gguf_routed.py
        from mtpx.loading import gguf_routed
        gguf_routed.write_metadata(w, cfg, n_mtp)
        w.add_file_type(ftype)
    else:
        _qwen35_metadata(w, cfg, arch, n_mtp, ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    for kind, i in tok["ids"].items():
        getattr(w, f"add_{kind}_token_id")(i)
    if tok["chat_template"]:
        w.add_chat_template(tok["chat_template"])

    # tensor infos first, then the data one tensor at a time: memory stays at one tensor, whatever the model size
    from gguf.quants import quant_shape_to_byte_shape
    if routed:
        names = _export_names(ckpt, with_mtp)
        plan = [(g, shape, tensor_type(g, shape, outtype)) for hf in names
                for g, shape in zip(_routed_names(hf, ckpt), gguf_routed.export_shapes(cfg, hf, ckpt.shapes[hf]))]
        data = gguf_routed.export_tensors(ckpt, names, _round_dtype(outtype))
    else:
        plan, data = tensor_plan(ckpt, outtype, with_mtp), gguf_tensors(ckpt, outtype, with_mtp)
    types: dict[str, int] = {}
    for gname, shape, qtype in plan:
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
            w.add_tensor_info(gname, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
        else:
            byte_shape = quant_shape_to_byte_shape(shape, qtype)
            w.add_tensor_info(gname, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
        types[qtype.name] = types.get(qtype.name, 0) + 1
    out.parent.mkdir(parents=True, exist_ok=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    written = 0
    for (gname, x), (planned, shape, qtype) in zip(data, plan):
        if gname != planned or tuple(x.shape) != tuple(shape):
            raise ModelLoadError(f"tensor {gname} {list(x.shape)} does not match the planned {planned} {list(shape)}")
        w.write_tensor_data(encode_tensor(gname, x, qtype))
        written += 1
    w.close()
    if written != len(plan):
        raise ModelLoadError(f"wrote {written} of {len(plan)} tensors")
    n_tensors = written
    return {"arch": arch, "n_main": n_main, "n_mtp": n_mtp, "n_tensors": n_tensors, "types": types, "notes": notes}
