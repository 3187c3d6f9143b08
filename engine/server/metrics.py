"""Prometheus metrics with vLLM-compatible names, in a registry owned by one server (no globals).

Engine-wide gauges and counters are read from AsyncEngine.stats() at scrape time; per-request
latency histograms are observed by the server as streams progress.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


class _EngineStatsCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, Any]], model_name: str) -> None:
        self._stats = stats
        self._labels = {"model_name": model_name}

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=list(self._labels))
        g.add_metric(list(self._labels.values()), value)
        return g

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(name, doc, labels=list(self._labels))
        c.add_metric(list(self._labels.values()), value)
        return c

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        if not s:
            return
        yield self._gauge("vllm:num_requests_running", "Requests in the running batch.", s.get("running", 0))
        yield self._gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", s.get("waiting", 0))
        yield self._gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).",
                          s.get("kv_cache_usage", 0.0))
        yield self._counter("vllm:prefix_cache_hits", "Prompt tokens served from the prefix cache.",
                            s.get("prefix_cache_hits", 0))
        yield self._counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                            s.get("prefix_cache_queries", 0))
        yield self._counter("vllm:prompt_tokens", "Prompt tokens of admitted requests.", s.get("prompt_tokens", 0))
        yield self._counter("vllm:generation_tokens", "Generated tokens.", s.get("generation_tokens", 0))
        yield self._counter("vllm:spec_decode_num_draft_tokens", "Tokens drafted by prompt-lookup speculation.",
                            s.get("spec_draft_tokens", 0))
        yield self._counter("vllm:spec_decode_num_accepted_tokens", "Drafted tokens the model confirmed.",
                            s.get("spec_accepted_tokens", 0))
        yield self._counter("vllm:num_preemptions", "Sequences preempted (recompute).", s.get("num_preemptions", 0))
        names = [*self._labels]
        by_reason = CounterMetricFamily("sovereign:engine_preemptions", "Preemptions by reason.",
                                        labels=[*names, "reason"])
        for reason, n in sorted(s.get("preemptions_by_reason", {}).items()):
            by_reason.add_metric([*self._labels.values(), reason], n)
        yield by_reason
        yield self._counter("sovereign:engine_deadline_misses", "Requests ended at their deadline.",
                            s.get("num_deadline_misses", 0))
        served = CounterMetricFamily("sovereign:engine_tenant_served_tokens",
                                     "Prompt tokens computed plus tokens generated, per tenant (fair share).",
                                     labels=[*names, "tenant"])
        for tenant, n in sorted(s.get("tenant_served_tokens", {}).items()):
            served.add_metric([*self._labels.values(), tenant], n)
        yield served


class EngineMetrics:
    def __init__(self, stats: Callable[[], dict[str, Any]], model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineStatsCollector(stats, model_name))
        labels = ["model_name"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=TTFT_BUCKETS, registry=self.registry).labels(model_name)
        self.tpot = Histogram("vllm:time_per_output_token_seconds", "Time per output token after the first.",
                              labels, buckets=TPOT_BUCKETS, registry=self.registry).labels(model_name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency.", labels,
                             buckets=E2E_BUCKETS, registry=self.registry).labels(model_name)

    def render(self) -> bytes:
        return generate_latest(self.registry)
