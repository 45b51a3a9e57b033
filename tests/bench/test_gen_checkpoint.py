"""`mtpx bench gen-checkpoint` shapes of the other MTP families (GLM-4.5-Air, DeepSeek-V3, Qwen3-Next, scaled down):
their sizes, configs that read back as the same model, and checkpoints in each family's own on-disk layout that load
and speculate."""
import json
import math

import pytest
import torch
from safetensors import safe_open

from mtpx import LLM
from mtpx.bench.gen_checkpoint import generate_checkpoint, parameter_shapes, shape_config
from mtpx.config import ModelConfig
from mtpx.errors import MtpxError

SMALL = ["glm4.5-air-small", "deepseek-v3-small", "qwen3-next-small"]


@pytest.mark.parametrize("shape", SMALL)
def test_scaled_shapes_fit_a_small_machine_and_keep_their_family(shape):
    cfg = shape_config(shape)
    n = sum(math.prod(s) for s in parameter_shapes(cfg).values())
    assert 0.5e9 < n < 1.1e9, n  # ~1-2 GB in bf16
    assert cfg.hidden_size == 1024 and cfg.num_hidden_layers == 12 and cfg.num_experts == 64
    again = ModelConfig.from_hf_dict({**cfg.to_hf_dict(), "num_nextn_predict_layers": 1, "mtp_num_hidden_layers": 1})
    assert type(again) is type(cfg) and again.model_type == cfg.model_type
    for f in ("num_experts_per_tok", "moe_intermediate_size", "head_dim", "layer_types", "rotary_dim"):
        assert getattr(again, f) == getattr(cfg, f), f


def test_full_size_shapes_are_the_real_models():
    ds = shape_config("deepseek-v3")
    assert ds.is_mla and ds.kv_lora_rank == 512 and ds.num_experts == 256 and ds.rope_yarn["factor"] == 40
    total = sum(math.prod(s) for s in parameter_shapes(ds, 0).values())
    assert 670e9 < total < 672e9  # DeepSeek-V3's 671B without its MTP module
    with pytest.raises(MtpxError, match="unknown shape"):
        shape_config("deepseek-v4")


@pytest.mark.parametrize("shape", SMALL)
def test_generated_checkpoint_has_the_family_layout_and_drafts(tmp_path, shape):
    info = generate_checkpoint(tmp_path / "ck", shape, layers=2, vocab_size=512, log=lambda m: None)
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert any(".mlp.experts.0.gate_proj.weight" in n for n in names)  # one module per expert, as released
    if shape.startswith("qwen3-next"):
        assert config["model_type"] == "qwen3_next" and config["mtp_num_hidden_layers"] == 1
        assert "model.layers.0.linear_attn.in_proj_qkvz.weight" in names and "mtp.fc.weight" in names
    else:
        assert config["num_nextn_predict_layers"] == 1
        assert {f"model.layers.2.{n}.weight" for n in ("enorm", "hnorm", "eh_proj", "shared_head.norm",
                                                       "embed_tokens", "shared_head.head")} <= names
    llm = LLM(tmp_path / "ck")
    assert llm.model.mtp is not None and llm.model.lm_head.weight.dtype == torch.bfloat16
    assert info["mtp_parameters"] > 0 and llm.config.model_type == config["model_type"]
    out = llm.generate("hello", max_tokens=6, spec_type="mtp", spec_synth_rates=[0.8], ignore_eos=True)
    assert out.stats["generated_tokens"] == 6 and out.stats["drafted_tokens"] > 0
