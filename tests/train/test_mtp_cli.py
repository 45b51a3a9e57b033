"""`mtpx train-mtp` on the other MTP families (GLM-4.5, DeepSeek-V3 with MLA, Qwen3-Next): the MTP layer it trains
learns (its loss falls), is written in the family's own on-disk names, next to base tensors left bit for bit as they
were, and the saved checkpoint reloads and speculates with output identical to plain decoding."""
import argparse
import json

import pytest
import torch
from safetensors import safe_open

import mtpx
from checkpoints import CORPUS
from mtpx.loading import build_model, load_checkpoint
from mtpx.loading.disk_layout import is_mtp_disk_name
from mtpx.train import mtp_cli
from mtpx.train.trainer import fresh_mtp, tokenize_file

FAMILIES = ["glm", "deepseek", "qwen3_next"]
# the copies of the embedding and output head train-mtp writes into a GLM nextn layer (DeepSeek's reference
# checkpoint has them already)
GLM_COPIES = {"model.layers.3.embed_tokens.weight", "model.layers.3.shared_head.head.weight"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    path.write_text("<|endoftext|>".join(CORPUS * 20))
    return path


def tensors_of(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def train_mtp(base, corpus, out, *extra):
    parser = argparse.ArgumentParser()
    mtp_cli.add_arguments(parser)
    args = parser.parse_args(["--model", str(base), "--corpus", str(corpus), "--out", str(out), "--steps", "4",
                              "--batch-size", "2", "--seq-len", "32", "--compile", "off", *extra])
    assert mtp_cli.main(args) == 0
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_distillation_lowers_the_mtp_loss(family_factory, corpus, family):
    ckpt = load_checkpoint(family_factory(family, mtp=False))
    model = build_model(ckpt, torch.float32, with_mtp=False)
    fresh_mtp(model, 0)
    history = mtp_cli.distill(model, tokenize_file(ckpt.tokenizer, corpus), 24, 4, 32, 3e-3, 0, log=lambda m: None)
    assert sum(history[-4:]) / 4 < 0.8 * sum(history[:4]) / 4, history


@pytest.mark.parametrize("family", FAMILIES)
def test_added_mtp_layer_has_the_family_names_and_drafts_losslessly(family_factory, corpus, tmp_path, family):
    base = family_factory(family, mtp=False)
    out = train_mtp(base, corpus, tmp_path / "out")
    written, source = tensors_of(out), tensors_of(base)
    reference = tensors_of(family_factory(family))  # the same family with an MTP layer, as the real ones store it
    cfg = load_checkpoint(out).config
    mtp_names = {n for n in written if is_mtp_disk_name(cfg, n)}
    want = {n for n in reference if is_mtp_disk_name(cfg, n)} | (GLM_COPIES if family == "glm" else set())
    assert mtp_names == want
    assert all(written[n].shape == reference[n].shape and written[n].dtype == reference[n].dtype
               for n in mtp_names & set(reference))
    assert written.keys() - mtp_names == source.keys()
    assert all(torch.equal(written[n], source[n]) for n in source)  # the base is left as it was
    config = json.loads((out / "config.json").read_text())
    assert config[cfg.MTP_KEY] == 1 and config["model_type"] == json.loads((base / "config.json").read_text())[
        "model_type"]
    llm = mtpx.LLM(out, dtype="fp32")
    assert llm.model.mtp is not None
    prompt = [5, 9, 14, 20, 7, 3]
    plain = llm.generate(prompt, max_tokens=12, ignore_eos=True, spec_type="none").token_ids
    for k in (1, 3):
        assert llm.generate(prompt, max_tokens=12, ignore_eos=True, spec_type="mtp", spec_draft_n_max=k,
                            spec_draft_policy="fixed").token_ids == plain


@pytest.mark.parametrize("family", ["glm", "deepseek"])
def test_refining_keeps_the_layout_and_starts_from_the_stored_layer(family_factory, corpus, tmp_path, family):
    src = family_factory(family)
    before = tensors_of(src)
    out = train_mtp(src, corpus, tmp_path / "refined", "--refine", "--lr", "1e-4")
    after = tensors_of(out)
    cfg = load_checkpoint(out).config
    eh_proj = f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight"
    moved = (after[eh_proj] - before[eh_proj]).abs().max().item()
    assert 0 < moved < 0.05 * before[eh_proj].abs().max().item()  # fine-tuned, not re-initialised
    assert {n for n in after if is_mtp_disk_name(cfg, n)} >= {n for n in before if is_mtp_disk_name(cfg, n)}


def test_a_gguf_or_missing_model_is_refused_by_name(corpus, tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    for model in (tmp_path / "model.gguf", tmp_path / "absent"):
        with pytest.raises(mtp_cli.TrainMTPError, match=f"{model.name} is not one"):
            train_mtp(model, corpus, tmp_path / "out")
