"""Load a model from a checkpoint directory (config.json + safetensors + tokenizer files) or a GGUF file.

Tensors are checked against the model's expected names and shapes before anything is built, and errors name the
tensor, the expected and the found shape. Only safetensors / GGUF are read; pickle files are never loaded.
"""
from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from torch import nn

from mtpx.config import ModelConfig, read_json
from mtpx.errors import ModelLoadError, RequestError
from mtpx.models.interface import CausalLM
from mtpx.models.qwen3_next import split_projections
from mtpx.models.registry import family
from mtpx.sampling import SamplingParams
from mtpx.tokenizer import Tokenizer

log = logging.getLogger(__name__)

IGNORED_PREFIXES = ("model.visual.", "visual.")  # vision tower of the multimodal (nested) checkpoints: text-only engine


@dataclass
class Checkpoint:
    """A checkpoint in internal (HF, flat) names, before it is turned into a model."""
    config: ModelConfig
    tensors: dict[str, Callable[[], torch.Tensor]]  # name -> loader (lazy, memory-mapped)
    shapes: dict[str, tuple[int, ...]]
    tokenizer: Tokenizer | None
    path: Path
    extra: dict = field(default_factory=dict)
    # the sampling its authors recommend (generation_config.json, GGUF general.sampling.*): SamplingParams fields
    sampling_defaults: dict = field(default_factory=dict)
    # name -> loader of the weight as a GroupedWeight holding the stored values exactly (a GGUF's quantized blocks
    # kept: loading/gguf_blocks.py), for runs with int4 / int8 weights; a loader with a `refused` reason stands for
    # a quantized type that cannot be kept
    quantized: dict[str, Callable] = field(default_factory=dict)


SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")  # the ones vLLM takes too


def sampling_defaults(raw: dict, source: str) -> dict:
    """The SamplingParams fields a generation config sets. `do_sample: false` means greedy (as in transformers);
    top_k -1 means off. A value SamplingParams rejects is left out, with a warning that names it."""
    found = {k: raw[k] for k in SAMPLING_KEYS
             if isinstance(raw.get(k), (int, float)) and not isinstance(raw.get(k), bool)}
    if raw.get("do_sample") is False:
        found = {"temperature": 0.0, **{k: v for k, v in found.items() if k == "repetition_penalty"}}
    if "top_k" in found:
        found["top_k"] = max(int(found["top_k"]), 0)
    valid = {}
    for key, value in found.items():
        try:
            SamplingParams(**{key: value})
        except RequestError as e:
            log.warning("%s: ignoring the sampling default %s = %r: %s", source, key, value, e)
            continue
        valid[key] = value
    return valid


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index.name} has no 'weight_map'")
        files = sorted({path / f for f in weight_map.values()})
        for f in files:
            if not f.exists():
                raise ModelLoadError(f"shard {f.name} listed in {index.name} is missing")
        return files
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {pickles}: pickle checkpoints are not loaded; convert them to safetensors)" if pickles else ""
        raise ModelLoadError(f"no *.safetensors weights in {path}{hint}")
    return files


def _read_tensor(file: Path, name: str) -> torch.Tensor:
    """A tensor of a safetensors file: a view of the file mapped for it alone, so that the file's pages it touched
    leave the process's memory with it (a mapping shared by every tensor of the file would keep every page read
    resident until the load ends: the whole checkpoint, where weights are quantized as they are read)."""
    return safe_open(str(file), framework="pt").get_tensor(name)


def _internal_name(name: str, prefix: str) -> str | None:
    if name.startswith(IGNORED_PREFIXES):
        return None
    if prefix != "model." and name.startswith(prefix):
        return "model." + name[len(prefix):]
    return name


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        from mtpx.loading.gguf import load_gguf_checkpoint
        return load_gguf_checkpoint(path)
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} is neither a checkpoint directory nor a .gguf file")
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path} has no config.json")
    raw = read_json(path / "config.json")
    cfg = ModelConfig.from_hf_dict(raw)
    defaults = {}
    if (path / "generation_config.json").exists():
        generation = read_json(path / "generation_config.json")
        eos = generation.get("eos_token_id")
        if eos is not None:
            eos = [eos] if isinstance(eos, int) else list(eos)
            cfg.eos_token_id = list(dict.fromkeys(eos + cfg.eos_token_id))
        defaults = sampling_defaults(generation, "generation_config.json")
    tensors: dict[str, Callable[[], torch.Tensor]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for file in _safetensors_files(path):
        try:
            handle = safe_open(str(file), framework="pt")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ModelLoadError(f"cannot read {file.name}: {e}") from None
        for name in handle.keys():
            internal = _internal_name(name, cfg.weight_prefix)
            if internal is None:
                continue
            shapes[internal] = tuple(handle.get_slice(name).get_shape())
            tensors[internal] = functools.partial(_read_tensor, file, name)
    _dequantize_fp8_blocks(raw.get("quantization_config"), tensors, shapes)
    if cfg.MTP_IN_LAYERS:
        rename_nextn_layers(cfg, tensors, shapes)
    if cfg.model_type == "qwen3_next":
        split_projections(cfg, tensors, shapes)
    _merge_per_expert_weights(tensors, shapes)
    tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").exists() else None
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise ModelLoadError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                             f"{cfg.vocab_size}: tokenizer and weights do not belong together")
    return Checkpoint(cfg, tensors, shapes, tokenizer, path, sampling_defaults=defaults)


def _dequantize_fp8_blocks(quant: dict | None, tensors: dict, shapes: dict) -> None:
    """Block-scaled FP8 checkpoints (DeepSeek-V3's and GLM-4.5-FP8's `quant_method: fp8`, `weight_block_size` [bn, bk]):
    each `X.weight` (float8_e4m3fn) with its `X.weight_scale_inv` [ceil(N / bn), ceil(K / bk)] becomes the fp32 weight
    w * scale of its block, when loaded."""
    scales = [n for n in tensors if n.endswith(".weight_scale_inv")]
    if not scales:  # other quantized formats fail the tensor check, naming their extra tensors
        return
    method = (quant or {}).get("quant_method")
    if method != "fp8":
        raise ModelLoadError(f"tensor {scales[0]}: unsupported quantization (quant_method {method!r}); mtpx reads "
                             "block-scaled fp8 (quant_method 'fp8', weight_scale_inv) and unquantized checkpoints")
    bn, bk = (quant.get("weight_block_size") or [128, 128])[:2]
    for scale_name in scales:
        name = scale_name[:-len("_scale_inv")]
        if name not in tensors:
            raise ModelLoadError(f"checkpoint has {scale_name} but no {name}")
        weight, scale = tensors[name], tensors.pop(scale_name)
        del shapes[scale_name]

        def load(weight=weight, scale=scale) -> torch.Tensor:
            w, s = weight().float(), scale().float()
            s = s.repeat_interleave(bn, dim=0)[:w.shape[0]].repeat_interleave(bk, dim=1)[:, :w.shape[1]]
            return w * s
        tensors[name] = load


_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _merge_per_expert_weights(tensors: dict, shapes: dict) -> None:
    """Accept routed experts stored one module per expert (`experts.{i}.gate_proj.weight` ...) by stacking them
    into the fused layout (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I])."""
    groups: dict[str, dict[int, dict[str, str]]] = {}
    for name in list(tensors):
        m = _EXPERT.match(name)
        if m:
            groups.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = name
    for base, experts in groups.items():
        ids = sorted(experts)
        if ids != list(range(len(ids))) or any(len(parts) != 3 for parts in experts.values()):
            raise ModelLoadError(f"{base}: per-expert weights are incomplete (experts {ids[:3]}..., each needs "
                                 "gate_proj, up_proj and down_proj)")
        loaders = {k: [tensors.pop(experts[i][k]) for i in ids] for k in ("gate_proj", "up_proj", "down_proj")}
        g_shape, d_shape = shapes.pop(experts[0]["gate_proj"]), shapes.pop(experts[0]["down_proj"])
        for i in ids:
            for k in ("gate_proj", "up_proj", "down_proj"):
                shapes.pop(experts[i][k], None)
        tensors[base + ".gate_up_proj"] = lambda L=loaders: torch.stack(
            [torch.cat([g(), u()]) for g, u in zip(L["gate_proj"], L["up_proj"])])
        tensors[base + ".down_proj"] = lambda L=loaders: torch.stack([d() for d in L["down_proj"]])
        shapes[base + ".gate_up_proj"] = (len(ids), 2 * g_shape[0], g_shape[1])
        shapes[base + ".down_proj"] = (len(ids), *d_shape)


def rename_nextn_layers(cfg: ModelConfig, tensors: dict, shapes: dict) -> None:
    """Families that store their MTP layers after the main stack (`model.layers.{L + j}.`, L = num_hidden_layers):
    those become `mtp.layers.{j}.`, the internal name."""
    pattern = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
    for name in list(tensors):
        m = pattern.match(name)
        if m and int(m[1]) >= cfg.num_hidden_layers:
            new = f"mtp.layers.{int(m[1]) - cfg.num_hidden_layers}.{m[2]}"
            tensors[new], shapes[new] = tensors.pop(name), shapes.pop(name)


def disk_name(cfg: ModelConfig, name: str) -> str:
    """An internal tensor name as the checkpoint directory spells it (for error messages)."""
    m = re.match(r"^mtp\.layers\.(\d+)\.(.*)$", name)
    if cfg.MTP_IN_LAYERS and m:
        return f"model.layers.{cfg.num_hidden_layers + int(m[1])}.{m[2]}"
    return name


# an MTP layer's optional copies of the main model's tensors (DeepSeek-V3 stores them; GLM-4.5 may)
MTP_COPIES = {"mtp.layers.0.embed_tokens.weight": "model.embed_tokens.weight",
              "mtp.layers.0.shared_head.head.weight": "lm_head.weight"}
FP32_SUFFIXES = ("e_score_correction_bias",)  # kept in fp32 whatever the run dtype (they only rank experts)


def _resolve_mtp_copies(ckpt: Checkpoint) -> set[str]:
    """The names of an MTP layer's copies of the main embedding / output head where they equal the main model's (the MTP
    layer then shares them: build_model leaves them out); an embedding of its own is kept (cfg.mtp_own_embedding), an
    output head of its own is refused (the drafters read MTP logits through the main head)."""
    cfg, shared = ckpt.config, set()
    cfg.mtp_own_embedding = False
    for copy, main in MTP_COPIES.items():
        if copy not in ckpt.shapes:
            continue
        if main == "lm_head.weight" and cfg.tie_word_embeddings:
            main = "model.embed_tokens.weight"
        if main not in ckpt.shapes or tuple(ckpt.shapes[copy]) != tuple(ckpt.shapes[main]):
            raise ModelLoadError(f"tensor {disk_name(cfg, copy)} has shape {list(ckpt.shapes[copy])}, expected "
                                 f"{list(ckpt.shapes.get(main, ()))} (the shape of {main})")
        if torch.equal(ckpt.tensors[copy](), ckpt.tensors[main]()):
            shared.add(copy)
        elif copy.endswith("embed_tokens.weight"):
            cfg.mtp_own_embedding = True
        else:
            raise ModelLoadError(f"tensor {disk_name(cfg, copy)}: an MTP output head that differs from {main} is not "
                                 "supported (mtpx computes MTP logits with the main output head)")
    return shared


def count_mtp_layers(names) -> int:
    idx = [int(m[1]) for n in names if (m := re.match(r"^mtp\.layers\.(\d+)\.", n))]
    return max(idx) + 1 if idx else 0


def kept_types(ckpt: Checkpoint) -> dict[str, str]:
    """{name: GGUF type} of the weights the checkpoint can give quantized as they are (for the memory planner)."""
    return {name: loader.qtype for name, loader in ckpt.quantized.items() if getattr(loader, "qtype", None)}


def _kept_linears(model: nn.Module, ckpt: Checkpoint) -> dict[str, tuple[nn.Module, str]]:
    """{parameter name: (module, attribute)} of the Linear weights and routed experts' stacks ckpt.quantized holds;
    refuses those it cannot keep."""
    from mtpx.models.linear import Linear
    from mtpx.models.qwen3_5 import Experts
    kept, refused = {}, []
    for name, module in model.named_modules():
        stacks = Experts.STACKS if isinstance(module, Experts) else ()
        for attribute in ("weight",) if isinstance(module, Linear) else stacks:
            loader = ckpt.quantized.get(f"{name}.{attribute}")
            if loader is None:
                continue
            if getattr(loader, "refused", None):
                refused.append(loader.refused)
            else:
                kept[f"{name}.{attribute}"] = (module, attribute)
    if refused:
        raise ModelLoadError(f"{ckpt.path.name}: {len(refused)} weight(s) cannot be kept as int4 / int8 blocks, e.g. "
                             f"{refused[0]}; load it with --dtype bf16 (dequantized)")
    return kept


def build_model(ckpt: Checkpoint, dtype: torch.dtype, device: torch.device | str = "cpu",
                with_mtp: bool = True, shard: Callable[[nn.Module], dict] | None = None,
                keep_quantized: bool = False,
                quantize_as_read: Callable[[nn.Module, str, torch.Tensor], bool] | None = None) -> CausalLM:
    """Check every tensor against the model's expected names and shapes, then build the model from them.
    shard(model), for one rank of a model split over several (runners/distributed.py): cuts the model, still on the
    meta device, to the rank's part and returns {parameter name: slice function} for the checkpoint's tensors,
    applied as each is read, so the rank never holds more than its share.
    keep_quantized (a run with int4 / int8 weights, unsharded): Linear weights and experts' stacks the checkpoint
    holds quantized (ckpt.quantized) are read as such into Linear.quantized / Experts.quantized, never widened
    (runners/weights.quantize keeps them); one of a quantized type that cannot be kept is refused here, before any
    weight is read.
    quantize_as_read(model, name, tensor) (a run with int4 / int8 weights, unsharded: runners/weights.py
    Quantizer.as_read) is offered each tensor as it is read (in the run's dtype), and returns True where it set the
    parameter `name` itself, quantized, so that loading never holds every weight in bf16 at once."""
    if shard is not None and quantize_as_read is not None:
        raise ValueError("quantize_as_read is for whole models; a sharded load quantizes once loaded")
    cfg = ckpt.config
    found = count_mtp_layers(ckpt.shapes)
    if cfg.mtp_num_hidden_layers is not None and found not in (0, cfg.mtp_num_hidden_layers):
        raise ModelLoadError(f"config says {cfg.MTP_KEY}={cfg.mtp_num_hidden_layers} but the weights hold "
                             f"{found} MTP layers")
    n_mtp = found if with_mtp else 0
    left_out: set[str] = set()  # tensors of the checkpoint the model does not load
    if cfg.MTP_IN_LAYERS and n_mtp:
        left_out = _resolve_mtp_copies(ckpt)
        if found > 1:  # drafting chains the first nextn layer; the others are not loaded
            log.info("%s: using the first of %d MTP layers", ckpt.path.name, found)
            left_out |= {n for n in ckpt.shapes if re.match(r"^mtp\.layers\.[1-9]", n)}
    model_class = family(cfg)
    with torch.device("meta"):
        model = model_class(cfg, n_mtp)
    expected = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    given = {n: s for n, s in ckpt.shapes.items() if (with_mtp or not n.startswith("mtp.")) and n not in left_out}
    if cfg.tie_word_embeddings:
        given.pop("lm_head.weight", None)  # some tied checkpoints still store a copy
    missing = sorted(set(expected) - set(given))
    if missing:
        listed = ", ".join(f"{disk_name(cfg, n)} {list(expected[n])}" for n in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ModelLoadError(f"checkpoint {ckpt.path.name} is missing {len(missing)} tensor(s): {listed}{more}")
    unexpected = sorted(set(given) - set(expected))
    if unexpected:
        listed = ", ".join(f"{disk_name(cfg, n)} {list(given[n])}" for n in unexpected[:5])
        raise ModelLoadError(f"checkpoint {ckpt.path.name} has {len(unexpected)} unexpected tensor(s): {listed}")
    for n, shape in expected.items():
        if tuple(given[n]) != shape:
            raise ModelLoadError(f"tensor {disk_name(cfg, n)} has shape {list(given[n])}, expected {list(shape)}")
    slices = shard(model) if shard is not None else {}
    tied_head = cfg.tie_word_embeddings and "lm_head.weight" not in slices
    kept = _kept_linears(model, ckpt) if keep_quantized and shard is None else {}
    for n, (module, attribute) in kept.items():
        if attribute == "weight":
            module.quantized = ckpt.quantized[n]()
        else:
            module.use_quantized(attribute, ckpt.quantized[n]())
        setattr(module, attribute, nn.Parameter(torch.empty(0, dtype=dtype, device=device), requires_grad=False))
    state = {}
    for n in [n for n, _ in model.named_parameters(remove_duplicate=False)]:  # quantize_as_read replaces some
        if n in kept:
            continue
        if n == "lm_head.weight" and cfg.tie_word_embeddings:
            if tied_head:
                continue
            source = "model.embed_tokens.weight"  # a head cut differently from the embedding reads its tensor
        else:
            source = n
        tensor = ckpt.tensors[source]()
        if n in slices:
            tensor = slices[n](tensor).contiguous()
        tensor = tensor.to(device=device, dtype=torch.float32 if n.endswith(FP32_SUFFIXES) else dtype)
        if quantize_as_read is None or not quantize_as_read(model, n, tensor):
            state[n] = tensor
        del tensor  # dropped before the next is read: one quantize_as_read took is freed now
    model.load_state_dict(state, strict=False, assign=True)
    if tied_head:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval().requires_grad_(False)
