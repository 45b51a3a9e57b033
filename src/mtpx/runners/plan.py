"""Memory planning from a model's config and tensor shapes alone: the model is built on the meta device (no weight
is read or allocated), its weights converted to the formats the runner would use, and one sequence's caches made on
the meta device too, so every byte count is what loading and running would allocate.

What a run needs on the device: weights (main model and MTP layer apart), per sequence the caches (attention KV,
Gated DeltaNet conv and recurrent states, the MTP layer's KV) and the states kept for rollback within a verify pass,
the largest transient of a prefill of the whole context (an upper bound: the projections' and MLP's activations of
every position), and the runtime's own overhead (on CUDA: its context, cuBLAS workspace and allocator slack).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass

import torch
from torch import nn

from mtpx.config import ModelConfig
from mtpx.models.grouped import super_size
from mtpx.models.linear import Linear, QuantizedWeight, fused_projection, weight_bytes
from mtpx.models.qwen3_5 import Experts
from mtpx.models.registry import family

CUDA_OVERHEAD = 600 << 20  # CUDA context + cuBLAS workspace; the allocator's slack is ALLOCATOR_SLACK
ALLOCATOR_SLACK = 0.05
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
QUANT_ORDER = ["bf16", "int8", "int4"]  # from the most to the least memory


class _Sized(QuantizedWeight):
    """A quantized weight's tensors on the meta device: bytes without memory."""

    def __init__(self, tensors: list[torch.Tensor], shape: torch.Size):
        self._tensors, self.shape = tensors, shape

    def tensors(self) -> list[torch.Tensor]:
        return self._tensors

    def row_blocks(self, n: int) -> list["_Sized"]:
        return [_Sized(list(parts), torch.Size((parts[0].shape[0], self.shape[1])))
                for parts in zip(*(t.chunk(n) for t in self._tensors))]


def _quantized_on_meta(weight: torch.Tensor, kind: str) -> _Sized:
    """The tensors runners/weights.quantize would make of `weight` (int4: models/grouped.py's groups of 32 in
    super-blocks of up to 8, else per-row int8)."""
    n, k = weight.shape
    meta = dict(device="meta")
    if kind == "int4" and k % 32 == 0:
        groups = k // 32
        return _Sized([torch.empty(n, k // 2, dtype=torch.uint8, **meta),
                       torch.empty(n, groups, 2, dtype=torch.int8, **meta),
                       torch.empty(n, groups // super_size(groups), 2, dtype=torch.float16, **meta)], weight.shape)
    return _Sized([torch.empty(n, k, dtype=torch.int8, **meta), torch.empty(n, dtype=torch.float32, **meta)],
                  weight.shape)


def meta_model(cfg: ModelConfig, mtp_layers: int, dtype: str, kept: dict[str, str] | None = None) -> nn.Module:
    """The model as a runner would hold it, on the meta device: bf16 / fp16 / fp32, int8 / int4 weights, or "stored"
    (bf16 but for the kept ones) (kept: {parameter name: GGUF type} of weights a GGUF file gives quantized as they
    are, loading/gguf_blocks.py)."""
    from mtpx.runners.weights import STORED, _join_loaded, _quantize_experts, _replace_weights, fuse_projections
    torch_dtype = {"fp16": torch.float16, "fp32": torch.float32}.get(dtype, torch.bfloat16)
    with torch.device("meta"):
        model = family(cfg)(cfg, mtp_layers).to(torch_dtype)
    if dtype in ("int8", "int4", STORED):
        if kept:
            from mtpx.loading.gguf_blocks import meta_weight
            for name, module in model.named_modules():
                if isinstance(module, Linear) and (qtype := kept.get(f"{name}.weight")):
                    module.quantized = meta_weight(qtype, tuple(module.weight.shape))
                    module.weight.data = torch.empty(0, dtype=torch_dtype, device="meta")
                for stack in Experts.STACKS if isinstance(module, Experts) else ():
                    if qtype := kept.get(f"{name}.{stack}"):
                        e, n, k = getattr(module, stack).shape
                        module.use_quantized(stack, meta_weight(qtype, (e * n, k)))
        fuse_projections(model)
        for module in model.modules():  # fused projections with kept members, joined as quantize() joins them
            if getattr(module, "FUSED_PROJECTIONS", None) and fused_projection(module) is None:
                _join_loaded(module, dtype, {"kept": 0}, lambda w: w)
        convert = (lambda w, tied: None) if dtype == STORED else (lambda w, tied: _quantized_on_meta(w, dtype))
        _replace_weights(model, convert)
        for module in model.modules():
            if isinstance(module, Experts):
                _quantize_experts(module, convert, Counter(), lambda w: w)
    return model


@dataclass
class Plan:
    device: str
    dtype: str
    context: int
    parallel: int
    drafts: int
    weights_main: int
    weights_mtp: int
    cache_per_sequence: int  # main + MTP caches of one sequence of `context` tokens
    rollback_per_sequence: int  # Gated DeltaNet states kept for the positions of one verify pass
    prefill_workspace: int
    overhead: int
    total: int
    memory: int | None = None

    @property
    def fits(self) -> bool | None:
        return None if self.memory is None else self.total <= self.memory

    def to_json(self) -> dict:
        return {**asdict(self), "fits": self.fits}


def plan(cfg: ModelConfig, *, device: str = "cuda", dtype: str = "bf16", context: int = 4096, parallel: int = 1,
         drafts: int = 3, mtp_layers: int = 1, memory: int | None = None, kept: dict[str, str] | None = None) -> Plan:
    """Bytes a run of this model needs on `device` (see the module docstring); `memory`: what the device has;
    `kept`: see meta_model."""
    model = meta_model(cfg, mtp_layers, dtype, kept)
    mtp = getattr(model, "mtp", None)
    weights_mtp = weight_bytes(mtp) if mtp is not None else 0  # the shared embedding / head count as main
    weights_main = weight_bytes(model) - weights_mtp
    state = model.new_state(context, device="meta")
    cache = state.nbytes() + (model.new_mtp_state(context, device="meta").nbytes() if mtp is not None else 0)
    gdn = sum(t.numel() * t.element_size() for t in [*state.conv.values(), *state.recurrent.values()])
    rollback = (drafts + 1) * gdn
    act = 2 if dtype != "fp32" else 4
    width = max(cfg.intermediate_size, getattr(cfg, "moe_intermediate_size", 0) or 0)
    prefill = context * (2 * width + 8 * cfg.hidden_size) * act  # prefill takes the last row's logits only
    prefill += context * 4 * 64 * 3 * max(getattr(cfg, "linear_num_value_heads", 0) or 0, 1)  # chunked delta rule
    overhead = CUDA_OVERHEAD if device.startswith("cuda") else 0
    subtotal = weights_main + weights_mtp + parallel * (cache + rollback) + prefill
    total = subtotal + overhead + (int(ALLOCATOR_SLACK * subtotal) if device.startswith("cuda") else 0)
    return Plan(device, dtype, context, parallel, drafts, weights_main, weights_mtp, cache, rollback, prefill,
                total - subtotal, total, memory)


def largest_context(cfg: ModelConfig, memory: int, **kw) -> int:
    """The longest context (a multiple of 256) whose plan fits in `memory`; 0 where even 256 does not."""
    lo, hi = 0, max(256, cfg.max_position_embeddings) // 256
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if plan(cfg, context=mid * 256, memory=memory, **kw).fits:
            lo = mid
        else:
            hi = mid - 1
    return lo * 256


def smallest_fitting_dtype(cfg: ModelConfig, memory: int, **kw) -> str | None:
    """The first of bf16, int8, int4 whose plan fits, or None."""
    kw.pop("dtype", None)
    return next((d for d in QUANT_ORDER if plan(cfg, dtype=d, memory=memory, **kw).fits), None)


def parse_bytes(text: str) -> int:
    """'24GiB', '24 GB', '512MiB', '1e9' -> bytes (GB and GiB both read as 2^30: what cards are sold and reported as)."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?B)?\s*", text)
    if not m:
        raise ValueError(f"cannot read {text!r} as a size: use e.g. 24GiB, 512MiB or a byte count")
    return int(float(m[1]) * 1024 ** " KMGT".index(m[2] or " "))


def explain(p: Plan, cfg: ModelConfig, kept: dict[str, str] | None = None) -> str:
    """The plan as lines of text, with what would fit where it does not (kept: as plan's)."""
    gib = lambda b: f"{b / 2**30:8.2f} GiB"  # noqa: E731
    lines = [f"{cfg.model_type} on {p.device}, {p.dtype} weights, context {p.context}, {p.parallel} sequence(s), "
             f"up to {p.drafts} drafts a round",
             f"  weights, main model      {gib(p.weights_main)}",
             f"  weights, MTP layer       {gib(p.weights_mtp)}",
             f"  caches per sequence      {gib(p.cache_per_sequence)}   (KV, Gated DeltaNet states, MTP KV)",
             f"  rollback per sequence    {gib(p.rollback_per_sequence)}   (states of one verify pass)",
             f"  prefill workspace        {gib(p.prefill_workspace)}   (a prefill of the whole context)",
             f"  runtime overhead         {gib(p.overhead)}",
             f"  total                    {gib(p.total)}"]
    if p.memory is not None:
        verdict = "fits" if p.fits else "does NOT fit"
        lines.append(f"  device memory            {gib(p.memory)}   -> {verdict}")
        if not p.fits:
            kw = dict(device=p.device, parallel=p.parallel, drafts=p.drafts,
                      mtp_layers=1 if p.weights_mtp else 0, kept=kept)
            ctx = largest_context(cfg, p.memory, dtype=p.dtype, **kw)
            lines.append(f"  largest context that fits with {p.dtype}: {ctx}" if ctx else
                         f"  {p.dtype} weights do not fit at any context")
            smaller = smallest_fitting_dtype(cfg, p.memory, context=p.context, **kw)
            if smaller and smaller != p.dtype:
                lines.append(f"  at context {p.context}, --dtype {smaller} fits")
    return "\n".join(lines)


def require_fit(cfg: ModelConfig, free: int, *, context: int = 256, **kw) -> Plan:
    """Refuse, before any weight is read, a model whose weights and a short sequence do not fit in `free` bytes."""
    p = plan(cfg, context=context, memory=free, **kw)
    if not p.fits:
        from mtpx.errors import ModelLoadError
        raise ModelLoadError(f"the model does not fit in the {free / 2**30:.2f} GiB free on {p.device}:\n"
                             + explain(p, cfg, kw.get("kept")))
    return p
