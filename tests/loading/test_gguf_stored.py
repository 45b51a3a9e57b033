"""Loading a quantized GGUF without --dtype keeps its quantized weights as stored (runners.weights.STORED), as
llama.cpp runs a file: no widening to bf16, the file's values exactly, lossless speculation, the planner counting
the same bytes; a type without a kernel is refused by name, and a split over ranks asks for an explicit dtype."""
import pytest
import torch

import mtpx
from mtpx.errors import ModelLoadError, RequestError
from mtpx.loading import load_checkpoint
from mtpx.loading.checkpoint import kept_types
from mtpx.models.grouped import GroupedWeight
from mtpx.models.linear import Linear, fused_projection, weight_bytes
from mtpx.runners import STORED, RunnerConfig
from mtpx.runners.plan import plan

from tests.loading.test_gguf_blocks import mixed_gguf, needs_kernel, q3_gguf  # noqa: F401 - fixtures


def _stored_values(llm) -> dict[str, torch.Tensor]:
    """{parameter name: the weight as the model holds it} of every quantized Linear or fused member."""
    held = {}
    for name, module in llm.model.named_modules():
        fused = fused_projection(module)
        if fused is not None and isinstance(fused[0], GroupedWeight):
            members = [f"{name}.{n}.weight" for n in module.FUSED_PROJECTIONS]
            held.update(zip(members, fused[0].dequantize(slice(None)).split(fused[2])))
        elif isinstance(module, Linear) and isinstance(module.quantized, GroupedWeight):
            held[f"{name}.weight"] = module.quantized.dequantize(slice(None))
    return held


@needs_kernel
def test_a_quantized_gguf_loads_as_stored_by_default(mixed_gguf):  # noqa: F811
    ckpt = load_checkpoint(mixed_gguf)
    kept = kept_types(ckpt)
    llm = mtpx.LLM(mixed_gguf, runner_config=RunnerConfig.from_env(tiles=False))
    assert llm.quantization == STORED and "quantized as stored" in llm.runner.describe()
    held = _stored_values(llm)
    assert set(kept) <= set(held)
    for name in kept:
        assert torch.equal(held[name], ckpt.tensors[name]().float()), name
    widened = mtpx.LLM(mixed_gguf, dtype="bf16", runner_config=RunnerConfig.from_env(tiles=False))
    assert weight_bytes(llm.model) < 0.65 * weight_bytes(widened.model)  # int4 and int8 blocks, none widened
    p = plan(llm.config, device="cpu", dtype=STORED, context=300, kept=kept)
    loaded = weight_bytes(llm.model)
    assert abs(p.weights_main + p.weights_mtp - loaded) <= 0.02 * loaded
    prompt = llm.tokenizer.encode("def add(a, b):")
    plain = llm.generate(prompt, max_tokens=24, spec_type="none").token_ids
    assert llm.generate(prompt, max_tokens=24, spec_type="mtp", spec_draft_n_max=3).token_ids == plain


def test_a_type_without_a_kernel_is_refused_by_default(q3_gguf):  # noqa: F811
    with pytest.raises(ModelLoadError, match=r"blk\.0\.ffn_up\.weight \(Q3_K; mtpx keeps Q4_0.*--dtype bf16"):
        mtpx.LLM(q3_gguf)


def test_a_split_over_ranks_asks_for_a_dtype(mixed_gguf):  # noqa: F811
    with pytest.raises(RequestError, match=r"not kept as stored when the model is split over ranks: give --dtype"):
        mtpx.LLM(mixed_gguf, split_layers=2)


def test_plan_defaults_to_the_stored_weights(mixed_gguf, capsys):  # noqa: F811
    from mtpx.cli import main
    assert main(["plan", str(mixed_gguf), "--device", "cpu", "--ctx", "300"]) == 0
    stored = capsys.readouterr().out
    assert main(["plan", str(mixed_gguf), "--device", "cpu", "--ctx", "300", "--dtype", "bf16"]) == 0
    assert "stored weights" in stored and "bf16 weights" in capsys.readouterr().out
