"""Training: loss goes down, checkpoints reload exactly, resume is identical, train-mtp raises acceptance."""
import random
from dataclasses import replace

import pytest
import torch

from mtpx import kernels
from mtpx.config import ModelConfig
from mtpx.errors import MtpxError
from mtpx.loading import build_model, load_checkpoint
from mtpx.tokenizer import Tokenizer
from mtpx.train.cli import PRESETS
from mtpx.train.corpus import DOC_SEPARATOR
from mtpx.train.mtp_cli import distill, teacher_forced_acceptance, write_with_mtp
from mtpx.train.trainer import (TrainConfig, fresh_mtp, mixed_precision, new_model, save_checkpoint, tokenize_file,
                                 train, train_tokenizer, training_device)

TC = TrainConfig(steps=30, seq_len=64, batch_size=8, lr=3e-3, warmup=5, val_every=0, save_every=0, seed=0,
                 compile="off")


def synthetic_corpus(n_docs: int, seed: int) -> str:
    rng = random.Random(seed)
    names = ["alpha", "beta", "gamma", "delta", "value", "total", "count", "index"]
    docs = []
    for _ in range(n_docs):
        a, b = rng.sample(names, 2)
        docs.append(f"def add_{a}({a}, {b}):\n    return {a} + {b}\n\nfor {a} in range({rng.randint(1, 9)}):\n"
                    f"    print({a}, {b})\n")
    return DOC_SEPARATOR.join(docs) + DOC_SEPARATOR


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    (d / "train.txt").write_text(synthetic_corpus(400, 0))
    (d / "val.txt").write_text(synthetic_corpus(60, 1))
    train_tokenizer([d / "train.txt"], 300, d / "tok")
    tok = Tokenizer.from_dir(d / "tok")
    cfg = ModelConfig(vocab_size=tok.vocab_size, tie_word_embeddings=True, max_position_embeddings=512,
                      eos_token_id=[tok.token_to_id("<|im_end|>")], **PRESETS["tiny"])
    return d, tok, cfg, tokenize_file(tok, d / "train.txt"), tokenize_file(tok, d / "val.txt")


def test_training_reduces_loss(setup, tmp_path):
    d, tok, cfg, data, _ = setup
    history = train(new_model(cfg, 1, 0), data, None, TC, tmp_path, log=lambda m: None)
    assert sum(history[-5:]) / 5 < 0.7 * sum(history[:5]) / 5


def test_precision_auto_uses_bf16_only_where_the_cpu_has_bf16_dot_products():
    def bf16_matmul(precision: str) -> bool:
        with mixed_precision(precision):
            return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert bf16_matmul("auto") == kernels.native_bf16()
    assert bf16_matmul("bf16") and not bf16_matmul("fp32")
    with pytest.raises(MtpxError, match="precision must be one of"):
        mixed_precision("fp8")


def test_bf16_training_reduces_loss_too(setup, tmp_path):
    d, tok, cfg, data, _ = setup
    history = train(new_model(cfg, 1, 0), data, None, replace(TC, precision="bf16"), tmp_path, log=lambda m: None)
    assert sum(history[-5:]) / 5 < 0.7 * sum(history[:5]) / 5


def test_compiled_training_follows_eager_training(setup, tmp_path):
    d, tok, cfg, data, _ = setup
    tc = replace(TC, steps=12)
    eager = train(new_model(cfg, 1, 0), data, None, tc, tmp_path / "eager", log=lambda m: None)
    model = new_model(cfg, 1, 0)
    compiled = train(model, data, None, replace(tc, compile="on"), tmp_path / "compiled", log=lambda m: None)
    # fused kernels round differently, so the runs drift apart slowly, but they train the same model
    assert compiled[0] == pytest.approx(eager[0], rel=1e-4)
    assert compiled == pytest.approx(eager, rel=2e-2)
    assert all(layer._compiled_call_impl is None for layer in model.model.layers)  # eager again after training
    with pytest.raises(MtpxError, match="compile must be one of"):
        train(new_model(cfg, 1, 0), data, None, replace(tc, compile="yes"), tmp_path / "bad", log=lambda m: None)


def test_an_unusable_training_device_is_a_clear_error():
    with pytest.raises(MtpxError, match="not a device name"):
        training_device("gpu0")
    with pytest.raises(MtpxError, match="training runs on cpu or cuda"):
        training_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(MtpxError, match="sees no CUDA GPU"):
            training_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_reduces_loss_and_resumes_identically(setup, tmp_path):
    d, tok, cfg, data, _ = setup
    tc = replace(TC, steps=12, save_every=6, device="cuda")
    history = train(new_model(cfg, 1, 0), data, None, replace(tc, steps=30), tmp_path / "long", log=lambda m: None)
    assert sum(history[-5:]) / 5 < 0.7 * sum(history[:5]) / 5
    straight = train(new_model(cfg, 1, 0), data, None, tc, tmp_path / "a", log=lambda m: None)
    train(new_model(cfg, 1, 0), data, None, replace(tc, steps=6), tmp_path / "b", log=lambda m: None)
    resumed = train(new_model(cfg, 1, 99), data, None, tc, tmp_path / "b", resume=True, log=lambda m: None)
    # GPU kernels may pick different reduction orders between processes, not within one: same process, same result
    assert resumed == pytest.approx(straight[6:], rel=1e-4)


def test_saved_checkpoint_reloads_with_same_logits(setup, tmp_path):
    d, tok, cfg, data, _ = setup
    model = new_model(cfg, 1, 0)
    train(model, data, None, replace(TC, steps=5), tmp_path / "run", log=lambda m: None)
    save_checkpoint(model, d / "tok", tmp_path / "ckpt", torch.float32)
    loaded = build_model(load_checkpoint(tmp_path / "ckpt"), torch.float32)
    x = data[:40][None].long()
    with torch.no_grad():
        assert torch.equal(model.eval().logits(model(x)), loaded.logits(loaded(x)))
        h = model(x)
        assert torch.equal(model.logits(model.mtp_forward(h[:, :-1], x[:, 1:])),
                           loaded.logits(loaded.mtp_forward(h[:, :-1], x[:, 1:])))


def test_resume_continues_identically(setup, tmp_path):
    d, tok, cfg, data, _ = setup
    tc = replace(TC, steps=12, save_every=6)
    straight = train(new_model(cfg, 1, 0), data, None, tc, tmp_path / "a", log=lambda m: None)
    train(new_model(cfg, 1, 0), data, None, replace(tc, steps=6), tmp_path / "b", log=lambda m: None)
    resumed = train(new_model(cfg, 1, 99), data, None, tc, tmp_path / "b", resume=True, log=lambda m: None)
    assert resumed == straight[6:]


def test_train_mtp_raises_heldout_acceptance(setup, tmp_path):
    d, tok, cfg, data, val = setup
    base = new_model(cfg, 0, 0)
    train(base, data, None, replace(TC, steps=60), tmp_path / "base", log=lambda m: None)
    base.eval()
    save_checkpoint(base, d / "tok", tmp_path / "base-ckpt", torch.float32)
    fresh_mtp(base, 1)
    before = teacher_forced_acceptance(base, val, batches=2, seq_len=64)
    distill(base, data, 80, 8, 64, 3e-3, 0, log=lambda m: None)
    after = teacher_forced_acceptance(base, val, batches=2, seq_len=64)
    assert after > before + 0.25 and after > 0.4, (before, after)
    write_with_mtp(tmp_path / "base-ckpt", base, tmp_path / "with-mtp")
    reloaded = build_model(load_checkpoint(tmp_path / "with-mtp"), torch.float32)
    assert teacher_forced_acceptance(reloaded, val, batches=2, seq_len=64) == pytest.approx(after, abs=1e-6)


def test_chained_mtp_loss_and_acceptance(setup):
    """mtp_steps=1 is the plain DeepSeek-style MTP loss; longer chains feed the MTP's own output back in."""
    from mtpx.train.evaluate import teacher_forced_acceptance as chained_acceptance
    from mtpx.train.trainer import losses
    d, tok, cfg, data, val = setup
    model = new_model(cfg, 1, 0)
    batch = data[:2 * 33].view(2, 33).long()
    main, mtp = losses(model, batch, 1)
    x, y = batch[:, :-1], batch[:, 1:]
    h = model(x)
    direct = torch.nn.functional.cross_entropy(model.logits(model.mtp_forward(h[:, :-1], x[:, 1:])).flatten(0, 1),
                                               y[:, 1:].flatten())
    assert torch.allclose(mtp, direct)
    _, mtp3 = losses(model, batch, 3)
    assert torch.isfinite(mtp3) and not torch.allclose(mtp3, mtp)
    model.eval()
    rates = chained_acceptance(model, val, k=3, windows=2, seq_len=64)
    assert len(rates) == 3 and rates[0] == pytest.approx(teacher_forced_acceptance(model, val, 2, 64), abs=0.2)


def test_train_mtp_cli_refuses_unclear_requests(setup, tmp_path):
    import argparse
    from mtpx.errors import MtpxError
    from mtpx.train import mtp_cli
    d, tok, cfg, data, val = setup
    save_checkpoint(new_model(cfg, 1, 0), d / "tok", tmp_path / "with-mtp", torch.float32)
    parser = argparse.ArgumentParser()
    mtp_cli.add_arguments(parser)
    base = ["--model", str(tmp_path / "with-mtp"), "--corpus", str(d / "train.txt"), "--out", str(tmp_path / "o")]
    with pytest.raises(MtpxError, match="already has an MTP layer"):
        mtp_cli.main(parser.parse_args(base))
    with pytest.raises(MtpxError, match="exclude"):
        mtp_cli.main(parser.parse_args(base + ["--replace", "--refine"]))
    args = parser.parse_args(base + ["--refine", "--steps", "3", "--batch-size", "2", "--seq-len", "32",
                                     "--chain", "2", "--val", str(d / "val.txt"), "--compile", "off"])
    assert mtp_cli.main(args) == 0
    assert build_model(load_checkpoint(tmp_path / "o"), torch.float32).mtp is not None


def test_mtpx_train_cli_writes_a_standard_checkpoint(setup, tmp_path):
    import argparse
    import json
    from mtpx.train import cli
    d, tok, cfg, data, val = setup
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    out = tmp_path / "run"
    args = parser.parse_args(["--corpus", str(d), "--out", str(out), "--preset", "tiny", "--vocab-size", "300",
                              "--steps", "3", "--warmup", "1", "--batch-size", "2", "--seq-len", "32",
                              "--val-every", "3", "--save-every", "3", "--val-batches", "1", "--compile", "off"])
    assert cli.main(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["mtp_num_hidden_layers"] == 1 and config["model_type"] == "qwen3_5_text"
    assert set(config["layer_types"]) == {"linear_attention", "full_attention"}
    special = {t: Tokenizer.from_dir(out).token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>", "<|im_start|>")}
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == \
        [special["<|im_end|>"], special["<|endoftext|>"]]
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["eos_token"] == "<|im_end|>" and "<|im_start|>" in tc["chat_template"]
    ckpt = load_checkpoint(out)
    assert ckpt.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert any(n.startswith("mtp.") for n in ckpt.shapes)
    card = (out / "README.md").read_text()
    assert "mtpx train --corpus" in card and "--preset tiny" in card and "val loss" in card


@pytest.mark.skipif(not __import__("mtpx.kernels", fromlist=["x"]).rowgemm_available(), reason="int8 needs rowgemm")
def test_quantization_error_reports_loss_and_agreement(dense_ckpt, tmp_path):
    import mtpx
    from mtpx.train.evaluate import quantization_error
    files = []
    for i in range(3):
        files.append(tmp_path / f"f{i}.py")
        files[-1].write_text("".join(f"def f{j}(x):\n    return x * {j}\n" for j in range(20 * (i + 1))))
    bf16, int8 = mtpx.LLM(dense_ckpt), mtpx.LLM(dense_ckpt, dtype="int8")
    same = quantization_error(bf16, bf16, files)
    assert same["greedy_agreement"] == 1.0 and same["loss_quantized"] == same["loss_reference"] > 0
    r = quantization_error(bf16, int8, files)
    assert 0.5 < r["greedy_agreement"] <= 1.0 and abs(r["loss_quantized"] - r["loss_reference"]) < 0.5
