"""Roofline: the machine's memory bandwidth, measured with torch, against the weight bytes each generated token reads.

Decoding one token reads every dense weight of the model once (and, on MoE models, the experts the token routes to),
so tokens/s × bytes/token is the bandwidth the engine achieves; its ratio to the measured read bandwidth says how far
from memory-bound the engine is.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from mtpx.models.linear import linear, parameter_count, row_invariant, weight_bytes


def _best(fn, reps: int, device: torch.device = torch.device("cpu")) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    fn()
    best = float("inf")
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


@torch.inference_mode()
def measure_bandwidth(mbytes: int = 512, reps: int = 5, device: torch.device | str = "cpu") -> dict:
    """GB/s (1e9 bytes) of: a copy (read + write counted), a sum (read), and bf16 matmuls over a stack of weights
    totalling `mbytes`: F.linear with one row, and (CPU) mtpx's step matmul with 1 and 5 rows (decode / verify k=4).
    On a GPU the buffers are 4x larger (well past its L2 cache)."""
    device = torch.device(device)
    gpu = device.type == "cuda"
    mbytes = mbytes * 4 if gpu else mbytes
    n = mbytes * 2**20 // 4
    src = torch.rand(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy_s = _best(lambda: dst.copy_(src), reps, device)
    sum_s = _best(lambda: src.sum(), reps, device)
    del src, dst
    hidden = 4096
    n_w = max(1, mbytes * 2**20 // (hidden * hidden * 2))
    weights = [torch.randn(hidden, hidden, dtype=torch.bfloat16, device=device) * 0.02 for _ in range(n_w)]
    x = torch.randn(1, hidden, dtype=torch.bfloat16, device=device)
    w_bytes = n_w * hidden * hidden * 2
    linear_s = _best(lambda: [F.linear(x, w) for w in weights], reps, device)
    out = {
        "device": torch.cuda.get_device_name(device) if gpu else "cpu",
        "buffer_bytes": n * 4,
        "copy_GBps": 2 * n * 4 / copy_s / 1e9,
        "read_GBps": n * 4 / sum_s / 1e9,
        "linear_bf16_GBps": w_bytes / linear_s / 1e9,
        "threads": torch.get_num_threads(),
    }
    if gpu:
        return out
    from mtpx import kernels
    with row_invariant():  # mtpx's step matmuls as they run on this machine (rowgemm, or padded oneDNN blocks)
        for rows in (1, 5):
            xr = torch.randn(rows, hidden, dtype=torch.bfloat16)
            out[f"step_linear_{rows}_rows_GBps"] = w_bytes / _best(lambda: [linear(xr, w) for w in weights], reps) / 1e9
    out["step_kernel"] = "rowgemm" if kernels.rowgemm_available() else "oneDNN, 5-row blocks"
    try:  # the fallback step path, for comparison: oneDNN-prepacked weights, 5 rows
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, 5) for w in weights]
        xp = torch.zeros(5, hidden, dtype=torch.bfloat16)
        packed_s = _best(lambda: [torch.ops.mkldnn._linear_pointwise(xp, p, None, "none", [], "") for p in packed],
                         reps)
        out["linear_bf16_packed_GBps"] = w_bytes / packed_s / 1e9
    except (RuntimeError, AttributeError):  # no oneDNN bf16 on this build/CPU
        pass
    return out


def add_roofline(records: list[dict], bandwidth: dict) -> None:
    roof = bandwidth["read_GBps"]
    for rec in records:
        b = rec.get("weight_bytes_per_token")
        if b:
            achieved = b * rec["decode_tokens_per_s"] / 1e9
            rec["achieved_GBps"] = achieved
            rec["bandwidth_fraction"] = achieved / roof
            rec["roofline_tokens_per_s"] = roof * 1e9 / b
        else:
            rec["achieved_GBps"] = rec["bandwidth_fraction"] = rec["roofline_tokens_per_s"] = None


def model_weight_bytes(model) -> dict:
    """Bytes of the model's weights by part (as loaded, without oneDNN's packed copies)."""
    from mtpx.bench.runner import WeightTraffic
    s = WeightTraffic.sizes(model)
    total = weight_bytes(model)
    params = parameter_count(model)
    return {**s, "total": total, "parameters": params,
            "mtp_total": weight_bytes(model.mtp) if model.mtp else 0}
