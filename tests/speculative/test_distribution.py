"""Speculative sampling is distributed exactly like plain sampling: chi-square on the joint law of 3 tokens."""
import random
from collections import Counter

import pytest
import torch
from scipy.stats import chi2_contingency

import mtpx
from mtpx.sampling import SamplingParams
from mtpx.speculative.chain import ChainDrafter
from mtpx.speculative.drafters import Draft, Drafter, MTPDrafter
from mtpx.engine.fork import prefill_shared
from mtpx.speculative.loop import decode_round
from mtpx.speculative.policy import DraftPolicy
from mtpx.speculative.suffix import SuffixDrafter

SAMPLES = 5000
BATCH = 500


class FixedDrafter(Drafter):
    """Deterministic drafter (one-hot q): always proposes the same plausible tokens."""

    def __init__(self, tokens):
        self.tokens = tokens

    def propose(self, seqs, ks):
        return [Draft(self.tokens[len(s.generated) - 1:][:k]) for s, k in zip(seqs, ks)]


@pytest.fixture(scope="module")
def peaked(ckpt_factory):
    """A tiny model whose next-token distributions are concentrated on a handful of tokens."""
    llm = mtpx.LLM(ckpt_factory(), dtype="fp32")
    with torch.no_grad():
        llm.model.lm_head.weight.mul_(12.0)
    return llm


def joint_counts(llm, prompt, params_kw, drafter, k, seed, samples=SAMPLES, first=3, max_tokens=3):
    """Counts of the first `first` of max_tokens sampled tokens; k: drafts a round, or a draft tree's shape (a
    tuple)."""
    counts = Counter()
    rng = random.Random(seed)
    tree = k if isinstance(k, tuple) else None
    policy = DraftPolicy(len(tree) if tree else k, 0, adaptive=False, tree=tree) if drafter else None
    for _ in range(samples // BATCH):
        seqs = [llm.engine.new_sequence(prompt, max_tokens, SamplingParams(**params_kw, seed=rng.getrandbits(62)),
                                        ignore_eos=True) for _ in range(BATCH)]
        prefill_shared(llm.model, drafter, seqs)  # one pass of the prompt, copied: each samples on its own
        while any(not s.finished for s in seqs):
            live = [s for s in seqs if not s.finished]
            decode_round(llm.model, drafter, policy, live)
        counts.update(tuple(s.generated[:first]) for s in seqs)
    return counts


def assert_same_distribution(a: Counter, b: Counter):
    keys = sorted(set(a) | set(b), key=lambda t: -(a[t] + b[t]))
    # pool rare outcomes so every expected count is >= 5
    common = [t for t in keys if a[t] + b[t] >= 20]
    table = [[a[t] for t in common] + [sum(a.values()) - sum(a[t] for t in common)],
             [b[t] for t in common] + [sum(b.values()) - sum(b[t] for t in common)]]
    if table[0][-1] + table[1][-1] == 0:
        table = [row[:-1] for row in table]
    assert len(table[0]) >= 5, "the test needs a distribution with several outcomes"
    p = chi2_contingency(table)[1]
    assert p > 0.01, f"speculative and plain sampling differ (chi-square p = {p:.2e})"


@pytest.mark.parametrize("params_kw,sampled_drafts", [
    (dict(temperature=1.0), False),
    (dict(temperature=0.7, top_p=0.9), True),
    (dict(temperature=1.0, repetition_penalty=1.5, presence_penalty=0.6, frequency_penalty=0.4), False)],
    ids=["T1-argmax-drafts", "T0.7-top_p0.9-sampled-drafts", "T1-penalties-argmax-drafts"])
def test_mtp_rejection_sampling_preserves_joint_distribution(peaked, params_kw, sampled_drafts):
    """MTP drafts its argmax when sampling (verified as deterministic drafts); drafts sampled from q, as the draft
    model's are, go through speculative sampling's rule instead: both exact."""
    prompt = [5, 17, 42, 99, 7]
    drafter = MTPDrafter(peaked.model)
    drafter.sampled_drafts = sampled_drafts
    plain = joint_counts(peaked, prompt, params_kw, None, 0, seed=1)
    spec = joint_counts(peaked, prompt, params_kw, drafter, 2, seed=2)
    assert_same_distribution(plain, spec)


def test_deterministic_drafter_preserves_joint_distribution(peaked):
    prompt = [5, 17, 42, 99, 7]
    params_kw = dict(temperature=1.0)
    plain = joint_counts(peaked, prompt, params_kw, None, 0, seed=3)
    likely = list(plain.most_common(1)[0][0])  # drafts that are often right and often wrong
    spec = joint_counts(peaked, prompt, params_kw, FixedDrafter(likely[1:] + likely[:1]), 2, seed=4)
    assert_same_distribution(plain, spec)


def test_detects_a_wrong_sampler(peaked):
    """The check above has power: sampling at a different temperature is caught."""
    prompt = [5, 17, 42, 99, 7]
    a = joint_counts(peaked, prompt, dict(temperature=1.0), None, 0, seed=5)
    b = joint_counts(peaked, prompt, dict(temperature=0.8), None, 0, seed=6)
    with pytest.raises(AssertionError, match="differ"):
        assert_same_distribution(a, b)


def test_chained_drafters_preserve_joint_distribution(peaked):
    """mtp,suffix at T = 1, a reduced case (2000 samples, the joint law of the first two tokens, where the one draft
    a round has room for is judged): the suffix drafter drafts (deterministically) where the sample repeats the
    prompt's "198 210" (a quarter of the rounds, half of those accepted), the MTP layer elsewhere."""
    prompt = [5, 17, 42, 99, 7, 198, 210, 5, 17, 42, 99, 7]
    drafter = ChainDrafter([SuffixDrafter()], MTPDrafter(peaked.model))
    plain = joint_counts(peaked, prompt, dict(temperature=1.0), None, 0, seed=7, samples=2000, first=2)
    spec = joint_counts(peaked, prompt, dict(temperature=1.0), drafter, 2, seed=8, samples=2000, first=2)
    assert_same_distribution(plain, spec)
