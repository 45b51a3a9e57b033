"""What the drafters hold per sequence stays within the bounds docs/serving.md states for a server slot: the MTP
layer's cache (the sequence's max length), its pending hidden states (the prompt's until the first draft, then at most
2 x MTP_BACKLOG), the main state's rollback snapshots (one round's positions) and the suffix index (the context)."""
import random

import pytest
import torch

import mtpx
from mtpx.models.linear import weight_bytes
from mtpx.sampling import SamplingParams
from mtpx.speculative.drafters import MTP_BACKLOG, MTPDrafter
from mtpx.speculative.loop import decode_round, prefill
from mtpx.speculative.policy import DraftPolicy
from mtpx.speculative.suffix import SuffixDrafter, SuffixIndex, _index_bytes


@pytest.fixture(scope="module")
def llm(dense_ckpt):
    return mtpx.LLM(dense_ckpt)


def mtp_bound(llm, seq, head: int) -> int:
    """docs/serving.md's bound of the MTP drafter's memory for one sequence."""
    row = llm.model.cfg.hidden_size * llm.model.lm_head.weight.element_size()
    return llm.model.new_mtp_state(seq.max_len).nbytes() + (head + 2 * MTP_BACKLOG) * row


def pending_consistent(seq) -> bool:
    d = seq.draft
    hidden = d.pending_hidden
    return hidden is None and not d.pending_tokens or len(hidden) == len(d.pending_tokens)


def test_mtp_pending_states_stay_bounded_through_rounds_without_drafting(llm):
    drafter = MTPDrafter(llm.model)
    prompt = list(range(5, 45))
    seq = llm.engine.new_sequence(prompt, 300, SamplingParams(), ignore_eos=True)
    prefill(llm.model, drafter, seq)
    for _ in range(120):  # plain rounds (no policy: k = 0) before the MTP layer ever drafts
        decode_round(llm.model, drafter, None, [seq])
        assert drafter.sequence_bytes(seq) <= mtp_bound(llm, seq, seq.n_prompt) and pending_consistent(seq)
    d = seq.draft
    assert len(d.pending_tokens) <= seq.n_prompt + 2 * MTP_BACKLOG
    assert d.pending_tokens[:seq.n_prompt] == seq.tokens[1:seq.n_prompt + 1]  # the prompt's pairs are kept
    assert d.pending_tokens[-MTP_BACKLOG:] == seq.tokens[-MTP_BACKLOG:]  # and the latest
    policy = DraftPolicy(3, 0, adaptive=False)
    for _ in range(5):  # it drafts from what it kept
        decode_round(llm.model, drafter, policy, [seq])
    assert seq.stats.drafted_tokens > 0 and d.committed > 0
    for _ in range(100):
        decode_round(llm.model, drafter, None, [seq])
        assert len(d.pending_tokens) <= 2 * MTP_BACKLOG and pending_consistent(seq)
        assert drafter.sequence_bytes(seq) <= mtp_bound(llm, seq, 0)
    assert drafter.memory_bytes(seq) > drafter.sequence_bytes(seq)  # plus the layer's weights


def test_greedy_output_unchanged_by_trimmed_catch_up(llm):
    """Drafts made after long pauses (the pending pairs trimmed) still verify to plain decoding's tokens."""
    prompt = list(range(3, 30))
    plain = llm.generate(prompt, max_tokens=150, spec_type="none", ignore_eos=True).token_ids
    drafter = MTPDrafter(llm.model)
    seq = llm.engine.new_sequence(prompt, 150, SamplingParams(), ignore_eos=True)
    prefill(llm.model, drafter, seq)
    policy, rounds = DraftPolicy(3, 0, adaptive=False), 0
    while not seq.finished:  # drafting in one round of every 50
        decode_round(llm.model, drafter, policy if rounds % 50 == 49 else None, [seq])
        rounds += 1
    assert seq.generated == plain and seq.stats.drafts > 0


def test_the_prompt_catch_up_is_priced_from_the_last_one_and_skipped_where_it_cannot_pay(llm):
    """The policy prices a request's catch-up on its prompt from the last one the drafter timed, and never starts
    drafting where its gain cannot earn that back (the output is plain decoding's either way); it drafts when the
    catch-up is cheap."""
    prompt = list(range(5, 45))
    plain = llm.generate(prompt, max_tokens=40, spec_type="none", ignore_eos=True).token_ids

    def run(policy):
        drafter = MTPDrafter(llm.model)  # a new one per request, as the engine makes them; the policy is kept
        policy.new_request()
        seq = llm.engine.new_sequence(prompt, 40, SamplingParams(), ignore_eos=True)
        prefill(llm.model, drafter, seq)
        assert drafter.catch_up_positions([seq]) == len(prompt)
        while not seq.finished:
            decode_round(llm.model, drafter, policy, [seq])
        assert seq.generated == plain
        # once the prompt is in, a backlog of rounds without drafting is not priced (it is MTP_BACKLOG at most)
        assert drafter.catch_up_positions([seq]) == 0 if seq.draft.committed else \
            drafter.catch_up_positions([seq]) >= len(prompt)
        return seq

    policy = DraftPolicy(3, 0, adaptive=True)
    seq = run(policy)  # the first catch-up: nothing to price it by, so the policy measures drafting
    assert policy.position_s > 0 and seq.stats.drafts > 0 and seq.draft.committed > 0
    policy.position_s = 1.0  # a second a position: no gain on 40 tokens pays for that
    seq = run(policy)
    assert seq.stats.drafted_tokens == 0 and seq.draft.committed == 0 and policy.position_s == 1.0
    cheap = DraftPolicy(3, 0, adaptive=True)  # unmeasured, drafting is worth measuring where the catch-up is cheap
    cheap.position_s = 1e-9
    assert run(cheap).stats.drafted_tokens > 0


def test_a_long_generation_keeps_drafter_memory_within_the_bound(llm):
    out = llm.generate(list(range(5, 205)), max_tokens=250, spec_type="mtp", spec_draft_n_max=3, ignore_eos=True)
    weights = weight_bytes(llm.model.mtp)
    max_len = 200 + 250 + 8  # prompt, max_tokens and the engine's reserve for drafts
    seq = type("S", (), {"max_len": max_len})
    assert out.stats["drafter_memory_bytes"] - weights <= mtp_bound(llm, seq, 200)


def test_mtp_reads_only_a_long_prompts_latest_pairs(llm, monkeypatch):
    """A prompt longer than the window: the MTP layer's cache holds the window's pairs and what follows them, and
    greedy output is still plain decoding's."""
    from mtpx.speculative import drafters
    monkeypatch.setattr(drafters, "MTP_PROMPT_WINDOW", 8)
    prompt = list(range(5, 45))
    plain = llm.generate(prompt, max_tokens=30, spec_type="none", ignore_eos=True).token_ids
    drafter = MTPDrafter(llm.model)
    seq = llm.engine.new_sequence(prompt, 30, SamplingParams(), ignore_eos=True)
    prefill(llm.model, drafter, seq)
    assert seq.draft.pending_tokens == seq.tokens[len(prompt) - 7:len(prompt) + 1]
    assert seq.draft.state.max_len == seq.max_len - len(prompt) + 8
    policy = DraftPolicy(3, 0, adaptive=False)
    while not seq.finished:
        decode_round(llm.model, drafter, policy, [seq])
    assert seq.generated == plain and seq.stats.drafts > 0


def test_rollback_snapshots_hold_one_round(llm):
    drafter = MTPDrafter(llm.model)
    seq = llm.engine.new_sequence(list(range(5, 25)), 60, SamplingParams(), ignore_eos=True)
    prefill(llm.model, drafter, seq)
    policy = DraftPolicy(4, 0, adaptive=False)
    while not seq.finished:
        decode_round(llm.model, drafter, policy, [seq])
        assert seq.state.snapshots and all(len(s) <= 4 + 2 for s in seq.state.snapshots.values())


def test_suffix_index_memory_grows_with_the_context_only():
    rng = random.Random(0)
    for tokens in ([rng.randrange(50) for _ in range(3000)], [1, 2, 3] * 1000, list(range(3000))):
        idx = SuffixIndex()
        idx.extend(tokens)
        assert len(idx.next) <= 2 * len(tokens) and sum(map(len, idx.next)) <= 3 * len(tokens)
        assert _index_bytes(idx) <= 800 * len(tokens)


def test_suffix_sequence_bytes_exclude_the_shared_store(llm):
    from mtpx.speculative.suffix import GlobalSuffixStore
    store = GlobalSuffixStore(1000)
    store.add(list(range(100)))
    drafter = SuffixDrafter(store)
    seq = llm.engine.new_sequence([5, 6, 7, 5, 6, 7], 4, SamplingParams(), ignore_eos=True)
    drafter.start(seq, torch.zeros(6, 1))
    assert 0 < drafter.sequence_bytes(seq) <= 800 * len(seq.tokens)
    assert drafter.memory_bytes(seq) == drafter.sequence_bytes(seq) + store.nbytes()
