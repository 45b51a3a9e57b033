"""Logits processing: repetition, presence, frequency and DRY penalties."""
import math
import random

import pytest
import torch

from mtpx.errors import RequestError
from mtpx.sampling import (PenaltyHistory, SamplingParams, TokenOccurrences, apply_penalties, dry_penalties,
                           penalty_history, target_probs)


def reference_row(logits, params, history, n_prompt):
    """One row, written the obvious way: vLLM's semantics."""
    out = logits.clone()
    generated = history[n_prompt:]
    for t in set(history):
        if params.repetition_penalty != 1:
            out[t] = out[t] / params.repetition_penalty if out[t] > 0 else out[t] * params.repetition_penalty
    for t in set(generated):
        out[t] -= params.presence_penalty + params.frequency_penalty * generated.count(t)
    return out


def test_rows_follow_the_history_plus_earlier_drafts():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 20, generator=g) * 3
    params = SamplingParams(presence_penalty=0.7, frequency_penalty=0.4, repetition_penalty=1.5)
    tokens, n_prompt, drafts = [3, 4, 5, 4, 9, 9, 1], 3, [9, 2, 5]
    got = apply_penalties(logits, params, tokens, n_prompt, drafts)
    for j in range(4):
        torch.testing.assert_close(got[j], reference_row(logits[j], params, tokens + drafts[:j], n_prompt))


def test_a_kept_history_counts_what_a_rebuilt_one_does():
    """PenaltyHistory, updated with each round's new tokens (the prompt first, then generated ones one or several at
    a time), gives penalty_history's tensors at every step, and apply_penalties the same logits with either."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 30, (60,), generator=g).tolist()
    n_prompt, history = 7, PenaltyHistory()
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.3)
    logits = torch.randn(3, 30, generator=g)
    for end in (7, 8, 9, 13, 14, 30, 31, 60):
        counts, seen = history.of(tokens[:end], n_prompt, 30, "cpu")
        ref_counts, ref_seen = penalty_history(tokens[:end], n_prompt, 30, "cpu")
        assert torch.equal(counts, ref_counts) and torch.equal(seen, ref_seen)
        assert torch.equal(apply_penalties(logits, params, tokens[:end], n_prompt, [4, 5], history),
                           apply_penalties(logits, params, tokens[:end], n_prompt, [4, 5]))
    counts, _ = history.of(tokens[:5], 2, 30, "cpu")  # another, shorter sequence: counted afresh
    assert torch.equal(counts, penalty_history(tokens[:5], 2, 30, "cpu")[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("penalties", [dict(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.7),
                                       dict(repetition_penalty=1.0, frequency_penalty=-0.5),
                                       dict(repetition_penalty=0.8)])
def test_the_one_pass_kernel_gives_the_pytorch_path_bits(dtype, penalties, monkeypatch):
    """kernels.penalize_rows (CPU) and the PyTorch ops it replaces: the same bits, drafts repeating ids included."""
    from mtpx import kernels
    if not kernels.rowgemm_available():
        pytest.skip("no CPU kernels here")
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(5, 300, generator=g) * 4).to(dtype)
    tokens = torch.randint(0, 300, (80,), generator=g).tolist()
    params = SamplingParams(**penalties)
    drafts = [7, 7, tokens[-1], 299]
    fused = apply_penalties(logits, params, tokens, 20, drafts)
    monkeypatch.setattr(kernels, "penalize_rows", lambda *args: None)
    assert torch.equal(fused, apply_penalties(logits, params, tokens, 20, drafts))


def test_defaults_change_nothing_and_bad_values_are_named():
    assert not SamplingParams().penalized
    logits = torch.randn(2, 10)
    torch.testing.assert_close(apply_penalties(logits, SamplingParams(), [1, 2, 3], 1, [4]), logits)
    for kw, name in ((dict(presence_penalty=3), "presence_penalty"), (dict(frequency_penalty=-2.5), "frequency"),
                     (dict(repetition_penalty=0), "repetition_penalty")):
        with pytest.raises(RequestError, match=name):
            SamplingParams(**kw)


def dry_reference(context: list[int], params: SamplingParams) -> dict[int, float]:
    """DRY by its definition: token t loses multiplier · base^(n - allowed) for the longest n such that the
    context's last n tokens (no breaker among them) followed by t occur earlier in the window."""
    window = context if params.dry_penalty_last_n < 0 else context[-params.dry_penalty_last_n:]
    breakers, longest = params.dry_breaker_ids, {}
    for n in range(1, len(window)):
        suffix = window[-n:]
        if any(t in breakers for t in suffix):
            break
        for start in range(len(window) - n):
            following = window[start + n]
            if window[start:start + n] == suffix and following not in breakers:
                longest[following] = max(n, longest.get(following, 0))
    return {t: params.dry_multiplier * params.dry_base ** (n - params.dry_allowed_length)
            for t, n in longest.items() if n >= params.dry_allowed_length}


def test_dry_penalises_the_token_that_would_continue_a_run():
    params = SamplingParams(dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2)
    # "1 2 3" ran before and was followed by 4: a run of 3, so 4 loses 0.8 · 1.75^(3 - 2)
    assert dry_penalties([1, 2, 3, 4, 1, 2, 3], params) == pytest.approx({4: 0.8 * 1.75})
    assert dry_penalties([1, 2, 3, 4, 5, 2, 3], params) == pytest.approx({4: 0.8})  # "2 3": the allowed length
    assert dry_penalties([1, 2, 3, 4, 5, 6, 3], params) == {}
    with_breaker = SamplingParams(dry_multiplier=0.8, dry_breaker_ids=frozenset({1}))
    assert dry_penalties([1, 2, 3, 4, 1, 2, 3], with_breaker) == pytest.approx({4: 0.8})  # the run stops at 1
    assert dry_penalties([1, 2, 3, 1, 2, 3], with_breaker) == {}  # what followed (1) is a breaker
    assert dry_penalties([5, 2, 3, 1, 5, 2, 3, 1], with_breaker) == {}  # the last token is a breaker
    recent = SamplingParams(dry_multiplier=0.8, dry_penalty_last_n=4)
    assert dry_penalties([1, 2, 3, 4, 1, 2, 3], recent) == {}  # the earlier run is outside the last 4 tokens
    # a long loop: penalties grow with the run, capped so that they stay finite in float32
    loop = dry_penalties([7, 8] * 500, params)
    assert set(loop) == {7} and math.isfinite(loop[7]) and loop[7] > 1e9


def test_dry_follows_its_definition_on_random_contexts():
    g = random.Random(0)
    for trial in range(300):
        context = [g.randrange(5) for _ in range(g.randrange(2, 40))]
        params = SamplingParams(dry_multiplier=g.choice([0.5, 0.8]), dry_base=g.choice([1.5, 1.75]),
                                dry_allowed_length=g.choice([1, 2, 3]), dry_penalty_last_n=g.choice([-1, 10, 25]),
                                dry_breaker_ids=frozenset(g.sample(range(5), g.choice([0, 0, 1]))))
        expected = dry_reference(context, params)
        assert dry_penalties(context, params) == pytest.approx(expected), (trial, context)
        # with an index of a prefix (a sequence's tokens, the rest being drafts): the same
        indexed = TokenOccurrences().of(context[:g.randrange(len(context) + 1)])
        assert dry_penalties(context, params, indexed) == pytest.approx(expected), (trial, context)


def test_dry_rows_follow_the_history_plus_earlier_drafts_with_the_other_penalties():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 12, generator=g)
    tokens, n_prompt, drafts = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2], 2, [3, 4, 1]
    params = SamplingParams(dry_multiplier=0.8, repetition_penalty=1.2, presence_penalty=0.3)
    counting_only = SamplingParams(repetition_penalty=1.2, presence_penalty=0.3)
    got = apply_penalties(logits, params, tokens, n_prompt, drafts)
    for j in range(4):
        expected = apply_penalties(logits[j:j + 1], counting_only, tokens + drafts[:j], n_prompt)[0].clone()
        for t, amount in dry_reference(tokens + drafts[:j], params).items():
            expected[t] -= amount
        torch.testing.assert_close(got[j], expected)
    assert dry_reference(tokens + drafts, params)  # the rows were penalised

    history = PenaltyHistory()  # the sequence's kept history (and DRY's index) gives the same rows
    for end in (4, 5, 9, 10):
        assert torch.equal(apply_penalties(logits, params, tokens[:end], n_prompt, drafts, history),
                           apply_penalties(logits, params, tokens[:end], n_prompt, drafts))
    assert torch.equal(apply_penalties(logits, params, [2, 3, 2], 1, drafts, history),  # another, shorter one
                       apply_penalties(logits, params, [2, 3, 2], 1, drafts))


@pytest.mark.parametrize("kw,name", [(dict(dry_multiplier=-0.5), "dry_multiplier"), (dict(dry_base=0.9), "dry_base"),
                                     (dict(dry_allowed_length=0), "dry_allowed_length"),
                                     (dict(dry_penalty_last_n=-2), "dry_penalty_last_n"),
                                     (dict(dry_sequence_breakers="\n"), "dry_sequence_breakers"),
                                     (dict(dry_sequence_breakers=["\n", ""]), "dry_sequence_breakers")])
def test_bad_dry_values_are_named(kw, name):
    with pytest.raises(RequestError, match=name):
        SamplingParams(**kw)
    assert not SamplingParams(dry_multiplier=0.8, dry_penalty_last_n=0).penalized  # searching no tokens: off


def test_sample_draws_each_id_with_its_probability():
    """The inverse-cumulative sampler against known probabilities: ids at block edges, most ids of probability 0
    (never drawn), weights not normalised."""
    from collections import Counter

    from scipy.stats import chisquare

    from mtpx.sampling import SAMPLE_BLOCK, sample
    g = torch.Generator().manual_seed(0)
    ids = [0, 7, SAMPLE_BLOCK - 1, SAMPLE_BLOCK, SAMPLE_BLOCK + 1, 2 * SAMPLE_BLOCK - 1, 5000]
    weights = torch.tensor([0.05, 0.2, 0.1, 0.15, 0.3, 0.12, 0.08])
    probs = torch.zeros(5001)
    probs[ids] = weights * 3
    n = 20000
    counts = Counter(sample(probs, g) for _ in range(n))
    assert set(counts) <= set(ids)
    assert chisquare([counts[i] for i in ids], (weights / weights.sum() * n).tolist()).pvalue > 1e-3
    assert sample(torch.tensor([0.0, 0.0, 1.0]), g) == 2 and sample(torch.tensor([1.0, 0.0, 0.0]), g) == 0
    column = torch.zeros(2 * SAMPLE_BLOCK, 2)
    column[SAMPLE_BLOCK + 3, 1] = 1.0
    assert sample(column[:, 1], g) == SAMPLE_BLOCK + 3  # a strided view


def reference_target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """target_probs written the plain way: mask, softmax, a full sort for top-p."""
    logits = logits.float() / max(params.temperature, 1e-5)
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= params.top_p
        probs = probs.masked_fill(drop.scatter(-1, order, drop), 0.0)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), 0.0)
    return probs / probs.sum(-1, keepdim=True)


@pytest.mark.parametrize("vocab", [7, 300, 5000])
def test_target_probs_follow_the_plain_definition(vocab):
    """The candidates-only paths (top-k first, then top-p among the largest ids) keep the same ids with the same
    probabilities as a full sort, ties at the k-th value included."""
    g = torch.Generator().manual_seed(vocab)
    for trial in range(60):
        logits = torch.randn(3, vocab, generator=g) * float(torch.empty(()).uniform_(0.2, 8, generator=g))
        params = SamplingParams(temperature=[0.3, 0.7, 1.0, 1.5][trial % 4], top_k=[0, 1, 5, 40, 400][trial % 5],
                                top_p=[1.0, 0.5, 0.9, 0.99][trial % 4 if trial % 3 else 0], min_p=[0, 0.05][trial % 2])
        if trial % 6 == 0:  # ties at the k-th value (and no top-p, where the order among tied ids is arbitrary)
            logits = logits.round()
            params = SamplingParams(temperature=1.0, top_k=3, min_p=[0, 0.05][trial % 4 == 0])
        got, want = target_probs(logits, params), reference_target_probs(logits, params)
        assert torch.equal(got > 0, want > 0), trial
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
