"""Over 2 ranks: greedy speculative output equals plain decoding on the same ranks for every drafter, logits stay
close to one device's (tensor parallel: sums split across ranks round differently; layer split: the same bits),
and rejection sampling keeps plain sampling's distribution."""
from collections import Counter

import pytest
import torch

from mtpx.engine.params import SamplingParams, SpecConfig
from mtpx.speculative.policy import DraftPolicy

PROMPTS = [[5, 17, 33, 99, 120, 7], [200, 3, 3, 3, 41], list(range(40, 75)), [9] * 12, [301, 12]]


def test_speculation_is_token_identical_to_plain_decoding(ranked, ckpt_factory):
    llm, _ = ranked
    draft = str(ckpt_factory(seed=7, mtp=False))
    for prompt in PROMPTS:
        plain = llm.generate(prompt, max_tokens=20, spec_type="none").token_ids
        for spec in [dict(spec_type="mtp", spec_draft_n_max=3, spec_draft_policy="fixed"),
                     dict(spec_type="mtp"),  # adaptive: rank 0 picks k, the other rank follows
                     dict(spec_type="mtp", spec_draft_tree="2,2"),  # a tree shape reaches the other rank the same way
                     dict(spec_type="ngram", spec_draft_n_max=4),
                     dict(spec_type="mtp,ngram", spec_draft_n_max=3),  # a chain: the lookup's limit from rank 0 too
                     dict(spec_type="draft", spec_draft_model=draft, spec_draft_n_max=2, spec_draft_policy="fixed")]:
            assert llm.generate(prompt, max_tokens=20, **spec).token_ids == plain, (prompt, spec)


def test_logits_match_one_device(ranked):
    llm, one = ranked
    prompt = PROMPTS[2]
    split, whole = llm.logits(prompt), one.logits(prompt)
    if llm.parallel.kind == "layers":
        assert torch.equal(split, whole)
    else:  # bf16 partial sums added across ranks instead of within one matmul
        torch.testing.assert_close(split, whole, atol=0.05, rtol=0)
        assert (split.argmax(-1) == whole.argmax(-1)).float().mean() > 0.9


def test_batched_rounds_over_ranks_match_single_requests(ranked):
    """The server's way: several sequences in one decode round (engine calls, told to the other rank)."""
    llm, _ = ranked
    engine, params = llm.engine, SamplingParams()
    drafter = engine.drafter(SpecConfig(spec_type="mtp", spec_draft_n_max=3), batched=True)
    policy = engine.new_policy(SpecConfig(spec_type="mtp", spec_draft_n_max=3, spec_draft_policy="fixed"))
    reqs = [engine.open(p, 12, params, ignore_eos=True) for p in PROMPTS]
    for r in reqs:
        engine.start(r, drafter)
    while any(not r.seq.finished for r in reqs):
        live = [r for r in reqs if not r.seq.finished]
        for r, new in zip(live, engine.decode_round(drafter, policy, [r.seq for r in live])):
            r.advance(new)
    for r, prompt in zip(reqs, PROMPTS):
        assert r.seq.generated[:12] == llm.generate(prompt, max_tokens=12, spec_type="none", ignore_eos=True).token_ids
        engine.release(r.seq)


def joint_counts(llm, spec: SpecConfig | None, n: int = 1600, batch: int = 400) -> Counter:
    """The joint law of 3 sampled tokens (T = 0.04: a few likely outcomes), from batched engine rounds."""
    engine, counts, prompt = llm.engine, Counter(), [5, 17, 42, 99, 7]
    drafter = engine.drafter(spec, batched=True) if spec else None
    policy = DraftPolicy(3, 0, adaptive=False) if spec else None
    for b in range(n // batch):
        reqs = [engine.open(prompt, 3, SamplingParams(temperature=0.04, seed=b * batch + i), ignore_eos=True)
                for i in range(batch)]
        engine.start_shared(reqs, drafter)  # one prefill of the shared prompt
        while any(not r.seq.finished for r in reqs):
            engine.decode_round(drafter, policy, [r.seq for r in reqs if not r.seq.finished])
        counts.update(tuple(r.seq.generated) for r in reqs)
        for r in reqs:
            engine.release(r.seq)
    return counts


def test_rejection_sampling_keeps_the_distribution(ranked):
    llm, _ = ranked
    if llm.parallel.kind != "tensor" or llm.config.is_moe:
        pytest.skip("once is enough: sampling is rank 0's decisions repeated, alike for every split")
    from speculative.test_distribution import assert_same_distribution
    plain = joint_counts(llm, None)
    spec = joint_counts(llm, SpecConfig(spec_type="mtp", spec_draft_n_max=3, spec_draft_policy="fixed"))
    assert_same_distribution(plain, spec)
