"""A GGUF's quantized blocks kept as they are (loading/gguf_blocks.py): every kept type gives, on the CPU kernel, the
weights gguf-py's dequantize gives, bit for bit; a model whose matrices are a mix of those types (and F32), loaded
with --dtype int4, holds exactly the file's values (value heads re-laid out, fused projections joined), runs, and
speculates losslessly; types that cannot be kept are refused; the planner counts the kept formats."""
import json
import shutil

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from mtpx import kernels
from mtpx.errors import ModelLoadError
from mtpx.loading.gguf_blocks import KEPT, block_weight
from mtpx.models.grouped import GroupedWeight, Int4Weight, Int8BlockWeight

from tests.loading.test_gguf import rewrite_gguf

from int_dot import reference

# where each type keeps its fp16 d (and dmin) in a block, for blocks made up rather than quantized (gguf-py has no
# K-quant quantizer)
K_QUANT_HALVES = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def _blocks(qtype: str, w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`w` [N, K] as rows of `qtype` blocks: quantized by gguf-py, or random codes and scales (K-quants) with d of
    the order of w's magnitude."""
    if qtype not in K_QUANT_HALVES:
        return quantize(w, Q[qtype])
    n, k = w.shape
    block, size = GGML_QUANT_SIZES[Q[qtype]]
    data = rng.integers(0, 256, size=(n, k // block, size), dtype=np.uint8)
    scale = float(np.abs(w).max()) / (63 * 15 if qtype != "Q6_K" else 127 * 32)
    for at in K_QUANT_HALVES[qtype]:  # a few subnormal fp16 values among them
        halves = (rng.random((n, k // block)) * 2 * scale).astype(np.float16)
        data[..., at:at + 2] = halves[..., None].view(np.uint8)
    return data.reshape(n, -1)


@pytest.mark.parametrize("qtype", KEPT)
def test_kept_blocks_are_gguf_py_values_on_the_kernel(qtype):
    rng = np.random.default_rng(len(qtype))
    n, k = 40, 512
    data = _blocks(qtype, (rng.standard_normal((n, k)) * 0.05).astype(np.float32), rng)
    want = torch.from_numpy(dequantize(data, Q[qtype]).reshape(n, k).copy())
    w = block_weight(data, qtype, (n, k))
    assert isinstance(w, Int4Weight if qtype.startswith("Q4") else Int8BlockWeight)
    assert torch.equal(w.dequantize(slice(None)), want)
    if kernels.rowgemm_available():  # one-hot rows read the kernel's weights back, through x's Q8 codes
        eye = torch.eye(k)
        got = torch.cat([w._kernel(eye[i:i + 8]) for i in range(0, k, 8)])
        assert torch.equal(got, reference(eye, w))  # the integer kernels' arithmetic (tests/int_dot.py)
        assert ((got.t() - want).abs() <= 2 ** -20 * want.abs().max()).all()  # the values, to a few fp32 roundings


# ---------------------------------------------------------------- a model in mixed GGUF types

# matrices' types in turn, so that fused projections mix them (and mix int4 with int8 blocks and with F32)
TYPES = ["Q4_K", "Q6_K", "Q4_0", "Q8_0", "Q5_K", "Q4_1", "Q5_0", "Q5_1"]


@pytest.fixture(scope="module")
def mixed_gguf(dense_ckpt, tmp_path_factory):
    """A Qwen3.5 checkpoint whose matrices have K a multiple of 256 (K-quants' blocks) and twice as many value
    heads as key heads (value-head re-layout), as GGUF with its matrices in TYPES (Gated DeltaNet's a / b and
    the embedding left F32)."""
    from safetensors.torch import save_file

    from mtpx.bench.gen_checkpoint import random_weights
    from mtpx.config import ModelConfig
    from mtpx.loading import load_checkpoint
    from mtpx.loading.convert import write_gguf
    cfg = ModelConfig(model_type="qwen3_5_text", vocab_size=384, tie_word_embeddings=False, hidden_size=256,
                      intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=64,
                      linear_value_head_dim=64, max_position_embeddings=512,
                      layer_types=["linear_attention"] * 3 + ["full_attention"], mtp_num_hidden_layers=1)
    cfg.validate()
    root = tmp_path_factory.mktemp("blocks")
    ckpt = root / "ckpt"
    ckpt.mkdir()
    tensors = random_weights(cfg, True, torch.Generator().manual_seed(0), 0.05)[0]
    (ckpt / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    save_file(tensors, str(ckpt / "model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (dense_ckpt / name).exists():
            shutil.copy(dense_ckpt / name, ckpt / name)
    plain = root / "plain.gguf"
    write_gguf(load_checkpoint(ckpt), plain, "f32")
    return _retype(plain, root / "mixed.gguf")


def _retype(src, dst, types: list[str] = TYPES, block: int = 256, experts: list[str] = ()):
    """`src` with its matrices of K a multiple of `block` in `types` in turn, and (`experts`) its routed experts'
    stacks in those types in turn."""
    rng, i, j, retyped = np.random.default_rng(1), 0, 0, {}
    for t in GGUFReader(str(src)).tensors:
        data = np.asarray(t.data)
        if data.ndim == 2 and data.shape[0] > 4 and data.shape[1] % block == 0 and t.name != "token_embd.weight":
            qtype = Q[types[i % len(types)]]
            retyped[t.name], i = (_blocks(qtype.name, data.astype(np.float32), rng), qtype), i + 1
        elif data.ndim == 3 and "_exps." in t.name and experts:
            qtype = Q[experts[j % len(experts)]]
            rows = data.reshape(-1, data.shape[-1]).astype(np.float32)
            retyped[t.name], j = (_blocks(qtype.name, rows, rng).reshape(*data.shape[:2], -1), qtype), j + 1
    return rewrite_gguf(src, dst, tensors=retyped)


needs_kernel = pytest.mark.skipif(not kernels.rowgemm_available(), reason="needs the rowgemm kernel")


@needs_kernel
def test_a_mixed_gguf_keeps_its_values_and_speculates_losslessly(mixed_gguf):
    import mtpx
    from mtpx.loading import load_checkpoint
    from mtpx.models.linear import Linear, fused_projection
    ckpt = load_checkpoint(mixed_gguf)
    kept_names = {n for n, f in ckpt.quantized.items() if getattr(f, "qtype", None)}
    assert {f.qtype for n, f in ckpt.quantized.items() if n in kept_names} == set(TYPES)
    llm = mtpx.LLM(mixed_gguf, dtype="int4")
    checked = 0
    for name, module in llm.model.named_modules():
        fused = fused_projection(module)
        if fused is not None:
            members = [f"{name}.{n}.weight" for n in module.FUSED_PROJECTIONS]
            parts = fused[0].dequantize(slice(None)).split(fused[2])
        elif isinstance(module, Linear) and isinstance(module.quantized, GroupedWeight):
            members, parts = [f"{name}.weight"], [module.quantized.dequantize(slice(None))]
        else:
            continue
        for member, part in zip(members, parts):
            if member in kept_names:  # the file's values (after the converter's re-layouts are undone), exactly
                assert torch.equal(part, ckpt.tensors[member]().float()), member
                checked += 1
    assert checked == len(kept_names)
    prompt = llm.tokenizer.encode("def add(a, b):")
    plain = llm.generate(prompt, max_tokens=24, spec_type="none").token_ids
    assert llm.generate(prompt, max_tokens=24, spec_type="mtp", spec_draft_n_max=3).token_ids == plain


@pytest.fixture(scope="module")
def q3_gguf(mixed_gguf, tmp_path_factory):
    """mixed_gguf with one matrix in Q3_K, a type mtpx cannot keep."""
    reader = GGUFReader(str(mixed_gguf))
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    n, k = t.shape[1], t.shape[0]
    q3 = np.random.default_rng(2).integers(0, 256, size=(n, k // 256 * GGML_QUANT_SIZES[Q.Q3_K][1]), dtype=np.uint8)
    q3.reshape(n, k // 256, -1)[..., -2:] = np.full((n, k // 256, 1), 1e-4, np.float16).view(np.uint8)
    return rewrite_gguf(mixed_gguf, tmp_path_factory.mktemp("q3") / "q3.gguf", tensors={t.name: (q3, Q.Q3_K)})


def test_types_that_cannot_be_kept_are_refused(q3_gguf):
    import mtpx
    dst = q3_gguf
    with pytest.raises(ModelLoadError, match=r"cannot be kept .*blk\.0\.ffn_up\.weight \(Q3_K; mtpx keeps Q4_0"):
        mtpx.LLM(dst, dtype="int4")
    assert mtpx.LLM(dst, dtype="bf16").generate([5, 6], max_tokens=2, spec_type="none").token_ids


@needs_kernel
def test_the_planner_counts_the_kept_formats(mixed_gguf):
    import mtpx
    from mtpx.loading import load_checkpoint
    from mtpx.loading.checkpoint import kept_types
    from mtpx.models.linear import weight_bytes
    from mtpx.runners import RunnerConfig
    from mtpx.runners.plan import plan
    llm = mtpx.LLM(mixed_gguf, dtype="int4", runner_config=RunnerConfig.from_env(tiles=False))
    loaded = weight_bytes(llm.model)
    kept = kept_types(load_checkpoint(mixed_gguf))
    p = plan(llm.config, device="cpu", dtype="int4", context=300, kept=kept)
    assert abs(p.weights_main + p.weights_mtp - loaded) <= 0.02 * loaded
    assert plan(llm.config, device="cpu", dtype="int4", context=300).weights_main < p.weights_main  # int8 blocks


def _interpreting() -> bool:
    try:
        import triton
        return torch.cuda.is_available() or triton.knobs.runtime.interpret
    except ImportError:
        return False


@pytest.mark.skipif(not _interpreting(), reason="needs a GPU or Triton's interpreter (TRITON_INTERPRET=1)")
def test_kept_blocks_on_the_cuda_runner(dense_ckpt, tmp_path):
    """On the CUDA runner (here in Triton's interpreter; the tiny checkpoint, its matrices in blocks of 32 only):
    kept int4 and int8 blocks on the device, on the Triton kernels, and greedy MTP output equal to plain
    decoding's."""
    import mtpx
    from mtpx.loading import load_checkpoint
    from mtpx.loading.convert import write_gguf
    from mtpx.models.linear import quantized_weights
    from mtpx.runners import RunnerConfig
    from mtpx.runners.weights import GpuInt4Weight, GpuInt8BlockWeight, GpuInt8Weight
    write_gguf(load_checkpoint(dense_ckpt), tmp_path / "plain.gguf", "f32")
    path = _retype(tmp_path / "plain.gguf", tmp_path / "small.gguf", ["Q4_0", "Q8_0", "Q4_1", "Q5_1"], 32)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    llm = mtpx.LLM(path, dtype="int4", device=device,
                   runner_config=RunnerConfig.from_env(static_steps=True, triton_gdn="interpret"))
    kinds = {type(w) for w in quantized_weights(llm.model)}
    assert {GpuInt4Weight, GpuInt8BlockWeight} <= kinds <= {GpuInt4Weight, GpuInt8BlockWeight, GpuInt8Weight}
    prompt = llm.tokenizer.encode("def add(a, b):")
    plain = llm.generate(prompt, max_tokens=8, ignore_eos=True, spec_type="none").token_ids
    assert llm.generate(prompt, max_tokens=8, ignore_eos=True, spec_type="mtp", spec_draft_n_max=3,
                        spec_draft_policy="fixed").token_ids == plain


# gate and up of a layer both int4 (joined as int4), or int4 and int8 (joined as int8 blocks)
EXPERT_TYPES = ["Q4_0", "Q4_1", "Q8_0", "Q5_1", "Q4_1"]


@needs_kernel
def test_a_moe_gguf_keeps_its_experts_blocks(moe_ckpt, tmp_path):
    """Routed experts' stacks (ffn_gate_exps + ffn_up_exps joined per expert, ffn_down_exps) in quantized types, kept
    per expert with --dtype int4: the file's values exactly, and greedy MTP output equal to plain decoding's."""
    import mtpx
    from mtpx.loading import load_checkpoint
    from mtpx.loading.checkpoint import kept_types
    from mtpx.loading.convert import write_gguf
    from mtpx.models.linear import weight_bytes
    from mtpx.models.qwen3_5 import Experts
    from mtpx.runners import RunnerConfig
    from mtpx.runners.plan import plan
    from mtpx.runners.weights import GpuInt4Weight, GpuInt8BlockWeight
    write_gguf(load_checkpoint(moe_ckpt), tmp_path / "plain.gguf", "f32")
    path = _retype(tmp_path / "plain.gguf", tmp_path / "moe.gguf", ["Q4_0", "Q8_0"], 32, EXPERT_TYPES)
    ckpt = load_checkpoint(path)
    kept = {n for n, f in ckpt.quantized.items() if ".mlp.experts." in n and getattr(f, "qtype", None)}
    llm = mtpx.LLM(path, dtype="int4")
    formats, checked = set(), 0
    for name, module in llm.model.named_modules():
        if isinstance(module, Experts):
            assert module.gate_up_proj.numel() == module.down_proj.numel() == 0
            for stack in Experts.STACKS:
                want = ckpt.tensors[f"{name}.{stack}"]().float()
                for e, w in enumerate(module.quantized[stack]):
                    assert torch.equal(w.dequantize(slice(None)), want[e]), f"{name}.{stack}[{e}]"
                formats.add((stack, type(w)))
                checked += 1
    assert checked == len(kept) == 2 * (ckpt.config.num_hidden_layers + 1)
    assert {t for s, t in formats if s == "gate_up_proj"} == {Int4Weight, Int8BlockWeight}
    loaded = weight_bytes(llm.model)
    p = plan(llm.config, device="cpu", dtype="int4", context=300, kept=kept_types(ckpt))
    assert abs(p.weights_main + p.weights_mtp - loaded) <= 0.02 * loaded
    prompt = llm.tokenizer.encode("def add(a, b):")
    plain = llm.generate(prompt, max_tokens=24, ignore_eos=True, spec_type="none").token_ids
    assert llm.generate(prompt, max_tokens=24, ignore_eos=True, spec_type="mtp", spec_draft_n_max=3,
                        spec_draft_policy="fixed").token_ids == plain
    if _interpreting():  # on the CUDA runner the kept blocks go to the device as they are
        on_gpu = mtpx.LLM(path, dtype="int4", device="cuda" if torch.cuda.is_available() else "cpu",
                          runner_config=RunnerConfig.from_env(static_steps=not torch.cuda.is_available()))
        blocks = [w for m in on_gpu.model.modules() if isinstance(m, Experts) for ws in m.quantized.values()
                  for w in ws]
        assert {type(w) for w in blocks} == {GpuInt4Weight, GpuInt8BlockWeight}


@pytest.mark.parametrize("qtype", KEPT)
def test_rows_repacked_in_chunks_equal_one_pass(qtype, monkeypatch):
    """block_weight splits the rows over threads: any split gives the weight one pass gives."""
    import mtpx.loading.gguf_blocks as gb
    n, k = 200, 512
    block, size = GGML_QUANT_SIZES[Q[qtype]]
    data = _blocks(qtype, np.random.default_rng(5).standard_normal((n, k)).astype(np.float32) * 0.1,
                   np.random.default_rng(6))
    monkeypatch.setattr(gb, "REPACK_ROWS", 10**9)
    whole = gb.block_weight(data, qtype, (n, k))
    monkeypatch.setattr(gb, "REPACK_ROWS", 16)
    monkeypatch.setattr(gb.os, "sched_getaffinity", lambda pid: set(range(7)))  # 7 chunks, the last one short
    split = gb.block_weight(data, qtype, (n, k))
    assert all(torch.equal(a, b) for a, b in zip(whole.tensors(), split.tensors()))
