"""GGUF export (`mtpx convert --to gguf`) and import, MTP layer included.

Round trips HF checkpoint -> GGUF -> mtpx on tiny random checkpoints (dense and MoE, with MTP):
- bf16 / f16: logits and MTP logits bit-identical to the HF checkpoint run at the same dtype;
- q8_0 (run in fp32): relative RMS error of logits and MTP logits <= 3 %, top-1 agreement >= 90 %
  (measured ~1 % and >= 97 %); q4_0: <= 25 % (measured 14-16 %).
The layout itself (names, +1 norms, -exp(A_log), squeezed conv1d, tiled value heads, F32 types) is checked against
llama.cpp's conventions directly, since a round trip alone cannot see a mistake made the same way in both directions.
"""
import json
import shutil

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from mtpx.cli import main as cli_main
from mtpx.errors import ModelLoadError
from mtpx.loading import build_model, load_checkpoint
from mtpx.loading.convert import write_gguf
from mtpx.loading.gguf import QWEN35_SPLIT
from mtpx.tokenizer import Tokenizer

TEXTS = ["def add(a, b):\n    return a + b\n", "Hello, how are you today?  I'm fine\t\tthanks\n\n",
         "naïve café 日本語 🚀 ''' I've 3333 tokens", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
         "for i in range(10):\n    print(i * i)\n"]


@pytest.fixture(scope="module")
def gguf_of(ckpt_factory, tmp_path_factory):
    """GGUF export of a generated checkpoint, built once per (checkpoint kind, outtype)."""
    cache = {}

    def get(outtype="bf16", **kw):
        key = (outtype, tuple(sorted(kw.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp("gguf") / f"model-{outtype}.gguf"
            write_gguf(load_checkpoint(ckpt_factory(**kw)), out, outtype)
            cache[key] = out
        return cache[key]
    return get


def forward_both(model, ids):
    with torch.no_grad():
        h = model(ids)
        return model.logits(h), model.logits(model.mtp_forward(h[:, :-1], ids[:, 1:]))


def rewrite_gguf(src, dst, *, arch=None, drop=(), values=None, tensors=None, add=None):
    """Copy a GGUF, optionally changing general.architecture, dropping keys, changing values {key: value},
    replacing tensors {name: (data, type)} and adding keys {key: (value, GGUFValueType)}."""
    r = GGUFReader(str(src))
    w = GGUFWriter(str(dst), arch or r.fields["general.architecture"].contents())
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop:
            continue
        vtype = f.types[0]
        w.add_key_value(key, (values or {}).get(key, f.contents()), vtype,
                        f.types[-1] if vtype == GGUFValueType.ARRAY else None)
    for key, (value, vtype) in (add or {}).items():
        w.add_key_value(key, value, vtype)
    for t in r.tensors:
        data, qtype = (tensors or {}).get(t.name, (np.asarray(t.data), t.tensor_type))
        w.add_tensor(t.name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


# ---------------------------------------------------------------- round trips

Q4_0_MAX_REL = 0.25  # measured 0.14 (logits) and 0.16 (MTP logits) on the tiny random checkpoint

@pytest.mark.parametrize("outtype,dtype", [("bf16", torch.bfloat16), ("f16", torch.float16)])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_round_trip_bit_identical(ckpt_factory, gguf_of, moe, outtype, dtype):
    ref = build_model(load_checkpoint(ckpt_factory(moe=moe)), dtype)
    ckpt = load_checkpoint(gguf_of(outtype, moe=moe))
    assert ckpt.config.mtp_num_hidden_layers == 1 and ckpt.config.is_moe == moe
    got = build_model(ckpt, dtype)
    assert got.mtp is not None
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    (la, ma), (lb, mb) = forward_both(ref, ids), forward_both(got, ids)
    assert torch.equal(la, lb), f"logits differ by {(la.float() - lb.float()).abs().max()}"
    assert torch.equal(ma, mb), f"MTP logits differ by {(ma.float() - mb.float()).abs().max()}"


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_q8_0_within_tolerance(ckpt_factory, gguf_of, moe):
    path = gguf_of("q8_0", moe=moe)
    types = {t.name: t.tensor_type for t in GGUFReader(str(path)).tensors}
    assert types["token_embd.weight"] == Q.Q8_0 and types["blk.4.attn_q.weight"] == Q.Q8_0
    assert types["blk.0.ssm_out.weight"] == Q.F16  # rows of 48: not a multiple of 32, F16 as llama.cpp does
    ref = build_model(load_checkpoint(ckpt_factory(moe=moe)), torch.float32)
    got = build_model(load_checkpoint(path), torch.float32)
    ids = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(2))
    for a, b in zip(forward_both(ref, ids), forward_both(got, ids)):
        rel = ((a - b).norm() / a.norm()).item()
        assert 0 < rel <= 0.03, rel
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9


def test_q4_0_export_loads_back(ckpt_factory, gguf_of):
    """--outtype q4_0 (llama.cpp's 4-bit blocks of 32): the weights that split into 32-blocks are Q4_0, and the
    model read back stays close to the checkpoint (4 bits: a looser bound than q8_0's)."""
    path = gguf_of("q4_0")
    types = {t.name: t.tensor_type for t in GGUFReader(str(path)).tensors}
    assert types["token_embd.weight"] == Q.Q4_0 and types["blk.4.attn_q.weight"] == Q.Q4_0
    assert types["blk.0.ssm_out.weight"] == Q.F16
    assert GGUFReader(str(path)).fields["general.file_type"].contents() == 2  # MOSTLY_Q4_0
    ref = build_model(load_checkpoint(ckpt_factory()), torch.float32)
    got = build_model(load_checkpoint(path), torch.float32)
    ids = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(2))
    for a, b in zip(forward_both(ref, ids), forward_both(got, ids)):
        rel = ((a - b).norm() / a.norm()).item()
        assert 0.01 < rel <= Q4_0_MAX_REL, rel


def test_tied_nested_checkpoint_round_trip(ckpt_factory, gguf_of):
    """Multimodal (nested) layout with tied embeddings: no output.weight in the file, same logits."""
    path = gguf_of("bf16", tied=True, nested=True)
    assert "output.weight" not in {t.name for t in GGUFReader(str(path)).tensors}
    ckpt = load_checkpoint(path)
    assert ckpt.config.tie_word_embeddings
    ref = build_model(load_checkpoint(ckpt_factory(tied=True, nested=True)), torch.bfloat16)
    got = build_model(ckpt, torch.bfloat16)
    ids = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(3))
    for a, b in zip(forward_both(ref, ids), forward_both(got, ids)):
        assert torch.equal(a, b)


def test_config_from_metadata(ckpt_factory, gguf_of):
    hf = load_checkpoint(ckpt_factory(moe=True)).config
    cfg = load_checkpoint(gguf_of("bf16", moe=True)).config
    for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "rms_norm_eps", "rope_theta", "partial_rotary_factor", "max_position_embeddings",
              "tie_word_embeddings", "layer_types", "linear_conv_kernel_dim", "linear_key_head_dim",
              "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads", "num_experts",
              "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size"):
        assert getattr(cfg, f) == getattr(hf, f), f
    assert cfg.model_type == "qwen3_5_moe_text" and cfg.mtp_num_hidden_layers == 1 and cfg.eos_token_id == [2]


def test_layer_types_from_full_attention_interval(gguf_of, tmp_path):
    """Files without attention.recurrent_layers: layer i is full attention when (i + 1) % interval == 0."""
    src = gguf_of("bf16")
    dst = rewrite_gguf(src, tmp_path / "a.gguf", drop={"qwen35.attention.recurrent_layers"})
    assert load_checkpoint(dst).config.layer_types == ["linear_attention"] * 2 + ["full_attention", "linear_attention"]
    dst = rewrite_gguf(src, tmp_path / "b.gguf", drop={"qwen35.attention.recurrent_layers",
                                                       "qwen35.full_attention_interval"})  # llama.cpp's default 4
    assert load_checkpoint(dst).config.layer_types == ["linear_attention"] * 3 + ["full_attention"]


# ---------------------------------------------------------------- llama.cpp's layout

def test_layout_follows_llama_cpp(ckpt_factory, gguf_of):
    hf_path = ckpt_factory()
    path = gguf_of("bf16")
    r = GGUFReader(str(path))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert f["general.architecture"] == "qwen35"
    assert f["qwen35.block_count"] == 5 and f["qwen35.nextn_predict_layers"] == 1
    assert f["qwen35.attention.recurrent_layers"] == [True, True, False, True, False]
    assert f["qwen35.ssm.state_size"] == 8 and f["qwen35.ssm.inner_size"] == 48
    assert f["qwen35.ssm.group_count"] == 2 and f["qwen35.ssm.time_step_rank"] == 4
    assert f["qwen35.rope.dimension_count"] == 8 and f["qwen35.rope.dimension_sections"] == [2, 1, 1, 0]
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    t = {x.name: x for x in r.tensors}
    for name in ("blk.4.nextn.eh_proj.weight", "blk.4.nextn.enorm.weight", "blk.4.nextn.hnorm.weight",
                 "blk.4.nextn.shared_head_norm.weight", "blk.4.attn_q.weight", "blk.4.ffn_gate.weight",
                 "blk.0.attn_qkv.weight", "blk.0.attn_gate.weight", "blk.0.ssm_a", "blk.0.ssm_dt.bias",
                 "blk.2.attn_q_norm.weight", "output_norm.weight", "output.weight", "token_embd.weight"):
        assert name in t, name
    assert t["blk.0.attn_norm.weight"].tensor_type == Q.F32 and t["blk.0.ssm_conv1d.weight"].tensor_type == Q.F32
    assert t["blk.0.attn_qkv.weight"].tensor_type == Q.BF16
    assert list(t["blk.0.ssm_conv1d.weight"].shape) == [4, 2 * 16 + 48]  # ggml order: {kernel, channels}

    from safetensors.torch import load_file
    hf = {k: v.to(torch.bfloat16).float() for k, v in load_file(hf_path / "model.safetensors").items()}

    def arr(name):
        return torch.from_numpy(np.array(t[name].data, dtype=np.float32))
    # norms hold 1 + w (the gated ssm_norm keeps w), MTP norms too
    assert torch.equal(arr("blk.0.attn_norm.weight"), hf["model.layers.0.input_layernorm.weight"] + 1)
    assert torch.equal(arr("blk.4.nextn.enorm.weight"), hf["mtp.pre_fc_norm_embedding.weight"] + 1)
    assert torch.equal(arr("blk.4.nextn.shared_head_norm.weight"), hf["mtp.norm.weight"] + 1)
    assert torch.equal(arr("blk.0.ssm_norm.weight"), hf["model.layers.0.linear_attn.norm.weight"])
    # value heads tiled: 2 key heads x 2 value heads each, grouped (k0v0 k0v1 k1v0 k1v1) -> (k0v0 k1v0 k0v1 k1v1)
    perm = [0, 2, 1, 3]
    assert torch.equal(arr("blk.0.ssm_a"), -torch.exp(hf["model.layers.0.linear_attn.A_log"][perm]))
    assert torch.equal(arr("blk.0.ssm_dt.bias"), hf["model.layers.0.linear_attn.dt_bias"][perm])
    conv = arr("blk.0.ssm_conv1d.weight")
    conv_hf = hf["model.layers.0.linear_attn.conv1d.weight"].squeeze(1)
    assert torch.equal(conv[:32], conv_hf[:32])
    assert torch.equal(conv[32:].view(4, 12, 4), conv_hf[32:].view(4, 12, 4)[perm])


def test_export_without_mtp(ckpt_factory, tmp_path):
    out = tmp_path / "nomtp.gguf"
    write_gguf(load_checkpoint(ckpt_factory()), out, "bf16", with_mtp=False)
    r = GGUFReader(str(out))
    assert r.fields["qwen35.block_count"].contents() == 4 and "qwen35.nextn_predict_layers" not in r.fields
    ckpt = load_checkpoint(out)
    assert not any(n.startswith("mtp.") for n in ckpt.shapes) and build_model(ckpt, torch.bfloat16).mtp is None


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_round_trip(ckpt_factory, gguf_of):
    hf = Tokenizer.from_dir(ckpt_factory())
    tok = load_checkpoint(gguf_of("bf16")).tokenizer
    for text in TEXTS:
        ids = hf.encode(text)
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == hf.decode(ids) == text
    assert tok.vocab_size == hf.vocab_size
    assert tok.chat_template == hf.chat_template and tok.eos_token == "<|im_end|>"
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs) == hf.apply_chat_template(msgs)


def test_qwen35_pre_tokenizer_round_trip(ckpt_factory, tmp_path):
    """A Qwen3.5-style tokenizer (NFC + Split regex + ByteLevel without regex) is written as pre 'qwen35' and
    rebuilt to the same ids."""
    from tokenizers import Regex, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    p = tmp_path / "ckpt"
    shutil.copytree(ckpt_factory(), p)
    spec = json.loads((p / "tokenizer.json").read_text())
    tok = HFTokenizer.from_str(json.dumps(spec))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN35_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.add_tokens(["<think>"])  # a non-special added token: USER_DEFINED in GGUF
    tok.save(str(p / "tokenizer.json"))
    out = tmp_path / "q.gguf"
    write_gguf(load_checkpoint(p), out, "bf16")
    r = GGUFReader(str(out))
    assert r.fields["tokenizer.ggml.pre"].contents() == "qwen35"
    assert r.fields["tokenizer.ggml.token_type"].contents()[320] == 4  # USER_DEFINED
    hf, got = Tokenizer.from_dir(p), load_checkpoint(out).tokenizer
    for text in TEXTS + ["Cafe\u0301 e\u0301t\u00e9 123456 x\r\ny", "a <think>plan</think> b"]:
        assert got.encode(text) == hf.encode(text), text
    assert 320 in got.encode("a <think>b")


# ---------------------------------------------------------------- CLI and errors

def test_cli_convert(ckpt_factory, tmp_path, capsys):
    out = tmp_path / "cli.gguf"
    assert cli_main(["convert", "--to", "gguf", str(ckpt_factory()), str(out), "--outtype", "q8_0"]) == 0
    assert "wrote" in capsys.readouterr().err
    assert GGUFReader(str(out)).fields["general.file_type"].contents() == 7  # MOSTLY_Q8_0
    assert cli_main(["convert", "--to", "gguf", str(tmp_path / "missing"), str(tmp_path / "x.gguf")]) == 1


def test_unsupported_architecture(gguf_of, tmp_path):
    dst = rewrite_gguf(gguf_of("bf16"), tmp_path / "llama.gguf", arch="llama")
    with pytest.raises(ModelLoadError, match="unsupported GGUF architecture 'llama'"):
        load_checkpoint(dst)


def test_unsupported_quant_type(gguf_of, tmp_path):
    name = "blk.0.ffn_up.weight"  # [96, 64] -> Q8_1: blocks of 32 values in 40 bytes
    dst = rewrite_gguf(gguf_of("bf16"), tmp_path / "q81.gguf",
                       tensors={name: (np.zeros((96, 2 * 40), dtype=np.uint8), Q.Q8_1)})
    with pytest.raises(ModelLoadError, match=r"unsupported GGUF quant type\(s\): Q8_1 \(1 tensor\(s\), e\.g\. "
                                             r"blk\.0\.ffn_up\.weight\)"):
        load_checkpoint(dst)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q5_0, Q.Q8_0])
def test_block_quants_dequantize(gguf_of, tmp_path, qtype):
    """Tensors re-encoded as other block quants load through gguf.quants to close values."""
    from gguf.quants import quantize
    src = gguf_of("f16")
    r = GGUFReader(str(src))
    t = next(x for x in r.tensors if x.name == "blk.2.attn_q.weight")
    w = np.array(t.data, dtype=np.float32)
    dst = rewrite_gguf(src, tmp_path / "q.gguf", tensors={t.name: (quantize(w, qtype), qtype)})
    got = load_checkpoint(dst).tensors["model.layers.2.self_attn.q_proj.weight"]()
    assert got.shape == w.shape
    err = (got - torch.from_numpy(w)).abs().max().item()
    assert 0 < err <= np.abs(w).max() / (7 if qtype != Q.Q8_0 else 100)


def test_unknown_pre_tokenizer_is_refused(gguf_of, tmp_path):
    dst = rewrite_gguf(gguf_of("bf16"), tmp_path / "pre.gguf", values={"tokenizer.ggml.pre": "mystery-bpe"})
    with pytest.raises(ModelLoadError, match="unsupported GGUF pre-tokenizer 'mystery-bpe'"):
        load_checkpoint(dst)


def test_not_a_gguf(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="cannot read GGUF file bad.gguf"):
        load_checkpoint(p)


def test_one_dim_shared_expert_gate(ckpt_factory, gguf_of, tmp_path):
    """llama-quantize writes ffn_gate_inp_shexp [1, H] as 1-D (ggml drops trailing size-1 dims): still loads."""
    src = gguf_of("bf16", moe=True)
    t = {x.name: x for x in GGUFReader(str(src)).tensors}
    new = {n: (np.array(x.data).reshape(-1), x.tensor_type) for n, x in t.items()
           if n.endswith("ffn_gate_inp_shexp.weight")}
    dst = rewrite_gguf(src, tmp_path / "m.gguf", tensors=new)
    assert [len(x.shape) for x in GGUFReader(str(dst)).tensors if x.name == "blk.0.ffn_gate_inp_shexp.weight"] == [1]
    ref = build_model(load_checkpoint(src), torch.bfloat16)
    got = build_model(load_checkpoint(dst), torch.bfloat16)
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(4))
    for a, b in zip(forward_both(ref, ids), forward_both(got, ids)):
        assert torch.equal(a, b)


def test_sampling_defaults_from_metadata(gguf_of, tmp_path):
    """llama.cpp's general.sampling.* keys are the model's recommended sampling, like generation_config.json."""
    f32 = GGUFValueType.FLOAT32
    dst = rewrite_gguf(gguf_of("bf16"), tmp_path / "sampling.gguf",
                       add={"general.sampling.temp": (0.6, f32), "general.sampling.top_k": (20, GGUFValueType.INT32),
                            "general.sampling.top_p": (0.95, f32), "general.sampling.penalty_repeat": (1.5, f32)})
    assert load_checkpoint(dst).sampling_defaults == pytest.approx(
        {"temperature": 0.6, "top_k": 20, "top_p": 0.95, "repetition_penalty": 1.5})
    assert load_checkpoint(gguf_of("bf16")).sampling_defaults == {}
