"""attention_step reads each cache row once for all the positions of a call (weighted_sum_rows): every position
must still get the bits it gets alone, for head sizes with and without a vector tail and for calls of up to 8
positions (blocks of 4 rows and a single row left over), on every instruction set this machine runs."""
import pytest
import torch

from mtpx import kernels

from isa import isa_levels, running_on

needs_kernel = pytest.mark.skipif(not kernels.rowgemm_available(), reason="the CPU kernels could not be built here")


@needs_kernel
@pytest.mark.parametrize("level", isa_levels())
@pytest.mark.parametrize("D", [72, 256])
def test_each_position_gets_its_bits_alone(level, D):
    g = torch.Generator().manual_seed(D)
    nh, nkv, rd, past = 4, 1, 32, 40
    with running_on(level):
        for T in (2, 3, 6, 8):
            qkv = torch.randn(T, 2 * nh * D + 2 * nkv * D, generator=g).bfloat16()
            norm = (torch.randn(D, generator=g) * 0.1).bfloat16()
            angles = torch.randn(T, rd, generator=g)
            cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
            cache = torch.randn(nkv, past + T, D, generator=g).bfloat16()
            k1, v1, k2, v2 = cache.clone(), cache.clone(), cache.clone(), cache.clone()
            together = kernels.attention_step(qkv, norm, norm, cos, sin, k1, v1, past, nh, nkv, D, 1e-6)
            for t in range(T):
                alone = kernels.attention_step(qkv[t:t + 1], norm, norm, cos[t:t + 1], sin[t:t + 1], k2, v2,
                                               past + t, nh, nkv, D, 1e-6)
                assert torch.equal(alone, together[t:t + 1]), (T, t)
            assert torch.equal(k1, k2) and torch.equal(v1, v2)


@needs_kernel
def test_the_split_of_heads_over_threads_changes_no_bits():
    """Jobs group a kv head's query heads, split further when threads outnumber kv heads: any split, same bits."""
    g = torch.Generator().manual_seed(3)
    nh, nkv, D, T, past = 8, 2, 64, 4, 30
    qkv = torch.randn(T, 2 * nh * D + 2 * nkv * D, generator=g).bfloat16()
    norm = (torch.randn(D, generator=g) * 0.1).bfloat16()
    angles = torch.randn(T, 32, generator=g)
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    cache = torch.randn(nkv, past + T, D, generator=g).bfloat16()
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 4, 8):
            torch.set_num_threads(n)
            outs.append(kernels.attention_step(qkv, norm, norm, cos, sin, cache.clone(), cache.clone(), past, nh,
                                               nkv, D, 1e-6))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
