"""The CPU kernels' integer matmul of quantized weights (kernels/gemm_core.h, "Integer dot products") computed
independently in PyTorch, to the bit: x quantized per row and span to int8 (d = max|x| / 127, codes x / d rounded to
nearest even; the span is the weight's super-block, 32 to 256 elements, int8 rows 256), exact integer sums of 4
code products per lane (over a span of several blocks, each block's sum times its group's sub-scale), then the
kernels' one float order (lanes accumulated span after span by fused multiply-adds, a fixed tree, the offsets' four
sums; int4 in spans of several blocks: the span's whole integer sums, of code products and of the groups' m times
the sums of x's codes, each accumulated by one fused multiply-add a span). reference(x, w) returns what
kernels.rowgemm_int4 / rowgemm_int8_blocks / rowgemm_int8 return for x [M, K] with K a multiple of 32."""
from __future__ import annotations

import torch

BLOCK = 32
MAX_SPAN = 256


def fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fp32 fused multiply-add, a * b + c with one rounding, where a * b is exact in fp64 (significands of at most
    53 bits together): fp64 sum and its exact error (TwoSum), rounded to fp32; the error decides only a tie."""
    p, c = a.double() * b.double(), c.double()
    s = p + c
    bb = s - p
    e = (p - (s - bb)) + (c - bb)
    r = s.float()
    d = s - r.double()
    other = torch.nextafter(r, torch.where(d > 0, torch.inf, -torch.inf).float())
    tie = (d != 0) & (s == (r.double() + other.double()) / 2) & (e != 0)
    return torch.where(tie & ((e > 0) == (d > 0)), other, r)


def span_of(w, K: int) -> int:
    """The elements sharing one scale of x for weight w (gemm_core.h's dot_span): its super-block, at least a block
    of 32, at most 256 (int8 rows: 256), halved until it divides K."""
    from mtpx.models.grouped import GroupedWeight
    span = min(MAX_SPAN, max(BLOCK, w.GROUP * w.per_super)) if isinstance(w, GroupedWeight) else MAX_SPAN
    while K % span:
        span //= 2
    return span


def quantize(x: torch.Tensor, span: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x fp32 [M, K] -> codes (as fp64 integers) [M, K / 32, 32] and scales d fp32 [M, K / span]."""
    spans = x.float().reshape(x.shape[0], -1, span)
    d = spans.abs().amax(-1) / 127
    live = d > 0
    q = torch.where(live[..., None], torch.round(spans / torch.where(live, d, 1)[..., None]), 0)
    return q.double().reshape(x.shape[0], -1, BLOCK), d


def _deinterleave(t: torch.Tensor) -> torch.Tensor:
    """Each block of 32 as its 16 even elements, then its 16 odd ones (int4's element order in the kernels)."""
    return t.reshape(t.shape[0], -1, BLOCK // 2, 2).transpose(-1, -2).reshape(t.shape[0], -1, BLOCK)


def reference(x: torch.Tensor, w) -> torch.Tensor:
    """x [M, K] @ w.T on the integer kernels, in x's dtype. w: Int4Weight, Int8BlockWeight or Int8Weight."""
    from mtpx.models.grouped import Int4Weight, Int8BlockWeight
    M, K = x.shape
    int4, grouped = isinstance(w, Int4Weight), isinstance(w, (Int4Weight, Int8BlockWeight))
    span = span_of(w, K)
    xf = x.float()
    if int4:
        xf = _deinterleave(xf).reshape(M, K)
    q, d = quantize(xf, span)  # [M, B, 32], [M, S]
    B, S = K // BLOCK, K // span
    if int4:
        codes = torch.stack([w.codes & 15, w.codes >> 4], dim=-1).reshape(-1, K)  # natural order
        codes = _deinterleave(codes.double())
    elif isinstance(w, Int8BlockWeight):
        codes = w.codes.double().reshape(-1, B, BLOCK)
    else:
        codes = w.q.double().reshape(-1, B, BLOCK)
    N = codes.shape[0]
    # lane l of block b: the exact sum of elements 4l..4l + 3's products, [M, N, B, 8]
    lanes = torch.einsum("nbli,mbli->mnbl", codes.reshape(N, B, 8, 4), q.reshape(M, B, 8, 4))
    if grouped:
        per = BLOCK // w.GROUP  # groups a block
        group_of_lane = torch.arange(8) // (8 // per)  # int4: 0; int8 blocks: lanes 0-3 the first group, 4-7 the second
        scale, offset = w.scales(slice(None))  # fp32 [N, G], exact
    if span == BLOCK and grouped:  # the group's fp32 scale in ds
        ds = scale.reshape(N, B, per)[:, :, group_of_lane][None] * d[:, None, :, None]  # [M, N, B, 8], one rounding
    elif grouped:  # the groups' sub-scales on the integer sums, the super-block's d in ds
        sc = w.groups[..., 0].double().reshape(N, B, per)[:, :, group_of_lane]  # [N, B, 8]
        lanes = (lanes * sc[None]).reshape(M, N, S, -1, 8).sum(3)  # exact: below 2^53
        d_super = w.supers[:, torch.arange(S) * span // (w.GROUP * w.per_super), 0].float()  # [N, S]
        ds = d_super[None, :, :, None] * d[:, None, :, None]  # one rounding
    else:
        lanes = lanes.reshape(M, N, S, -1, 8).sum(3)
        ds = d[:, None, :, None]
    whole = int4 and span > BLOCK
    if whole:  # a span's whole integer sums of code products and of offsets, one accumulator
        per_span = span // BLOCK
        qsum = q.sum(-1).reshape(M, 1, S, per_span)  # [M, 1, S, groups a span], exact
        u = (w.groups[..., 1].double().reshape(1, N, S, per_span) * qsum).sum(-1).float()  # [M, N, S], exact
        dmin = w.supers[:, torch.arange(S) * span // (w.GROUP * w.per_super), 1].float()  # [N, S]
        dm = dmin[None] * d[:, None, :]  # one rounding
        totals, ds = lanes.sum(-1).float(), ds[..., 0].expand(M, N, S)  # to nearest even, as the int32 conversion
        out = torch.zeros(M, N)
        for s_ in range(S):
            out = fma32(u[:, :, s_], dm[:, :, s_], fma32(totals[:, :, s_], ds[:, :, s_], out))
    else:
        lanes = lanes.float()  # to nearest, ties to even, as the kernels' int32 conversion
        ds = ds.expand(M, N, lanes.shape[2], 8)
        acc = torch.zeros(M, N, 8)
        for b in range(lanes.shape[2]):
            acc = fma32(lanes[:, :, b], ds[:, :, b], acc)
        s4 = acc[..., :4] + acc[..., 4:]
        out = (s4[..., 0] + s4[..., 2]) + (s4[..., 1] + s4[..., 3])
    if grouped and not whole:  # (whole spans have their offsets in the accumulator)
        G = offset.shape[1]
        qsum = q.reshape(M, G, -1).sum(-1).float()  # exact
        sums = d.repeat_interleave(span // w.GROUP, dim=1) * qsum  # [M, G]
        o = torch.zeros(M, N, 4)
        for g in range(G):
            o[..., g % 4] = fma32(offset[None, :, g].expand(M, N), sums[:, None, g].expand(M, N), o[..., g % 4])
        out = out + ((o[..., 0] + o[..., 2]) + (o[..., 1] + o[..., 3]))
    elif not grouped:
        out = out * w.scale.float()[None]
    return out.to(x.dtype)
