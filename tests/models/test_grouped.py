"""int4 and int8-block weights (models/grouped.py): the quantizers' error bounds and size, row-invariant step
matmuls on the CPU kernels, and the exact re-layouts a GGUF import uses (rows, super-block sizes, group order,
int4 as int8 blocks, fused projections joined)."""
import pytest
import torch

from mtpx import kernels
from mtpx.models.grouped import Int4Weight, Int8BlockWeight, join_rows, super_size
from mtpx.models.linear import linear, row_invariant

from int_dot import reference

needs_kernel = pytest.mark.skipif(not kernels.rowgemm_available(), reason="needs the rowgemm kernel")


def _group_bound(w, weight: torch.Tensor) -> torch.Tensor:
    """Half of each group's step (its scale), per weight, for comparison with the quantization error."""
    scale, _ = w.scales(slice(None))
    return (scale / 2).repeat_interleave(w.GROUP, dim=1).double() * (1 + 2 ** -20) + 1e-7


def test_int4_is_within_half_a_step_of_its_group_and_near_the_one_level_step():
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(1088, 512, generator=g).bfloat16()  # 1088 rows: quantized in slices, the last one ragged
    w = Int4Weight(weight)
    assert w.per_super == 8 and w.supers.dtype == torch.float16 and w.groups.dtype == torch.int8
    assert sum(t.numel() * t.element_size() for t in w.tensors()) == 1088 * 512 * 37 // 64  # 4.625 bits a weight
    dequantized = w.dequantize(slice(None)).double()
    error = (dequantized - weight.double()).abs()
    assert (error <= _group_bound(w, weight)).all()
    # each group's step against the range / 15 of one fp32 scale per group: at most d (a 127th of the
    # super-block's largest) wider, and the offset's rounding down (dmin) spread over the range
    groups = weight.double().reshape(1088, 16, 32)
    ideal = (groups.amax(-1) - groups.amin(-1)) / 15
    scale, _ = w.scales(slice(None))
    d = w.supers[..., 0].double().repeat_interleave(8, dim=1)
    dmin = w.supers[..., 1].double().abs().repeat_interleave(8, dim=1)
    assert (scale.double() >= ideal * (1 - 2 ** -10)).all()
    assert (scale.double() <= ideal + d + dmin / 15 + 1e-6).all()
    rms = ((dequantized - weight.double()) ** 2).mean().sqrt() / weight.double().std()
    assert rms < 0.085  # a uniform 4-bit error over each group's range: measured 0.077 (one fp32 scale: 0.075)


def test_int8_blocks_are_within_half_a_step():
    g = torch.Generator().manual_seed(5)
    weight = (torch.randn(70, 96, generator=g) * 0.05).bfloat16()
    w = Int8BlockWeight(weight)
    assert w.per_super == super_size(6, 16) == 2
    error = (w.dequantize(slice(None)).double() - weight.double()).abs()
    assert (error <= _group_bound(w, weight)).all()
    assert error.max() <= weight.double().abs().max() / 127


@needs_kernel
@pytest.mark.parametrize("kind", [Int4Weight, Int8BlockWeight])
def test_step_rows_do_not_depend_on_row_count_and_match_dequantized(kind):
    """Each row's bits independent of the row count (so speculation stays exact), values those of the dequantized
    weight; a long prefill (sliced fp32 sgemm) computes the same function."""
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(1088, 256, generator=g).bfloat16()
    w = kind(weight)
    x = torch.randn(11, 256, generator=g).bfloat16()
    # a row of more groups than the kernels expand at a time (kernels/gemm_core.h kDotChunk): one-hot rows read the
    # kernel's weights back, through x's Q8 codes (the one as 127 at scale 1/127): int_dot.py's bits, and the weights
    # to a few fp32 roundings
    wide = kind(torch.randn(24, 9216, generator=g))
    eye = torch.eye(9216)[::97]
    got = torch.cat([wide._kernel(eye[i:i + 8]) for i in range(0, len(eye), 8)])
    assert torch.equal(got, reference(eye, wide))
    want = wide.dequantize(slice(None))[:, ::97].t()
    assert ((got - want).abs() <= 2 ** -20 * want.abs().max()).all()
    with row_invariant():
        alone = torch.cat([linear(x[i:i + 1], w) for i in range(11)])
        for m in range(2, 12):
            assert torch.equal(linear(x[:m], w), alone[:m])
    dequantized = w.dequantize(slice(None)).double()
    ref = x.double() @ dequantized.t()
    # x's Q8 codes on the kernel (a step of max|x| / 127 per super-block of 256) and the bf16 output: measured 0.71 %
    assert (alone.double() - ref).norm() / ref.norm() < 0.01
    with row_invariant(False):  # a long prefill: dequantized slices and sgemm
        xs = torch.randn(kind.KERNEL_ROWS + 10, 256, generator=g).bfloat16()
        prefill = linear(xs, w).double()
    ref = xs.double() @ dequantized.t()
    assert (prefill - ref).norm() / ref.norm() < 0.005
    assert torch.equal(w.rows(torch.tensor([3, 1000])), dequantized[[3, 1000]].bfloat16())
    assert kind.fits(weight.shape) and not kind.fits(weight[:, :40].shape)


def test_re_layouts_keep_every_value():
    g = torch.Generator().manual_seed(6)
    a, b = Int4Weight(torch.randn(24, 512, generator=g)), Int4Weight(torch.randn(8, 512, generator=g))
    dense_a, dense_b = a.dequantize(slice(None)), b.dequantize(slice(None))
    rows = torch.tensor([5, 0, 23, 7])
    assert torch.equal(a.take_rows(rows).dequantize(slice(None)), dense_a[rows])
    assert torch.equal(a.with_super_size(2).dequantize(slice(None)), dense_a)
    assert a.with_super_size(2).supers.shape == (24, 8, 2)
    # groups moved four at a time (chunks of 128 columns, as a value head's columns): super-blocks of 4
    order = torch.arange(16).reshape(2, 2, 4).transpose(0, 1).reshape(-1)
    moved = a.take_groups(order)
    assert moved.per_super == 4
    assert torch.equal(moved.dequantize(slice(None)), dense_a.reshape(24, 16, 32)[:, order].reshape(24, 512))
    blocks = a.to_int8_blocks()
    assert isinstance(blocks, Int8BlockWeight) and torch.equal(blocks.dequantize(slice(None)), dense_a)
    joined = join_rows([a, b.with_super_size(1)])
    assert isinstance(joined, Int4Weight) and joined.per_super == 1
    assert torch.equal(joined.dequantize(slice(None)), torch.cat([dense_a, dense_b]))
    c = Int8BlockWeight(torch.randn(3, 512, generator=g))
    mixed = join_rows([a, c])
    assert isinstance(mixed, Int8BlockWeight)
    assert torch.equal(mixed.dequantize(slice(None)), torch.cat([dense_a, c.dequantize(slice(None))]))


@needs_kernel
def test_int4_quantizes_what_fits_and_keeps_int8_for_the_rest(dense_ckpt):
    import mtpx
    from mtpx.models.linear import Int8Weight, quantized_weights
    llm = mtpx.LLM(dense_ckpt, dtype="int4")
    weights = quantized_weights(llm.model)
    assert {type(w) for w in weights} == {Int4Weight, Int8Weight}  # Gated DeltaNet's out_proj has K = 48: int8
    assert all(isinstance(w, Int8Weight) == (not Int4Weight.fits(w.shape)) for w in weights)
    assert llm.generate([5, 6, 7], max_tokens=8, spec_type="none").token_ids
