"""The CPU thread count of decode rounds, chosen by measuring them (ThreadTuner).

Why: on this project's 2-core machine a step of the demo model runs ~1.4x faster on both cores than on one while
they are free, and ~3x slower while another process keeps one of them busy: each of the step's parallel regions then
waits for the descheduled thread. No fixed count suits both moments, so the tuner measures
each candidate over a window of rounds, keeps the fastest, measures again now and then (at intervals that double
while the choice holds), and at once when throughput falls well below what the chosen count measured.

Switching costs nothing in output: every kernel splits its work into blocks computed alike on any thread
(kernels/rowgemm.cpp), so results are the same bits whatever the count (tests/test_kernels.py).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

WINDOW_ROUNDS = 4  # a measurement window: at least this many rounds, and...
WINDOW_TOKENS = 32  # ...this many tokens emitted (a small model: ~30 ms)...
WINDOW_SECONDS = 0.25  # ...or this long (a large one: 32 tokens of a 0.8B model take ~2-3 s)
FIRST_INTERVAL, MAX_INTERVAL = 8, 256  # windows between measurements of every candidate
SLOWDOWN = 1.6  # a window this much slower than the chosen count measured starts a new measurement


class ThreadTuner:
    def __init__(self, choices: list[int], set_threads: Callable[[int], None] = torch.set_num_threads):
        if not choices:
            raise ValueError("ThreadTuner needs at least one thread count")
        self.choices = sorted(set(choices))
        self.set_threads = set_threads
        # tokens per second for each count: the last value seen, which a change of context (plain vs MTP rounds)
        # rebases for the count in use only, so entries can describe different work; `measured`: the last complete
        # measurement, its counts measured one after another (what a report should show)
        self.rates: dict[int, float] = {}
        self.measured: dict[int, float] = {}
        self.interval = FIRST_INTERVAL
        self.windows_left = 0
        self.switches = 0
        self._pending = list(reversed(self.choices))  # counts still to measure in this measurement, next first
        self._chosen: int | None = None
        self._tokens, self._seconds, self._rounds = 0, 0.0, 0
        self._skip = False
        self._context: object = None
        self._rebase = False
        self.current: int | None = None  # the count in use
        self._use(self._pending[0])

    def observe(self, tokens: int, seconds: float, context: object = None) -> bool:
        """Count a decode round (tokens emitted, wall time). `context` describes the work (LLM: the drafter and the
        batch size): when it changes, tokens per second change with it, so the next window becomes the chosen
        count's new reference instead of being compared with the old one (alternating plain and MTP requests
        would otherwise look like a slowdown every time). Returns True when it changed the thread count."""
        if context != self._context:  # a new window, all of it in the new context
            self._context, self._rebase = context, True
            self._tokens, self._seconds, self._rounds = 0, 0.0, 0
        if self._skip:  # the first round on a new count pays for waking its threads
            self._skip = False
            return False
        self._tokens += tokens
        self._seconds += seconds
        self._rounds += 1
        if self._rounds < WINDOW_ROUNDS or (self._tokens < WINDOW_TOKENS and self._seconds < WINDOW_SECONDS) \
                or self._tokens == 0 or self._seconds <= 0:
            return False
        rate = self._tokens / self._seconds
        self._tokens, self._seconds, self._rounds = 0, 0.0, 0
        before, rebase, self._rebase = self.current, self._rebase, False
        if self._pending:
            self.rates[self._pending.pop(0)] = rate
            if self._pending:
                self._use(self._pending[0])
            else:
                self._choose()
        elif rebase:
            self.rates[self.current] = rate
        elif rate * SLOWDOWN < self.rates[self.current]:
            self._measure()
        else:
            self.windows_left -= 1
            if self.windows_left <= 0:
                self._measure()
        return self.current != before

    def _measure(self) -> None:
        """Measure every count again, the chosen one last (it then keeps running if it stays the best)."""
        self._pending = [c for c in self.choices if c != self.current] + [self.current]
        self._use(self._pending[0])

    @property
    def preferred(self) -> int:
        """The count last chosen (the most cores before any measurement): for work outside decode rounds, such as
        a prefill, which should not run on a count being tried out."""
        return self._chosen if self._chosen is not None else self.choices[-1]

    def _choose(self) -> None:
        self.measured = dict(self.rates)
        best = max(self.rates, key=self.rates.get)
        self.interval = min(2 * self.interval, MAX_INTERVAL) if best == self._chosen else FIRST_INTERVAL
        others = [r for n, r in self.rates.items() if n != best]
        if best == self.choices[-1] and others and self.rates[best] > SLOWDOWN * max(others):
            # all cores by a wide margin (a large model): only contention can change that, and the slowdown
            # it causes starts a measurement at once; scheduled ones would only cost time on the slower counts
            self.interval = MAX_INTERVAL
        self._chosen = best
        self.windows_left = self.interval
        self._use(best)

    def _use(self, threads: int) -> None:
        if self.current != threads:
            self.current = threads
            self.set_threads(threads)
            self.switches += 1
            self._skip = True
