"""Constrained decoding stays lossless: with a grammar active, greedy speculation (MTP, draft model, n-gram) gives
token for token what constrained plain decoding gives, the output matches the grammar even on a random model, and
logprobs are the same with speculation on and off."""
import json

import pytest

import mtpx
from mtpx.engine.constraints import GrammarSpec
from mtpx.engine.params import FieldError

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["ok", "n", "color"],
          "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 999},
                         "color": {"enum": ["red", "green", "blue"]}}}
PROMPTS = ["def add(a, b):", "The quick brown", "import os\n"]


@pytest.fixture(scope="module")
def llm(dense_ckpt):
    return mtpx.LLM(dense_ckpt)


@pytest.mark.parametrize("grammar", [GrammarSpec.json_schema(SCHEMA), GrammarSpec("json_object"),
                                     GrammarSpec("regex", r"(ab|cd)+[0-9]{2,6}x")])
def test_greedy_constrained_speculation_equals_plain(llm, grammar):
    accepted = 0
    for prompt in PROMPTS:
        plain = llm.generate(prompt, max_tokens=40, grammar=grammar, logprobs=2, spec_type="none")
        for spec in (dict(spec_type="mtp", spec_draft_n_max=3, spec_draft_policy="fixed"),
                     dict(spec_type="mtp", spec_draft_tree="2,2", spec_draft_policy="fixed"),  # chains under a grammar
                     dict(spec_type="ngram", spec_ngram_min=1, spec_draft_n_max=4, spec_draft_policy="fixed"),
                     dict(spec_type="draft", spec_draft_model=str(llm.path), spec_draft_n_max=3,
                          spec_draft_policy="fixed")):  # the model as its own draft: its drafts pass the grammar
            out = llm.generate(prompt, max_tokens=40, grammar=grammar, logprobs=2, **spec)
            assert out.token_ids == plain.token_ids, (prompt, spec)
            assert out.logprobs == plain.logprobs
            accepted += out.stats["accepted_tokens"]
    assert accepted > 0  # verify rows past the first were checked (drafts that passed the grammar, forced tokens)


def test_schema_output_is_valid_json_on_a_random_model(llm):
    for prompt in PROMPTS:
        out = llm.generate(prompt, max_tokens=60, grammar=GrammarSpec.json_schema(SCHEMA), spec_type="mtp")
        assert out.finish_reason == "stop", out.text
        value = json.loads(out.text)
        assert set(value) == {"ok", "n", "color"} and value["color"] in ("red", "green", "blue")


def test_sampled_constrained_output_matches_the_grammar(llm):
    for seed in range(3):
        out = llm.generate("Hello", max_tokens=60, grammar=GrammarSpec.json_schema(SCHEMA), temperature=1.0,
                           seed=seed, spec_type="mtp", spec_draft_n_max=3)
        assert isinstance(json.loads(out.text)["ok"], bool)


def test_logprobs_equal_with_and_without_speculation(llm):
    plain = llm.generate("def add(a, b):", max_tokens=24, logprobs=3, spec_type="none")
    spec = llm.generate("def add(a, b):", max_tokens=24, logprobs=3, spec_type="mtp", spec_draft_n_max=3,
                        spec_draft_policy="fixed")
    assert spec.token_ids == plain.token_ids and spec.logprobs == plain.logprobs
    assert len(plain.logprobs) == len(plain.token_ids) and len(plain.logprobs[0][1]) == 3
    lp, top = plain.logprobs[0]
    assert lp == top[0][1] and top[0][0] == plain.token_ids[0]  # greedy: the chosen token is the most likely


def test_bad_grammar_names_the_field(llm):
    with pytest.raises(FieldError) as e:
        llm.engine.check_grammar(GrammarSpec("json_schema", '{"type": "nonsense"}', "response_format.json_schema"))
    assert e.value.field == "response_format.json_schema"
    with pytest.raises(FieldError):
        llm.generate("x", grammar=GrammarSpec("regex", "(unclosed", "grammar"), spec_type="none")


def test_sampling_under_a_grammar_keeps_the_joint_distribution(ckpt_factory):
    """Rejection sampling with the grammar's mask on every verify row (and on the MTP drafter's proposals) samples
    3 tokens as constrained plain sampling does (chi-square, as tests/speculative/test_distribution.py)."""
    import random
    import re
    from collections import Counter

    import torch
    from scipy.stats import chi2_contingency

    from mtpx.sampling import SamplingParams
    from mtpx.speculative.drafters import MTPDrafter
    from mtpx.speculative.loop import decode_round, prefill
    from mtpx.speculative.policy import DraftPolicy

    llm = mtpx.LLM(ckpt_factory(), dtype="fp32")
    with torch.no_grad():
        llm.model.lm_head.weight.mul_(12.0)  # peaked distributions: few likely outcomes
    prompt = [5, 17, 42, 99, 7]
    probs = torch.softmax(llm.logits(prompt)[-1], -1)
    texts = {t: llm.tokenizer.decode([t]) for t in probs.argsort(descending=True).tolist()[:40]}
    words = [s for s in texts.values() if s and "\ufffd" not in s and "<|" not in s][:10]
    grammar = GrammarSpec("regex", "(" + "|".join(re.escape(w) for w in words[1:]) + ")*")  # not the likeliest

    def counts(drafter, seed, n=2000, batch=500):
        rng, out = random.Random(seed), Counter()
        policy = DraftPolicy(2, 0, adaptive=False) if drafter else None
        for _ in range(n // batch):
            seqs = []
            for _ in range(batch):
                params = SamplingParams(temperature=1.0, seed=rng.getrandbits(62), grammar=grammar)
                seq = llm.engine.new_sequence(prompt, 3, params, ignore_eos=True)
                prefill(llm.model, drafter, seq)
                seqs.append(seq)
            while any(not s.finished for s in seqs):
                decode_round(llm.model, drafter, policy, [s for s in seqs if not s.finished])
            out.update(tuple(s.generated) for s in seqs)
        return out

    a, b = counts(None, 1), counts(MTPDrafter(llm.model), 2)
    common = [t for t in set(a) | set(b) if a[t] + b[t] >= 20]
    assert len(common) >= 5
    table = [[c[t] for t in common] + [sum(c.values()) - sum(c[t] for t in common)] for c in (a, b)]
    if table[0][-1] + table[1][-1] == 0:
        table = [row[:-1] for row in table]
    assert chi2_contingency(table)[1] > 0.01
