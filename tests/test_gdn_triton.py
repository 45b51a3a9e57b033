"""The gated delta rule as one Triton kernel (kernels/gdn_triton.py) against the token-by-token PyTorch step, run in
Triton's interpreter on the CPU (tests/conftest.py turns it on where there is no GPU) and compiled on a GPU."""
import os
import platform
import sys

import pytest
import torch
import torch.nn.functional as F

from mtpx.kernels import gdn_triton
from mtpx.models.qwen3_5 import recurrent_gated_delta_step

try:
    import triton
except ImportError:
    # a test dependency on Linux x86-64 (pyproject.toml): missing there in CI is a broken install, not a skip
    in_ci = os.environ.get("CI", "").lower() not in ("", "0", "false")
    if in_ci and sys.platform == "linux" and platform.machine() == "x86_64":
        raise
    pytest.skip("triton is not installed", allow_module_level=True)
DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(not triton.knobs.runtime.interpret, reason="compiled Triton")),
           pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def _inputs(W, H, dk, dv, seed, device):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(W, H, dk, generator=g), dim=-1) / dk ** 0.5
    k = F.normalize(torch.randn(W, H, dk, generator=g), dim=-1)
    v = torch.randn(W, H, dv, generator=g)
    decay, beta = -torch.rand(W, H, generator=g), torch.rand(W, H, generator=g)
    state = torch.randn(H, dk, dv, generator=g)
    return [t.to(device) for t in (q, k, v, decay, beta, state)]


@pytest.mark.parametrize("W, H, dk, dv, T", [(8, 4, 64, 64, 3), (8, 2, 32, 48, 8), (8, 3, 20, 16, 1), (4, 2, 16, 16, 0)])
def test_recurrence_matches_the_token_loop(device, W, H, dk, dv, T):
    q, k, v, decay, beta, state0 = _inputs(W, H, dk, dv, T, device)
    state, snaps = state0.clone(), torch.full((W + 1, H, dk, dv), float("nan"), device=device)
    out = gdn_triton.gated_delta_recurrence(q, k, v, decay, beta, state, snaps, T)
    rec, outs, states = state0, [], [state0]
    for t in range(T):
        o, rec = recurrent_gated_delta_step(q[t], k[t], v[t], decay[t], beta[t], rec)
        outs.append(o)
        states.append(rec)
    tol = dict(rtol=1e-5, atol=1e-5)
    if T:
        torch.testing.assert_close(out[:T], torch.stack(outs), **tol)
    assert torch.equal(out[T:], torch.zeros_like(out[T:]))  # padding rows
    torch.testing.assert_close(snaps[:T + 1], torch.stack(states), **tol)  # before the pass, after each position
    torch.testing.assert_close(state, rec, **tol)


def test_positions_keep_their_bits_whatever_the_pass_width(device):
    q, k, v, decay, beta, state0 = _inputs(8, 4, 64, 64, 7, device)
    wide_state, wide_snaps = state0.clone(), state0.new_zeros(9, 4, 64, 64)
    wide = gdn_triton.gated_delta_recurrence(q, k, v, decay, beta, wide_state, wide_snaps, 6)
    state, snaps, rows = state0.clone(), state0.new_zeros(9, 4, 64, 64), []
    for t in range(6):  # one position per pass, each from the state the last one left
        one = [x[t:t + 1].expand(8, *x.shape[1:]).contiguous() for x in (q, k, v, decay, beta)]
        rows.append(gdn_triton.gated_delta_recurrence(*one, state, snaps, 1)[0])
    assert torch.equal(wide[:6], torch.stack(rows))
    assert torch.equal(wide_state, state)


def test_off_cuda_only_in_the_interpreter():
    # mode: RunnerConfig.triton_gdn (MTPX_TRITON_GDN, read once at load)
    assert not gdn_triton.available(torch.device("cpu"))  # the CPU's static passes keep the token loop
    assert gdn_triton.available(torch.device("cpu"), "interpret")
    assert not gdn_triton.available(torch.device("cuda"), "0")
    with pytest.raises(TypeError, match="fp32"):
        gdn_triton.gated_delta_recurrence(*_inputs(8, 2, 16, 16, 0, "cpu")[:5], torch.zeros(2, 16, 16).bfloat16(),
                                          torch.zeros(9, 2, 16, 16), 1)
