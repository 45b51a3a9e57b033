"""The one stats function: its formulas and the keys README and the server document."""
from mtpx.engine.params import SamplingParams
from mtpx.engine.sequence import Sequence
from mtpx.engine.stats import generation_stats


def sequence(n_prompt=4, generated=(7, 8, 9, 10, 11)):
    seq = Sequence(tokens=list(range(n_prompt)) + list(generated), n_prompt=n_prompt, max_new=16,
                   params=SamplingParams(), eos=set(), state=None, max_len=32)
    seq.stats.prefill_s = 0.5
    seq.stats.record(3, 2)  # drafted 3, accepted the first 2
    seq.stats.record(2, 0)
    seq.stats.record(0, 0)  # a round without drafts is not a draft
    return seq


def test_formulas():
    s = generation_stats(sequence(), started=10.0, first_token_at=11.0, now=13.0, spec_type="mtp",
                         drafter_memory_bytes=123)
    assert s["prompt_tokens"] == 4 and s["generated_tokens"] == 5
    assert s["prefill_tokens_per_s"] == 4 / 0.5
    assert s["time_to_first_token_s"] == 1.0 and s["decode_s"] == 2.0 and s["total_s"] == 3.0
    assert s["decode_tokens_per_s"] == (5 - 1) / 2.0  # the tokens after the first, over the time after it
    assert (s["drafts"], s["drafted_tokens"], s["accepted_tokens"]) == (2, 5, 2)
    assert s["acceptance_rate"] == 2 / 5
    assert s["acceptance_by_position"] == [0.5, 0.5, 0.0]
    assert s["mean_acceptance_length"] == 1 + 2 / 2
    assert s["spec_type"] == "mtp" and s["drafter_memory_bytes"] == 123


def test_counts_per_drafter():
    seq = sequence()  # rounds recorded without a drafter name count in the totals only
    seq.stats.record(3, 3, "ngram")
    seq.stats.record(1, 0, "mtp")
    seq.stats.record(2, 1, "ngram")
    s = generation_stats(seq, started=0.0, first_token_at=1.0, now=2.0, spec_type="mtp,ngram")
    assert (s["drafts"], s["drafted_tokens"], s["accepted_tokens"]) == (5, 11, 6)
    ngram = s["by_drafter"]["ngram"]
    assert (ngram["drafts"], ngram["drafted_tokens"], ngram["accepted_tokens"]) == (2, 5, 4)
    assert ngram["drafted_by_position"] == [2, 2, 1] and ngram["accepted_by_position"] == [2, 1, 1]
    assert ngram["acceptance_by_position"] == [1.0, 0.5, 1.0] and ngram["mean_acceptance_length"] == 3.0
    assert s["by_drafter"]["mtp"]["acceptance_rate"] == 0.0 and set(s["by_drafter"]) == {"ngram", "mtp"}


def test_no_drafts_and_no_time():
    seq = Sequence(tokens=[1, 2, 3], n_prompt=2, max_new=4, params=SamplingParams(), eos=set(), state=None,
                   max_len=8)
    s = generation_stats(seq, started=1.0, first_token_at=1.0, now=1.0)
    assert s["decode_tokens_per_s"] == 0.0 and s["prefill_tokens_per_s"] == 0.0
    assert s["acceptance_rate"] == 0.0 and s["mean_acceptance_length"] == 1.0 and s["acceptance_by_position"] == []


def test_documented_keys():
    s = generation_stats(sequence(), started=0.0, first_token_at=1.0, now=2.0)
    assert {"prompt_tokens", "generated_tokens", "prefill_tokens_per_s", "decode_tokens_per_s",
            "time_to_first_token_s", "total_s", "spec_type", "drafts", "drafted_tokens", "accepted_tokens",
            "acceptance_rate", "acceptance_by_position", "mean_acceptance_length", "prefill_s", "draft_s",
            "verify_s", "drafter_memory_bytes", "by_drafter"} <= set(s)
