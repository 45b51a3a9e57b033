"""The GPU's weight-only int8 / int4 matmuls (kernels/triton_matmul.py), in Triton's interpreter where there is no
GPU: the dequantize-then-matmul result, and each row's bits independent of the call's row count."""
import pytest
import torch

from mtpx.models.grouped import Int4Weight, Int8BlockWeight
from mtpx.models.linear import Int8Weight

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
    # int8 blocks with a super-block per group (GGUF's Q8_0 kept) and super-blocks of 2 (rows of 96: 6 groups)
    qb = Int8BlockWeight(w).with_super_size(1 if k == 128 else 2)
    int8 = ((q8.q.to(DEVICE), q8.scale.to(DEVICE)), (q8.q.float() * q8.scale[:, None]))
    grouped = {name: (tuple(t.to(DEVICE) for t in q.tensors()), q.dequantize(slice(None)))
               for name, q in (("int4", q4), ("int8 blocks", qb))}
    return x, {"int8": int8, **grouped}


@pytest.mark.parametrize("n,k", [(96, 128), (70, 64), (40, 96)])  # 70: a partial column block
@pytest.mark.parametrize("kind", ["int8", "int4", "int8 blocks"])
def test_matches_dequantized_matmul_and_rows_ignore_the_row_count(n, k, kind):
    from mtpx.kernels import triton_matmul
    fn = {"int8": triton_matmul.int8_matmul, "int4": triton_matmul.int4_matmul,
          "int8 blocks": triton_matmul.int8_blocks_matmul}[kind]
    x, formats = _weights(n, k)
    args, dense = formats[kind]
    full = fn(x, *args)
    ref = x.float().cpu() @ dense.t()
    assert full.shape == (20, n) and full.dtype == torch.bfloat16
    torch.testing.assert_close(full.float().cpu(), ref, rtol=2 ** -7, atol=2 ** -7 * ref.abs().max().item())
    for rows in (1, 3, 5, 8, 17):  # decode, verify widths, and more than one row block
        assert torch.equal(fn(x[:rows], *args), full[:rows])
