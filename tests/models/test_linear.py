"""Prefill matmuls of bf16 weights on CPUs without bf16 dot products run widened to fp32 in slices of the weight;
bf16 weights as AMX tiles. (int4 and int8 blocks: test_grouped.py.)"""
import pytest
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


def test_tiles_replace_the_bf16_weights_that_fit_and_compute_what_they_did(dense_ckpt, monkeypatch):
    """On a CPU with AMX, LLM(dtype=bf16) moves every weight with K % 32 == 0 to tile order and releases the bf16
    copy; the tied head is tiled too while small (the embedding keeps its copy). Logits match the vector kernel's
    to bf16 rounding, and greedy text is the same."""
    import mtpx
    from mtpx import kernels
    from mtpx.models.linear import TileWeight, quantized_weights
    if not kernels.amx_available():
        pytest.skip("no AMX tiles here")
    llm = mtpx.LLM(dense_ckpt)
    model = llm.model
    tiles = quantized_weights(model)
    assert tiles and all(isinstance(w, TileWeight) and w.shape[1] % 32 == 0 for w in tiles)
    assert all(m.weight.numel() == 0 for m in model.modules()
               if isinstance(m, linear_module.Linear) and m.quantized is not None and m is not model.lm_head)
    from mtpx.runners import RunnerConfig
    vector = mtpx.LLM(dense_ckpt, runner_config=RunnerConfig.from_env(tiles=False))
    assert not quantized_weights(vector.model)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.inference_mode():
        a = model.logits(model(ids, [model.new_state(16)], "prefill"))
        b = vector.model.logits(vector.model(ids, [vector.model.new_state(16)], "prefill"))
    torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05 * b.float().abs().max().item())
    assert llm.generate([5, 6, 7], max_tokens=12, spec_type="none").token_ids == vector.generate([5, 6, 7], max_tokens=12, spec_type="none").token_ids


def test_a_tied_head_is_tiled_only_while_small(tmp_path, monkeypatch):
    import mtpx
    from mtpx import kernels
    from mtpx.models.linear import TileWeight
    from checkpoints import make_checkpoint
    if not kernels.amx_available():
        pytest.skip("no AMX tiles here")
    make_checkpoint(tmp_path / "tied", tied=True)
    model = mtpx.LLM(tmp_path / "tied").model
    assert isinstance(model.lm_head.quantized, TileWeight)
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.numel()
    from mtpx.runners import weights
    monkeypatch.setattr(weights, "TILED_TIED_HEAD_BYTES", 0)
    assert mtpx.LLM(tmp_path / "tied").model.lm_head.quantized is None
