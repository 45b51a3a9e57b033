"""The stats of one generation, computed in one place for `LLM`, the server and `mtpx bench`.

Keys (README documents them; the server's usage block renames two of them for the API, see serve/app.py):
  prompt_tokens, generated_tokens
  prefill_tokens_per_s      prompt tokens / the main model's prefill time
  decode_tokens_per_s       tokens after the first / time since the first token
  time_to_first_token_s, decode_s, total_s
  spec_type                 none | mtp | draft | ngram
  drafts                    rounds that drafted at least one token
  drafted_tokens, accepted_tokens
  acceptance_rate           accepted / drafted tokens
  acceptance_by_position    per draft position i: accepted / drafted at i
  mean_acceptance_length    tokens a drafting round emits on average: 1 + accepted / drafts
  prefill_s, draft_s, verify_s   time in the main model's prefill, the drafter, and verify passes
  drafter_memory_bytes      the drafter's weights and this sequence's drafter caches
  by_drafter                per drafter that drafted (one name, or several for a chain such as mtp,ngram): its
                            drafts, drafted_tokens, accepted_tokens, acceptance_rate, acceptance_by_position,
                            mean_acceptance_length, drafted_by_position, accepted_by_position
"""
from __future__ import annotations

import time

from mtpx.engine.sequence import DraftCounts, Sequence


def draft_stats(c: DraftCounts) -> dict:
    """The rates of one set of draft counts (a sequence's, or one drafter's within it)."""
    return {
        "drafts": c.drafts,
        "drafted_tokens": c.drafted_tokens,
        "accepted_tokens": c.accepted_tokens,
        "acceptance_rate": c.accepted_tokens / c.drafted_tokens if c.drafted_tokens else 0.0,
        "acceptance_by_position": [a / d for a, d in zip(c.accepted_by_position, c.drafted_by_position)],
        "mean_acceptance_length": 1 + c.accepted_tokens / c.drafts if c.drafts else 1.0,
        "drafted_by_position": list(c.drafted_by_position),
        "accepted_by_position": list(c.accepted_by_position),
    }


def generation_stats(seq: Sequence, *, started: float, first_token_at: float, now: float | None = None,
                     spec_type: str = "none", drafter_memory_bytes: int = 0) -> dict:
    """Stats of `seq` so far: `started` is when the request arrived, `first_token_at` when prefill emitted its first
    token, `now` the end (default: now), all time.perf_counter() values."""
    now = time.perf_counter() if now is None else now
    s = seq.stats
    n_gen = len(seq.generated)
    decode_s = now - first_token_at if first_token_at else 0.0
    return {
        "prompt_tokens": seq.n_prompt,
        "generated_tokens": n_gen,
        "prefill_tokens_per_s": seq.n_prompt / s.prefill_s if s.prefill_s else 0.0,
        "decode_tokens_per_s": (n_gen - 1) / decode_s if n_gen > 1 and decode_s > 0 else 0.0,
        "time_to_first_token_s": first_token_at - started if first_token_at else 0.0,
        "decode_s": decode_s,
        "total_s": now - started,
        "spec_type": spec_type,
        **{k: v for k, v in draft_stats(s).items() if not k.endswith("ed_by_position")},
        "prefill_s": s.prefill_s,
        "draft_s": s.draft_s,
        "verify_s": s.verify_s,
        "drafter_memory_bytes": drafter_memory_bytes,
        "by_drafter": {name: draft_stats(c) for name, c in s.by_drafter.items()},
    }
