"""Continuous batching: one worker thread owns the model and runs batched speculative decoding for all requests.

Every iteration the worker
  1. drops cancelled requests (their Sequence and caches go with them),
  2. admits waiting requests (prefill, one prompt at a time, up to a prompt-token budget per iteration; the n
     samples of one request share one prefill: engine/fork.py),
  3. runs one `decode_round` over every running sequence: one batched draft, one batched verify forward, each
     sequence accepting its own number of tokens and rolling back its own caches,
  4. turns new tokens into text (stop strings, incremental UTF-8) and hands each request its delta through the
     request's `sink` callback, then removes finished sequences.

The drafter and the draft-length policy are shared by the whole server: the policy sees the batch size each round
and measures acceptance and costs across all requests. Everything per sequence (caches, rounds, text, stats) is the
LLM's engine's (mtpx/engine/); this module only decides what runs when.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from mtpx.engine.params import SamplingParams, SpecConfig
from mtpx.engine.request import Request, StreamEvent
from mtpx.errors import RankLost
from mtpx.llm import LLM
from mtpx.serve.metrics import Metrics

log = logging.getLogger("mtpx.serve")


@dataclass
class Delta:
    """What one request receives after a scheduler step."""
    text: str
    token_ids: list[int]
    stats: dict  # the request's stats so far (engine/stats.py)
    finish_reason: str | None = None  # set on the last delta
    error: str | None = None  # the engine failed this request (last delta)
    error_code: str | None = None  # SHUTTING_DOWN: the server ended the request because it is stopping
    logprobs: list | None = None  # of token_ids, when the request asked for them (engine/request.py)


_ids = itertools.count(1)
SHUTTING_DOWN = "server_shutting_down"
RANK_LOST = "rank_lost"  # a rank of a model run over several processes is gone: the server answers 503, then exits


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams
    sink: Callable[[Delta], None]
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    id: int = field(default_factory=lambda: next(_ids))
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    done: bool = False
    admitted_at: float = 0.0
    # the other samples of an n > 1 request: admitted and prefilled with this one (one pass of their shared prompt),
    # then each decoded as a sequence of its own; only this one is submitted
    siblings: list[GenRequest] = field(default_factory=list)
    # engine state, owned by the worker thread
    req: Request | None = None
    counted: tuple = (0, 0, 0, ())  # speculation counts already added to the metrics


    @property
    def members(self) -> list[GenRequest]:
        """This request and its siblings: the sequences admitted together."""
        return [self, *self.siblings]


class Scheduler:
    def __init__(self, llm: LLM, spec: SpecConfig | None = None, metrics: Metrics | None = None,
                 max_num_seqs: int = 32, prefill_budget: int = 2048):
        self.llm = llm
        self.engine = llm.engine
        self.spec = spec or SpecConfig()
        self.drafter = self.engine.drafter(self.spec, batched=True)
        self.policy = self.engine.new_policy(self.spec)
        self.metrics = metrics or Metrics("model")
        self.max_num_seqs = max(1, int(max_num_seqs))
        self.prefill_budget = max(1, int(prefill_budget))
        self._waiting: deque[GenRequest] = deque()
        self._running: list[GenRequest] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- called from other threads -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="mtpx-scheduler", daemon=True)
            self._thread.start()

    def request_stop(self) -> None:
        """Stop without waiting: after its current step the worker ends every waiting and running request (each
        gets a last delta with error_code SHUTTING_DOWN) and exits; submit() refuses new ones."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def stop(self, timeout: float = 10.0) -> None:
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, r: GenRequest) -> GenRequest:
        with self._cv:
            if self._stopping:
                raise RuntimeError("the scheduler is shutting down")
            self._waiting.append(r)
            with self.metrics.lock:
                self.metrics.waiting = len(self._waiting)
            self._cv.notify_all()
        return r

    def cancel(self, r: GenRequest) -> None:
        """Ask the worker to drop `r` (client went away). Safe to call at any time, also after it finished."""
        if r.done or r.cancelled:
            return
        with self._cv:
            r.cancelled = True
            self._cv.notify_all()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- the worker thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stopping and not self._waiting and not self._running:
                        self._cv.wait()
                    if self._stopping:
                        break
                    admit = self._take_admissions()
                try:
                    changed = self._drop_cancelled()
                    for r in admit:
                        self._prefill(r)
                    if admit or changed:
                        self._update_gauges()
                        if self.policy is not None:
                            self.policy.skip_gap()
                    if self._running:
                        self._decode()
                except Exception as e:  # a bug outside the guarded model calls: fail this batch, keep serving
                    log.error("scheduler step failed:\n%s", traceback.format_exc())
                    for r in [m for a in admit for m in a.members] + self._running:
                        self._fail(r, f"internal error: {e}")
                    self._running = []
                    self._update_gauges()
        for r in [m for w in self._waiting for m in w.members] + self._running:  # shutting down: tell the clients
            self._fail(r, "the server is shutting down", SHUTTING_DOWN)
        self._waiting.clear()
        self._running.clear()

    def _take_admissions(self) -> list[GenRequest]:
        admit, budget, seqs = [], self.prefill_budget, 0
        if any(r.cancelled for r in self._waiting):
            for r in self._waiting:
                if r.cancelled:  # the client went away: the whole group with it
                    for m in r.members:
                        if not m.done:
                            self._count_cancel(m)
            self._waiting = deque(r for r in self._waiting if not r.done)
        while self._waiting:
            r = self._waiting[0]
            size = len(r.members)
            if len(self._running) + seqs + size > self.max_num_seqs and (self._running or admit):
                break  # a group larger than max_num_seqs still runs, alone
            if admit and len(r.prompt_ids) > budget:
                break  # next iteration: running sequences get a decode round between long prefills
            budget -= len(r.prompt_ids)
            seqs += size
            admit.append(self._waiting.popleft())
        with self.metrics.lock:
            self.metrics.waiting = len(self._waiting)
        return admit

    def _drop_cancelled(self) -> bool:
        keep = [r for r in self._running if not r.cancelled]
        if len(keep) == len(self._running):
            return False
        for r in self._running:
            if r.cancelled:
                self._count_cancel(r)
        self._running = keep
        return True

    def _count_cancel(self, r: GenRequest) -> None:
        r.done = True
        self._free(r)
        with self.metrics.lock:
            self.metrics.requests_cancelled += 1

    def _free(self, r: GenRequest) -> None:
        """Drop the request's Sequence: its caches and drafter state are freed (static ones go back to the pool)."""
        if r.req is not None:
            self.engine.release(r.req.seq)
            r.req = None

    def _prefill(self, r: GenRequest) -> None:
        """Prefill `r` and its siblings (one pass of their prompt) and add them to the running batch."""
        for s in r.siblings:
            if s.cancelled and not s.done:
                self._count_cancel(s)
        group = [m for m in r.members if not m.done]
        r.admitted_at = time.perf_counter()
        with self.metrics.lock:
            self.metrics.queue_time.observe(r.admitted_at - r.arrived)
        try:
            for m in group:
                m.admitted_at = r.admitted_at
                m.req = self.engine.open(m.prompt_ids, m.max_tokens, m.params, stop=m.stop,
                                         ignore_eos=m.ignore_eos, started=m.arrived)
            events = self.engine.start_shared([m.req for m in group], self.drafter)
            with self.metrics.lock:
                self.metrics.prompt_tokens += r.req.seq.n_prompt  # prefilled once for the whole group
                self.metrics.ttft.observe(r.req.first_token_at - r.arrived)
            for m, event in zip(group, events):
                self._emit(m, event)
        except Exception as e:  # an engine failure must not take the server down
            log.error("prefill failed:\n%s", traceback.format_exc())
            for m in group:
                self._fail(m, f"prefill failed: {e}", RANK_LOST if isinstance(e, RankLost) else None)
            return
        self._running += [m for m in group if not m.done]

    def _decode(self) -> None:
        batch = list(self._running)
        seqs = [r.req.seq for r in batch]
        before = [s.stats.drafted_tokens for s in seqs]
        t0 = time.perf_counter()
        try:
            news = self.engine.decode_round(self.drafter, self.policy, seqs)
        except Exception as e:
            log.error("decode round failed:\n%s", traceback.format_exc())
            for r in batch:
                self._fail(r, f"decode failed: {e}", RANK_LOST if isinstance(e, RankLost) else None)
            self._running = []
            self._update_gauges()
            return
        with self.metrics.lock:
            self.metrics.decode_rounds += 1
            self.metrics.round_time.observe(time.perf_counter() - t0)
            self.metrics.last_draft_len = max(s.stats.drafted_tokens - b for s, b in zip(seqs, before))
        for r, new in zip(batch, news):
            if r.cancelled:
                continue  # dropped at the top of the next iteration
            self._emit(r, r.req.advance(new))
        still = [r for r in self._running if not r.done]
        if len(still) != len(self._running):
            self._running = still
            self._update_gauges()

    def _emit(self, r: GenRequest, ev: StreamEvent) -> None:
        """Account the new tokens' stats and hand the request its delta (text already past stop strings)."""
        seq = r.req.seq
        self._account(r)
        with self.metrics.lock:
            self.metrics.generation_tokens += len(ev.token_ids)
        if seq.finished:
            completion = self.engine.finish(r.req, self.spec, self.drafter)
            r.done = True
            finished_at = time.perf_counter()
            with self.metrics.lock:
                self.metrics.e2e.observe(finished_at - r.arrived)
                reason = completion.finish_reason
                self.metrics.requests_finished[reason] = self.metrics.requests_finished.get(reason, 0) + 1
            delta = Delta(ev.text, ev.token_ids, completion.stats, finish_reason=completion.finish_reason,
                          logprobs=ev.logprobs)
            self._free(r)  # free the caches now; the client has everything it needs
        else:
            delta = Delta(ev.text, ev.token_ids, self.engine.stats(r.req, self.spec), logprobs=ev.logprobs)
        self._send(r, delta)

    def _account(self, r: GenRequest) -> None:
        s = r.req.seq.stats
        d0, t0, a0, p0 = r.counted
        per_pos = [a - (p0[i] if i < len(p0) else 0) for i, a in enumerate(s.accepted_by_position)]
        if s.drafts != d0:
            self.metrics.add_spec(s.drafts - d0, s.drafted_tokens - t0, s.accepted_tokens - a0, per_pos)
        r.counted = (s.drafts, s.drafted_tokens, s.accepted_tokens, tuple(s.accepted_by_position))

    def _send(self, r: GenRequest, delta: Delta) -> None:
        try:
            r.sink(delta)
        except Exception:  # the client's event loop is gone: treat as a disconnect
            if not r.done:
                r.cancelled = True

    def _fail(self, r: GenRequest, message: str, code: str | None = None) -> None:
        if r.done:
            return
        r.done = True
        self._free(r)
        with self.metrics.lock:
            self.metrics.requests_failed += 1
        self._send(r, Delta("", [], {}, finish_reason="error", error=message, error_code=code))

    def _update_gauges(self) -> None:
        total = 0
        for r in self._running:
            if r.req is not None:
                seq = r.req.seq
                total += seq.state.nbytes()
                draft = getattr(seq.draft, "state", None)
                if draft is not None:
                    total += draft.nbytes()
        with self.metrics.lock:
            self.metrics.running = len(self._running)
            self.metrics.cache_bytes = total

