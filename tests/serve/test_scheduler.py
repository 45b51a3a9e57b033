"""The continuous-batching scheduler without HTTP: staggered arrivals, every drafter, cancellation."""
from __future__ import annotations

import dataclasses
import threading
import time

import pytest

import mtpx
from mtpx.engine.params import SamplingParams, SpecConfig
from mtpx.serve.scheduler import GenRequest, Scheduler


class Collector:
    def __init__(self):
        self.tokens, self.text, self.final, self.done = [], [], None, threading.Event()
        self.count = 0

    def __call__(self, delta):
        self.tokens += delta.token_ids
        self.text.append(delta.text)
        self.count += 1
        if delta.finish_reason is not None:
            self.final = delta
            self.done.set()


def prompts(llm, n):
    texts = ["def add(a, b):\n", "import os\n", "The quick brown fox", "for i in range(10):\n",
             "class Point:\n    def __init__(self, x, y):\n", "Hello, how are you today? I am fine, thank you."]
    out = [llm.tokenizer.encode(texts[i % len(texts)] * (1 + i // len(texts))) for i in range(n)]
    out[-1] = out[-1] * 6  # one long prompt: a long pending catch-up in the drafter next to short ones
    return out


@pytest.fixture(scope="module")
def draft_path(ckpt_factory):
    return str(ckpt_factory(seed=7, mtp=False))


SPECS = {
    "none": SpecConfig(),
    "mtp-fixed": SpecConfig(spec_type="mtp", spec_draft_n_max=3, spec_draft_policy="fixed"),
    "mtp-adaptive": SpecConfig(spec_type="mtp", spec_draft_n_max=4),
    "draft-fixed": SpecConfig(spec_type="draft", spec_draft_n_max=2, spec_draft_policy="fixed"),
    "ngram-fixed": SpecConfig(spec_type="ngram", spec_draft_n_max=3, spec_draft_policy="fixed"),
}


def run_staggered(llm, spec):
    """Seven requests of different lengths, four arriving while the first three decode; every one must equal
    sequential greedy decoding."""
    jobs = prompts(llm, 7)
    max_tokens = [12, 30, 5, 24, 1, 18, 16]
    refs = [llm.generate(p, max_tokens=m, spec_type="none") for p, m in zip(jobs, max_tokens)]
    sched = Scheduler(llm, spec)
    sched.start()
    try:
        cols = [Collector() for _ in jobs]
        reqs = [GenRequest(p, m, SamplingParams(), c) for p, m, c in zip(jobs, max_tokens, cols)]
        for r in reqs[:3]:
            sched.submit(r)
        deadline = time.time() + 30
        while cols[1].count < 4 and not cols[1].done.is_set():  # the rest arrive while these are decoding
            assert time.time() < deadline
            time.sleep(0.002)
        for r in reqs[3:]:
            sched.submit(r)
        for c in cols:
            assert c.done.wait(60)
    finally:
        sched.stop()
    for i, (ref, c) in enumerate(zip(refs, cols)):
        assert c.final.error is None
        assert c.tokens == ref.token_ids, f"request {i} differs from sequential greedy decoding"
        assert "".join(c.text) == ref.text
        assert c.final.finish_reason == ref.finish_reason
    m = sched.metrics.snapshot()
    assert m["running"] == 0 and m["cache_bytes"] == 0 and m["requests_finished"] == len(jobs)
    if spec.spec_type != "none" and spec.spec_draft_policy == "fixed":
        assert m["spec_decode"]["num_drafts"] > 0


@pytest.mark.parametrize("name", list(SPECS))
def test_staggered_batch_equals_sequential_greedy(serve_llm, draft_path, name):
    spec = SPECS[name]
    if spec.spec_type == "draft":
        spec = dataclasses.replace(spec, spec_draft_model=draft_path)
    run_staggered(serve_llm, spec)


@pytest.mark.parametrize("name", ["none", "mtp-fixed"])
def test_static_passes_in_a_batch_equal_sequential_greedy(dense_ckpt, name):
    """Static step passes (CUDA graphs on a GPU; here run eagerly): one pass per sequence in a batched round, and
    every static cache back in the pool afterwards."""
    llm = mtpx.LLM(dense_ckpt, static_steps=True)
    run_staggered(llm, SPECS[name])
    held = [s for states in llm.runner.state_pool(llm.model).free.values() for s in states]
    assert held and all(s.pool is None for s in held)  # every one released, none still marked as handed out
    made = len(held)
    run_staggered(llm, SPECS[name])
    assert sum(len(v) for v in llm.runner.state_pool(llm.model).free.values()) == made  # the second run reused them all


def test_cancel_running_and_waiting(serve_llm):
    sched = Scheduler(serve_llm, SpecConfig(spec_type="mtp"), max_num_seqs=1)
    sched.start()
    try:
        ids = serve_llm.tokenizer.encode("def add(a, b):\n")
        a, b = Collector(), Collector()
        ra = sched.submit(GenRequest(ids, 400, SamplingParams(), a, ignore_eos=True))
        rb = sched.submit(GenRequest(ids, 400, SamplingParams(), b, ignore_eos=True))  # waits: max_num_seqs=1
        deadline = time.time() + 30
        while a.count < 2:
            assert time.time() < deadline
            time.sleep(0.002)
        assert sched.metrics.snapshot()["waiting"] == 1
        sched.cancel(rb)
        sched.cancel(ra)
        while sched.metrics.snapshot()["requests_cancelled"] < 2:
            assert time.time() < deadline
            time.sleep(0.01)
        m = sched.metrics.snapshot()
        assert m["running"] == 0 and m["waiting"] == 0 and m["cache_bytes"] == 0
        assert ra.req is None and rb.req is None  # the Sequence (and its caches) is released
        assert b.count == 0 and not a.done.is_set()
        c = Collector()
        sched.submit(GenRequest(ids, 3, SamplingParams(), c))
        assert c.done.wait(30) and len(c.tokens) == 3
    finally:
        sched.stop()


def test_mixed_sampling_and_greedy_in_one_batch(serve_llm):
    """A sampled request in the batch does not change the greedy requests next to it."""
    ids = serve_llm.tokenizer.encode("for i in range(10):\n")
    ref = serve_llm.generate(ids, max_tokens=16, spec_type="none")
    sched = Scheduler(serve_llm, SpecConfig(spec_type="mtp", spec_draft_n_max=2, spec_draft_policy="fixed"))
    sched.start()
    try:
        greedy, sampled = Collector(), Collector()
        sched.submit(GenRequest(ids, 16, SamplingParams(temperature=1.0, seed=3), sampled))
        sched.submit(GenRequest(ids, 16, SamplingParams(), greedy))
        assert greedy.done.wait(30) and sampled.done.wait(30)
    finally:
        sched.stop()
    assert greedy.tokens == ref.token_ids
    assert len(sampled.tokens) >= 1


def test_scheduler_survives_an_engine_error(serve_llm, monkeypatch):
    sched = Scheduler(serve_llm, SpecConfig())
    sched.start()
    try:
        import mtpx.engine.engine as mod  # the scheduler prefills through Engine.prefill
        original = mod.prefill

        def boom(*a, **k):
            raise RuntimeError("injected")
        monkeypatch.setattr(mod, "prefill", boom)
        bad = Collector()
        sched.submit(GenRequest([5, 6, 7], 4, SamplingParams(), bad))
        assert bad.done.wait(10) and "injected" in bad.final.error
        monkeypatch.setattr(mod, "prefill", original)
        good = Collector()
        sched.submit(GenRequest([5, 6, 7], 4, SamplingParams(), good))
        assert good.done.wait(10) and good.final.error is None and len(good.tokens) == 4
        assert sched.metrics.snapshot()["requests_failed"] == 1
    finally:
        sched.stop()


def test_mtpx_package_exports_llm():
    assert hasattr(mtpx, "LLM")


def test_siblings_share_one_prefill_and_wait_or_go_as_a_group(serve_llm):
    """The n samples of a request (siblings): one prefill, admitted together (alone when more than max_num_seqs),
    and dropped together when cancelled while waiting."""
    sched = Scheduler(serve_llm, SpecConfig(spec_type="mtp"), max_num_seqs=2)
    sched.start()
    try:
        ids = serve_llm.tokenizer.encode("def add(a, b):\n")
        cols = [Collector() for _ in range(3)]
        group = [GenRequest(ids, 6, SamplingParams(), c, ignore_eos=True) for c in cols]
        group[0].siblings = group[1:]
        sched.submit(group[0])
        assert all(c.done.wait(30) for c in cols)
        assert [c.tokens for c in cols] == [cols[0].tokens] * 3 and len(cols[0].tokens) == 6
        assert sched.metrics.snapshot()["prompt_tokens"] == len(ids)
        long = Collector()
        ra = sched.submit(GenRequest(ids, 400, SamplingParams(), long, ignore_eos=True))
        deadline = time.time() + 30
        while long.count < 2:
            assert time.time() < deadline
            time.sleep(0.002)
        waiting = [Collector() for _ in range(2)]
        group = [GenRequest(ids, 6, SamplingParams(), c) for c in waiting]
        group[0].siblings = group[1:]
        sched.submit(group[0])  # 1 running + 2 > max_num_seqs: waits
        assert sched.metrics.snapshot()["waiting"] == 1
        for g in group:
            sched.cancel(g)
        sched.cancel(ra)
        while sched.metrics.snapshot()["requests_cancelled"] < 3:
            assert time.time() < deadline
            time.sleep(0.01)
        assert all(g.done and g.req is None for g in group) and [c.count for c in waiting] == [0, 0]
    finally:
        sched.stop()
