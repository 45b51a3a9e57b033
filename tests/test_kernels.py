"""The rowgemm CPU kernel: each row's result is the same bits whatever the row count, and it is a correct matmul."""
import pytest
import torch

from mtpx import kernels
from mtpx.models import linear as linear_module
from mtpx.models.linear import Int8Weight, linear, row_invariant

needs_kernel = pytest.mark.skipif(not kernels.rowgemm_available(), reason="rowgemm kernel could not be built here")


@needs_kernel
@pytest.mark.parametrize("n,k", [(64, 64), (37, 48), (1024, 3584), (4096, 1024), (8192, 256)])
def test_rowgemm_rows_do_not_depend_on_row_count(n, k):
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g).bfloat16()
    x = torch.randn(8, k, generator=g).bfloat16()
    alone = torch.cat([kernels.rowgemm(x[i:i + 1], w) for i in range(8)])
    for m in range(2, 9):
        assert torch.equal(kernels.rowgemm(x[:m], w), alone[:m])
    ref = x.double() @ w.double().t()
    # fp32 accumulation, one bf16 rounding of the result
    assert ((alone.double() - ref).abs() <= ref.abs() * 2 ** -7 + 1e-3 * k ** 0.5).all()


@needs_kernel
def test_rowgemm_thread_count_does_not_change_bits():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(3000, 512, generator=g).bfloat16(), torch.randn(5, 512, generator=g).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.rowgemm(x, w)
        torch.set_num_threads(2)
        assert torch.equal(kernels.rowgemm(x, w), one)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_rowgemm_rejects_bad_shapes():
    w = torch.randn(16, 32).bfloat16()
    with pytest.raises(RuntimeError, match="1..8 rows"):
        kernels.rowgemm(torch.randn(9, 32).bfloat16(), w)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        kernels.rowgemm(torch.randn(2, 24).bfloat16(), torch.randn(16, 24).bfloat16())


def test_padded_onednn_path_is_row_invariant_too(monkeypatch):
    """Where the kernel cannot be built, step matmuls fall back to fixed blocks of STEP_ROWS rows on oneDNN."""
    monkeypatch.setattr(linear_module, "uses_rowgemm", lambda w: False)
    g = torch.Generator().manual_seed(2)
    w = torch.randn(1024, 3584, generator=g).bfloat16()
    x = torch.randn(11, 3584, generator=g).bfloat16()
    with row_invariant():
        alone = torch.cat([linear(x[i:i + 1], w) for i in range(11)])
        for m in (2, 5, 6, 11):
            assert torch.equal(linear(x[:m], w), alone[:m])


@needs_kernel
def test_rowgemm_int8_rows_do_not_depend_on_row_count_and_match_dequantized():
    g = torch.Generator().manual_seed(3)
    w = Int8Weight(torch.randn(1000, 512, generator=g).bfloat16())
    x = torch.randn(8, 512, generator=g).bfloat16()
    alone = torch.cat([kernels.rowgemm_int8(x[i:i + 1], w.q, w.scale) for i in range(8)])
    for m in range(2, 9):
        assert torch.equal(kernels.rowgemm_int8(x[:m], w.q, w.scale), alone[:m])
    ref = x.double() @ (w.q.double() * w.scale.double()[:, None]).t()
    assert ((alone.double() - ref).abs() <= ref.abs() * 2 ** -7 + 1e-2).all()
    # and the prefill path (PyTorch's int8 weight-only matmul) computes the same function up to rounding
    with row_invariant(False):
        prefill = linear(x, w)
    assert ((prefill.double() - ref).abs() <= ref.abs() * 2 ** -6 + 5e-2).all()


@needs_kernel
def test_gdn_steps_match_the_reference_recurrence_and_do_not_depend_on_token_count():
    """The fused Gated DeltaNet step equals the op-by-op recurrence (to fp32 rounding), and its result for a token is
    the same bits whether the call holds 1 token or several."""
    from mtpx.models.qwen3_5 import recurrent_gated_delta_step
    g = torch.Generator().manual_seed(4)
    T, nk, nv, dk, dv = 5, 2, 4, 16, 32
    mixed = torch.randn(T, 2 * nk * dk + nv * dv, generator=g)
    gate = -torch.rand(T, nv, generator=g)
    beta = torch.rand(T, nv, generator=g)
    state = torch.randn(nv, dk, dv, generator=g)
    out, states = kernels.gdn_steps(mixed, gate, beta, state, nk, dk, dv)
    ref_state = state
    for t in range(T):
        q, k, v = mixed[t].split([nk * dk, nk * dk, nv * dv])
        q, k = q.view(nk, dk), k.view(nk, dk)
        q = (q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6) / dk ** 0.5).repeat_interleave(nv // nk, 0)
        k = (k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)).repeat_interleave(nv // nk, 0)
        o, ref_state = recurrent_gated_delta_step(q, k, v.view(nv, dv), gate[t], beta[t], ref_state)
        torch.testing.assert_close(out[t], o, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(states[t], ref_state, rtol=1e-5, atol=1e-5)
    # one token at a time, continuing from the state each call left
    s = state
    for t in range(T):
        o1, (s,) = kernels.gdn_steps(mixed[t:t + 1].contiguous(), gate[t:t + 1].contiguous(),
                                     beta[t:t + 1].contiguous(), s, nk, dk, dv)
        assert torch.equal(o1[0], out[t]) and torch.equal(s, states[t])
