"""Draft-length policy: fixed k, or adaptive k chosen each step to maximise expected tokens per second.

Expected tokens from one round with k drafts: E(k) = 1 + sum_{j<=k} prod_{i<=j} a_i, where a_i is the running
acceptance rate at position i given the earlier ones were accepted. Time: r(B, k), the wall time of a whole round
(drafting, the drafter's bookkeeping, and the verify pass over B sequences x (k+1) positions) relative to a round
without drafts (k = n_min) at the same batch size B. The policy picks the k in [n_min, n_max] maximising E(k)/r(B, k),
and drafting (k > n_min) must promise MARGIN (15%) more than not drafting.

How the ratios are measured, and why this way:
- per (batch size, k), as whole rounds: on CPU a pass over B sequences x w positions costs different amounts for the
  same B·w (per-sequence attention / recurrent work vs batched matmuls), and a drafter's catch-up and bookkeeping
  cost per round, so neither a per-row verify cost nor a per-step draft cost predicts a round; both made speculation
  look cheap at batch 8-16 where it loses;
- as ratios between rounds a few rounds apart: other processes on the machine slow rounds down in bursts, and a
  comparison of an absolute cost measured now against one measured minutes ago picks whichever came from a calm
  moment; the context also grows, so costs drift;
- in runs of MEASURE_ROUNDS rounds, using the last: the first drafting round after rounds without drafts also pays
  the drafter's catch-up on everything accepted meanwhile, and the next still runs on weights that the rounds without
  drafts let go cold in the caches (measured on the demo model: a second round read k = 1 as 2.3x a plain round,
  its steady cost is 1.5x);
- always against rounds with k = n_min, never chained through another k's ratio;
- including the time between rounds (streaming the tokens out, detokenizing, a server's HTTP threads): it grows
  with the tokens a round emits, and leaving it out overstated the gain at 4 streams (predicted >= 1.15x, the load
  check saw 0.90-0.93x); gaps longer than IDLE_GAP are idleness, not cost;
- trusted once three samples agree (their median): single samples taken during a burst of load misled the policy
  for a hundred rounds.
Where step matmuls run in blocks of `row_block` rows that each read the weights (the CPU rowgemm kernel: 8 rows),
a round over B x (k + 1) rows reads the weights ceil(B(k + 1) / row_block) times: that many times a plain round's
reads is a floor on its ratio, known without measuring (at 8 streams, k = 1 reads them twice and cannot win).
Each k is measured before it is judged (batch sizes between two measured ones interpolate; a k that could not win
even at the cost of k - 1 drafts is not measured), and now and then the
policy re-measures the runner-up (k + 1 while not drafting wins, n_min while drafting wins), at intervals that
double from 16 to 256 rounds while the choice stays the same: a losing measurement pair costs ~2-3 rounds' time,
~1% of the time at 256 rounds.

A drafter that has not yet seen the prompt (the MTP layer's pass over it is paid at the first draft) makes the
first drafting round of a request cost that pass on top: `catch_up` positions, priced per position from the last
such pass (observe_catch_up).
Drafting (or measuring, or exploring) then starts only if its gain over the request's remaining tokens, at the
option's value against plain rounds, would earn that back; otherwise the request decodes without drafts and never pays
it (a long prompt's pass can cost more plain steps than drafting would save on a short answer).

Draft trees (`tree`: branches per depth, speculative/tree.py) are more options of the same kind: the tree cut to
each of its depths that branches somewhere, beside the chains n_min..n_max. A tree's expected tokens come from its own
per-depth acceptance (a node of the depth accepted, given the path to it was; before it is measured, the chain's
rate with each extra branch halving the misses), its cost from whole rounds with that shape, measured as a chain
length's is. Options are judged in order of their node counts, so a cost floor carries from fewer nodes to more.
`next_k` returns an int for a chain of k drafts, a tuple for a tree shape.
"""
from __future__ import annotations

import statistics

PRIOR_RATE, PRIOR_WEIGHT = 0.6, 4.0
MARGIN = 0.15  # drafting must promise 15% more tokens/s than not drafting: timing noise on a shared CPU is large,
# and losing to plain decoding is the worse error
WINDOW = 5  # a ratio is the median of its last WINDOW samples ...
MIN_SAMPLES = 3  # ... once it has at least this many
EXPLORE_EVERY = 16  # re-measure the runner-up k after this many rounds with the same choice ...
EXPLORE_MAX = 256  # ... doubling the interval each time the choice stays, up to this
MEASURE_TRIES = 8  # measurement runs per (batch, k); drafts can come out shorter than k (p_min, n-gram misses): stop forcing an unmeasured k then
RECENT = 8  # rounds remembered for the reference of a ratio sample
MEASURE_ROUNDS = 3  # rounds per measurement run; only the last one is a sample
IDLE_GAP = 0.25  # seconds between rounds beyond which the gap is not counted as the round's cost
TREE_MISS = 0.5  # a tree's prior: each extra branch at a depth halves the chain's misses there

Choice = int | tuple  # a chain's k, or a tree's branches per depth


def nodes(option: Choice) -> int:
    """Draft tokens a round with this option verifies."""
    return sum(option) if isinstance(option, tuple) else option


class DraftPolicy:
    def __init__(self, n_max: int = 3, n_min: int = 0, adaptive: bool = True, row_block: int | None = None,
                 tree: tuple[int, ...] | None = None):
        if n_max < 0 or n_min < 0 or n_min > n_max:
            from mtpx.errors import RequestError
            raise RequestError(f"need 0 <= spec_draft_n_min <= spec_draft_n_max, got {n_min}, {n_max}")
        self.n_max, self.n_min, self.adaptive = n_max, n_min, adaptive
        self.row_block = row_block
        self.tree = tuple(tree) if tree is not None and any(w > 1 for w in tree) else None
        self.tried = [0.0] * n_max  # drafts reaching position i (all earlier accepted)
        self.accepted = [0.0] * n_max
        depth = len(self.tree) if self.tree else 0
        self.tree_tried = [0.0] * depth  # tree rounds reaching depth i + 1 (a node of every depth before accepted)
        self.tree_accepted = [0.0] * depth
        self.ratio: dict[tuple[int, int], float] = {}  # (batch, k) -> round time / round time with k = n_min
        self._ratio_samples: dict[tuple[int, int], list[float]] = {}
        self.recent: list[tuple[int, int, float]] = []  # (batch, k drafted, seconds) of the last rounds
        self.last_end: float | None = None  # when the previous round ended (perf_counter)
        self.rounds = 0
        # per batch size: [best k, rounds between explorations, rounds since the last] (a server's batch size moves
        # up and down as requests come and go; one shared backoff was reset by every move and explored every 16)
        self.explore: dict[int, list] = {}
        self.measure_tries: dict[tuple[int, int], int] = {}
        self.repeat_k, self.repeat_left, self.repeat_batch = 0, 0, 0
        self.position_s: float | None = None  # seconds a position of the drafter's last prompt catch-up took

    def rate(self, i: int) -> float:
        if i >= self.n_max:
            return PRIOR_RATE
        return (self.accepted[i] + PRIOR_RATE * PRIOR_WEIGHT) / (self.tried[i] + PRIOR_WEIGHT)

    def tree_rate(self, i: int) -> float:
        """The chance that the tree's depth i + 1 holds the target's token, given its path so far was accepted."""
        prior = 1 - (1 - self.rate(i)) * TREE_MISS ** (self.tree[i] - 1)
        return (self.tree_accepted[i] + prior * PRIOR_WEIGHT) / (self.tree_tried[i] + PRIOR_WEIGHT)

    def expected_tokens(self, k: Choice) -> float:
        """Tokens a round with this option is expected to emit."""
        rates = [self.tree_rate(i) for i in range(len(k))] if isinstance(k, tuple) else map(self.rate, range(k))
        total, run = 1.0, 1.0
        for r in rates:
            run *= r
            total += run
        return total

    def options(self) -> list[Choice]:
        """The chains n_min..n_max and the branching cuts of the tree, by node count (chains first on a tie)."""
        trees = [self.tree[:d] for d in range(1, len(self.tree) + 1) if max(self.tree[:d]) > 1] if self.tree else []
        return sorted([*range(self.n_min, self.n_max + 1), *trees], key=lambda o: (nodes(o), isinstance(o, tuple)))

    def round_ratio(self, batch: int, k: Choice) -> float | None:
        """Time of a round with k drafts relative to one with n_min, at this batch size: measured, or interpolated
        between two measured batch sizes; None when it would have to be extrapolated."""
        if k == self.n_min:
            return 1.0
        table = {b: r for (b, kk), r in self.ratio.items() if kk == k}
        if batch in table:
            return table[batch]
        below = [b for b in table if b < batch]
        above = [b for b in table if b > batch]
        if not below or not above:
            return None
        lo, hi = max(below), min(above)
        return table[lo] + (table[hi] - table[lo]) * (batch - lo) / (hi - lo)

    def weight_reads(self, batch: int, k: Choice) -> float:
        """Lower bound of a round's time with k drafts (or a tree) relative to one with n_min: how many more times
        its matmuls read the weights (1 where rows are not blocked)."""
        if not self.row_block:
            return 1.0
        blocks = lambda rows: -(-rows // self.row_block)
        return blocks(batch * (nodes(k) + 1)) / blocks(batch * (self.n_min + 1))

    def _could_win(self, k: Choice, cost_floor: float, best: float) -> bool:
        """Whether k drafts, at a round cost of at least cost_floor, could beat the best value so far."""
        return self.expected_tokens(k) / cost_floor / (1 + MARGIN) > best

    def _plain_round_s(self, batch: int) -> float | None:
        """Seconds of a round without drafts at this batch size, from the recent rounds (drafting rounds divided by
        their measured ratio where no plain round is among them)."""
        times = [t for b, k, t in self.recent if b == batch and k == self.n_min]
        if not times:
            times = [t / self.ratio[(b, k)] for b, k, t in self.recent if b == batch and (b, k) in self.ratio]
        return statistics.median(times) if times else None

    def _pays_back(self, batch: int, k: Choice, value: float, upfront_s: float, remaining: int | None,
                   bet: bool = False) -> bool:
        """Whether drafting k, at `value` tokens per plain round's time, saves more than upfront_s over the
        `remaining` tokens (each a plain round). bet: re-measuring a losing option, whose value may have changed
        with the text: also where upfront_s is within MARGIN of the remaining time (the margin drafting must win
        by anyway)."""
        if upfront_s <= 0 or remaining is None or k == self.n_min or self.n_min > 0:  # with n_min > 0 every
            return True  # round drafts: the catch-up is paid whatever k
        plain = self._plain_round_s(batch)
        if plain is None:
            return True
        left_s = remaining * plain
        return left_s * (1 - 1 / value) > upfront_s or (bet and upfront_s <= MARGIN * left_s)

    def _value(self, batch: int, k: Choice) -> float:
        """Tokens per plain round's time of option k, from its measured round ratio (the cost floor where none)."""
        ratio = self.round_ratio(batch, k)
        return self.expected_tokens(k) / max(ratio if ratio is not None else 1.0, self.weight_reads(batch, k))

    def observe_catch_up(self, done: tuple[int, float] | None) -> None:
        """(positions, seconds) of a drafter's prompt-size catch-up passes, as Drafter.take_catch_up gives them."""
        if done is not None:
            self.position_s = done[1] / done[0]

    def next_k(self, batch: int = 1, catch_up: int = 0, remaining: int | None = None) -> Choice:
        """The option for the next round over `batch` sequences; catch_up: positions a drafting round would feed
        the drafter now beyond its usual work (a prompt it has not seen), remaining: tokens left to generate."""
        upfront_s = catch_up * self.position_s if self.position_s is not None else 0.0
        if not self.adaptive:
            return self.tree or self.n_max
        if self.n_max == self.n_min and self.tree is None:
            return self.n_max
        self.rounds += 1
        if self.repeat_left > 0:  # rest of a measurement run ...
            if batch == self.repeat_batch:
                self.repeat_left -= 1
                return self.repeat_k
            self.repeat_left = 0  # ... unless the batch size changed: its rounds would not compare (and a k chosen
            # for 4 sequences may read the weights twice for 8)
        best_k, best, floor = self.n_min, -1.0, 1.0
        for k in self.options():
            ratio = self.round_ratio(batch, k)
            margin = 1 + MARGIN if k != self.n_min else 1
            floor = max(floor, self.weight_reads(batch, k))
            if ratio is None:  # not measured at this batch size yet
                if not self._could_win(k, floor, best):
                    continue  # cannot win even if it cost no more than k - 1 drafts: do not pay to measure it
                if (self.measure_tries.get((batch, k), 0) < MEASURE_TRIES
                        and self._pays_back(batch, k, self.expected_tokens(k) / floor, upfront_s, remaining)):
                    return self._measure(batch, k)
                continue
            floor = ratio = max(floor, ratio)
            value = self.expected_tokens(k) / ratio / margin
            if value > best:
                best_k, best = k, value
        if not self._pays_back(batch, best_k, self._value(batch, best_k), upfront_s, remaining):
            return self.n_min  # the exploration state is left as it is: this is not a change of the best option
        explore = self.explore.setdefault(batch, [None, EXPLORE_EVERY, 0])
        if best_k != explore[0]:
            explore[:] = [best_k, EXPLORE_EVERY, 0]
            return best_k
        explore[2] += 1
        if explore[2] >= explore[1]:  # keep the runner-up's acceptance and cost measured
            explore[1], explore[2] = min(2 * explore[1], EXPLORE_MAX), 0
            options = self.options()
            runner_up = self.n_min if best_k != self.n_min else options[min(options.index(self.n_min) + 1,
                                                                           len(options) - 1)]
            if runner_up != self.n_min and (
                    not self._could_win(runner_up, self.weight_reads(batch, runner_up), best)
                    or not self._pays_back(batch, runner_up, self._value(batch, runner_up), upfront_s, remaining,
                                           bet=True)):
                return best_k  # it cannot win at this batch size whatever it measures, or not enough to pay the
                # catch-up
            self.repeat_k, self.repeat_left, self.repeat_batch = runner_up, MEASURE_ROUNDS - 1, batch
            return self.repeat_k
        return best_k

    def _measure(self, batch: int, k: Choice) -> Choice:
        """Start a measurement run of k, right after a round whose ratio is known (the reference)."""
        last = self.recent[-1] if self.recent else None
        if last is None or last[:2] != (batch, self.n_min):
            return self.n_min  # a reference round first
        self.measure_tries[(batch, k)] = self.measure_tries.get((batch, k), 0) + 1
        self.repeat_k, self.repeat_left, self.repeat_batch = k, MEASURE_ROUNDS - 1, batch
        return k

    def new_request(self) -> None:
        """A new request starts with what this policy measured for earlier ones (mtpx.LLM keeps one per setting),
        but its text may draft differently: the acceptance counts weigh half as much, so its own rounds soon
        dominate. Where not drafting won, the exploration backoff starts again from EXPLORE_EVERY, so that the new
        text's acceptance is tried within 16 rounds rather than up to 256. Where drafting won it is kept: its
        rounds measure the new text's acceptance anyway, and exploring means plain rounds, which re-measure only a
        cost ratio that does not depend on the text (restarting it there cost the demo's bench 1-6 % at k <= 3)."""
        self.tried = [t / 2 for t in self.tried]
        self.accepted = [a / 2 for a in self.accepted]
        self.tree_tried = [t / 2 for t in self.tree_tried]
        self.tree_accepted = [a / 2 for a in self.tree_accepted]
        for entry in self.explore.values():
            if entry[0] == self.n_min:
                entry[1], entry[2] = EXPLORE_EVERY, 0
        self.skip_gap()  # the time since the last request's last round is not a round's cost

    def restart_timing(self) -> None:
        """Round costs changed for a reason of their own (the thread count did): later rounds are not compared with
        earlier ones."""
        self.recent.clear()
        self.skip_gap()

    def skip_gap(self) -> None:
        """Other work ran since the last round (a server's prefill of a new request, a cancellation): the time until
        the next round is not that round's cost. (Counted, it made the first round at each new batch size look
        slow, and so the reference it was compared with.)"""
        self.last_end = None

    def observe(self, batch: int, ks: list[int], accepted: list[int], draft_s: float, verify_s: float,
                started: float | None = None, ended: float | None = None, tree: tuple | None = None,
                chains: tuple[list[int], list[int]] | None = None) -> None:
        """A round: ks[b] draft positions (a tree's depth) of which accepted[b] were accepted; `tree`: the shape of
        a tree round (the option its time is a sample of), `chains`: the length of the chain of likeliest children
        in each tree and how much of it was accepted (what chain drafting would have got: the chains' acceptance
        stays measured while trees are chosen)."""
        counts = [(self.tree_tried, self.tree_accepted, ks, accepted)] if tree is not None else \
            [(self.tried, self.accepted, ks, accepted)]
        if chains is not None:
            counts.append((self.tried, self.accepted, *chains))
        for tried, hits, lengths, accepted_n in counts:
            for k, n in zip(lengths, accepted_n):
                for i in range(min(k, n + 1, len(tried))):
                    tried[i] += 1
                    hits[i] += i < n
        k, t = tree if tree is not None else (max(ks) if ks else 0), draft_s + verify_s
        if started is not None and self.last_end is not None and 0 <= started - self.last_end <= IDLE_GAP:
            t += started - self.last_end
        self.last_end = ended
        run = self.recent[-(MEASURE_ROUNDS - 1):]
        if len(run) == MEASURE_ROUNDS - 1 and all(r[:2] == (batch, k) for r in run):  # steady: not among the first
            # rounds after a change of k
            # compare with the rounds just before that used the other side of base vs drafting (never chained
            # through another k's ratio: errors would compound)
            refs = [(kk, tt) for b, kk, tt in self.recent[-(MEASURE_ROUNDS + 3):] if b == batch and kk != k
                    and (kk == self.n_min) != (k == self.n_min)]
            if refs and t > 0:
                ref_k = refs[-1][0]
                ref_t = statistics.median(tt for kk, tt in refs if kk == ref_k)  # not min: that would bias the
                # ratio toward whichever side happens to be the reference
                if k != self.n_min:
                    self._add_ratio(batch, k, t / ref_t)
                else:
                    self._add_ratio(batch, ref_k, ref_t / t)
        self.recent.append((batch, k, t))
        del self.recent[:-RECENT]

    def _add_ratio(self, batch: int, k: Choice, value: float) -> None:
        window = self._ratio_samples.setdefault((batch, k), [])
        window.append(value)
        del window[:-WINDOW]
        if len(window) >= MIN_SAMPLES:  # one sample can be a burst of load: trust a median of three
            self.ratio[(batch, k)] = statistics.median(window)
