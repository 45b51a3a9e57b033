"""Prefill matmuls of bf16 weights on CPUs without bf16 dot products run widened to fp32 in slices of the weight."""
import torch

import mtpx.models.linear as linear_module
from mtpx.models.linear import WIDEN_ROWS, linear


def test_widened_prefill_matmul_is_a_bf16_matmul_and_slices_the_weight(monkeypatch):
    monkeypatch.setattr(linear_module, "_widen_prefill", True)
    monkeypatch.setattr(linear_module, "_WIDEN_BYTES", 4 * 64 * 40)  # slices of 40 rows: 3 slices of 100 rows
    g = torch.Generator().manual_seed(0)
    w = torch.randn(100, 64, generator=g).bfloat16()
    x = torch.randn(2, WIDEN_ROWS, 64, generator=g).bfloat16()
    widened = []
    monkeypatch.setattr(linear_module, "_widened_matmul", lambda rows, weight, f=linear_module._widened_matmul:
                        widened.append(rows.shape[0]) or f(rows, weight))
    with torch.inference_mode():
        out = linear(x, w)
        few = linear(x[:1, :WIDEN_ROWS - 1], w)  # below WIDEN_ROWS: PyTorch's bf16 matmul
    assert widened == [2 * WIDEN_ROWS]
    assert out.dtype == torch.bfloat16 and out.shape == (2, WIDEN_ROWS, 100)
    ref = x.double() @ w.double().t()
    assert ((out.double() - ref).abs() <= ref.abs() * 2 ** -7 + 1e-3).all()  # fp32 sums, one bf16 rounding
    assert ((few.double() - ref[:1, :WIDEN_ROWS - 1]).abs() <= ref[:1, :WIDEN_ROWS - 1].abs() * 2 ** -7 + 1e-3).all()
    with torch.enable_grad():  # training keeps PyTorch's matmul (and its autograd graph)
        linear(x, w)
    assert widened == [2 * WIDEN_ROWS]
