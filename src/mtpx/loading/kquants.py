"""llama.cpp's Q4_K and Q6_K blocks written from float weights, for `mtpx convert --outtype q4_k` (gguf-py decodes
K-quants but has no quantizer for them). gguf-py's `gguf.quants.dequantize` is the authority on the layout; the
decoding side of these same blocks is loading/gguf_blocks.py.

- Q4_K: super-blocks of 256 weights in 8 sub-blocks of 32; weight = d * sc * q - dmin * m with q in 0..15, sc and m
  6-bit, d and dmin fp16. Each sub-block's (scale, min) comes from llama.cpp's search (make_qkx2_quants: 21 trial
  scales, each refitted by weighted least squares, weights |x| + the sub-block's RMS); the scales and mins are then
  quantized to 6 bits against the super-block's largest, and the codes recomputed with the scales as stored.
- Q6_K: super-blocks of 256 weights in 16 sub-blocks of 16; weight = d * sc * (q - 32) with q in 0..63, sc int8,
  d fp16. Each sub-block's scale is llama.cpp's make_qx_quants search (19 trial scales, x² weights), signed so that
  the largest magnitude lands on -32, the one end the codes reach.

Both follow llama.cpp's reference quantizers (quantize_row_q4_K_ref / _q6_K_ref) step for step: against libggml's,
about 97 % of blocks come out byte for byte the same, the rest differing where float sums taken in another order
tip a choice, with the same error. Written with torch rather than numpy so that a large file quantizes on the GPU,
or on all CPU cores, in seconds.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType

from mtpx.errors import ModelLoadError

TYPES = ("Q4_K", "Q6_K")
# super-blocks quantized at a time: temporaries of tens of MB (hundreds on a GPU) whatever the matrix
_CHUNK = {"cpu": 1 << 14, "cuda": 1 << 16}


def quantize(x: torch.Tensor, qtype: str, device: str | torch.device | None = None,
             name: str = "tensor") -> np.ndarray:
    """Float weights [..., K] (K a multiple of 256) -> uint8 [..., K / 256 * block bytes] of `qtype` (Q4_K or
    Q6_K), in llama.cpp's layout. `device`: where to compute (default: x's)."""
    if qtype not in TYPES:
        raise ModelLoadError(f"{name}: no K-quant quantizer for {qtype}; mtpx writes {', '.join(TYPES)}")
    if x.ndim == 0 or x.shape[-1] % QK_K:
        raise ModelLoadError(f"{name}: rows of {x.shape[-1] if x.ndim else 0} weights do not split into {qtype}'s "
                             f"super-blocks of {QK_K}")
    size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][1]  # bytes a block
    blocks = x.detach().reshape(-1, QK_K)
    out = np.empty((blocks.shape[0], size), dtype=np.uint8)
    encode = _q4_k if qtype == "Q4_K" else _q6_k
    device = torch.device(device or blocks.device)
    chunk = _CHUNK.get(device.type, _CHUNK["cpu"])
    for start in range(0, blocks.shape[0], chunk):
        part = blocks[start:start + chunk].to(device, torch.float32)
        if not torch.isfinite(part).all():
            raise ModelLoadError(f"{name} holds non-finite values: it cannot be quantized to {qtype}")
        out[start:start + chunk] = encode(part, name).cpu().numpy()
    return out.reshape(*x.shape[:-1], x.shape[-1] // QK_K * size)


def _half_bytes(v: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [B] -> (its fp16 rounding as float32, its two little-endian bytes [B, 2])."""
    h = v.half()
    if not torch.isfinite(h).all():
        raise ModelLoadError(f"{name}: a super-block's scale overflows fp16 (weights above ~4e6)")
    return h.float(), h.view(torch.int16)[:, None].view(torch.uint8).reshape(-1, 2)


def _fit_sub_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's make_qkx2_quants (nmax 15, rmin -1, rdelta 0.1, 20 steps) on each row of x [..., 32]: the
    (scale >= 0, min >= 0) of weight = scale * q - min with the least weighted squared error found. As there, each
    trial scale spans the range from the best offset so far, so the search follows the same path."""
    w = x.pow(2).mean(-1, keepdim=True).sqrt() + x.abs()
    high = x.amax(-1, keepdim=True)
    low = x.amin(-1, keepdim=True).clamp(max=0)
    flat = high == low
    inv = 15 / torch.where(flat, 1, high - low)
    sum_w, sum_x = w.sum(-1, keepdim=True), (w * x).sum(-1, keepdim=True)
    scale, offset = 1 / inv, low
    best = (w * ((inv * (x - low)).round().clamp(0, 15) * scale + low - x).pow(2)).sum(-1, keepdim=True)
    for step in range(21):
        trial = float(np.float32(np.float32(-1) + np.float32(0.1) * np.float32(step)) + np.float32(15))  # as float
        span = high - offset
        q = (trial / torch.where(span > 0, span, 1) * (x - offset)).round().clamp(0, 15)
        sum_l, sum_l2, sum_xl = (w * q).sum(-1, keepdim=True), (w * q * q).sum(-1, keepdim=True), \
            (w * q * x).sum(-1, keepdim=True)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = (det > 0) & (span > 0)
        safe = torch.where(ok, det, 1)
        s, m = (sum_w * sum_xl - sum_x * sum_l) / safe, (sum_l2 * sum_x - sum_l * sum_xl) / safe
        positive = m > 0  # the offset may not be above 0: refit the scale alone
        s = torch.where(positive, sum_xl / torch.where(sum_l2 > 0, sum_l2, 1), s)
        m = torch.where(positive, 0, m)
        err = (w * (s * q + m - x).pow(2)).sum(-1, keepdim=True)
        better = ok & (err < best)
        scale, offset = torch.where(better, s, scale), torch.where(better, m, offset)
        best = torch.where(better, err, best)
    scale, offset = torch.where(flat, 0, scale), torch.where(flat, low, offset)
    return scale[..., 0], -offset[..., 0]


def _q4_k(x: torch.Tensor, name: str) -> torch.Tensor:
    b = x.shape[0]
    sub = x.reshape(b, 8, 32)
    scale, low = _fit_sub_blocks(sub)
    max_scale, max_min = scale.amax(-1, keepdim=True), low.amax(-1, keepdim=True)
    sc = torch.where(max_scale > 0, (63 / torch.where(max_scale > 0, max_scale, 1) * scale).round(), 0).clamp(max=63)
    m = torch.where(max_min > 0, (63 / torch.where(max_min > 0, max_min, 1) * low).round(), 0).clamp(max=63)
    d, d_bytes = _half_bytes(max_scale[:, 0] / 63, name)
    dmin, dmin_bytes = _half_bytes(max_min[:, 0] / 63, name)
    step = d[:, None] * sc
    q = ((sub + (dmin[:, None] * m)[..., None]) / torch.where(step > 0, step, 1)[..., None]).round().clamp(0, 15)
    q = torch.where(step[..., None] > 0, q, 0).to(torch.uint8)
    sc, m = sc.to(torch.uint8), m.to(torch.uint8)
    # 12 bytes: the first four scales and mins in bytes 0-3 / 4-7 (6 bits), the last four's top 2 bits above them,
    # and their low 4 bits in bytes 8-11 (scale low nibble, min high nibble): gguf_blocks._k_scales reads them back
    scales = torch.cat([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), m[:, :4] | ((m[:, 4:] >> 4) << 6),
                        (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)], dim=1)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(b, 128)  # sub-blocks 2c and 2c + 1 share 32 bytes
    return torch.cat([d_bytes, dmin_bytes, scales, qs], dim=1)


def _fit_symmetric(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's make_qx_quants (nmax 32, x² weights) on each row of x [..., 16]: the signed scale of
    weight = scale * q, q in -32..31, with the least weighted squared error found."""
    at = x.abs().argmax(-1, keepdim=True)
    peak = x.gather(-1, at)  # the signed value of largest magnitude
    flat = peak.abs() < 1e-15
    peak = torch.where(flat, 1, peak)
    w = x * x
    scale = torch.zeros_like(peak)
    best = torch.full_like(peak, -1.0)
    for step in [0] + [s for s in range(-9, 10) if s]:
        q = (-(32 + 0.1 * step) / peak * x).round().clamp(-32, 31)
        sum_lx, sum_l2 = (w * x * q).sum(-1, keepdim=True), (w * q * q).sum(-1, keepdim=True)
        ok = sum_l2 > 0
        s = sum_lx / torch.where(ok, sum_l2, 1)
        score = torch.where(ok, s * sum_lx, -1)  # the squared error falls as sum_lx² / sum_l2 rises
        better = ok & (score > best)
        scale, best = torch.where(better, s, scale), torch.where(better, score, best)
    return torch.where(flat, 0, scale)[..., 0]


def _q6_k(x: torch.Tensor, name: str) -> torch.Tensor:
    b = x.shape[0]
    sub = x.reshape(b, 16, 16)
    scales = _fit_symmetric(sub)
    top = scales.gather(-1, scales.abs().argmax(-1, keepdim=True))  # signed
    empty = top.abs() < 1e-15
    inv = torch.where(empty, 0, -128 / torch.where(empty, 1, top))
    d, d_bytes = _half_bytes(torch.where(empty, 0, 1 / torch.where(inv == 0, 1, inv))[:, 0], name)
    sc = (inv * scales).round().clamp(-128, 127)
    step = d[:, None] * sc
    q = (sub / torch.where(step != 0, step, 1)[..., None]).round().clamp(-32, 31)
    q = (torch.where(step[..., None] != 0, q, 0) + 32).to(torch.uint8).reshape(b, 2, 4, 32)  # halves of 128
    # per half: 64 bytes holding elements 0-63 (low nibbles) and 64-127 (high nibbles); 32 bytes holding element
    # l + 32 j's top 2 bits at bits 2j (gguf_blocks._decode's Q6_K branch reads them back)
    ql = torch.cat([q[:, :, 0] & 15 | ((q[:, :, 2] & 15) << 4), q[:, :, 1] & 15 | ((q[:, :, 3] & 15) << 4)], dim=2)
    qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
    return torch.cat([ql.reshape(b, 128), qh.reshape(b, 64), sc.to(torch.int8).view(torch.uint8), d_bytes], dim=1)
