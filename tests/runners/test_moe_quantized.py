"""Routed experts quantized (runners/weights.py quantize, models/qwen3_5.py Experts.quantized): each stack run per
expert from views of one quantized stack, against dequantized weights; a row's bits independent of the other rows of
a step pass; the bf16 stacks released and the planner counting the quantized ones; greedy MTP speculation equal to
plain decoding on the CPU runner (tests/runners/test_cuda.py: on the CUDA runner)."""
import pytest
import torch
import torch.nn.functional as F

import mtpx
from mtpx import kernels
from mtpx.models.grouped import Int4Weight
from mtpx.models.linear import Int8Weight, QuantizedWeight, row_invariant, weight_bytes
from mtpx.models.qwen3_5 import Experts
from mtpx.runners import RunnerConfig

needs_kernel = pytest.mark.skipif(not kernels.rowgemm_available(), reason="needs the rowgemm kernel")


@pytest.fixture(scope="module", params=["int4", "int8"])
def quantized(moe_ckpt, request):
    return mtpx.LLM(moe_ckpt, dtype=request.param, runner_config=RunnerConfig.from_env(tiles=False))


def _experts(llm) -> list[Experts]:
    return [m for m in llm.model.modules() if isinstance(m, Experts)]


def _dequantized(w: QuantizedWeight) -> torch.Tensor:
    return w.dequantize(slice(None)) if isinstance(w, Int4Weight) else w.q.float() * w.scale[:, None]


def _routed(experts: Experts, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, experts.quantized["down_proj"][0].shape[0], generator=g).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(experts.num_experts, generator=g)[:2] for _ in range(n)])
    weights = torch.softmax(torch.randn(n, 2, generator=g), -1).to(torch.bfloat16)
    return x, weights, idx


@needs_kernel
def test_experts_are_quantized_per_expert_and_the_stacks_released(quantized, moe_ckpt):
    kind = Int4Weight if quantized.quantization == "int4" else Int8Weight
    bf16 = mtpx.LLM(moe_ckpt, dtype="bf16", runner_config=RunnerConfig.from_env(tiles=False))
    for experts, ref in zip(_experts(quantized), _experts(bf16)):
        assert experts.gate_up_proj.numel() == experts.down_proj.numel() == 0
        for name in Experts.STACKS:
            blocks = experts.quantized[name]
            assert len(blocks) == experts.num_experts and all(type(w) is kind for w in blocks)
            stack = getattr(ref, name)
            # views of one stack, each expert's block what quantizing it alone gives
            assert len({w.tensors()[0].untyped_storage().data_ptr() for w in blocks}) == 1
            alone = kind(stack[3])
            assert all(torch.equal(a, b) for a, b in zip(blocks[3].tensors(), alone.tensors()))
            step = (_dequantized(blocks[3]) - stack[3].float()).abs().max()
            assert step < 0.1 * stack[3].float().abs().max()
    expert_bytes = sum(t.numel() * t.element_size() for e in _experts(quantized)
                       for ws in e.quantized.values() for w in ws for t in w.tensors())
    stacks = sum(weight_bytes(e) for e in _experts(bf16))
    assert expert_bytes < stacks * (0.36 if kind is Int4Weight else 0.6)
    assert weight_bytes(quantized.model) < weight_bytes(bf16.model) * 0.75


@needs_kernel
def test_quantized_experts_compute_the_dequantized_weights(quantized):
    experts = _experts(quantized)[0]
    x, weights, idx = _routed(experts, 5)
    with row_invariant(True):
        got = experts(x, weights, idx).float()
    want = torch.zeros_like(got)
    for e in range(experts.num_experts):
        rows, slot = torch.where(idx == e)
        gate_up, down = (_dequantized(w) for w in experts.expert(e))
        gate, up = F.linear(x[rows].float(), gate_up).chunk(2, dim=-1)
        want[rows] += F.linear((F.silu(gate) * up).to(torch.bfloat16).float(), down) * weights[rows, slot, None]
    assert (got - want).abs().max() <= 0.02 * want.abs().max()


@needs_kernel
def test_a_row_has_the_same_bits_alone_and_in_a_five_row_pass(quantized):
    experts = _experts(quantized)[-1]
    x, weights, idx = _routed(experts, 5, seed=1)
    with row_invariant(True):
        together = experts(x, weights, idx)
        for r in range(5):
            assert torch.equal(experts(x[r:r + 1], weights[r:r + 1], idx[r:r + 1])[0], together[r])


@needs_kernel
def test_the_planner_counts_the_quantized_experts(quantized):
    from mtpx.runners.plan import plan
    p = plan(quantized.config, device="cpu", dtype=quantized.quantization, context=300, mtp_layers=1)
    loaded = weight_bytes(quantized.model)
    assert abs(p.weights_main + p.weights_mtp - loaded) <= 0.02 * loaded


@needs_kernel
def test_greedy_speculation_is_plain_decoding_with_int4_experts_on_the_cpu_runner(moe_ckpt):
    llm = mtpx.LLM(moe_ckpt, dtype="int4")
    assert llm.runner.name == "cpu" and _experts(llm)[0].quantized
    prompt = llm.tokenizer.encode("def add(a, b):")
    plain = llm.generate(prompt, max_tokens=24, ignore_eos=True, spec_type="none").token_ids
    assert llm.generate(prompt, max_tokens=24, ignore_eos=True, spec_type="mtp", spec_draft_n_max=3,
                        spec_draft_policy="fixed").token_ids == plain
