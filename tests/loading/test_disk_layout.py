"""loading/disk_layout.py writes a model's tensors in its family's checkpoint names; loading them back gives the same
model, for each layout the loader rewrites (nextn layers, fused Qwen3-Next projections, per-expert weights, nested
Qwen3.5 prefix)."""
import shutil

import pytest
import torch
from safetensors.torch import save_file

from mtpx.errors import ModelLoadError
from mtpx.loading import build_model, load_checkpoint
from mtpx.loading.disk_layout import disk_tensors, is_mtp_disk_name, stores_per_expert


def rewrite(src, dst, per_expert):
    model = build_model(load_checkpoint(src), torch.float32)
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    tied = model.cfg.tie_word_embeddings
    state = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    disk = disk_tensors(model.cfg, state, per_expert)
    save_file({k: v.contiguous() for k, v in disk.items()}, str(dst / "model.safetensors"))
    return model, disk


@pytest.mark.parametrize("family,kw", [("glm", {}), ("deepseek", {"mtp_copies": False}), ("qwen3_next", {})])
@pytest.mark.parametrize("per_expert", [True, False], ids=["per-expert", "stacked"])
def test_written_names_load_back_to_the_same_model(family_factory, tmp_path, family, kw, per_expert):
    src = family_factory(family, **kw)
    model, disk = rewrite(src, tmp_path / "out", per_expert)
    cfg = model.cfg
    assert stores_per_expert(disk) == per_expert
    if cfg.MTP_IN_LAYERS:
        L = cfg.num_hidden_layers
        assert {f"model.layers.{L}.{n}.weight" for n in ("enorm", "hnorm", "eh_proj", "shared_head.norm")} <= set(disk)
        assert not any(n.startswith("mtp.") for n in disk)
    else:
        assert "model.layers.0.linear_attn.in_proj_qkvz.weight" in disk and "mtp.fc.weight" in disk
        assert not any(n.endswith(("in_proj_qkv.weight", "in_proj_z.weight")) for n in disk)
    assert any(is_mtp_disk_name(cfg, n) for n in disk) and not is_mtp_disk_name(cfg, "model.layers.0.mlp.gate.weight")
    again = build_model(load_checkpoint(tmp_path / "out"), torch.float32)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nested_qwen35_keeps_its_prefix(ckpt_factory, tmp_path):
    _, disk = rewrite(ckpt_factory(nested=True), tmp_path / "out", False)
    assert "model.language_model.embed_tokens.weight" in disk and "mtp.fc.weight" in disk
    assert not any(n.startswith("model.layers.") for n in disk)


def test_a_missing_qwen3_next_projection_is_named(family_factory):
    model = build_model(load_checkpoint(family_factory("qwen3_next")), torch.float32)
    state = {k: v for k, v in model.state_dict().items() if "layers.0.linear_attn.in_proj_b" not in k}
    with pytest.raises(ModelLoadError, match=r"model\.layers\.0\.linear_attn\.in_proj_b\.weight is missing"):
        disk_tensors(model.cfg, state, False)
