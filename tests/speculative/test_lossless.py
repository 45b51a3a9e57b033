"""Greedy speculative decoding returns exactly the tokens of plain decoding (bf16, CPU), for every drafter and chain
of drafters."""
import random

import pytest
import torch

import mtpx
from mtpx.speculative.drafters import Draft, Drafter

N_PROMPTS = 50
MAX_TOKENS = 24


class OracleDrafter(Drafter):
    """Proposes the reference continuation with some tokens corrupted: many acceptances and rejections at every
    position, so rollback is exercised everywhere."""
    name = "oracle"

    def __init__(self, reference: list[int], vocab: int, seed: int):
        self.reference, self.vocab, self.rng = reference, vocab, random.Random(seed)

    def propose(self, seqs, ks):
        out = []
        for seq, k in zip(seqs, ks):
            done = len(seq.generated)
            toks = list(self.reference[done:done + k])
            toks = [t if self.rng.random() > 0.3 else (t + 1) % self.vocab for t in toks]
            out.append(Draft(toks))
        return out


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 300, (int(torch.randint(2, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def run_with(llm, drafter, prompt, k, **kw):
    """Generate with a given drafter object (for drafters the public API does not construct)."""
    llm.engine.drafter = lambda spec, batched=False: drafter
    try:
        return llm.generate(prompt, max_tokens=MAX_TOKENS, spec_type="mtp", spec_draft_n_max=k,
                            spec_draft_policy="fixed", **kw)
    finally:
        del llm.engine.drafter  # the Engine method again


@pytest.fixture(scope="module", params=["dense", "moe"])
def llm(request, ckpt_factory):
    return mtpx.LLM(ckpt_factory(moe=request.param == "moe"))


@pytest.fixture(scope="module")
def draft_path(ckpt_factory):
    return str(ckpt_factory(seed=7, mtp=False))


def test_every_drafter_is_token_identical_to_plain_decoding(llm, draft_path):
    mismatches = []
    drafted_by = set()  # (mode, drafter) pairs that drafted somewhere: chains hand rounds from one to the other
    for i, prompt in enumerate(prompts(N_PROMPTS)):
        ref = llm.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True, spec_type="none").token_ids
        for k in (1, 2, 3, 4):
            runs = {
                "mtp": llm.generate(prompt, max_tokens=MAX_TOKENS, spec_type="mtp", spec_draft_n_max=k,
                                    spec_draft_policy="fixed", ignore_eos=True),
                "ngram": llm.generate(prompt, max_tokens=MAX_TOKENS, spec_type="ngram", spec_draft_n_max=k,
                                      spec_draft_policy="fixed", ignore_eos=True, spec_ngram_min=1),
                "oracle": run_with(llm, OracleDrafter(ref, llm.config.vocab_size, i * 10 + k), prompt, k,
                                   ignore_eos=True),
            }
            if i % 2 == 0:  # chains (the lookup drafts where the text repeats, MTP elsewhere), suffix drafting
                for spec in ("mtp,ngram", "suffix") + (("mtp,suffix",) if i % 6 == 0 else ()):
                    runs[spec] = llm.generate(prompt, max_tokens=MAX_TOKENS, spec_type=spec, spec_draft_n_max=k,
                                              spec_draft_policy="fixed", ignore_eos=True)
            if i % 5 == 0:
                runs["draft"] = llm.generate(prompt, max_tokens=MAX_TOKENS, spec_type="draft", spec_draft_n_max=k,
                                             spec_draft_policy="fixed", spec_draft_model=draft_path, ignore_eos=True)
            for name, out in runs.items():
                if out.token_ids != ref:
                    mismatches.append((i, k, name))
                drafted_by |= {(name, d) for d in out.stats["by_drafter"]}
    assert not mismatches
    assert {("mtp,ngram", "mtp"), ("mtp,ngram", "ngram"), ("suffix", "suffix"), ("mtp,suffix", "mtp"),
            ("mtp,suffix", "suffix")} <= drafted_by


def test_oracle_exercises_acceptance(llm):
    drafted = accepted = 0
    for i, prompt in enumerate(prompts(5, seed=9)):
        ref = llm.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True, spec_type="none").token_ids
        out = run_with(llm, OracleDrafter(ref, llm.config.vocab_size, 100 + i), prompt, 4, ignore_eos=True)
        assert out.token_ids == ref
        drafted, accepted = drafted + out.stats["drafted_tokens"], accepted + out.stats["accepted_tokens"]
    assert 0.4 < accepted / drafted < 0.95  # both accepts and rejects happened, at many positions


def test_eos_mid_draft_stops_exactly_where_plain_decoding_stops(llm):
    for i, prompt in enumerate(prompts(10, seed=3)):
        ref = llm.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True, spec_type="none").token_ids
        eos_tok = ref[7 + i % 9]
        llm.engine.eos = {eos_tok}
        try:
            plain = llm.generate(prompt, max_tokens=MAX_TOKENS, spec_type="none")
            assert plain.finish_reason == "stop" and plain.token_ids[-1] == eos_tok
            for k in (2, 4):
                spec = run_with(llm, OracleDrafter(ref, llm.config.vocab_size, i), prompt, k)
                assert spec.token_ids == plain.token_ids and spec.text == plain.text
                assert spec.finish_reason == "stop"
        finally:
            llm.engine.eos = set(llm.config.eos_token_id)


def test_stop_string_mid_draft_cuts_like_plain_decoding(llm):
    for i, prompt in enumerate(prompts(10, seed=4)):
        ref = llm.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True, spec_type="none")
        tail = ref.text[len(llm.tokenizer.decode(ref.token_ids[:8])):]
        stop = tail[2:5] if len(tail) > 6 else None
        if not stop:
            continue
        plain = llm.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True, stop=[stop], spec_type="none")
        assert stop not in plain.text and plain.finish_reason == "stop"
        for k in (3, 4):
            spec = run_with(llm, OracleDrafter(ref.token_ids, llm.config.vocab_size, i), prompt, k,
                            ignore_eos=True, stop=[stop])
            assert (spec.token_ids, spec.text, spec.finish_reason) == (plain.token_ids, plain.text, "stop")


@pytest.mark.parametrize("penalties", [dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.3),
                                       dict(repetition_penalty=1.1, dry_multiplier=0.8, dry_allowed_length=1)],
                         ids=["counting", "with-dry"])
def test_penalties_keep_speculation_lossless(llm, penalties):
    changed = 0
    for i, prompt in enumerate(prompts(8, seed=11)):
        ref = llm.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True, spec_type="none", **penalties).token_ids
        changed += ref != llm.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True, spec_type="none").token_ids
        for k in (2, 4):
            for spec in ("mtp", "ngram", "mtp,suffix"):
                out = llm.generate(prompt, max_tokens=MAX_TOKENS, spec_type=spec, spec_draft_n_max=k,
                                   spec_draft_policy="fixed", ignore_eos=True, **penalties)
                assert out.token_ids == ref, (i, k, spec)
            # drafts that plain decoding with penalties would emit, some corrupted: rows after an accepted draft
            # must be penalised for it, rows after a rejected one are discarded
            out = run_with(llm, OracleDrafter(ref, llm.config.vocab_size, i), prompt, k, ignore_eos=True,
                           **penalties)
            assert out.token_ids == ref and out.stats["accepted_tokens"] > 0, (i, k, "oracle")
    assert changed >= 4  # the penalties are really applied


def test_adaptive_policy_is_lossless_too(llm):
    for prompt in prompts(5, seed=5):
        ref = llm.generate(prompt, max_tokens=40, ignore_eos=True, spec_type="none").token_ids
        for spec in ("mtp", "ngram", "draft-mtp", "ngram-simple", "draft-mtp,ngram-mod", "suffix", "mtp,suffix"):
            out = llm.generate(prompt, max_tokens=40, spec_type=spec, ignore_eos=True)
            assert out.token_ids == ref


@pytest.mark.skipif(not __import__("mtpx.kernels", fromlist=["x"]).rowgemm_available(), reason="needs rowgemm")
@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_quantized_weights_speculation_is_token_identical_to_quantized_plain(ckpt_factory, dtype):
    """Quantization changes the model, not the guarantee: speculative == plain decoding at the same weights."""
    llm = mtpx.LLM(ckpt_factory(), dtype=dtype)
    for prompt in prompts(10, seed=5):
        plain = llm.generate(prompt, max_tokens=MAX_TOKENS, spec_type="none").token_ids
        for k in (1, 3):
            spec = llm.generate(prompt, max_tokens=MAX_TOKENS, spec_type="mtp", spec_draft_n_max=k,
                                spec_draft_policy="fixed").token_ids
            assert spec == plain, (prompt, k)


@pytest.mark.parametrize("dtype", ["bf16", "int8", "int4"])
def test_reduced_draft_vocabulary_is_token_identical_and_drafts_only_kept_ids(ckpt_factory, dtype):
    """A DraftHead over the first N ids (+ eos) changes what MTP proposes, never what is emitted; its drafts come
    from the kept ids only, and its logits for those ids are the full head's."""
    from mtpx import kernels
    from mtpx.speculative.drafters import MTPDrafter
    if dtype != "bf16" and not kernels.rowgemm_available():
        pytest.skip("quantized weights need rowgemm")
    llm = mtpx.LLM(ckpt_factory(), dtype=dtype)
    size = 64
    head = llm.engine.draft_head(size)
    assert head.ids.tolist() == sorted(set(range(size)) | {t for t in llm.eos if t >= size})
    x = torch.randn(3, llm.config.hidden_size).to(torch.bfloat16)
    full = llm.model.logits(x, step=True).float()
    reduced = head(x).float()
    dropped = torch.ones(llm.config.vocab_size, dtype=torch.bool)
    dropped[head.ids] = False
    assert torch.isneginf(reduced[:, dropped]).all()
    torch.testing.assert_close(reduced[:, head.ids], full[:, head.ids], rtol=0.02, atol=0.02)
    drafted = []
    original = MTPDrafter.propose

    def recording(self, seqs, ks):
        out = original(self, seqs, ks)
        drafted.extend(t for d in out for t in d.tokens)
        return out
    MTPDrafter.propose = recording
    try:
        for prompt in prompts(8, seed=11):
            plain = llm.generate(prompt, max_tokens=MAX_TOKENS, spec_type="none").token_ids
            for temperature in (0.0, 0.8):
                kw = dict(max_tokens=MAX_TOKENS, temperature=temperature, seed=3)
                ref = llm.generate(prompt, spec_type="none", **kw).token_ids
                spec = llm.generate(prompt, spec_type="mtp", spec_draft_n_max=3, spec_draft_policy="fixed",
                                    spec_draft_vocab=size, **kw).token_ids
                if temperature == 0:
                    assert spec == plain == ref, prompt
            assert len(spec) == len(ref)
    finally:
        MTPDrafter.propose = original
    assert drafted and set(drafted) <= set(head.ids.tolist())
    from mtpx.errors import RequestError
    with pytest.raises(RequestError, match="spec_draft_vocab"):
        llm.generate([1, 2, 3], max_tokens=2, spec_type="mtp", spec_draft_vocab=-5)
