"""A GGUF file's quantized blocks kept as they are: repacked into mtpx's grouped formats (models/grouped.py) without
going through floats, so that `--dtype int4` / `int8` on a quantized GGUF runs on the file's own values.

Every llama.cpp block type below is a scale and an offset per group of 16 or 32 weights along a row, each a small
integer times an fp16 (Q4_K: the 6-bit sc times the super-block's d, and the 6-bit m times its dmin), which
mtpx's two-level scales hold: int8 (sc, m) per group, fp16 (d, dmin) per super-block. Kept, and exact (the weights
the kernels compute are, bit for bit, what gguf.quants.dequantize gives, because code * scale is exact in fp32 and
the offset is then added with one rounding, as gguf-py does):

- as int4 (groups of 32): Q4_0 (d * (q - 8): scale d, offset -8 d, a super-block per group), Q4_1 (d * q + m),
  Q4_K (d * sc * q - dmin * m, super-blocks of 8 groups);
- as int8 blocks (groups of 16): Q8_0 (d * q), Q5_0 (d * (q - 16)), Q5_1 (d * q + m), Q5_K (as Q4_K with 5-bit
  codes), Q6_K (d * sc * (q - 32), sc an int8 per 16).

Not kept: Q2_K and Q3_K (their 4-bit sub-scales would fit, but mtpx does not read them), and the IQ types (codes
are indices into a grid of non-uniform values, which no scale and offset reproduce): `KEPT` names what is.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

from mtpx.models.grouped import GroupedWeight, Int4Weight, Int8BlockWeight, join_rows

INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
INT8_TYPES = ("Q8_0", "Q5_0", "Q5_1", "Q5_K", "Q6_K")
KEPT = INT4_TYPES + INT8_TYPES


def _half(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 at byte `at` of every block [..., bytes] -> float16 [...]."""
    return np.ascontiguousarray(blocks[..., at:at + 2]).view(np.float16)[..., 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Bytes [..., n] -> [..., 2n]: the n low nibbles, then the n high ones (llama.cpp's order within a block)."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K's 12 bytes -> the 8 sub-blocks' 6-bit scales and mins [..., 8]: bytes 0-3 and 4-7 hold the first
    four of each in their low 6 bits and the top 2 bits of the last four; bytes 8-11 the low 4 bits of the last
    four scales (low nibble) and mins (high nibble)."""
    lo, mid, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([lo & 63, (hi & 15) | ((lo >> 6) << 4)], axis=-1)
    m = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=-1)
    return sc, m


def _five_bit_high(qh: np.ndarray, n: int) -> np.ndarray:
    """Q5_0 / Q5_1's 4 bytes -> bit e of the little-endian 32-bit word for e < n, [..., n]."""
    word = np.ascontiguousarray(qh).view("<u4")[..., 0]
    return ((word[..., None] >> np.arange(n, dtype=np.uint32)) & 1).astype(np.uint8)


def _decode(blocks: np.ndarray, qtype: str):
    """Blocks [N, nb, bytes] -> (codes [N, nb * block], sc, m [N, groups], d, dmin fp16 [N, supers])."""
    n, nb = blocks.shape[:2]
    one = np.ones((n, nb), dtype=np.int8)
    if qtype == "Q4_0":
        d = _half(blocks, 0)
        return _nibbles(blocks[..., 2:18]), one, -8 * one, d, d
    if qtype == "Q4_1":
        return _nibbles(blocks[..., 4:20]), one, one, _half(blocks, 0), _half(blocks, 2)
    if qtype in ("Q4_K", "Q5_K"):
        sc, m = _k_scales(blocks[..., 4:16])
        qs = blocks[..., 16:144] if qtype == "Q4_K" else blocks[..., 48:176]
        codes = _nibbles(qs.reshape(n, nb, 4, 32)).reshape(n, nb, 8, 32)  # sub-blocks 2c, 2c + 1 from 32 bytes
        if qtype == "Q5_K":  # sub-block i's fifth bit: bit i of byte j of qh, for its element j
            qh = blocks[..., 16:48]
            codes = codes | (((qh[:, :, None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1) << 4)
        # dmin * m is subtracted: the offset is (-dmin) * m, exactly
        return codes, sc.astype(np.int8), m.astype(np.int8), _half(blocks, 0), -_half(blocks, 2)
    if qtype == "Q8_0":
        return blocks[..., 2:34].view(np.int8), one, 0 * one, _half(blocks, 0), np.zeros((n, nb), np.float16)
    if qtype in ("Q5_0", "Q5_1"):
        at = 2 if qtype == "Q5_0" else 4
        codes = _nibbles(blocks[..., at + 4:at + 20]) | (_five_bit_high(blocks[..., at:at + 4], 32) << 4)
        if qtype == "Q5_0":
            return codes.astype(np.int8) - 16, one, 0 * one, _half(blocks, 0), np.zeros((n, nb), np.float16)
        return codes, one, one, _half(blocks, 0), _half(blocks, 2)
    if qtype == "Q6_K":
        ql, qh = blocks[..., 0:128], blocks[..., 128:192]
        # each half of 128 weights: 64 bytes of low nibbles (then high nibbles) and 32 bytes of 2-bit pairs
        low = _nibbles(ql.reshape(n, nb, 2, 64))
        high = ((qh.reshape(n, nb, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3).reshape(n, nb, 2, 128)
        codes = (low | (high << 4)).astype(np.int8) - 32
        return codes, blocks[..., 192:208].view(np.int8), np.zeros((n, nb * 16), np.int8), _half(blocks, 208), \
            np.zeros((n, nb), np.float16)
    raise ValueError(f"GGUF type {qtype} is not kept")


def block_weight(data: np.ndarray, qtype: str, shape: tuple[int, int]) -> GroupedWeight:
    """A GGUF matrix of type `qtype` (one of KEPT), its raw rows of blocks [N, bytes] for a weight [N, K], as the
    mtpx weight holding the same values (Int4Weight or Int8BlockWeight). Rows are repacked in chunks on every core
    (numpy releases the GIL in these element-wise ops): on one, a 27B model's Q4_K / Q6_K matrices take minutes."""
    n, k = shape
    rows = np.asarray(data, dtype=np.uint8).reshape(n, -1)
    cores = len(os.sched_getaffinity(0))
    step = max(REPACK_ROWS, -(-n // cores))
    chunks = [slice(i, min(i + step, n)) for i in range(0, n, step)]
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    int4 = qtype in INT4_TYPES
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    out = [np.empty((n, k // 2) if int4 else (n, k), np.uint8 if int4 else np.int8),
           np.empty((n, k // (32 if int4 else 16), 2), np.int8), np.empty((n, k // block, 2), np.float16)]

    def fill(rows_of: slice) -> None:
        for whole, part in zip(out, _repack(rows[rows_of], qtype, k, block, size)):
            whole[rows_of] = part
    if len(chunks) == 1:
        fill(chunks[0])
    else:
        with ThreadPoolExecutor(len(chunks)) as pool:
            list(pool.map(fill, chunks))
    codes, groups, supers = (torch.from_numpy(part) for part in out)
    if int4:
        return Int4Weight.from_parts(codes, groups, supers, shape)
    return Int8BlockWeight.from_parts(codes, groups, supers, shape)


REPACK_ROWS = 256  # the fewest rows worth a thread of their own


def _repack(rows: np.ndarray, qtype: str, k: int, block: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of `size`-byte blocks of `block` weights [n, bytes] -> (int4 codes packed two a byte, or int8 codes;
    groups [n, groups, 2] int8; supers [n, supers, 2] fp16), the parts of block_weight's weight."""
    n = rows.shape[0]
    codes, sc, m, d, dmin = _decode(rows.reshape(n, k // block, size), qtype)
    group = 32 if qtype in INT4_TYPES else 16
    codes = codes.reshape(n, k)
    repeat = (k // group) // (sc.size // n)  # a block's (sc, m) for each of its groups of 16
    sc, m = (np.repeat(v.reshape(n, -1), repeat, axis=1) for v in (sc, m))
    groups = np.stack([sc, m], axis=-1).astype(np.int8)
    supers = np.stack([d.reshape(n, -1), dmin.reshape(n, -1)], axis=-1).astype(np.float16)
    if qtype in INT4_TYPES:
        return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8), groups, supers
    return codes.astype(np.int8), groups, supers


class Refused:
    """A quantized GGUF matrix whose type cannot be kept: a loader that names why (build_model refuses it when the
    run keeps quantized weights, before reading any)."""

    def __init__(self, name: str, qtype: str):
        self.refused = f"{name} ({qtype}; mtpx keeps {', '.join(KEPT)})"

    def __call__(self) -> GroupedWeight:
        raise ValueError(self.refused)


class Kept:
    """A loader of a GGUF matrix kept as it is, with its type (for the memory planner)."""

    def __init__(self, load: Callable[[], GroupedWeight], qtype: str):
        self.load, self.qtype = load, qtype

    def __call__(self) -> GroupedWeight:
        return self.load()


def kept_loader(t, shape: tuple[int, ...], hf_suffix: str, cfg) -> Kept | Refused | None:
    """For the GGUF reader's matrix `t` (HF shape `shape`, internal name suffix `hf_suffix`): a loader of it as a
    kept GroupedWeight, with loading/gguf.py's re-layout of linear-attention value heads applied to it exactly;
    Refused for a quantized type that cannot be kept; None for float types and for tensors that are not matrices."""
    qtype = t.tensor_type.name
    if len(shape) == 3 and hf_suffix.startswith("mlp.experts."):  # a stack [E, N, K]: its rows [E * N, K]
        shape = (shape[0] * shape[1], shape[2])
    if len(shape) != 2 or qtype in ("F32", "F16", "BF16"):
        return None
    if qtype not in KEPT:
        return Refused(t.name, qtype)

    def load() -> GroupedWeight:
        w = block_weight(np.asarray(t.data), qtype, (int(shape[0]), int(shape[1])))
        return _reorder_heads(w, hf_suffix, cfg) if hf_suffix.startswith("linear_attn.") else w
    return Kept(load, qtype)


def kept_gate_up(gate: Kept | Refused | None, up: Kept | Refused | None, experts: int) -> Kept | Refused | None:
    """Routed experts' ffn_gate_exps and ffn_up_exps, each kept as its rows [E * I, H], as gate_up_proj's rows
    [E * 2I, H] (each expert's gate rows, then its up rows), exactly, in one format (models/grouped.join_rows); None
    where either is a float type (both are then read as floats)."""
    if isinstance(gate, Refused) or isinstance(up, Refused):
        return gate if isinstance(gate, Refused) else up
    if gate is None or up is None:
        return None

    def load() -> GroupedWeight:
        joined = join_rows([gate(), up()])
        rows = joined.shape[0] // (2 * experts)
        return joined.take_rows(torch.arange(joined.shape[0]).reshape(2, experts, rows).transpose(0, 1).reshape(-1))
    # the planner's format: int8 blocks where either is (join_rows widens int4 to them)
    return Kept(load, up.qtype if up.qtype in INT8_TYPES else gate.qtype)


def meta_weight(qtype: str, shape: tuple[int, int]) -> GroupedWeight:
    """The tensors block_weight makes of a `qtype` matrix of `shape`, on the meta device: bytes without memory."""
    n, k = shape
    int4 = qtype in INT4_TYPES
    group = 32 if int4 else 16
    per_super = (1 if qtype in ("Q4_0", "Q4_1") else 8) if int4 else (16 if qtype[-1] == "K" else 2)
    kind = Int4Weight if int4 else Int8BlockWeight
    return kind.from_parts(torch.empty(n, k // 2 if int4 else k, dtype=torch.uint8 if int4 else torch.int8,
                                       device="meta"),
                           torch.empty(n, k // group, 2, dtype=torch.int8, device="meta"),
                           torch.empty(n, k // group // per_super, 2, dtype=torch.float16, device="meta"), shape)


def _reorder_heads(w: GroupedWeight, hf_suffix: str, cfg) -> GroupedWeight:
    """gguf.linear_attn_reorder (llama.cpp's value-head order back to HF's) on a kept weight: the same permutation,
    found by reordering indices, of its rows, or of its groups of columns for out_proj."""
    from mtpx.errors import ModelLoadError
    from mtpx.loading.gguf import linear_attn_reorder
    n, k = w.shape
    if hf_suffix != "linear_attn.out_proj.weight":
        return w.take_rows(linear_attn_reorder(hf_suffix, torch.arange(n).reshape(n, 1), cfg, to_gguf=False)[:, 0])
    columns = linear_attn_reorder(hf_suffix, torch.arange(k).reshape(1, k), cfg, to_gguf=False)[0]
    order = columns[::w.GROUP] // w.GROUP
    if not torch.equal(columns, (order[:, None] * w.GROUP + torch.arange(w.GROUP)).reshape(-1)):
        raise ModelLoadError(f"{hf_suffix}: value heads of {cfg.linear_value_head_dim} columns do not move whole "
                             f"groups of {w.GROUP}; load it with --dtype bf16")
    return w.take_groups(order)
