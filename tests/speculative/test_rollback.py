"""After rejections, the caches equal those of a run that never saw the rejected tokens."""
import torch

import mtpx
from mtpx.sampling import SamplingParams
from mtpx.speculative.drafters import MTPDrafter
from mtpx.speculative.loop import decode_round, prefill
from mtpx.speculative.policy import DraftPolicy
from test_lossless import OracleDrafter, prompts


def final_state(llm, prompt, drafter, k, n):
    seq = llm.engine.new_sequence(prompt, n, SamplingParams(), ignore_eos=True)
    prefill(llm.model, drafter, seq)
    policy = DraftPolicy(k, 0, adaptive=False)
    while not seq.finished:
        decode_round(llm.model, drafter, policy if drafter else None, [seq])
    return seq


def assert_same_caches(a, b):
    assert a.length == b.length
    for i in a.kv:
        assert torch.equal(a.kv[i][0][:, :a.length], b.kv[i][0][:, :b.length])
        assert torch.equal(a.kv[i][1][:, :a.length], b.kv[i][1][:, :b.length])
    for i in a.conv:
        assert torch.equal(a.conv[i], b.conv[i])
        assert torch.equal(a.recurrent[i], b.recurrent[i])


def test_caches_after_rejections_equal_plain_run(ckpt_factory):
    for moe in (False, True):
        llm = mtpx.LLM(ckpt_factory(moe=moe))
        for i, prompt in enumerate(prompts(4, seed=11)):
            plain = final_state(llm, prompt, None, 0, 30)
            spec = final_state(llm, prompt, OracleDrafter(plain.generated, llm.config.vocab_size, 1000 + i), 4, 30)
            assert spec.stats.accepted_tokens < spec.stats.drafted_tokens  # rejections happened
            assert spec.generated == plain.generated
            assert_same_caches(spec.state, plain.state)


def assert_mtp_cache_holds_accepted_pairs(llm, seq) -> int:
    """The sequence's MTP cache equals one built from its accepted (h_i, t_{i+1}) pairs, up to the bf16 rounding
    between the prefill and step paths; returns how many positions it holds."""
    mtp_state = seq.draft.state
    with torch.no_grad():
        ids = torch.tensor([seq.tokens])
        hidden = llm.model(ids)
        ref_state = llm.model.new_mtp_state(seq.max_len)
        n = mtp_state.length
        llm.model.mtp_forward(hidden[:, :n], ids[:, 1:n + 1], [ref_state], "prefill")
    for i in mtp_state.kv:
        ours, ref = mtp_state.kv[i][0][:, :n].float(), ref_state.kv[i][0][:, :n].float()
        assert torch.allclose(ours, ref, atol=0.05, rtol=0.05)
    return n


def test_mtp_cache_holds_only_accepted_pairs(dense_ckpt):
    """The MTP cache after a round equals one built from the accepted sequence's true (h_i, t_{i+1}) pairs."""
    llm = mtpx.LLM(dense_ckpt)
    seq = final_state(llm, prompts(1, seed=12)[0], MTPDrafter(llm.model), 3, 20)
    assert_mtp_cache_holds_accepted_pairs(llm, seq)
