"""Draft-length policy: fixed k, or adaptive k chosen each step to maximise expected tokens per second.

Expected tokens from one round with k drafts: E(k) = 1 + sum_{j<=k} prod_{i<=j} a_i, where a_i is the running
acceptance rate at position i given the earlier ones were accepted. Time: k draft steps plus a verify pass over
B·(k+1) rows, both measured as the run goes. The policy picks the k in [n_min, n_max] maximising E(k)/time.
"""
from __future__ import annotations

PRIOR_RATE, PRIOR_WEIGHT = 0.6, 4.0
EMA = 0.2
EXPLORE_EVERY = 16  # while k = 0 wins, draft one token after this many rounds to keep measuring acceptance ...
EXPLORE_MAX = 256  # ... doubling the interval each time it still loses, up to this (a server under load that
# never profits from drafting pays < 1% for the measurements instead of ~6%)


class DraftPolicy:
    def __init__(self, n_max: int = 3, n_min: int = 0, adaptive: bool = True):
        if n_max < 0 or n_min < 0 or n_min > n_max:
            from mtpx.errors import RequestError
            raise RequestError(f"need 0 <= spec_draft_n_min <= spec_draft_n_max, got {n_min}, {n_max}")
        self.n_max, self.n_min, self.adaptive = n_max, n_min, adaptive
        self.tried = [0.0] * n_max  # drafts reaching position i (all earlier accepted)
        self.accepted = [0.0] * n_max
        self.draft_step_s: dict[int, float] = {}  # batch size -> seconds per draft step
        self.verify_s: dict[int, float] = {}  # rows -> seconds per verify pass
        self.rounds = 0
        self.explore_every, self.since_explore = EXPLORE_EVERY, 0

    def rate(self, i: int) -> float:
        return (self.accepted[i] + PRIOR_RATE * PRIOR_WEIGHT) / (self.tried[i] + PRIOR_WEIGHT)

    def expected_tokens(self, k: int) -> float:
        total, run = 1.0, 1.0
        for i in range(k):
            run *= self.rate(i)
            total += run
        return total

    @staticmethod
    def _estimate(table: dict[int, float], key: int) -> float | None:
        if not table:
            return None
        if key in table:
            return table[key]
        below = [k for k in table if k < key]
        above = [k for k in table if k > key]
        if below and above:
            lo, hi = max(below), min(above)
            return table[lo] + (table[hi] - table[lo]) * (key - lo) / (hi - lo)
        near = max(below) if below else min(above)
        return table[near] * max(key / near, 1.0) if below else table[near]  # pessimistic: linear growth beyond data

    def next_k(self, batch: int = 1) -> int:
        if not self.adaptive or self.n_max == 0:
            return self.n_max
        self.rounds += 1
        verify1 = self._estimate(self.verify_s, batch)
        step = self._estimate(self.draft_step_s, batch)
        if verify1 is None or step is None:
            return self.n_max  # measure the costs first
        best_k, best = self.n_min, -1.0
        for k in range(self.n_min, self.n_max + 1):
            t = k * step + (self._estimate(self.verify_s, batch * (k + 1)) or verify1)
            value = self.expected_tokens(k) / t
            if value > best:
                best_k, best = k, value
        if best_k > 0:
            self.explore_every, self.since_explore = EXPLORE_EVERY, 0
            return best_k
        self.since_explore += 1
        if self.since_explore >= self.explore_every:  # keep measuring acceptance now and then
            self.since_explore = 0
            self.explore_every = min(2 * self.explore_every, EXPLORE_MAX)
            return 1
        return 0

    def observe(self, batch: int, ks: list[int], accepted: list[int], draft_s: float, verify_s: float,
                rows: int) -> None:
        for k, n in zip(ks, accepted):
            for i in range(min(k, n + 1)):
                self.tried[i] += 1
                self.accepted[i] += i < n
        steps = max(ks) if ks else 0
        if steps:
            self._ema(self.draft_step_s, batch, draft_s / steps)
        self._ema(self.verify_s, rows, verify_s)

    @staticmethod
    def _ema(table: dict[int, float], key: int, value: float) -> None:
        table[key] = value if key not in table else (1 - EMA) * table[key] + EMA * value
