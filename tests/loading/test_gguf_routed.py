"""GGUF of the routed-MoE families (llama.cpp arch glm4moe / deepseek2, MTP as blk.{L}.nextn.*): export then import
gives the checkpoint's model bit for bit, and exporting the imported file again gives the same tensors."""
import numpy as np
import pytest
import torch

import mtpx
from mtpx.errors import ModelLoadError
from mtpx.loading import build_model, load_checkpoint
from mtpx.loading.convert import write_gguf

VARIANTS = [("glm", {}), ("deepseek", {"yarn": True})]


@pytest.mark.parametrize("family,kw", VARIANTS, ids=["glm4moe", "deepseek2-yarn"])
def test_round_trip_is_bit_identical(family_factory, tmp_path, family, kw):
    from gguf import GGUFReader
    path = family_factory(family, **kw)
    out = tmp_path / "model.gguf"
    summary = write_gguf(load_checkpoint(path), out, "bf16")
    assert summary["n_mtp"] == 1
    names = {t.name for t in GGUFReader(str(out)).tensors}
    L = summary["n_main"]
    assert {f"blk.{L}.nextn.{n}.weight" for n in ("eh_proj", "enorm", "hnorm", "shared_head_norm")} <= names
    ckpt = load_checkpoint(out)
    assert ckpt.extra["gguf_arch"] == summary["arch"]
    ref, got = build_model(load_checkpoint(path), torch.bfloat16), build_model(ckpt, torch.bfloat16)
    a, b = ref.state_dict(), got.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k]) or a[k].dtype != b[k].dtype] == []
    assert ckpt.config.rope_yarn == ref.cfg.rope_yarn
    x = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ref.logits(ref(x)), got.logits(got(x)))
        assert torch.equal(ref.mtp_forward(ref(x), x), got.mtp_forward(got(x), x))
    again = tmp_path / "again.gguf"
    write_gguf(load_checkpoint(out), again, "bf16")
    t1 = {t.name: np.asarray(t.data) for t in GGUFReader(str(out)).tensors}
    t2 = {t.name: np.asarray(t.data) for t in GGUFReader(str(again)).tensors}
    assert t1.keys() == t2.keys() and all(np.array_equal(t1[k], t2[k]) for k in t1)


def test_gguf_model_drafts_losslessly(family_factory, tmp_path):
    out = tmp_path / "ds.gguf"
    write_gguf(load_checkpoint(family_factory("deepseek")), out, "bf16")
    llm = mtpx.LLM(out)
    prompt = [5, 9, 14, 20, 7]
    ref = llm.generate(prompt, max_tokens=12, ignore_eos=True, spec_type="none").token_ids
    for k in (1, 3):
        assert llm.generate(prompt, max_tokens=12, ignore_eos=True, spec_type="mtp", spec_draft_n_max=k,
                            spec_draft_policy="fixed").token_ids == ref


def test_non_interleaved_mla_is_not_exported(family_factory, tmp_path):
    path = family_factory("deepseek", q_lora=False, interleave=False, yarn=True)
    with pytest.raises(ModelLoadError, match="interleaved RoPE"):
        write_gguf(load_checkpoint(path), tmp_path / "x.gguf", "bf16")


def test_unknown_router_in_gguf_names_the_key(family_factory, tmp_path):
    from mtpx.loading import gguf_routed
    out = tmp_path / "softmax.gguf"
    original = gguf_routed.SIGMOID
    gguf_routed.SIGMOID = 1  # write a softmax router
    try:
        write_gguf(load_checkpoint(family_factory("glm")), out, "bf16")
    finally:
        gguf_routed.SIGMOID = original
    with pytest.raises(ModelLoadError, match="glm4moe.expert_gating_func=1"):
        load_checkpoint(out)
