"""Loader: every bad input gets an error naming the problem; the layouts real checkpoints use all load."""
import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from mtpx.errors import ModelLoadError
from mtpx.loading import build_model, load_checkpoint


@pytest.fixture
def copy(dense_ckpt, tmp_path):
    def make():
        dst = tmp_path / "m"
        shutil.copytree(dense_ckpt, dst)
        return dst
    return make


def rewrite(path, fn):
    t = load_file(path / "model.safetensors")
    fn(t)
    save_file(t, str(path / "model.safetensors"))


def load(path):
    return build_model(load_checkpoint(path), torch.float32)


def test_missing_tensor_names_it_with_shape(copy):
    p = copy()
    rewrite(p, lambda t: t.pop("model.layers.1.linear_attn.A_log"))
    with pytest.raises(ModelLoadError, match=r"missing 1 tensor.*model\.layers\.1\.linear_attn\.A_log \[4\]"):
        load(p)


def test_unexpected_tensor_is_named(copy):
    p = copy()
    rewrite(p, lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(3)))
    with pytest.raises(ModelLoadError, match=r"unexpected.*model\.layers\.0\.extra\.weight \[3\]"):
        load(p)


def test_wrong_shape_reports_expected_and_found(copy):
    p = copy()
    rewrite(p, lambda t: t.__setitem__("model.norm.weight", torch.zeros(65)))
    with pytest.raises(ModelLoadError, match=r"model\.norm\.weight has shape \[65\], expected \[64\]"):
        load(p)


def test_unsupported_model_type(copy):
    p = copy()
    cfg = json.loads((p / "config.json").read_text())
    cfg["model_type"] = "llama"
    (p / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unsupported model_type 'llama'"):
        load_checkpoint(p)


def test_broken_json(copy):
    p = copy()
    (p / "config.json").write_text('{"model_type": "qwen3_5_text",')
    with pytest.raises(ModelLoadError, match="config.json is not valid JSON"):
        load_checkpoint(p)


def test_tokenizer_vocab_larger_than_model(copy):
    p = copy()
    cfg = json.loads((p / "config.json").read_text())
    cfg["vocab_size"] = 100
    (p / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="tokenizer has 320 tokens but the model's vocab_size is 100"):
        load_checkpoint(p)


def test_pickle_checkpoints_are_refused(tmp_path, dense_ckpt):
    p = tmp_path / "pkl"
    p.mkdir()
    shutil.copy(dense_ckpt / "config.json", p)
    torch.save({"x": torch.zeros(1)}, p / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle checkpoints are not loaded"):
        load_checkpoint(p)


def test_missing_config(tmp_path):
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_checkpoint(tmp_path)


def test_mtp_count_contradicting_config(copy):
    p = copy()
    cfg = json.loads((p / "config.json").read_text())
    cfg["mtp_num_hidden_layers"] = 2
    (p / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="mtp_num_hidden_layers=2 but the weights hold 1"):
        load(p)


def test_sharded_checkpoint_with_index(copy, dense_ckpt):
    p = copy()
    t = load_file(p / "model.safetensors")
    names = sorted(t)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for f, ns in shards.items():
        save_file({n: t[n] for n in ns}, str(p / f))
    (p / "model.safetensors").unlink()
    (p / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: f for f, ns in shards.items() for n in ns}}))
    sharded, whole = load(p), load(dense_ckpt)
    x = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        assert torch.equal(sharded.logits(sharded(x)), whole.logits(whole(x)))
    assert sharded.mtp is not None


def test_per_expert_layout_loads_identically(ckpt_factory):
    fused = build_model(load_checkpoint(ckpt_factory(moe=True)), torch.float32)
    split = build_model(load_checkpoint(ckpt_factory(moe=True, per_expert=True)), torch.float32)
    x = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        assert torch.equal(fused.logits(fused(x)), split.logits(split(x)))


def test_eos_ids_merged_from_generation_config(copy):
    p = copy()
    (p / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    assert load_checkpoint(p).config.eos_token_id[:2] == [2, 0]


def test_sampling_defaults_from_generation_config(copy, caplog):
    p = copy()
    (p / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "min_p": 2,
         "max_new_tokens": 64, "eos_token_id": 2}))
    assert load_checkpoint(p).sampling_defaults == {"temperature": 0.7, "top_p": 0.8, "top_k": 20,
                                                    "repetition_penalty": 1.05}
    assert "ignoring the sampling default min_p = 2" in caplog.text  # out of range: named, not applied
    (p / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.7, "top_k": -1}))
    assert load_checkpoint(p).sampling_defaults == {"temperature": 0.0}  # greedy, as transformers reads it


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_a_tensor_read_takes_its_mapping_of_the_file_with_it(dense_ckpt):
    """Each tensor maps the file for itself, so the pages it touched leave the process with it (weights quantized as
    read then never leave the whole file resident)."""
    ckpt = load_checkpoint(dense_ckpt)
    file = str(dense_ckpt / "model.safetensors")

    def mappings() -> int:
        return sum(line.rstrip().endswith(file) for line in open("/proc/self/maps"))
    before = mappings()
    tensors = [ckpt.tensors[n]() for n in list(ckpt.tensors)[:3]]
    assert mappings() == before + 3
    del tensors
    assert mappings() == before
