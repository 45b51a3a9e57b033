"""qwen3_next (Qwen3-Next): its fused in_proj_qkvz / in_proj_ba rewritten into Qwen3.5's projections at load; logits
against transformers (fp32), the `mtp.*` layer drafting losslessly."""
import pytest
import torch

import mtpx
from checkpoints import hf_qwen3_next_model
from mtpx.errors import ModelLoadError
from mtpx.loading import build_model, load_checkpoint


def ids(n, seed=0):
    return torch.randint(0, 300, (1, n), generator=torch.Generator().manual_seed(seed))


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_logits_match_transformers_prefill_and_cached_steps(family_factory):
    path = family_factory("qwen3_next")
    model = build_model(load_checkpoint(path), torch.float32)
    assert model.mtp is not None
    x = ids(80)  # > one chunk of the chunked gated delta rule
    with torch.no_grad():
        ref = hf_qwen3_next_model(path)(x).logits[0]
        assert rel(model.logits(model(x))[0], ref) < 1e-4
        state = model.new_state(96)
        outs = [model.logits(model(x[:, :70], [state], "prefill"))[0]]
        outs.append(model.logits(model(x[:, 70:73], [state], "step"))[0])
        for t in range(73, 80):
            state.mark()
            outs.append(model.logits(model(x[:, t:t + 1], [state], "step"))[0])
        assert rel(torch.cat(outs), ref) < 1e-4


def test_greedy_mtp_speculation_is_token_identical(family_factory):
    llm = mtpx.LLM(family_factory("qwen3_next"))
    mismatches = []
    for i in range(4):
        prompt = ids(4 + 6 * i, seed=20 + i)[0].tolist()
        ref = llm.generate(prompt, max_tokens=16, ignore_eos=True, spec_type="none").token_ids
        for k in (1, 2, 3, 4):
            out = llm.generate(prompt, max_tokens=16, spec_type="mtp", spec_draft_n_max=k, spec_draft_policy="fixed",
                               ignore_eos=True)
            if out.token_ids != ref:
                mismatches.append((i, k))
    assert not mismatches


def test_unsupported_options_are_named():
    from mtpx.config import ModelConfig
    from checkpoints import base_config
    raw = {**base_config(moe=True), "model_type": "qwen3_next", "mlp_only_layers": [0]}
    with pytest.raises(ModelLoadError, match="mlp_only_layers"):
        ModelConfig.from_hf_dict(raw)


def test_gguf_round_trip_is_bit_identical(family_factory, tmp_path):
    """arch qwen3next: ssm_in / ssm_ba hold the fused projections; export, import and export again change no bit."""
    import numpy as np
    from gguf import GGUFReader
    from mtpx.loading.convert import write_gguf
    path, out, again = family_factory("qwen3_next"), tmp_path / "a.gguf", tmp_path / "b.gguf"
    assert write_gguf(load_checkpoint(path), out, "bf16")["arch"] == "qwen3next"
    names = {t.name for t in GGUFReader(str(out)).tensors}
    assert {"blk.0.ssm_in.weight", "blk.0.ssm_ba.weight", "blk.4.nextn.eh_proj.weight"} <= names
    a = build_model(load_checkpoint(path), torch.bfloat16).state_dict()
    ckpt = load_checkpoint(out)
    assert ckpt.config.model_type == "qwen3_next"
    b = build_model(ckpt, torch.bfloat16).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    write_gguf(load_checkpoint(out), again, "bf16")
    t1 = {t.name: np.asarray(t.data) for t in GGUFReader(str(out)).tensors}
    t2 = {t.name: np.asarray(t.data) for t in GGUFReader(str(again)).tensors}
    assert t1.keys() == t2.keys() and all(np.array_equal(t1[k], t2[k]) for k in t1)
