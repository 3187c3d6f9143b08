"""SLA metrics in the gateway's real Prometheus registry, and the Grafana dashboard over them:
every PromQL expression in docs/grafana/sovereign-appliance.json names only metrics that a real
scrape of the gateway's registry (after some observations) or an engine node's registry exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from appliance.metrics import GatewayMetrics
from appliance.sla_metrics import slo_result
from engine.server.metrics import EngineMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "sovereign-appliance.json"
NODE_STATS = {"running": 2, "waiting": 5, "kv_cache_usage": 0.42, "preemptions_by_reason": {"priority": 3, "blocks": 1},
              "num_deadline_misses": 2, "tenant_served_tokens": {"acme": 100, "batchco": 900}, "num_preemptions": 4}


def _samples(registry: Any) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(registry).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.fixture()
def metrics() -> GatewayMetrics:
    m = GatewayMetrics()
    sla = m.sla
    # interactive: TTFT 1 s, TPOT 0.2 s
    assert sla.observe("acme", "interactive", 0.3, 0.05, 1.0, "completed", 1.0, 0.2, percentile=99) == "met"
    assert sla.observe("acme", "interactive", 1.0, 0.2, 3.0, "completed", 1.0, 0.2) == "met"  # at the target: met
    assert sla.observe("acme", "interactive", 1.2, 0.05, 2.0, "completed", 1.0, 0.2) == "ttft"
    assert sla.observe("acme", "interactive", 0.3, 0.25, 4.0, "completed", 1.0, 0.2) == "tpot"
    assert sla.observe("acme", "interactive", None, None, 0.5, "failed", 1.0, 0.2) == "failed"
    assert sla.observe("acme", "interactive", 0.1, None, 0.6, "aborted", 1.0, 0.2) == "aborted"
    # batch: no TPOT target, a slow TPOT does not count
    assert sla.observe("batchco", "batch", 20.0, 3.0, 90.0, "completed", 60.0, None, percentile=90) == "met"
    sla.rejected("acme", "interactive", "sla_unattainable")
    sla.rejected("acme", "interactive", "sla_unattainable")
    sla.rejected("batchco", "batch", "appliance_saturated")
    m.set_node_state("node-a", "active")
    sla.watch_nodes(lambda: [("node-a", NODE_STATS), ("node-b", {})])
    return m


def test_attainment_goodput_rejections_and_node_counters(metrics: GatewayMetrics) -> None:
    s = _samples(metrics.registry)
    assert _value(s, "appliance_sla_slo_met_total", tenant="acme", sla_class="interactive") == 2
    for reason in ("ttft", "tpot", "failed", "aborted"):
        assert _value(s, "appliance_sla_slo_missed_total", tenant="acme", sla_class="interactive", reason=reason) == 1
    assert _value(s, "appliance_sla_slo_met_total", tenant="batchco", sla_class="batch") == 1
    assert _value(s, "appliance_sla_slo_missed_total", tenant="batchco", sla_class="batch", reason="ttft") == 0
    assert _value(s, "appliance_sla_ttft_seconds_count", tenant="acme", sla_class="interactive") == 5  # none if failed
    assert _value(s, "appliance_sla_ttft_seconds_bucket", tenant="acme", sla_class="interactive", le="1.0") == 4
    assert _value(s, "appliance_sla_tpot_seconds_count", tenant="acme", sla_class="interactive") == 4
    assert _value(s, "appliance_sla_e2e_seconds_count", tenant="acme", sla_class="interactive") == 6
    assert _value(s, "appliance_sla_e2e_seconds_sum", tenant="acme", sla_class="interactive") == pytest.approx(11.1)
    assert _value(s, "appliance_sla_rejections_total", tenant="acme", sla_class="interactive",
                  code="sla_unattainable") == 2
    assert _value(s, "appliance_sla_rejections_total", tenant="batchco", sla_class="batch",
                  code="appliance_saturated") == 1
    assert _value(s, "appliance_sla_target_seconds", sla_class="interactive", target="tpot") == 0.2
    assert ("appliance_sla_target_seconds", frozenset({("sla_class", "batch"), ("target", "tpot")})) not in s
    assert _value(s, "appliance_sla_objective_ratio", sla_class="interactive") == pytest.approx(0.99)
    assert _value(s, "appliance_node_preemptions_total", node="node-a", reason="priority") == 3
    assert _value(s, "appliance_node_deadline_misses_total", node="node-a") == 2
    assert _value(s, "appliance_node_kv_cache_usage_ratio", node="node-a") == pytest.approx(0.42)
    assert _value(s, "appliance_node_requests_waiting", node="node-a") == 5
    assert not any(labels and ("node", "node-b") in labels for _, labels in s)  # no stats yet: no zeros


def test_bad_observations_refused(metrics: GatewayMetrics) -> None:
    with pytest.raises(ValueError, match=r"SLA outcome: expected one of \['completed', 'failed', 'aborted'\], "
                                         r"found 'rejected'"):
        metrics.sla.observe("acme", "interactive", 0.1, None, 0.2, "rejected", 1.0, None)
    with pytest.raises(ValueError, match="SLA targets: expected seconds > 0"):
        metrics.sla.observe("acme", "interactive", 0.1, None, 0.2, "completed", 0.0, None)
    with pytest.raises(ValueError, match="watch_nodes was already called"):
        metrics.sla.watch_nodes(lambda: [])
    assert slo_result("completed", None, None, 1.0, None) == "ttft"


_KEYWORDS = {"sum", "max", "min", "avg", "count", "by", "without", "on", "ignoring", "group_left", "group_right",
             "and", "or", "unless", "bool", "offset", "le", "inf", "nan", "e"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (label matchers, grouping labels, ranges,
    strings, numbers, functions and keywords removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        rest = text[match.end():].lstrip()
        word = match.group(0)
        if rest.startswith("(") or word.lower() in _KEYWORDS or text[match.start() - 1:match.start()].isdigit():
            continue
        names.add(word)
    return names


def test_metric_names_parser() -> None:
    assert metric_names('histogram_quantile(0.99, sum by (sla_class, le) (rate(a_bucket{tenant=~"$t"}[5m])))') \
        == {"a_bucket"}
    assert metric_names("sum by (x) (increase(m_total[1h])) / (sum by (x) (n_total) + 1e3)") == {"m_total", "n_total"}
    assert metric_names('max by (node, state) (appliance_node_state) == 1') == {"appliance_node_state"}
    assert metric_names("vllm:kv_cache_usage_perc") == {"vllm:kv_cache_usage_perc"}


def test_dashboard_queries_name_only_metrics_that_exist(metrics: GatewayMetrics) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    engine = EngineMetrics(lambda: NODE_STATS, "SmolLM2-135M-Instruct")
    engine.ttft.observe(0.1)
    exposed = {name for name, _ in _samples(metrics.registry)} | {name for name, _ in _samples(engine.registry)}
    panels = dashboard["panels"]
    assert len(panels) >= 10 and len({p["id"] for p in panels}) == len(panels)
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    used: set[str] = set()
    for panel in panels:
        assert panel["title"] and panel["targets"], panel.get("title")
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            assert expr.count("(") == expr.count(")"), (panel["title"], expr)
            for var in re.findall(r"\$\{?(\w+)", expr):
                assert var in variables, (panel["title"], var)
            names = metric_names(expr)
            assert names, (panel["title"], expr)
            missing = names - exposed
            assert not missing, f"panel {panel['title']!r} names metrics no registry exposes: {sorted(missing)}"
            used |= names
    # what the dashboard promises to show is there
    for name in ("appliance_sla_ttft_seconds_bucket", "appliance_sla_target_seconds", "appliance_sla_slo_met_total",
                 "appliance_sla_slo_missed_total", "appliance_sla_rejections_total", "appliance_node_preemptions_total",
                 "appliance_node_kv_cache_usage_ratio", "appliance_node_requests_waiting", "appliance_node_state",
                 "vllm:kv_cache_usage_perc", "sovereign:engine_tenant_served_tokens_total"):
        assert name in used, name
    tenant_var = next(v for v in dashboard["templating"]["list"] if v["name"] == "tenant")
    assert metric_names(tenant_var["definition"].removeprefix("label_values(").split(",")[0]) <= exposed
