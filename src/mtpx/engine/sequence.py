"""One sequence being generated: its tokens, sampling settings, caches and speculation counters."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mtpx.engine.params import SamplingParams
from mtpx.sampling import PenaltyHistory
from mtpx.state import SequenceState


@dataclass
class DraftCounts:
    """Drafting rounds, drafted and accepted tokens, in all and per draft position."""
    drafts: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    drafted_by_position: list[int] = field(default_factory=list)
    accepted_by_position: list[int] = field(default_factory=list)

    def add(self, k: int, n: int, drafted: int | None = None) -> None:
        """A round that drafted k > 0 positions and accepted the first n; `drafted`: the tokens drafted, where a
        draft tree holds more than one at a position (default k)."""
        self.drafts += 1
        self.drafted_tokens += k if drafted is None else drafted
        self.accepted_tokens += n
        while len(self.drafted_by_position) < k:
            self.drafted_by_position.append(0)
            self.accepted_by_position.append(0)
        for i in range(k):
            self.drafted_by_position[i] += 1
            self.accepted_by_position[i] += i < n


@dataclass
class SpecStats(DraftCounts):
    """Raw counts and times of one sequence's speculation; engine/stats.py turns them into rates. by_drafter: the
    same counts per drafter that drafted (a chain of drafters picks one per round)."""
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    by_drafter: dict[str, DraftCounts] = field(default_factory=dict)

    def record(self, k: int, n: int, drafter: str = "", drafted: int | None = None) -> None:
        """A round that drafted k positions (with `drafter`; `drafted` tokens in all, for a tree) and accepted the
        first n."""
        if k == 0:
            return
        self.add(k, n, drafted)
        if drafter:
            self.by_drafter.setdefault(drafter, DraftCounts()).add(k, n, drafted)


@dataclass
class Sequence:
    tokens: list[int]  # prompt + generated; the last one has not been fed to the model yet
    n_prompt: int
    max_new: int
    params: SamplingParams
    eos: set[int]
    state: SequenceState
    max_len: int
    gen: torch.Generator | None = None
    synthetic_rates: list[float] | None = None
    draft: object = None  # the drafter's per-sequence state (a model drafter's caches, in a chain too)
    lookup: dict = field(default_factory=dict)  # lookup drafters' per-sequence indexes, by drafter name
    finish_reason: str | None = None
    stats: SpecStats = field(default_factory=SpecStats)
    penalties: PenaltyHistory = field(default_factory=PenaltyHistory)  # used only when params.penalized
    constraint: object = None  # engine/constraints.py Constraint of params.grammar: its state over the output
    # per generated token, when params.logprobs is set: (logprob, [(id, logprob) of the params.logprobs best])
    logprobs: list = field(default_factory=list)

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.n_prompt:]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, new: list[int]) -> list[int]:
        """Append accepted tokens, stopping at eos or max_new; returns what was appended."""
        out = []
        for t in new:
            out.append(t)
            if t in self.eos:
                self.finish_reason = "stop"
                break
            if len(self.generated) + len(out) >= self.max_new:
                self.finish_reason = "length"
                break
        self.tokens.extend(out)
        if self.constraint is not None:
            self.constraint.extend(out)
        return out
