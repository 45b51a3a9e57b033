"""Server counters, gauges and histograms, rendered in the Prometheus text format (no extra dependency).

Names follow vLLM's (`vllm:spec_decode_num_drafts` ...) with the `mtpx:` prefix; counters are exposed as a family
`name` with the sample `name_total`, as prometheus_client does.
"""
from __future__ import annotations

import threading

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
        label = f'model_name="{_escape(self.model_name)}"'
        out: list[str] = []

        def family(name: str, kind: str, help_: str) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")

        def counter(name: str, help_: str, value, extra: str = "") -> None:
            family(name, "counter", help_)
            out.append(f"{name}_total{{{label}{extra}}} {value}")

        def gauge(name: str, help_: str, value) -> None:
            family(name, "gauge", help_)
            out.append(f"{name}{{{label}}} {value}")

        def histogram(name: str, help_: str, h: Histogram) -> None:
            family(name, "histogram", help_)
            for b, c in zip(h.buckets, h.counts):
                out.append(f'{name}_bucket{{{label},le="{b}"}} {c}')
            out.append(f'{name}_bucket{{{label},le="+Inf"}} {h.count}')
            out.append(f"{name}_sum{{{label}}} {h.sum}")
            out.append(f"{name}_count{{{label}}} {h.count}")

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
            family("mtpx:spec_decode_num_accepted_tokens_per_pos", "counter",
                   "Accepted draft tokens at each draft position.")
            for i, a in enumerate(self.spec_accepted_per_pos):
                out.append(f'mtpx:spec_decode_num_accepted_tokens_per_pos_total{{{label},position="{i}"}} {a}')
            counter("mtpx:prompt_tokens", "Prefilled prompt tokens.", self.prompt_tokens)
            counter("mtpx:generation_tokens", "Generated tokens.", self.generation_tokens)
            family("mtpx:request_success", "counter", "Finished requests by finish reason.")
            for reason, n in sorted(self.requests_finished.items()):
                out.append(f'mtpx:request_success_total{{{label},finished_reason="{reason}"}} {n}')
            counter("mtpx:num_requests_cancelled", "Sequences cancelled (client disconnected) and freed.",
                    self.requests_cancelled)
            counter("mtpx:num_requests_failed", "Requests that failed inside the engine.", self.requests_failed)
            counter("mtpx:decode_rounds", "Batched decode rounds run.", self.decode_rounds)
            histogram("mtpx:time_to_first_token_seconds", "Time from arrival to the first token.", self.ttft)
            histogram("mtpx:e2e_request_latency_seconds", "Time from arrival to the last token.", self.e2e)
            histogram("mtpx:request_queue_time_seconds", "Time from arrival to admission (prefill start).",
                      self.queue_time)
            histogram("mtpx:decode_round_seconds", "Wall time of one batched draft/verify round.", self.round_time)
        return "\n".join(out) + "\n"


def _escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
