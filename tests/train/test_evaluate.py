"""The held-out measures of mtpx.train.evaluate that need no model."""
import pytest

from mtpx.train.evaluate import repetition


def test_repetition_counts_repeated_four_grams_and_lines():
    fresh = repetition(list(range(10)), "a = 1\nb = 2\n")
    assert fresh == {"rep4": 0.0, "repeated_lines": 0.0}
    looped = repetition([1, 2, 3, 1, 2, 3, 1, 2, 3], "x()\n\nx()\n  x()\ny()\n")
    # 4-grams: (1,2,3,1) (2,3,1,2) (3,1,2,3) then the same three again: 3 of 6 repeat; lines: x() twice more of 4
    assert looped["rep4"] == pytest.approx(0.5) and looped["repeated_lines"] == pytest.approx(0.5)
    assert repetition([1, 2], "") == {"rep4": 0.0, "repeated_lines": 0.0}


def test_speculative_acceptance_pools_the_runs_under_the_given_decoding(dense_ckpt):
    import mtpx
    from mtpx.train.evaluate import speculative_acceptance
    llm = mtpx.LLM(dense_ckpt)
    prompts = ["1 2 3 1 2 3 1 2 3", "while True:\n"]
    plain = speculative_acceptance(llm, prompts, 2, 20)
    penalties = dict(dry_multiplier=1.5, dry_base=2.0, dry_allowed_length=1, dry_sequence_breakers=[])
    dry = speculative_acceptance(llm, prompts, 2, 20, decoding=penalties)
    for r in (plain, dry):
        assert r["drafts"] > 0 and 0 <= r["first_position_acceptance"] <= 1
        assert r["mean_acceptance_length"] == pytest.approx(1 + r["accepted_tokens"] / r["drafts"])
        assert r["generated_tokens"] <= 40 and set(r) >= {"rep4", "repeated_lines"}
    assert dry["rep4"] < plain["rep4"]  # the tiny model loops on the first prompt; DRY breaks the loop
