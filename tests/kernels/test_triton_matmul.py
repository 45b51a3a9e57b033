"""The GPU's weight-only int8 / int4 matmuls (kernels/triton_matmul.py), in Triton's interpreter where there is no
GPU: the dequantize-then-matmul result, and each row's bits independent of the call's row count."""
import pytest
import torch

from mtpx.models.linear import Int4Weight, Int8Weight

try:
    import triton
    RUNS = torch.cuda.is_available() or triton.knobs.runtime.interpret
except ImportError:
    RUNS = False
pytestmark = pytest.mark.skipif(not RUNS, reason="needs a GPU or Triton's interpreter (TRITON_INTERPRET=1)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _weights(n: int, k: int):
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g).bfloat16()
    x = torch.randn(20, k, generator=g).bfloat16().to(DEVICE)
    q8, q4 = Int8Weight(w), Int4Weight(w)
    int8 = ((q8.q.to(DEVICE), q8.scale.to(DEVICE)), (q8.q.float() * q8.scale[:, None]))
    int4 = ((q4.codes.to(DEVICE), q4.scale_offset.to(DEVICE)), q4.dequantize(slice(None)))
    return x, {"int8": int8, "int4": int4}


@pytest.mark.parametrize("n,k", [(96, 128), (70, 64)])  # 70: a partial column block
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_matches_dequantized_matmul_and_rows_ignore_the_row_count(n, k, kind):
    from mtpx.kernels import triton_matmul
    fn = triton_matmul.int8_matmul if kind == "int8" else triton_matmul.int4_matmul
    x, formats = _weights(n, k)
    args, dense = formats[kind]
    full = fn(x, *args)
    ref = x.float().cpu() @ dense.t()
    assert full.shape == (20, n) and full.dtype == torch.bfloat16
    torch.testing.assert_close(full.float().cpu(), ref, rtol=2 ** -7, atol=2 ** -7 * ref.abs().max().item())
    for rows in (1, 3, 5, 8, 17):  # decode, verify widths, and more than one row block
        assert torch.equal(fn(x[:rows], *args), full[:rows])
