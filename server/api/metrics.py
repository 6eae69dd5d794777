"""Prometheus metrics for /metrics: vLLM's metric names under the `n4:` prefix, each with a `model_name` label.

Gauges and engine counters are read from the engine's snapshot when scraped (a custom collector); an engine
process sends that small snapshot with each step's outputs. Request histograms are observed here, in the API
layer, from each engine request's timestamps: arrival (the HTTP handler), first scheduled (carried on its output),
first token, each later token, and the finish. Each app has its own CollectorRegistry (tests build several).
"""
from __future__ import annotations

import time

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from server.engine.engine import AsyncEngine, RequestOutput

PREFIX = "n4:"
FINISH_REASONS = ("stop", "length", "abort")
# No `*_created` series (process-wide switch; vLLM does the same): they double the output and no dashboard reads them.
disable_created_metrics()
CONTENT_TYPE = CONTENT_TYPE_LATEST
# vLLM's buckets, so dashboards built for it read the same.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)


class _EngineCollector:
    """Scheduler and KV-cache state, read at scrape time from the engine's snapshot (live in-thread; as of the
    last step for an engine process)."""

    def __init__(self, engine: AsyncEngine, model_name: str):
        self.engine = engine
        self.model_name = model_name

    def collect(self):
        snap = self.engine.snapshot()
        gauges = [("num_requests_running", "Requests in the engine's running batch.", snap.num_running),
                  ("num_requests_waiting", "Requests waiting to be scheduled (preempted ones included).",
                   snap.num_waiting),
                  ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).", snap.kv_cache_usage)]
        for name, doc, value in gauges:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family
        counters = [("prompt_tokens", "Prompt tokens computed (prefix-cache hits excluded).", snap.prompt_tokens),
                    ("generation_tokens", "Tokens generated.", snap.generation_tokens),
                    ("num_preemptions", "Requests preempted for lack of KV blocks.", snap.num_preemptions),
                    ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                     snap.prefix_cache_queries),
                    ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", snap.prefix_cache_hits)]
        for name, doc, value in counters:
            family = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family


class ServerMetrics:
    def __init__(self, engine: AsyncEngine, model_name: str):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine, model_name))

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(PREFIX + name, doc, ["model_name"], buckets=buckets,
                             registry=self.registry).labels(model_name)

        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first generated token.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive generated tokens.",
                             ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish.", REQUEST_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "Arrival to first scheduled.", REQUEST_BUCKETS)
        self.prefill = histogram("request_prefill_time_seconds", "First scheduled to first token.", REQUEST_BUCKETS)
        self.decode = histogram("request_decode_time_seconds", "First token to last token.", REQUEST_BUCKETS)
        self.inference = histogram("request_inference_time_seconds", "First scheduled to last token.",
                                   REQUEST_BUCKETS)
        self._success = Counter(PREFIX + "request_success", "Requests finished, by finish reason.",
                                ["model_name", "finished_reason"], registry=self.registry)
        for reason in FINISH_REASONS:   # present (at 0) from the start, so rate() works from the first scrape
            self._success.labels(model_name, reason)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self, arrival: float) -> "RequestTimer":
        return RequestTimer(self, arrival)

    def finished(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()


class RequestTimer:
    """One engine request's timestamps (time.monotonic, the clock the engine stamps requests with)."""

    def __init__(self, metrics: ServerMetrics, arrival: float):
        self.metrics = metrics
        self.arrival = arrival
        self.scheduled: float | None = None
        self.first_token: float | None = None
        self.last_token: float | None = None

    def on_output(self, out: RequestOutput) -> None:
        now = time.monotonic()
        if self.scheduled is None:
            self.scheduled = out.first_scheduled_time
        count = len(out.new_token_ids)
        if not count:
            return
        if self.first_token is None:
            self.first_token = now
            self.metrics.ttft.observe(now - self.arrival)
            count -= 1
        if count:
            gap = (now - self.last_token) / count
            for _ in range(count):
                self.metrics.itl.observe(gap)
        self.last_token = now

    def finish(self, reason: str) -> None:
        now = time.monotonic()
        metrics = self.metrics
        metrics.finished(reason)
        metrics.e2e.observe(now - self.arrival)
        if self.scheduled is None:
            return
        metrics.queue.observe(max(self.scheduled - self.arrival, 0.0))
        first = self.first_token if self.first_token is not None else now
        last = self.last_token if self.last_token is not None else now
        metrics.prefill.observe(max(first - self.scheduled, 0.0))
        metrics.decode.observe(max(last - first, 0.0))
        metrics.inference.observe(max(last - self.scheduled, 0.0))
