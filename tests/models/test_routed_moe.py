"""glm4_moe (GLM-4.5 family) and deepseek_v3 (MLA): logits against transformers (fp32), the MTP layer from the on-disk
nextn names, greedy MTP / n-gram speculation token-identical to plain decoding, the MLA cache, and the bad inputs of
the MTP layer and router."""
import json
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

import mtpx
from checkpoints import hf_routed_model
from mtpx.errors import ModelLoadError, RequestError
from mtpx.loading import build_model, load_checkpoint
from mtpx.speculative.drafters import Draft, Drafter


def ids(n, seed=0):
    return torch.randint(0, 300, (1, n), generator=torch.Generator().manual_seed(seed))


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


VARIANTS = [("glm", {}), ("deepseek", {}), ("deepseek", {"q_lora": False, "interleave": False, "yarn": True}),
            ("glm_lite", {})]


@pytest.fixture(scope="module")
def glm(family_factory):
    return family_factory("glm")


@pytest.mark.parametrize("family,kw", VARIANTS, ids=["glm", "deepseek", "deepseek-plain-yarn", "glm-lite"])
def test_logits_match_transformers_prefill_and_cached_steps(family_factory, family, kw):
    path = family_factory(family, **kw)
    model = build_model(load_checkpoint(path), torch.float32)
    assert model.mtp is not None and len(model.mtp.layers) == 1
    x = ids(48)
    with torch.no_grad():
        ref = hf_routed_model(path, family)(x).logits[0]
        assert rel(model.logits(model(x))[0], ref) < 1e-4
        state = model.new_state(64)
        outs = [model.logits(model(x[:, :30], [state], "prefill"))[0]]
        outs.append(model.logits(model(x[:, 30:33], [state], "step"))[0])  # a verify-sized step
        for t in range(33, 48):
            outs.append(model.logits(model(x[:, t:t + 1], [state], "step"))[0])
        assert rel(torch.cat(outs), ref) < 1e-4


def test_mtp_layer_follows_the_nextn_formula(glm):
    """h' = eh_proj([enorm(embed(t)); hnorm(h)]) -> decoder layer -> shared_head.norm, from the on-disk tensors."""
    model = build_model(load_checkpoint(glm), torch.float32)
    t = load_file(glm / "model.safetensors")
    L, eps = model.cfg.num_hidden_layers, model.cfg.rms_norm_eps
    x = ids(12, seed=4)

    def norm(v, w):
        return w * (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps))
    with torch.no_grad():
        h = model(x[:, :-1])
        e = t["model.embed_tokens.weight"][x[:, 1:]]
        inp = torch.cat([norm(e, t[f"model.layers.{L}.enorm.weight"]), norm(h, t[f"model.layers.{L}.hnorm.weight"])], -1)
        inp = inp @ t[f"model.layers.{L}.eh_proj.weight"].T
        layer = model.mtp.layers[0]
        from mtpx.models.common import Pass, rotary_tables
        cos, sin = rotary_tables(model.cfg, [0], inp.shape[1], inp.dtype, inp.device)
        want = norm(layer(inp, Pass(None, "prefill", cos, sin)), t[f"model.layers.{L}.shared_head.norm.weight"])
        assert torch.allclose(model.mtp_forward(h, x[:, 1:]), want, atol=1e-5)


@pytest.fixture(scope="module", params=["glm", "deepseek"])
def llm(request, family_factory):
    return mtpx.LLM(family_factory(request.param))


class Oracle(Drafter):
    """The reference continuation with some tokens corrupted: acceptances and rejections at every position."""
    name = "oracle"

    def __init__(self, reference, seed):
        self.reference, self.rng = reference, random.Random(seed)

    def propose(self, seqs, ks):
        return [Draft([t if self.rng.random() > 0.3 else (t + 1) % 300
                       for t in self.reference[len(s.generated):len(s.generated) + k]]) for s, k in zip(seqs, ks)]


def test_greedy_speculation_is_token_identical(llm):
    mismatches = []
    for i in range(6):
        prompt = ids(4 + 5 * i, seed=10 + i)[0].tolist()
        ref = llm.generate(prompt, max_tokens=16, ignore_eos=True, spec_type="none").token_ids
        for k in (1, 2, 3, 4):
            for spec in ("mtp", "ngram"):
                out = llm.generate(prompt, max_tokens=16, spec_type=spec, spec_draft_n_max=k, spec_ngram_min=1,
                                   spec_draft_policy="fixed", ignore_eos=True)
                if out.token_ids != ref:
                    mismatches.append((i, k, spec))
            llm.engine.drafter = lambda spec, batched=False: Oracle(ref, i * 10 + k)
            try:
                out = llm.generate(prompt, max_tokens=16, spec_type="mtp", spec_draft_n_max=k,
                                   spec_draft_policy="fixed", ignore_eos=True)
            finally:
                del llm.engine.drafter
            if out.token_ids != ref:
                mismatches.append((i, k, "oracle"))
    assert not mismatches


def test_mtp_copies_of_embedding_and_head_are_shared(family_factory):
    model = build_model(load_checkpoint(family_factory("deepseek")), torch.float32)  # stored with copies
    assert not hasattr(model.mtp.layers[0], "embed_tokens")
    assert "mtp.layers.0.shared_head.head.weight" not in dict(model.named_parameters())


def test_mla_cache_holds_latent_and_rope_key_only(family_factory):
    model = build_model(load_checkpoint(family_factory("deepseek")), torch.bfloat16)
    cfg = model.cfg
    state = model.new_state(100)
    per_token = state.nbytes() / 100 / cfg.num_hidden_layers
    assert per_token == 2 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    full = 2 * cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    assert per_token < full


def test_model_without_mtp_runs_and_refuses_mtp(family_factory):
    llm = mtpx.LLM(family_factory("glm", mtp=False))
    assert llm.model.mtp is None
    assert len(llm.generate([5, 6, 7], max_tokens=4, ignore_eos=True, spec_type="none").token_ids) == 4
    with pytest.raises(RequestError, match="MTP layer"):
        llm.generate([5, 6, 7], max_tokens=4, spec_type="mtp")


def _copy(src, dst, drop=(), config=None, tensors=None):
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    t = {k: v for k, v in load_file(src / "model.safetensors").items() if k not in drop}
    t.update(tensors or {})
    save_file(t, str(dst / "model.safetensors"))
    if config:
        raw = json.loads((src / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**raw, **config}))
    return dst


def test_bad_mtp_layer_and_router_errors_name_the_tensor_or_key(glm, tmp_path):
    L = 3
    with pytest.raises(ModelLoadError, match=rf"model\.layers\.{L}\.eh_proj\.weight"):
        build_model(load_checkpoint(_copy(glm, tmp_path / "a", drop={f"model.layers.{L}.eh_proj.weight"})),
                    torch.float32)
    wrong = {f"model.layers.{L}.hnorm.weight": torch.ones(5)}
    with pytest.raises(ModelLoadError, match=rf"model\.layers\.{L}\.hnorm\.weight has shape \[5\]"):
        build_model(load_checkpoint(_copy(glm, tmp_path / "b", tensors=wrong)), torch.float32)
    with pytest.raises(ModelLoadError, match="num_nextn_predict_layers=2"):
        build_model(load_checkpoint(_copy(glm, tmp_path / "c", config={"num_nextn_predict_layers": 2})),
                    torch.float32)
    with pytest.raises(ModelLoadError, match="scoring_func='softmax'"):
        load_checkpoint(_copy(glm, tmp_path / "d", config={"scoring_func": "softmax"}))
    head = {f"model.layers.{L}.shared_head.head.weight": torch.zeros(384, 64)}
    with pytest.raises(ModelLoadError, match=rf"model\.layers\.{L}\.shared_head\.head\.weight"):
        build_model(load_checkpoint(_copy(glm, tmp_path / "e", tensors=head)), torch.float32)


def test_block_fp8_weights_are_dequantized_at_load(family_factory, tmp_path):
    """DeepSeek-V3's HF checkpoints are float8_e4m3fn with a scale per 128 x 128 block (`weight_scale_inv`)."""
    src, block = family_factory("deepseek"), 16
    t = load_file(src / "model.safetensors")
    want = {}
    for k in [k for k in t if k.endswith(("o_proj.weight", "kv_a_proj_with_mqa.weight"))]:
        n, m = t[k].shape
        scale = torch.rand(-(-n // block), -(-m // block), generator=torch.Generator().manual_seed(len(want))) + 0.01
        full = scale.repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :m]
        t[k], t[k + "_scale_inv"] = (t[k] / full).to(torch.float8_e4m3fn), scale
        want[k.replace("model.layers.3.", "mtp.layers.0.")] = t[k].float() * full
    quant = {"quant_method": "fp8", "weight_block_size": [block, block]}
    model = build_model(load_checkpoint(_copy(src, tmp_path / "fp8", config={"quantization_config": quant},
                                              tensors=t)), torch.float32)
    got = model.state_dict()
    assert all(torch.equal(got[k], w) for k, w in want.items())
    with pytest.raises(ModelLoadError, match="quant_method 'awq'"):
        load_checkpoint(_copy(src, tmp_path / "awq", config={"quantization_config": {"quant_method": "awq"}},
                              tensors=t))


def test_mtp_rejection_sampling_keeps_the_distribution(family_factory):
    """Sampled MTP speculation on MLA (the absorbed step form verifying, the MTP layer drafting) has plain sampling's
    joint law of 3 tokens (the chi-square check of tests/speculative/test_distribution.py, fewer samples)."""
    from speculative import test_distribution as dist
    llm = mtpx.LLM(family_factory("deepseek"), dtype="fp32")
    with torch.no_grad():
        llm.model.lm_head.weight.mul_(12.0)  # peaked next-token distributions: few outcomes, a sharp test
    old = dist.SAMPLES
    dist.SAMPLES = 2000
    try:
        prompt, params = [5, 17, 42, 99, 7], dict(temperature=1.0)
        plain = dist.joint_counts(llm, prompt, params, None, 0, seed=1)
        spec = dist.joint_counts(llm, prompt, params, dist.MTPDrafter(llm.model), 2, seed=2)
    finally:
        dist.SAMPLES = old
    dist.assert_same_distribution(plain, spec)


def test_mtp_embedding_of_its_own_is_used(glm, tmp_path):
    """An MTP embedding copy that differs from the main one is the MTP layer's own (DeepSeek-V3's layout allows it)."""
    own = torch.randn(384, 64, generator=torch.Generator().manual_seed(3))
    path = _copy(glm, tmp_path / "own", tensors={"model.layers.3.embed_tokens.weight": own})
    model = build_model(load_checkpoint(path), torch.float32)
    assert torch.equal(model.mtp.layers[0].embed_tokens.weight, own)
    shared = build_model(load_checkpoint(glm), torch.float32)
    x = ids(10, seed=5)
    with torch.no_grad():
        h = model(x)
        assert not torch.equal(model.mtp_forward(h, x), shared.mtp_forward(h, x))
