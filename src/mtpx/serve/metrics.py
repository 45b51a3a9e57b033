"""Server counters, gauges and histograms, written in the Prometheus text format by prometheus_client.

Names follow vLLM's (`vllm:spec_decode_num_drafts` ...) with the `mtpx:` prefix. The scheduler thread updates plain
numbers under one lock; each scrape turns a consistent copy of them into metric families (a custom collector on a
registry of this server's own), so prometheus_client writes the TYPE lines and the `_total` samples of counters.
"""
from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

try:  # the text format 0.0.4, which every Prometheus reads
    from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4 as CONTENT_TYPE
except ImportError:  # older prometheus_client: its latest is 0.0.4
    from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1


class Metrics:
    """All server metrics. Updated by the scheduler thread, read by HTTP handlers; one lock guards both."""

    def __init__(self, model_name: str):
        self.lock = threading.Lock()
        self.model_name = model_name
        self.spec_drafts = 0
        self.spec_draft_tokens = 0
        self.spec_accepted_tokens = 0
        self.spec_accepted_per_pos: list[int] = []
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.requests_finished: dict[str, int] = {}
        self.requests_cancelled = 0
        self.requests_failed = 0
        self.running = 0
        self.waiting = 0
        self.cache_bytes = 0
        self.decode_rounds = 0
        self.last_draft_len = 0
        self.ttft = Histogram()
        self.e2e = Histogram()
        self.queue_time = Histogram()
        self.round_time = Histogram((0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))

    def add_spec(self, drafts: int, draft_tokens: int, accepted: int, accepted_per_pos: list[int]) -> None:
        with self.lock:
            self.spec_drafts += drafts
            self.spec_draft_tokens += draft_tokens
            self.spec_accepted_tokens += accepted
            while len(self.spec_accepted_per_pos) < len(accepted_per_pos):
                self.spec_accepted_per_pos.append(0)
            for i, a in enumerate(accepted_per_pos):
                self.spec_accepted_per_pos[i] += a

    def snapshot(self) -> dict:
        with self.lock:
            return {
                "running": self.running, "waiting": self.waiting, "cache_bytes": self.cache_bytes,
                "requests_finished": sum(self.requests_finished.values()),
                "requests_cancelled": self.requests_cancelled, "requests_failed": self.requests_failed,
                "prompt_tokens": self.prompt_tokens, "generation_tokens": self.generation_tokens,
                "spec_decode": {
                    "num_drafts": self.spec_drafts, "num_draft_tokens": self.spec_draft_tokens,
                    "num_accepted_tokens": self.spec_accepted_tokens,
                    "num_accepted_tokens_per_pos": list(self.spec_accepted_per_pos),
                    "acceptance_rate": (self.spec_accepted_tokens / self.spec_draft_tokens
                                        if self.spec_draft_tokens else 0.0),
                    "mean_acceptance_length": (1 + self.spec_accepted_tokens / self.spec_drafts
                                               if self.spec_drafts else 1.0),
                    "last_draft_len": self.last_draft_len,
                },
            }

    def render(self) -> str:
        """The Prometheus text exposition (format 0.0.4, CONTENT_TYPE) of every metric."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self))
        return generate_latest(registry).decode()

    def families(self) -> list:
        """The metric families, from one consistent copy of the numbers."""
        labels, value = ["model_name"], [self.model_name]
        out: list = []

        def gauge(name: str, help_: str, v) -> None:
            f = GaugeMetricFamily(name, help_, labels=labels)
            f.add_metric(value, v)
            out.append(f)

        def counter(name: str, help_: str, v) -> None:
            f = CounterMetricFamily(name, help_, labels=labels)
            f.add_metric(value, v)
            out.append(f)

        def histogram(name: str, help_: str, h: Histogram) -> None:
            f = HistogramMetricFamily(name, help_, labels=labels)
            buckets = [(repr(float(b)), c) for b, c in zip(h.buckets, h.counts)] + [("+Inf", h.count)]
            f.add_metric(value, buckets, h.sum)
            out.append(f)

        with self.lock:
            gauge("mtpx:num_requests_running", "Sequences in the running batch.", self.running)
            gauge("mtpx:num_requests_waiting", "Requests waiting to be admitted.", self.waiting)
            gauge("mtpx:cache_bytes", "Bytes held by the KV / recurrent caches of live sequences.", self.cache_bytes)
            gauge("mtpx:spec_decode_draft_len", "Draft length chosen for the last decode round.", self.last_draft_len)
            counter("mtpx:spec_decode_num_drafts", "Number of speculative drafts (one per sequence per round).",
                    self.spec_drafts)
            counter("mtpx:spec_decode_num_draft_tokens", "Number of draft tokens proposed.", self.spec_draft_tokens)
            counter("mtpx:spec_decode_num_accepted_tokens", "Number of draft tokens accepted.",
                    self.spec_accepted_tokens)
            per_pos = CounterMetricFamily("mtpx:spec_decode_num_accepted_tokens_per_pos",
                                          "Accepted draft tokens at each draft position.",
                                          labels=["model_name", "position"])
            for i, a in enumerate(self.spec_accepted_per_pos):
                per_pos.add_metric([self.model_name, str(i)], a)
            out.append(per_pos)
            counter("mtpx:prompt_tokens", "Prefilled prompt tokens.", self.prompt_tokens)
            counter("mtpx:generation_tokens", "Generated tokens.", self.generation_tokens)
            success = CounterMetricFamily("mtpx:request_success", "Finished requests by finish reason.",
                                          labels=["model_name", "finished_reason"])
            for reason, n in sorted(self.requests_finished.items()):
                success.add_metric([self.model_name, reason], n)
            out.append(success)
            counter("mtpx:num_requests_cancelled", "Sequences cancelled (client disconnected) and freed.",
                    self.requests_cancelled)
            counter("mtpx:num_requests_failed", "Requests that failed inside the engine.", self.requests_failed)
            counter("mtpx:decode_rounds", "Batched decode rounds run.", self.decode_rounds)
            histogram("mtpx:time_to_first_token_seconds", "Time from arrival to the first token.", self.ttft)
            histogram("mtpx:e2e_request_latency_seconds", "Time from arrival to the last token.", self.e2e)
            histogram("mtpx:request_queue_time_seconds", "Time from arrival to admission (prefill start).",
                      self.queue_time)
            histogram("mtpx:decode_round_seconds", "Wall time of one batched draft/verify round.", self.round_time)
        return out


class _Collector:
    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        return self.metrics.families()
