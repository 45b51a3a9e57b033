"""Linear layers of the step and prefill paths: row-invariant step matmuls (rowgemm, or fixed oneDNN row blocks),
fused projections, weight-only int8 (int4 and int8 blocks: models/grouped.py), and counting the weight bytes a
forward reads."""
from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from mtpx import kernels

# Step-mode matmuls must give each row the bits it would get alone (greedy speculation is then bit-exact). Two ways:
# - rowgemm (mtpx.kernels, bf16 weights on CPU): computes every row the same way whatever the row count, and reads
#   the weights once for all rows, so verifying k drafts costs about one decode step;
# - otherwise: oneDNN picks its kernel (and so its summation order) by row count, so every matmul runs on exactly
#   STEP_ROWS rows (zero-padded, or in blocks). 5 = a verify pass of k = 4 drafts.
STEP_ROWS = 5
_row_invariant = False
# Prefill matmuls of bf16 weights with at least this many rows run widened to fp32 (MKL's sgemm) where the CPU has
# no bf16 dot products: oneDNN's emulated bf16 path reached 51-60 GFLOP/s here, fp32 128-234 (64-512 rows of the
# 0.8B body's shapes, 2 threads). The weight is widened in slices of _WIDEN_BYTES, never all at once.
WIDEN_ROWS = 32
_WIDEN_BYTES = 16 << 20
_widen_prefill: bool | None = None  # None: widen where kernels.native_bf16() is false


@contextmanager
def row_invariant(enabled: bool = True):
    """Within this block, matmuls give each row the same result whatever the number of rows (see STEP_ROWS)."""
    global _row_invariant
    previous, _row_invariant = _row_invariant, enabled
    try:
        yield
    finally:
        _row_invariant = previous


def step_rows() -> bool:
    """Inside row_invariant(): a step forward, whose ops must treat every row as if it were alone."""
    return _row_invariant


class QuantizedWeight:
    """A weight [N, K] in a kernel's own format (weight-only int8 / int4, or bf16 in AMX tile order; bf16
    activations): `matmul` computes rows @ w.T, row-invariantly in step
    mode; `tensors()` are what a forward reads; `rows(index)` gives the weight of some output rows (a reduced draft
    head)."""
    shape: torch.Size

    def matmul(self, rows: torch.Tensor, step: bool) -> torch.Tensor:
        raise NotImplementedError

    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def rows(self, index: torch.Tensor):
        raise NotImplementedError

    def row_blocks(self, n: int) -> list["QuantizedWeight"]:
        """The weight as `n` equal blocks of output rows, each a weight of this type (views: no copies); routed
        experts stored as one stack [E * N, K] are run as E such blocks."""
        raise NotImplementedError


class Int8Weight(QuantizedWeight):
    """Weight-only int8: q [N, K] int8 and one fp32 scale per output row (w ≈ q * scale, symmetric, absmax / 127).
    Step matmuls run on rowgemm_int8 (row-invariant, like bf16); prefill uses PyTorch's int8 weight-only matmul."""

    def __init__(self, weight: torch.Tensor, chunk_rows: int = 1024):
        w = weight.detach()
        self.scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
        self.q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
        for start in range(0, w.shape[0], chunk_rows):  # in slices: no fp32 copy of a whole (vocab-sized) weight
            rows = w[start:start + chunk_rows].float()
            scale = (rows.abs().amax(dim=1) / 127).clamp(min=1e-12)
            self.scale[start:start + chunk_rows] = scale
            self.q[start:start + chunk_rows] = torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.scale_bf16 = self.scale.to(torch.bfloat16)
        self.shape = self.q.shape

    def rows(self, index: torch.Tensor) -> "Int8Weight":
        """The weight of the output rows `index` (already quantized: copies, no requantization)."""
        part = Int8Weight.__new__(Int8Weight)
        part.q, part.scale = self.q[index].contiguous(), self.scale[index].contiguous()
        part.scale_bf16, part.shape = part.scale.to(torch.bfloat16), part.q.shape
        return part

    def row_blocks(self, n: int) -> list["Int8Weight"]:
        parts = []
        for q, scale in zip(self.q.chunk(n), self.scale.chunk(n)):
            part = copy.copy(self)  # keeps the type (a GPU weight stays one)
            part.q, part.scale, part.shape = q, scale, q.shape
            if hasattr(self, "scale_bf16"):
                part.scale_bf16 = scale.to(torch.bfloat16)
            parts.append(part)
        return parts

    def matmul(self, rows: torch.Tensor, step: bool) -> torch.Tensor:
        if step:
            return _in_blocks(rows, lambda b: kernels.rowgemm_int8(b, self.q, self.scale))
        return torch.ops.aten._weight_int8pack_mm(rows.to(torch.bfloat16), self.q, self.scale_bf16)

    def tensors(self) -> list[torch.Tensor]:
        return [self.q, self.scale]


class TileWeight(QuantizedWeight):
    """A bf16 weight [N, K] stored for the CPU's AMX tile unit (kernels.rowgemm_tiles): [ceil(N / 16), K / 32, 16,
    32], per 16 output columns and 32 of K the pairs (w[n, k], w[n, k + 1]) of the 16 columns in 16 rows, columns
    past N zero. Every matmul, step or prefill, any row count, runs on the tile unit, where a few rows cost about
    one (kernels/rowgemm.cpp). The same values as the bf16 weight in another layout; no other copy is kept."""
    TILE, TILE_K = 16, 32

    @classmethod
    def fits(cls, shape: torch.Size) -> bool:
        return len(shape) == 2 and shape[1] % cls.TILE_K == 0

    def __init__(self, weight: torch.Tensor):
        w = weight.detach()
        n, k = w.shape
        blocks = -(-n // self.TILE)
        if blocks * self.TILE != n:
            w = torch.cat([w, w.new_zeros(blocks * self.TILE - n, k)])
        # [blocks, 16 columns, K / 32, 16 pairs, 2] -> [blocks, K / 32, 16 pairs, 16 columns, 2]
        self.tiles = (w.reshape(blocks, self.TILE, k // self.TILE_K, self.TILE_K // 2, 2).permute(0, 2, 3, 1, 4)
                      .reshape(blocks, k // self.TILE_K, self.TILE_K // 2, 2 * self.TILE).contiguous())
        self.n = torch.tensor(n)  # a tensor, so that tensors() carries it to the whole-layer kernels
        self.shape = torch.Size((n, k))

    def unpacked(self, index=slice(None)) -> torch.Tensor:
        """The bf16 weight's rows `index` in the ordinary [rows, K] layout."""
        blocks, kb = self.tiles.shape[:2]
        w = self.tiles.reshape(blocks, kb, self.TILE_K // 2, self.TILE, 2).permute(0, 3, 1, 2, 4)
        return w.reshape(blocks * self.TILE, kb * self.TILE_K)[:self.shape[0]][index].contiguous()

    def matmul(self, rows: torch.Tensor, step: bool) -> torch.Tensor:
        return kernels.rowgemm_tiles(rows, self.tiles, self.shape[0])

    def tensors(self) -> list[torch.Tensor]:
        return [self.tiles, self.n]

    def rows(self, index: torch.Tensor) -> "TileWeight":
        return TileWeight(self.unpacked(index))


def _in_blocks(rows: torch.Tensor, fn) -> torch.Tensor:
    """fn over blocks of at most kernels.MAX_ROWS rows: each row's result is independent of its block."""
    blocks = rows.split(kernels.MAX_ROWS)
    return torch.cat([fn(b) for b in blocks]) if len(blocks) > 1 else fn(rows)


def uses_rowgemm(weight: torch.Tensor) -> bool:
    return (weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and weight.shape[-1] % 16 == 0
            and weight.is_contiguous() and kernels.rowgemm_available())


def _widens(rows: torch.Tensor, weight) -> bool:
    # cheap checks first: a training step (fp32 weights, gradients on) never reads the CPU flags, which
    # torch.compile could not trace
    if not (isinstance(weight, torch.Tensor) and weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
            and not torch.is_grad_enabled() and rows.shape[0] >= WIDEN_ROWS):
        return False
    return _widen_prefill if _widen_prefill is not None else not kernels.native_bf16()


def _widened_matmul(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    x = rows.float()
    out = torch.empty(rows.shape[0], weight.shape[0], dtype=rows.dtype)
    step = max(16, _WIDEN_BYTES // (4 * weight.shape[1]))
    for n in range(0, weight.shape[0], step):
        out[:, n:n + step] = F.linear(x, weight[n:n + step].float())
    return out


def _matmul(rows: torch.Tensor, weight: torch.Tensor | None, packed: torch.Tensor | None) -> torch.Tensor:
    if _widens(rows, weight):
        return _widened_matmul(rows, weight)
    if packed is not None:
        return torch.ops.mkldnn._linear_pointwise(rows, packed, None, "none", [], "")
    return F.linear(rows, weight)


def linear(x: torch.Tensor, weight, packed: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T, `weight` a tensor or a QuantizedWeight; `packed` is the same weight prepacked for oneDNN (see
    pack_for_cpu), used in its place."""
    out_features = (weight if weight is not None else packed).shape[0]
    rows = x.reshape(-1, x.shape[-1])
    if isinstance(weight, QuantizedWeight):
        return weight.matmul(rows, _row_invariant).to(x.dtype).reshape(*x.shape[:-1], out_features)
    if not _row_invariant:
        return _matmul(rows, weight, packed).to(x.dtype).reshape(*x.shape[:-1], out_features)
    if weight is not None and uses_rowgemm(weight):
        out = _in_blocks(rows, lambda b: kernels.rowgemm(b, weight))
        return out.to(x.dtype).reshape(*x.shape[:-1], out_features)
    m = rows.shape[0]
    pad = (-m) % STEP_ROWS
    if pad:
        rows = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])])
    if m + pad > STEP_ROWS:
        out = torch.cat([_matmul(block, weight, packed) for block in rows.split(STEP_ROWS)])
    else:
        out = _matmul(rows, weight, packed)
    return out[:m].reshape(*x.shape[:-1], out_features)


class Linear(nn.Linear):
    """nn.Linear (no bias) that honours row_invariant() and can run from a oneDNN-prepacked copy."""
    packed: torch.Tensor | None = None

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    quantized: QuantizedWeight | None = None  # set by quantize(): used instead of the bf16 weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.quantized if self.quantized is not None else self.weight, self.packed)


def kernel_weight(weight) -> list[torch.Tensor] | None:
    """A weight (tensor or QuantizedWeight) as the tensors a whole-layer step kernel takes (kernels/layer_step.cpp):
    [w] bf16, [q, scale] int8, [codes, groups, supers] int4 / int8 blocks, [tiles, n] AMX tiles; None where the
    rowgemm kernel cannot read it."""
    if isinstance(weight, QuantizedWeight):
        return weight.tensors()
    return [weight] if weight is not None and uses_rowgemm(weight) else None


def fused_projection(owner: nn.Module) -> tuple | None:
    """(weight, prepacked weight or None, member sizes) of the projections fuse_projections (runners/weights.py)
    joined in `owner`, or None. Replaced (a new object) whenever the weights are converted again."""
    return owner.__dict__.get("_fused")


def set_fused_projection(owner: nn.Module, weight, packed: torch.Tensor | None, sizes: list[int]) -> None:
    """Make `project(owner, ...)` one matmul with `weight` (prepacked for oneDNN as `packed`, or None), split into
    `sizes` outputs."""
    owner.__dict__["_fused"] = (weight, packed, sizes)


def step_weight(module: nn.Module) -> list[torch.Tensor] | None:
    """kernel_weight of a Linear, or of the fused projection of a module whose projections pack_for_cpu fused."""
    if isinstance(module, Linear):
        return kernel_weight(module.quantized if module.quantized is not None else module.weight)
    fused = module.__dict__.get("_fused")
    return kernel_weight(fused[0]) if fused is not None else None


def project(owner: nn.Module, names: tuple[str, ...], x: torch.Tensor) -> list[torch.Tensor]:
    """Apply several Linear layers that read the same input; one matmul once pack_for_cpu has fused them."""
    fused = owner.__dict__.get("_fused")
    if fused is None:
        return [getattr(owner, n)(x) for n in names]
    weight, packed, sizes = fused
    return list(linear(x, weight, packed).split(sizes, dim=-1))


def project_joined(owner: nn.Module, names: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
    """`project`'s outputs side by side in one tensor [..., sum of out_features]."""
    fused = owner.__dict__.get("_fused")
    if fused is None:
        return torch.cat(project(owner, names, x), dim=-1)
    weight, packed, _ = fused
    return linear(x, weight, packed)


def weight_tensors(module: nn.Module, skip: set[int] = frozenset()) -> list[torch.Tensor]:
    """The weight tensors a forward of `module` reads: its parameters (ids in `skip` left out), with quantized
    replacements (values and scales) instead of the bf16 weights they replaced."""
    tensors, replaced = [], set(skip)
    for w in quantized_weights(module):
        tensors += w.tensors()
    for m in module.modules():
        if isinstance(m, Linear) and m.quantized is not None:
            replaced.add(id(m.weight))
    params = {id(p): p for p in module.parameters() if id(p) not in replaced and p.numel()}
    return tensors + list(params.values())


def quantized_weights(module: nn.Module) -> list[QuantizedWeight]:
    """Every QuantizedWeight of `module`: fused projections', Linears' and routed experts' (their `quantized`
    dict of per-expert lists)."""
    found = {}
    for m in module.modules():
        quantized = getattr(m, "quantized", None)
        stacks = quantized.values() if isinstance(quantized, dict) else [[quantized]]
        for w in [m.__dict__.get("_fused", (None,))[0], *(w for ws in stacks for w in ws)]:
            if isinstance(w, QuantizedWeight):
                found[id(w)] = w
    return list(found.values())


def parameter_count(module: nn.Module) -> int:
    """Parameters of `module` as loaded: quantized weights count their N x K values, not their packed bytes."""
    tensors = weight_tensors(module)
    quantized = quantized_weights(module)
    packed = sum(t.numel() for w in quantized for t in w.tensors())
    return sum(t.numel() for t in tensors) - packed + sum(w.shape.numel() for w in quantized)


def nbytes(weight) -> int:
    """Bytes of one weight: a tensor, or a QuantizedWeight's values and scales."""
    parts = weight.tensors() if isinstance(weight, QuantizedWeight) else [weight]
    return sum(t.numel() * t.element_size() for t in parts)


def weight_bytes(module: nn.Module, skip: set[int] = frozenset()) -> int:
    return sum(nbytes(t) for t in weight_tensors(module, skip))
