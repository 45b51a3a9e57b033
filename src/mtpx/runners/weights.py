"""Weights in the layouts a runner's kernels read, converted once at load: projections that read the same input fused
into one matmul, weight-only int8 / int4, bf16 as AMX tiles, oneDNN prepacking."""
from __future__ import annotations

import torch
from torch import nn

from mtpx import kernels
from mtpx.models.grouped import GroupedWeight, Int4Weight, Int8BlockWeight, join_rows
from mtpx.models.linear import (STEP_ROWS, Int8Weight, Linear, QuantizedWeight, TileWeight, fused_projection, nbytes,
                                set_fused_projection)
from mtpx.models.qwen3_5 import Experts

def fuse_projections(model: nn.Module) -> list[torch.Tensor]:
    """Fuse the projections of each module that read the same input (its FUSED_PROJECTIONS) into one weight, the
    members' parameters becoming views of it: one matmul instead of several, no memory added. Returns the fused
    weights. Groups with weights loaded quantized (a GGUF's blocks kept) are left to `quantize`, and groups fused
    already (Quantizer.as_read) as they are."""
    fused_weights = []
    for module in model.modules():
        groups = getattr(module, "FUSED_PROJECTIONS", None)
        if groups and fused_projection(module) is None:
            if any(getattr(module, n).quantized is not None for n in groups):
                continue
            fused_weights.append(_fuse(module))
    return fused_weights


def _fuse(module: nn.Module) -> torch.Tensor:
    """The projections of `module` (its FUSED_PROJECTIONS) joined into one weight, their parameters views of it."""
    members = [getattr(module, n) for n in module.FUSED_PROJECTIONS]
    weight = torch.cat([m.weight.detach() for m in members])
    offset = 0
    for m in members:
        rows = m.weight.shape[0]
        m.weight.data = weight[offset:offset + rows]
        offset += rows
    set_fused_projection(module, weight, None, [m.weight.shape[0] for m in members])
    return weight


def pack_for_cpu(model: nn.Module) -> None:
    """Inference on CPU in bf16: fuse_projections. Without the rowgemm kernel, also prepack every weight for oneDNN
    (~1.5x the weight bandwidth of F.linear on AVX512_BF16 machines; the parameters stay for state_dict users)."""
    fused_weights = fuse_projections(model)
    if not kernels.rowgemm_available():
        def pack(w: torch.Tensor) -> torch.Tensor:
            return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), STEP_ROWS)
        members = set()
        for module in model.modules():
            if (fused := fused_projection(module)) is not None:
                weight, _, sizes = fused
                set_fused_projection(module, weight, pack(weight), sizes)
                members.update(id(getattr(module, n)) for n in module.FUSED_PROJECTIONS)
        for module in model.modules():
            if isinstance(module, Linear) and id(module) not in members:
                module.packed = pack(module.weight)
    own_copies(model, fused_weights)


def own_copies(model: nn.Module, owned: list[torch.Tensor] = ()) -> None:
    """Every parameter (but those in `owned`'s storages) as a copy of its own. The loader's tensors are views of the
    memory-mapped checkpoint (a mapping each: loading/checkpoint.py _read_tensor), the file's pages they cover
    resident and mapped while they live; own copies let them go. Run after quantizing, so that the weights it
    released are not copied."""
    owned = {w.untyped_storage().data_ptr() for w in owned}
    for param in {id(p): p for p in model.parameters()}.values():
        if param.untyped_storage().data_ptr() not in owned:
            param.data = param.data.clone()


QUANTIZATIONS = ("int8", "int4")
# a GGUF's quantized weights as the file stores them (loading/gguf_blocks.py), its float ones left as they are: what
# loading a quantized GGUF does unless --dtype says otherwise (as llama.cpp runs a file)
STORED = "stored"


class GpuInt8Weight(Int8Weight):
    """Int8Weight on the GPU: the Triton kernel (kernels/triton_matmul.py) for every row count."""

    @classmethod
    def of(cls, w: Int8Weight, device: torch.device) -> "GpuInt8Weight":
        gpu = cls.__new__(cls)
        gpu.q, gpu.scale, gpu.shape = w.q.to(device), w.scale.to(device), w.shape
        return gpu

    def matmul(self, rows: torch.Tensor, step: bool) -> torch.Tensor:
        from mtpx.kernels import triton_matmul
        return triton_matmul.int8_matmul(rows, self.q, self.scale)

    def rows(self, index: torch.Tensor) -> "GpuInt8Weight":
        return GpuInt8Weight.of(super().rows(index), self.q.device)


class GpuInt4Weight(Int4Weight):
    """Int4Weight on the GPU: the Triton kernel (kernels/triton_matmul.py) for every row count."""

    @classmethod
    def of(cls, w: Int4Weight, device: torch.device) -> "GpuInt4Weight":
        return cls.from_parts(w.codes.to(device), w.groups.to(device), w.supers.to(device), w.shape)

    def matmul(self, rows: torch.Tensor, step: bool) -> torch.Tensor:
        from mtpx.kernels import triton_matmul
        return triton_matmul.int4_matmul(rows, self.codes, self.groups, self.supers)


class GpuInt8BlockWeight(Int8BlockWeight):
    """Int8BlockWeight on the GPU: the Triton kernel (kernels/triton_matmul.py) for every row count."""

    @classmethod
    def of(cls, w: Int8BlockWeight, device: torch.device) -> "GpuInt8BlockWeight":
        return cls.from_parts(w.codes.to(device), w.groups.to(device), w.supers.to(device), w.shape)

    def matmul(self, rows: torch.Tensor, step: bool) -> torch.Tensor:
        from mtpx.kernels import triton_matmul
        return triton_matmul.int8_blocks_matmul(rows, self.codes, self.groups, self.supers)


_ON_GPU = {Int8Weight: GpuInt8Weight, Int4Weight: GpuInt4Weight, Int8BlockWeight: GpuInt8BlockWeight}


def quantize(model: nn.Module, kind: str, gpu: torch.device | None = None) -> dict[str, int]:
    """Weight-only quantization of every Linear, fused projection and stack of routed experts (models/qwen3_5.py
    Experts: quantized whole, run per expert; the embedding stays bf16): int8 (per output row), or int4
    (models/grouped.py: groups of 32) with int8 for weights whose K is not a multiple of 32, or STORED (no weight is
    quantized here). Weights loaded quantized (a GGUF's blocks kept exactly: Linear.quantized or Experts.quantized
    already set) stay as they are; a fused projection with such members is joined in their format, its other members
    quantized to it (int8 blocks where any member is). The bf16 copies are released, except the embedding's when
    lm_head shares it. `gpu`: quantize here (on the CPU) and keep the codes on that device, for the Triton kernels.
    Returns how many weights (a stack of experts counting once) got each format, and how many were kept as loaded."""
    return Quantizer(kind, gpu).finish(model)


class Quantizer:
    """`quantize`, of a loaded model (`finish`) or weight by weight as build_model reads the checkpoint (`as_read`,
    then `finish` for the rest), so that loading holds the quantized model and the bf16 of a few weights at a time
    (at most one fused projection's members) instead of the bf16 model. Each weight gets the format and the bits
    quantizing after the load gives: the same function of the same bf16 tensor, a fused projection's members
    (`fuse`: joined, as fuse_projections joins them) quantized once all of them are read, as one weight."""

    def __init__(self, kind: str, gpu: torch.device | None = None, fuse: bool = False):
        if gpu is None and not kernels.rowgemm_available():
            from mtpx.errors import RequestError
            raise RequestError(f"{kind} weights need the rowgemm CPU kernel, which could not be built here "
                               "(a C++ compiler is required); use dtype bf16")
        self.kind, self.gpu, self.fuse = kind, gpu, fuse
        self.counts = {"int8": 0, "int4": 0, "int8 blocks": 0, "kept": 0}
        self.made: set[int] = set()  # ids of the weights as_read quantized, told apart from those loaded quantized

    def _move(self, w: QuantizedWeight) -> QuantizedWeight:
        return w if self.gpu is None else _ON_GPU[type(w)].of(w, self.gpu)

    def _place(self, w: QuantizedWeight) -> QuantizedWeight:
        self.counts[_format(w)] += 1
        return self._move(w)

    def _convert(self, weight: torch.Tensor, tied: bool) -> QuantizedWeight | None:
        if self.kind == STORED:
            return None
        weight = weight.cpu()
        int4 = self.kind == "int4" and Int4Weight.fits(weight.shape)
        return self._place(Int4Weight(weight) if int4 else Int8Weight(weight))

    def as_read(self, model: nn.Module, name: str, tensor: torch.Tensor) -> bool:
        """build_model's quantize_as_read: the parameter `name` of `model` (still on the meta device) set from
        `tensor` and quantized, its bf16 released, where quantize would quantize it; a fused projection's members are
        held until the last one is read. Returns whether it took `tensor`; one it leaves (not a Linear's weight or a
        stack of experts, or fused with weights loaded quantized: those are joined by `finish`) is loaded as is."""
        if self.kind == STORED:
            return False
        path, _, attribute = name.rpartition(".")
        module = model.get_submodule(path)
        if isinstance(module, Experts) and attribute in Experts.STACKS:
            stacked = self._convert(tensor.reshape(-1, tensor.shape[-1]), False)
            setattr(module, attribute, nn.Parameter(tensor, requires_grad=False))
            module.use_quantized(attribute, stacked)
            self.made.add(id(module.quantized[attribute][0]))
            return True
        if not isinstance(module, Linear) or attribute != "weight":
            return False
        owner_path, _, member = path.rpartition(".")
        owner = model.get_submodule(owner_path)
        group = getattr(owner, "FUSED_PROJECTIONS", None) or ()
        members = [getattr(owner, n) for n in group] if member in group else []
        if any(m.quantized is not None for m in members):
            return False
        module.weight = nn.Parameter(tensor, requires_grad=False)
        if members and self.fuse:
            if not any(m.weight.is_meta for m in members):
                _fuse(owner)
                _replace_fused(owner, self._convert)
            return True
        _replace_linear(module, self._convert, tied=False)
        self.made.add(id(module.quantized))
        return True

    def finish(self, model: nn.Module) -> dict[str, int]:
        """Quantize what `as_read` did not (all of a model loaded without it); returns the counts `quantize` does."""
        made = self.made
        for module in model.modules():
            groups = getattr(module, "FUSED_PROJECTIONS", None)
            if groups and fused_projection(module) is None and \
                    not any(id(getattr(module, n).quantized) in made for n in groups):
                _join_loaded(module, self.kind, self.counts, self._place)
        loaded = [m for m in model.modules()
                  if isinstance(m, Linear) and isinstance(m.quantized, GroupedWeight) and id(m.quantized) not in made]
        _replace_weights(model, self._convert)
        for module in loaded:
            self.counts["kept"] += 1
            module.quantized = self._place(module.quantized)
        for module in model.modules():
            if isinstance(module, Experts):
                _quantize_experts(module, self._convert, self.counts, self._move, made)
        return self.counts


def _format(w: QuantizedWeight) -> str:
    return {Int4Weight: "int4", Int8BlockWeight: "int8 blocks"}.get(type(w), "int8")


def _quantize_experts(experts: Experts, convert, counts: dict, move, made: set[int] = frozenset()) -> None:
    """Each stack of routed experts [E, N, K] quantized as one weight [E * N, K] and run as E blocks of its rows
    (quantization is row by row: each block holds what quantizing its expert alone gives); a stack loaded quantized
    (Experts.quantized already set) keeps its blocks, moved to the device; one quantized already (its first block's
    id in `made`) is left as it is."""
    loaded = experts.quantized or {}
    for name in Experts.STACKS:
        if name in loaded and id(loaded[name][0]) in made:
            continue
        if name in loaded:
            counts[_format(loaded[name][0])] += 1
            counts["kept"] += 1
            experts.quantized[name] = [move(w) for w in loaded[name]]
            continue
        stack = getattr(experts, name).detach()
        stacked = convert(stack.reshape(-1, stack.shape[-1]), False)
        if stacked is not None:
            experts.use_quantized(name, stacked)


def _join_loaded(module: nn.Module, kind: str, counts: dict, place) -> None:
    """A fused projection some of whose members were loaded quantized, as one weight in their format."""
    members = [getattr(module, n) for n in module.FUSED_PROJECTIONS]
    loaded = [m.quantized for m in members if isinstance(m.quantized, GroupedWeight)]
    if not loaded:
        return
    fmt = Int4Weight if kind in ("int4", STORED) and all(isinstance(w, Int4Weight) for w in loaded) else Int8BlockWeight
    parts = [m.quantized if isinstance(m.quantized, GroupedWeight) else fmt(m.weight.detach()) for m in members]
    counts["kept"] += len(loaded)
    set_fused_projection(module, place(join_rows(parts)), None, [p.shape[0] for p in parts])
    for m in members:
        m.quantized = None
        m.weight.data = torch.empty(0, dtype=m.weight.dtype, device=m.weight.device)


# A tied lm_head keeps the embedding's bf16 copy (the embedding reads it), so its tiles would be a second copy of
# the whole head: made only up to this size (the demo's 4 MiB head, not the 0.8B's 485 MiB one).
TILED_TIED_HEAD_BYTES = 64 << 20


def to_tiles(model: nn.Module) -> int:
    """bf16 weights of every Linear and fused projection whose K is a multiple of 32 to AMX tile order (TileWeight),
    where kernels.amx_available(); the bf16 copies are released. Returns how many weights were converted."""
    if not kernels.amx_available():
        return 0
    count = 0

    def convert(weight: torch.Tensor, tied: bool) -> QuantizedWeight | None:
        nonlocal count
        if (weight.dtype != torch.bfloat16 or not TileWeight.fits(weight.shape)
                or (tied and nbytes(weight) > TILED_TIED_HEAD_BYTES)):
            return None
        count += 1
        return TileWeight(weight)
    _replace_weights(model, convert)
    return count


def _replace_weights(model: nn.Module, convert) -> None:
    """Every fused projection and Linear weight (not yet replaced) by convert(weight, tied), which may return None to
    keep it (tied: lm_head sharing the embedding's weight). The bf16 copies of replaced weights are released, except
    one the embedding shares."""
    shared = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    for module in model.modules():
        _replace_fused(module, convert)
    for module in model.modules():
        if isinstance(module, Linear) and module.weight.numel() and module.quantized is None:
            _replace_linear(module, convert, tied=id(module.weight) in shared)


def _replace_fused(module: nn.Module, convert) -> None:
    """The fused projection of `module`, if it has one still a tensor, by convert(weight, False)."""
    fused = fused_projection(module)
    if fused is not None and isinstance(fused[0], torch.Tensor):
        weight, _, sizes = fused
        new = convert(weight, False)
        if new is not None:
            set_fused_projection(module, new, None, sizes)
            for n in module.FUSED_PROJECTIONS:
                getattr(module, n).weight.data = torch.empty(0, dtype=weight.dtype, device=weight.device)


def _replace_linear(module: Linear, convert, tied: bool) -> None:
    """The weight of `module` by convert(weight, tied), its bf16 released unless tied (the embedding's)."""
    new = convert(module.weight, tied)
    if new is not None:
        module.quantized, module.packed = new, None
        if not tied:
            module.weight.data = torch.empty(0, dtype=module.weight.dtype, device=module.weight.device)
