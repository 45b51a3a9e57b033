"""Chains of drafters (spec_type mtp,ngram): who drafts each round, the MTP layer's state through rounds it sits
out, stats per drafter, and the errors a bad chain gets."""
import argparse

import pytest

import mtpx
from mtpx.cli import main
from mtpx.engine.flags import add_spec_arguments, spec_from_args
from mtpx.engine.params import FieldError, SpecConfig, spec_from_json
from mtpx.sampling import SamplingParams
from mtpx.speculative.chain import ChainDrafter
from mtpx.speculative.drafters import Draft, Drafter, MTPDrafter, NgramDrafter
from mtpx.speculative.loop import decode_round, prefill
from mtpx.speculative.policy import DraftPolicy
from mtpx.speculative.suffix import SuffixDrafter
from test_lossless import prompts
from test_rollback import assert_mtp_cache_holds_accepted_pairs


class EveryOther(Drafter):
    """A lookup drafter that is confident every other round (proposing a fixed token)."""
    name = "every-other"

    def __init__(self):
        self.rounds = 0

    def propose(self, seqs, ks):
        self.rounds += 1
        return [Draft([7] * k if self.rounds % 2 else []) for k in ks]


def run(llm, drafter, prompt, k=3, n=24, policy=None):
    seq = llm.engine.new_sequence(prompt, n, SamplingParams(), ignore_eos=True)
    prefill(llm.model, drafter, seq)
    policy = policy or DraftPolicy(k, 0, adaptive=False)
    seq.rounds = 0
    while not seq.finished:
        decode_round(llm.model, drafter, policy, [seq])
        seq.rounds += 1
    return seq


@pytest.fixture(scope="module")
def llm(dense_ckpt):
    return mtpx.LLM(dense_ckpt)


def test_first_confident_lookup_drafts_else_the_model_drafter(llm):
    mtp = MTPDrafter(llm.model)
    chain = ChainDrafter([NgramDrafter(1, 4), SuffixDrafter()], mtp)
    seq = llm.engine.new_sequence([1, 2, 3, 4, 5, 1, 2, 3], 8, SamplingParams(), ignore_eos=True)
    prefill(llm.model, chain, seq)
    seq.tokens[-1:] = [4]  # ... 1 2 3 4 5 1 2 3 4: the n-gram "2 3 4" matched, followed by 5 1 2
    drafts = chain.propose([seq], [2], [3])
    assert drafts[0].tokens == [5, 1, 2] and drafts[0].source == "ngram"  # lookups draft up to n_max
    seq.tokens[-1:] = [99]  # nothing matches: the MTP layer drafts the policy's k
    drafts = chain.propose([seq], [2], [3])
    assert drafts[0].source == "mtp" and len(drafts[0].tokens) == 2
    assert chain.name == "ngram,suffix,mtp" and chain.is_lookup(Draft([1], source="suffix"))


def test_engine_builds_chains_in_priority_order(llm):
    for spec_type in ("mtp,ngram", "ngram,mtp", "draft-mtp,ngram-mod"):
        d = llm.engine.drafter(SpecConfig(spec_type))
        assert isinstance(d, ChainDrafter) and isinstance(d.model, MTPDrafter)
        assert [type(x) for x in d.lookups] == [NgramDrafter]
    d = llm.engine.drafter(SpecConfig("suffix,ngram"))
    assert [x.name for x in d.lookups] == ["suffix", "ngram"] and d.model is None
    assert isinstance(llm.engine.drafter(SpecConfig("ngram")), NgramDrafter)  # alone: as before
    assert SpecConfig("draft-mtp,ngram-mod").kind == "mtp,ngram"


def test_mtp_state_stays_consistent_through_rounds_it_sits_out(llm):
    """The MTP cache after a chained run equals one built from the accepted sequence's (h_i, t_{i+1}) pairs, as
    after a run of MTP alone (the catch-up feeds it the pairs of the rounds the lookup drafted)."""
    lookup = EveryOther()
    seq = run(llm, ChainDrafter([lookup], MTPDrafter(llm.model)), prompts(1, seed=12)[0], n=30)
    assert set(seq.stats.by_drafter) == {"every-other", "mtp"}
    assert assert_mtp_cache_holds_accepted_pairs(llm, seq) >= len(seq.tokens) - 8  # caught up to the last rounds


def test_stats_per_drafter_add_up(llm):
    out = llm.generate([5, 6, 7, 5, 6, 7, 5, 6], max_tokens=40, spec_type="mtp,ngram", spec_draft_n_max=4,
                       ignore_eos=True)
    by = out.stats["by_drafter"]
    assert out.stats["spec_type"] == "mtp,ngram" and set(by) <= {"mtp", "ngram"}
    for key in ("drafts", "drafted_tokens", "accepted_tokens"):
        assert out.stats[key] == sum(d[key] for d in by.values())
    for d in by.values():
        assert sum(d["drafted_by_position"]) == d["drafted_tokens"] and len(d["acceptance_by_position"]) <= 4


def test_the_policy_sees_only_the_model_drafters_rounds(llm):
    policy = DraftPolicy(3, 0, adaptive=True)
    seen = []
    original = policy.observe
    policy.observe = lambda batch, ks, *a, **kw: (seen.append(ks), original(batch, ks, *a, **kw))[1]
    seq = run(llm, ChainDrafter([EveryOther()], MTPDrafter(llm.model)), [1, 2, 3], n=30, policy=policy)
    lookup_rounds = seq.stats.by_drafter["every-other"].drafts
    assert lookup_rounds > 0 and len(seen) == seq.rounds - lookup_rounds


BAD_CHAINS = [("mtp,bogus", "unknown drafter 'bogus'"), ("", "empty drafter name"), ("mtp,,ngram", "empty"),
              ("mtp,draft-mtp", "names the drafter 'mtp' twice"), ("ngram,ngram-mod", "twice"),
              ("none,mtp", "'none' cannot be part of a chain"), ("mtp,draft", "at most one of mtp and draft")]


@pytest.mark.parametrize("spec_type,message", BAD_CHAINS)
def test_bad_chains_name_the_field_and_the_flag(spec_type, message):
    with pytest.raises(FieldError, match=message) as e:
        SpecConfig(spec_type)
    assert e.value.field == "spec_type"
    with pytest.raises(FieldError, match=message) as e:
        spec_from_json({"spec_type": spec_type})  # the API's 400 names the field
    assert e.value.field == "spec_type"
    p = argparse.ArgumentParser()
    add_spec_arguments(p)
    with pytest.raises(FieldError, match=f"^--spec-type: .*{message}"):
        spec_from_args(p.parse_args(["--spec-type", spec_type]))


def test_mtp_in_a_chain_needs_an_mtp_layer(ckpt_factory, capsys):
    no_mtp = mtpx.LLM(ckpt_factory(seed=7, mtp=False))
    with pytest.raises(FieldError, match="mtp,ngram.*MTP layer") as e:
        no_mtp.generate([1, 2, 3], max_tokens=2, spec_type="mtp,ngram")
    assert e.value.field == "spec_type"
    assert no_mtp.generate([1, 2, 3, 1, 2], max_tokens=4, spec_type="ngram,suffix").token_ids  # lookups only: fine
    p = argparse.ArgumentParser()
    add_spec_arguments(p)
    with pytest.raises(FieldError, match="^--spec-type mtp,ngram: mtp drafts with the model's MTP layer"):
        spec_from_args(p.parse_args(["--spec-type", "mtp,ngram"]), has_mtp=False)
    assert main(["run", "--model", str(ckpt_factory(seed=7, mtp=False)), "--prompt", "x", "--max-tokens", "2",
                 "--spec-type", "suffix,mtp"]) == 1
    assert "error: --spec-type suffix,mtp: mtp drafts with the model's MTP layer" in capsys.readouterr().err


@pytest.mark.parametrize("spec_type", ["mtp,ngram", "mtp,suffix"])
def test_batched_rounds_mixing_drafters_are_lossless(llm, spec_type):
    """Sequences decoded together, some drafting with the lookup and some with the (grouped) MTP layer in the same
    round, each emit exactly what plain decoding does."""
    spec = SpecConfig(spec_type, spec_draft_n_max=4)
    drafter = llm.engine.drafter(spec, batched=True)
    policy = llm.engine.new_policy(spec)
    batch = prompts(6, seed=21) + [[5, 6, 7, 5, 6, 7, 5, 6]]
    seqs = []
    for p in batch:
        seq = llm.engine.new_sequence(p, 30, SamplingParams(), ignore_eos=True)
        prefill(llm.model, drafter, seq)
        seqs.append(seq)
    while any(not s.finished for s in seqs):
        decode_round(llm.model, drafter, policy, [s for s in seqs if not s.finished])
    for p, seq in zip(batch, seqs):
        assert seq.generated == llm.generate(p, max_tokens=30, spec_type="none", ignore_eos=True).token_ids
    assert {d for s in seqs for d in s.stats.by_drafter} == set(spec.drafters)


def test_suffix_store_drafts_from_earlier_outputs(llm):
    """With spec_suffix_cache, a request that repeats an earlier one drafts its output from the store."""
    llm.engine.suffix_store = None
    prompt, kw = prompts(1, seed=33)[0], dict(max_tokens=40, ignore_eos=True, spec_draft_n_max=6)
    first = llm.generate(prompt, spec_type="suffix", spec_suffix_cache=1000, **kw)
    second = llm.generate(prompt, spec_type="suffix", spec_suffix_cache=1000, **kw)
    alone = llm.generate(prompt, spec_type="suffix", **kw)  # no store: as the first
    assert first.token_ids == second.token_ids == alone.token_ids
    assert second.stats["accepted_tokens"] >= 30 > alone.stats["accepted_tokens"]
    assert llm.engine.suffix_store.outputs[-1] == second.token_ids
    llm.engine.suffix_store = None
