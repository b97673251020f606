"""`GET /metrics`: the server's counters in Prometheus' text format, through prometheus_client.

Each app has its own registry (not the library's global one), so two apps in one process (the
tests) count apart. Requests are counted by route (the route's path, never the raw URL, so a
client cannot grow the label set) and status once their response has ended; a sample's time to
first token, its time per further token and its tokens are recorded when it finishes, whatever
the reason; queue depth and running rows are read from the engine when scraped. Each HELP line is
the words of docs/serve.md's table of metrics (a test holds them equal).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds. A first token waits for a prefill and possibly a queue; later tokens take one batched step.
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "gpt_small_requests", "requests once their response ended; route is the route's path (other for "
            "unknown paths)", ["route", "status"], registry=r)
        self.request_seconds = Histogram("gpt_small_request_duration_seconds", "request time, streams to their end",
                                         ["route"], buckets=_REQUEST_BUCKETS, registry=r)
        self.prompt_tokens = Counter("gpt_small_prompt_tokens", "prompt tokens of finished samples", registry=r)
        self.generated_tokens = Counter("gpt_small_generated_tokens", "tokens generated (cancelled samples included)",
                                        registry=r)
        self.samples = Counter("gpt_small_samples", "samples finished: stop, length, cancelled, error",
                               ["finish_reason"], registry=r)
        self.queue_depth = Gauge("gpt_small_queue_depth", "samples waiting for a row", registry=r)
        self.running_rows = Gauge("gpt_small_running_rows", "samples being decoded", registry=r)
        self.ttft = Histogram("gpt_small_time_to_first_token_seconds", "submission to first token, per sample",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("gpt_small_time_per_output_token_seconds", "mean time between a sample's tokens after "
                              "the first", buckets=_TPOT_BUCKETS, registry=r)

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.request_seconds.labels(route=route).observe(seconds)

    def sample(self, seq: Any, ended_at: float) -> None:
        """A finished engine.Sequence; `ended_at` on perf_counter's clock."""
        n = len(seq.new_ids)
        self.prompt_tokens.inc(len(seq.prompt_ids))
        self.generated_tokens.inc(n)
        self.samples.labels(finish_reason=str(seq.finish_reason)).inc()
        if seq.first_token_at is not None:
            self.ttft.observe(seq.first_token_at - seq.submitted)
            if n > 1:
                self.tpot.observe((ended_at - seq.first_token_at) / (n - 1))

    def render(self, stats: dict[str, int]) -> bytes:
        self.queue_depth.set(stats["queued"])
        self.running_rows.set(stats["active"])
        return generate_latest(self.registry)
