"""Weight-only quantized weights in groups along K with scales in two levels, as llama.cpp's K-quants keep them:
int4 (mtpx's own quantizer, and GGUF's Q4_0 / Q4_1 / Q4_K blocks kept as they are) and int8 blocks (GGUF's Q8_0,
Q5_0 / Q5_1, Q5_K and Q6_K blocks kept as they are; loading/gguf_blocks.py).

Each group of GROUP weights along K has an int8 pair (sc, m), and each super-block of `per_super` groups (a power of
two) an fp16 pair (d, dmin): the group's scale is d * sc and its offset dmin * m, both exact in fp32 (products of an
11-bit and an 8-bit integer significand), and a weight is code * scale + offset, as the kernels compute it (one
fused multiply-add; kernels/gemm_core.h, kernels/triton_matmul.py). mtpx's int4 uses super-blocks of 8 groups of
32: 4 bits a code + 16 bits per group + 32 bits per 256 weights = 4.625 bits (0.578 bytes) a weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mtpx import kernels
from mtpx.models.linear import QuantizedWeight, _in_blocks


def super_size(groups: int, most: int = 8) -> int:
    """Groups per super-block for a row of `groups` groups: the largest power of two up to `most` dividing it."""
    size = most
    while groups % size:
        size //= 2
    return size


class GroupedWeight(QuantizedWeight):
    """codes, groups int8 [N, G, 2] (sc, m) and supers fp16 [N, G / per_super, 2] (d, dmin) of a weight [N, K]
    (see the module docstring). Step matmuls run on the row-invariant CPU kernel (`_kernel`), and so do prefills of
    fewer than KERNEL_ROWS rows; longer ones dequantize slices of rows to fp32 for MKL's sgemm."""
    GROUP: int
    _ROWS = 1024  # rows dequantized at a time: no fp32 copy of a whole (vocab-sized) weight
    # below this many input rows, blocks of 8 on the kernel beat dequantizing (measured on the 0.8B body's shapes,
    # 2 threads, int4: 64 rows 107 against 288 ms, 256 rows 419 against 465, 1024 rows 1777 against 1129)
    KERNEL_ROWS = 256
    codes: torch.Tensor
    groups: torch.Tensor
    supers: torch.Tensor

    @classmethod
    def fits(cls, shape: torch.Size) -> bool:
        return len(shape) == 2 and shape[1] % cls.GROUP == 0

    @classmethod
    def from_parts(cls, codes: torch.Tensor, groups: torch.Tensor, supers: torch.Tensor, shape) -> "GroupedWeight":
        """A weight from its parts (taken as they are)."""
        w = cls.__new__(cls)
        w.codes, w.groups, w.supers, w.shape = codes, groups, supers, torch.Size(shape)
        return w

    @property
    def per_super(self) -> int:
        return self.groups.shape[1] // self.supers.shape[1]

    def values(self, index) -> torch.Tensor:
        """The codes of the output rows `index` as fp32 [rows, K]."""
        raise NotImplementedError

    def scales(self, index) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, offset) of every group of the output rows `index`, fp32 [rows, G] each (exact)."""
        groups = self.groups[index].float()
        supers = self.supers[index].float().repeat_interleave(self.per_super, dim=1)
        return supers[..., 0] * groups[..., 0], supers[..., 1] * groups[..., 1]

    def dequantize(self, index) -> torch.Tensor:
        """fp32 weights of the output rows `index` (a slice or an index tensor): the kernels' values (one fused
        multiply-add), since code * scale is exact for every format mtpx makes or keeps, the offset then added with
        one rounding (mtpx's own int8 blocks, whose products may round, have no offset)."""
        scale, offset = self.scales(index)
        values = self.values(index).reshape(scale.shape[0], -1, self.GROUP)
        return torch.addcmul(offset[..., None], values, scale[..., None]).reshape(scale.shape[0], -1)

    def _kernel(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def matmul(self, rows: torch.Tensor, step: bool) -> torch.Tensor:
        if step or rows.shape[0] < self.KERNEL_ROWS:
            return _in_blocks(rows, self._kernel)
        x = rows.float()
        out = torch.empty(rows.shape[0], self.shape[0], dtype=torch.bfloat16)
        for n in range(0, self.shape[0], self._ROWS):
            out[:, n:n + self._ROWS] = F.linear(x, self.dequantize(slice(n, n + self._ROWS)))
        return out

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.groups, self.supers]

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """The (dequantized, bf16) weight of the output rows `index`, for a reduced draft head: drafts need not be
        exact, and bf16 runs on the fast rowgemm."""
        return self.dequantize(index).to(torch.bfloat16)

    def row_blocks(self, n: int) -> list["GroupedWeight"]:
        return [type(self).from_parts(c, g, s, (c.shape[0], self.shape[1]))
                for c, g, s in zip(self.codes.chunk(n), self.groups.chunk(n), self.supers.chunk(n))]

    def take_rows(self, index) -> "GroupedWeight":
        """The same weight's output rows `index`, exactly (copies of their codes and scales)."""
        codes = self.codes[index].contiguous()
        return type(self).from_parts(codes, self.groups[index].contiguous(), self.supers[index].contiguous(),
                                     (codes.shape[0], self.shape[1]))

    def with_super_size(self, per_super: int) -> "GroupedWeight":
        """The same values with super-blocks of `per_super` groups (a power of two dividing the current size):
        each super-block's (d, dmin) repeated for its parts."""
        if per_super == self.per_super:
            return self
        assert self.per_super % per_super == 0
        supers = self.supers.repeat_interleave(self.per_super // per_super, dim=1)
        return type(self).from_parts(self.codes, self.groups, supers, self.shape)

    def take_groups(self, order: torch.Tensor) -> "GroupedWeight":
        """The same weight with its groups along K in `order` (a permutation of the group indices): columns moved a
        group at a time, exactly. Super-blocks shrink to the largest size whose groups move together."""
        n_groups = self.groups.shape[1]
        size = self.per_super
        while size > 1 and not _moves_together(order, size):
            size //= 2
        w = self.with_super_size(size)
        codes = w.codes.reshape(self.shape[0], n_groups, -1)[:, order].reshape(w.codes.shape)
        supers = w.supers[:, order.reshape(-1, size)[:, 0] // size]
        return type(self).from_parts(codes.contiguous(), w.groups[:, order].contiguous(), supers.contiguous(),
                                     self.shape)


def _moves_together(order: torch.Tensor, size: int) -> bool:
    """Whether `order` moves groups in aligned runs of `size`, each kept in order."""
    runs = order.reshape(-1, size)
    return bool(((runs - runs[:, :1]) == torch.arange(size)).all() and (runs[:, 0] % size == 0).all())


def _level(v: torch.Tensor, up: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Values [rows, S, P] (P groups a super-block) as d * q: d fp16 [rows, S] (the largest magnitude / 127, rounded
    up so that q reaches it; often below fp16's normal range, where its steps are coarser), q integers in -127..127
    (as floats), rounded up or down; returns (d, q, d * q)."""
    exact = v.abs().amax(-1) / 127
    d = exact.half()
    d = (d.view(torch.int16) + (d.float() < exact).to(torch.int16)).view(torch.float16)  # the next fp16 up
    df = d.float()[..., None]
    ratio = torch.where(df > 0, v / torch.where(df > 0, df, 1), 0)
    q = (torch.ceil(ratio) if up else torch.floor(ratio)).clamp(-127, 127)
    return d, q, df * q


def _pack(sc: torch.Tensor, m: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """groups int8 [rows, S * P, 2] and supers fp16 [rows, S, 2] of _level's parts."""
    return torch.stack([sc, m], dim=-1).to(torch.int8).reshape(sc.shape[0], -1, 2), torch.stack([d, dmin], dim=-1)


class Int4Weight(GroupedWeight):
    """int4: codes 0..15, two a byte [N, K / 2] (the even element of each pair in the low nibble), groups of 32.
    Quantizing a weight: each group's codes span its range (offset = its minimum rounded down to a multiple of the
    super-block's dmin, scale = the rest of its range / 15 rounded up to a multiple of d), so a weight is off by at
    most half its group's step."""
    GROUP = 32

    def __init__(self, weight: torch.Tensor):
        w = weight.detach()
        n, k = w.shape
        g = self.GROUP
        per_super = super_size(k // g)
        self.codes = torch.empty(n, k // 2, dtype=torch.uint8, device=w.device)
        self.groups = torch.empty(n, k // g, 2, dtype=torch.int8, device=w.device)
        self.supers = torch.empty(n, k // g // per_super, 2, dtype=torch.float16, device=w.device)
        for start in range(0, n, self._ROWS):
            rows = w[start:start + self._ROWS].float().reshape(-1, k // g // per_super, per_super, g)
            low, high = rows.amin(-1), rows.amax(-1)
            dmin, m, offset = _level(low, up=False)  # offsets down, scales up: every group's range stays covered
            d, sc, scale = _level((high - offset).clamp(min=0) / 15, up=True)
            groups, supers = _pack(sc, m, d, dmin)
            step = torch.where(scale > 0, scale, 1)[..., None]
            codes = torch.round((rows - offset[..., None]) / step).clamp(0, 15).to(torch.uint8).reshape(-1, k)
            self.codes[start:start + self._ROWS] = codes[:, 0::2] | (codes[:, 1::2] << 4)
            self.groups[start:start + self._ROWS] = groups
            self.supers[start:start + self._ROWS] = supers
        self.shape = w.shape

    def values(self, index) -> torch.Tensor:
        codes = self.codes[index]
        return torch.stack([codes & 15, codes >> 4], dim=-1).reshape(codes.shape[0], -1).float()

    def _kernel(self, rows: torch.Tensor) -> torch.Tensor:
        return kernels.rowgemm_int4(rows, self.codes, self.groups, self.supers)

    def to_int8_blocks(self) -> "Int8BlockWeight":
        """The same values as int8 blocks (each group of 32 two groups of 16 with its scale and offset), exactly."""
        codes = self.values(slice(None)).to(torch.int8)
        return Int8BlockWeight.from_parts(codes, self.groups.repeat_interleave(2, dim=1), self.supers, self.shape)


class Int8BlockWeight(GroupedWeight):
    """int8 codes [N, K] in groups of 16: what GGUF's 5- to 8-bit blocks keep exactly (loading/gguf_blocks.py).
    Quantizing a weight (for a projection fused with such blocks): symmetric, each group's scale its largest
    magnitude / 127 rounded up to a multiple of the super-block's d, offset 0."""
    GROUP = 16

    def __init__(self, weight: torch.Tensor):
        w = weight.detach()
        n, k = w.shape
        g = self.GROUP
        per_super = super_size(k // g, 16)
        self.codes = torch.empty(n, k, dtype=torch.int8, device=w.device)
        self.groups = torch.empty(n, k // g, 2, dtype=torch.int8, device=w.device)
        self.supers = torch.empty(n, k // g // per_super, 2, dtype=torch.float16, device=w.device)
        for start in range(0, n, self._ROWS):
            rows = w[start:start + self._ROWS].float().reshape(-1, k // g // per_super, per_super, g)
            d, sc, scale = _level(rows.abs().amax(-1) / 127, up=True)
            groups, supers = _pack(sc, torch.zeros_like(sc), d, torch.zeros_like(d))
            step = torch.where(scale > 0, scale, 1)[..., None]
            codes = torch.round(rows / step).clamp(-127, 127).to(torch.int8)
            self.codes[start:start + self._ROWS] = codes.reshape(-1, k)
            self.groups[start:start + self._ROWS] = groups
            self.supers[start:start + self._ROWS] = supers
        self.shape = w.shape

    def values(self, index) -> torch.Tensor:
        return self.codes[index].float()

    def _kernel(self, rows: torch.Tensor) -> torch.Tensor:
        return kernels.rowgemm_int8_blocks(rows, self.codes, self.groups, self.supers)


def join_rows(parts: list[GroupedWeight]) -> GroupedWeight:
    """Weights of the same K stacked along N (a fused projection) in one format, exactly: int8 blocks if any part is
    (int4 parts converted), super-blocks of the smallest part's size."""
    if any(isinstance(p, Int8BlockWeight) for p in parts):
        parts = [p.to_int8_blocks() if isinstance(p, Int4Weight) else p for p in parts]
    size = min(p.per_super for p in parts)
    parts = [p.with_super_size(size) for p in parts]
    return type(parts[0]).from_parts(torch.cat([p.codes for p in parts]), torch.cat([p.groups for p in parts]),
                                     torch.cat([p.supers for p in parts]),
                                     (sum(p.shape[0] for p in parts), parts[0].shape[1]))
