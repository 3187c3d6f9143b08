"""SLA attainment metrics per tenant and class, in the gateway's Prometheus registry.

What the gateway measures for every request it served or refused (``observe`` / ``rejected``):

- ``appliance_sla_ttft_seconds``, ``appliance_sla_tpot_seconds``, ``appliance_sla_e2e_seconds``:
  histograms per ``tenant`` and ``sla_class`` (TPOT: time per output token after the first).
- ``appliance_sla_slo_met_total``: requests that met their class's targets: completed, TTFT at
  or under the target and, when the class has one, TPOT at or under its target. Its rate is the
  goodput (requests per second that met their SLO).
- ``appliance_sla_slo_missed_total``: the others, by ``reason`` (``ttft``, ``tpot``, ``failed``,
  ``aborted``; a request that missed both targets counts once, as ``ttft``). Attainment is
  ``met / (met + missed)``.
- ``appliance_sla_rejections_total``: requests refused before they ran, by ``code``
  (``sla_unattainable``, ``appliance_saturated``, ``rate_limit_exceeded``...).
- ``appliance_sla_target_seconds`` (``target`` = ``ttft``/``tpot``) and
  ``appliance_sla_objective_ratio`` (the class's percentile / 100): the promise, so dashboards
  draw the target beside the measurement.

And from the node stats the gateway already polls (``watch_nodes``), read at scrape time:
``appliance_node_preemptions_total`` by ``reason``, ``appliance_node_deadline_misses_total``,
``appliance_node_kv_cache_usage_ratio``, ``appliance_node_requests_waiting`` and
``appliance_node_requests_running``, per ``node``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
OUTCOMES = ("completed", "failed", "aborted")
MISS_REASONS = ("ttft", "tpot", "failed", "aborted")

NodeStats = Callable[[], Iterable[tuple[str, dict[str, Any]]]]


def slo_result(outcome: str, ttft_s: float | None, tpot_s: float | None, ttft_target_s: float,
               tpot_target_s: float | None) -> str:
    """``met`` or the reason it was missed (``ttft``, ``tpot``, ``failed``, ``aborted``)."""
    if outcome != "completed":
        return outcome
    if ttft_s is None or ttft_s > ttft_target_s:
        return "ttft"
    if tpot_target_s is not None and tpot_s is not None and tpot_s > tpot_target_s:
        return "tpot"
    return "met"


class _NodeStatsCollector(Collector):
    """Engine counters of every node, from the stats the fleet's health loop last read."""

    def __init__(self, source: NodeStats) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        preempted = CounterMetricFamily("appliance_node_preemptions", "Sequences preempted on each engine node, "
                                        "by reason (from the node's last stats).", labels=["node", "reason"])
        misses = CounterMetricFamily("appliance_node_deadline_misses", "Requests each engine node ended at "
                                     "their deadline (from the node's last stats).", labels=["node"])
        kv = GaugeMetricFamily("appliance_node_kv_cache_usage_ratio", "Fraction of each engine node's KV-cache "
                               "blocks in use (1 = full).", labels=["node"])
        waiting = GaugeMetricFamily("appliance_node_requests_waiting", "Requests waiting in each engine "
                                    "node's queue.", labels=["node"])
        running = GaugeMetricFamily("appliance_node_requests_running", "Requests in each engine node's "
                                    "running batch.", labels=["node"])
        for node, stats in self.source():
            if not stats:
                continue  # never probed, or down: no numbers rather than zeros
            for reason, count in sorted((stats.get("preemptions_by_reason") or {}).items()):
                preempted.add_metric([node, str(reason)], float(count))
            misses.add_metric([node], float(stats.get("num_deadline_misses", 0)))
            kv.add_metric([node], float(stats.get("kv_cache_usage", 0.0)))
            waiting.add_metric([node], float(stats.get("waiting", 0)))
            running.add_metric([node], float(stats.get("running", 0)))
        yield from (preempted, misses, kv, waiting, running)


class SlaMetrics:
    """The SLA metrics of one gateway, registered in ``registry`` (``GatewayMetrics.registry``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["tenant", "sla_class"]
        self.registry = registry
        self.ttft = Histogram("appliance_sla_ttft_seconds", "Time to first token, per tenant and SLA class.",
                              labels, buckets=TTFT_BUCKETS, registry=registry)
        self.tpot = Histogram("appliance_sla_tpot_seconds", "Time per output token after the first, per tenant "
                              "and SLA class.", labels, buckets=TPOT_BUCKETS, registry=registry)
        self.e2e = Histogram("appliance_sla_e2e_seconds", "End-to-end request latency, per tenant and SLA class.",
                             labels, buckets=E2E_BUCKETS, registry=registry)
        self.met = Counter("appliance_sla_slo_met", "Requests that completed within their class's TTFT and TPOT "
                           "targets (rate = goodput).", labels, registry=registry)
        self.missed = Counter("appliance_sla_slo_missed", "Requests that missed their class's targets, by reason "
                              "(ttft, tpot, failed, aborted).", [*labels, "reason"], registry=registry)
        self.rejections = Counter("appliance_sla_rejections", "Requests refused before they ran, by error code.",
                                  [*labels, "code"], registry=registry)
        self.target = Gauge("appliance_sla_target_seconds", "The SLA class's latency targets (ttft, tpot).",
                            ["sla_class", "target"], registry=registry)
        self.objective = Gauge("appliance_sla_objective_ratio", "Share of requests the class promises to serve "
                               "within its targets (its percentile / 100).", ["sla_class"], registry=registry)
        self._nodes: _NodeStatsCollector | None = None

    def observe(self, tenant: str, sla_class: str, ttft_s: float | None, tpot_s: float | None, e2e_s: float,
                outcome: str, ttft_target_s: float, tpot_target_s: float | None, *,
                percentile: float | None = None) -> str:
        """Record one request that ran, at its end; returns ``met`` or the reason it missed.

        ``outcome``: ``completed``, ``failed`` or ``aborted``; ``ttft_s`` is ``None`` when no token
        came, ``tpot_s`` when fewer than two did. Targets in seconds (``tpot_target_s`` ``None``:
        the class has no TPOT target); ``percentile``: the class's (99 = p99), for the objective.
        """
        if outcome not in OUTCOMES:
            raise ValueError(f"SLA outcome: expected one of {list(OUTCOMES)}, found {outcome!r}")
        if ttft_target_s <= 0 or (tpot_target_s is not None and tpot_target_s <= 0):
            raise ValueError(f"SLA targets: expected seconds > 0, found ttft {ttft_target_s}, tpot {tpot_target_s}")
        if ttft_s is not None:
            self.ttft.labels(tenant, sla_class).observe(ttft_s)
        if tpot_s is not None:
            self.tpot.labels(tenant, sla_class).observe(tpot_s)
        self.e2e.labels(tenant, sla_class).observe(e2e_s)
        self.target.labels(sla_class, "ttft").set(ttft_target_s)
        if tpot_target_s is not None:
            self.target.labels(sla_class, "tpot").set(tpot_target_s)
        if percentile is not None:
            self.objective.labels(sla_class).set(percentile / 100.0)
        result = slo_result(outcome, ttft_s, tpot_s, ttft_target_s, tpot_target_s)
        # every series of the pair exists from its first request on, so met / (met + missed) has both sides
        met = self.met.labels(tenant, sla_class)
        missed = {why: self.missed.labels(tenant, sla_class, why) for why in MISS_REASONS}
        if result == "met":
            met.inc()
        else:
            missed[result].inc()
        return result

    def rejected(self, tenant: str, sla_class: str, code: str) -> None:
        """Record one request refused before it ran (429/503...), by its error code."""
        self.rejections.labels(tenant, sla_class, code or "unknown").inc()

    def watch_nodes(self, source: NodeStats) -> None:
        """Export the engine nodes' preemption and queue numbers from ``source``: ``(node, stats)``
        pairs, the stats each node last reported to the fleet's health loop. Once per registry."""
        if self._nodes is not None:
            raise ValueError("SLA metrics: watch_nodes was already called for this registry")
        self._nodes = _NodeStatsCollector(source)
        self.registry.register(self._nodes)
