"""Draft-length policy: fixed k, or adaptive k chosen each step to maximise expected tokens per second.

Expected tokens from one round with k drafts: E(k) = 1 + sum_{j<=k} prod_{i<=j} a_i, where a_i is the running
acceptance rate at position i given the earlier ones were accepted. Time: the measured wall time of a whole round
(drafting, the drafter's bookkeeping, and the verify pass of B sequences x (k+1) positions) with k drafts at batch
size B. The policy picks the k in [n_min, n_max] maximising E(k)/time.

Round costs are kept per (batch size, k). On CPU a pass over B sequences x w positions costs different amounts for
the same B·w (per-sequence attention / recurrent work vs batched matmuls), and a drafter's catch-up and bookkeeping
cost per round, not per draft step, so neither a per-row verify cost nor a per-step draft cost predicts a round well;
both made speculation look cheap at large batches where it loses. Each k is measured before it is judged (other
batch sizes interpolate the same k), and now and then the policy re-measures the runner-up (k = 1 while k = 0 wins,
k = n_min while drafting wins), at intervals that double from 16 to 256 rounds while the choice stays the same.
Measurements come in pairs of consecutive rounds: the first drafting round after rounds without drafts also pays the
drafter's catch-up on everything accepted meanwhile, which would otherwise make drafting look dearer than it is.
Costs are the minimum of the last few samples: slowdowns caused by other processes on the machine only add time,
and a cost that is sampled rarely (the k not chosen) must not keep such a spike for hundreds of rounds.
"""
from __future__ import annotations

PRIOR_RATE, PRIOR_WEIGHT = 0.6, 4.0
WINDOW = 8  # a cost is the minimum of its last WINDOW samples
EXPLORE_EVERY = 16  # re-measure the runner-up k after this many rounds with the same choice ...
EXPLORE_MAX = 256  # ... doubling the interval each time the choice stays, up to this
MEASURE_ROUNDS = 2  # rounds in a row per measurement (the first one may include the drafter's catch-up)
MEASURE_TRIES = 6  # drafts can come out shorter than k (p_min, n-gram misses): stop forcing an unmeasured k then


class DraftPolicy:
    def __init__(self, n_max: int = 3, n_min: int = 0, adaptive: bool = True):
        if n_max < 0 or n_min < 0 or n_min > n_max:
            from mtpx.errors import RequestError
            raise RequestError(f"need 0 <= spec_draft_n_min <= spec_draft_n_max, got {n_min}, {n_max}")
        self.n_max, self.n_min, self.adaptive = n_max, n_min, adaptive
        self.tried = [0.0] * n_max  # drafts reaching position i (all earlier accepted)
        self.accepted = [0.0] * n_max
        self.round_s: dict[tuple[int, int], float] = {}  # (batch, k drafted) -> seconds per round
        self.rounds = 0
        self.explore_every, self.since_explore, self.last_best = EXPLORE_EVERY, 0, None
        self.measure_tries: dict[int, int] = {}
        self.samples_per_k: dict[int, int] = {}
        self.repeat_k, self.repeat_left = 0, 0
        self._samples: dict[tuple[int, int], list[float]] = {}

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

    def round_cost(self, batch: int, k: int) -> float | None:
        """Seconds for one round of `batch` sequences with k drafts: measured, or interpolated over batch sizes."""
        return self._estimate({b: t for (b, kk), t in self.round_s.items() if kk == k}, batch)

    def next_k(self, batch: int = 1) -> int:
        if not self.adaptive or self.n_max == 0:
            return self.n_max
        self.rounds += 1
        if self.repeat_left > 0:  # second round of a measurement
            self.repeat_left -= 1
            return self.repeat_k
        best_k, best = self.n_min, -1.0
        for k in range(self.n_min, self.n_max + 1):
            cost = self.round_cost(batch, k)
            if cost is None or self.samples_per_k.get(k, 0) < MEASURE_ROUNDS:  # not measured yet: measure it
                if self.measure_tries.get(k, 0) < MEASURE_TRIES:
                    self.measure_tries[k] = self.measure_tries.get(k, 0) + 1
                    return k
                if cost is None:
                    continue
            value = self.expected_tokens(k) / cost
            if value > best:
                best_k, best = k, value
        if best_k != self.last_best:
            self.last_best, self.explore_every, self.since_explore = best_k, EXPLORE_EVERY, 0
            return best_k
        self.since_explore += 1
        if self.since_explore >= self.explore_every:  # keep the runner-up's acceptance and cost measured
            self.since_explore = 0
            self.explore_every = min(2 * self.explore_every, EXPLORE_MAX)
            self.repeat_k = self.n_min if best_k > self.n_min else min(best_k + 1, self.n_max)
            self.repeat_left = MEASURE_ROUNDS - 1
            return self.repeat_k
        return best_k

    def observe(self, batch: int, ks: list[int], accepted: list[int], draft_s: float, verify_s: float,
                rows: int) -> None:
        for k, n in zip(ks, accepted):
            for i in range(min(k, n + 1)):
                self.tried[i] += 1
                self.accepted[i] += i < n
        key = (batch, max(ks) if ks else 0)
        self.samples_per_k[key[1]] = self.samples_per_k.get(key[1], 0) + 1
        window = self._samples.setdefault(key, [])
        window.append(draft_s + verify_s)
        del window[:-WINDOW]
        self.round_s[key] = min(window)
