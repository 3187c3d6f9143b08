"""Prometheus metrics of the gateway, in a registry of its own (one per appliance instance)."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from appliance.sla_metrics import SlaMetrics

NODE_STATES = ("active", "draining", "drained", "down")


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "appliance_requests_total", "Tenant API requests by outcome.", ["tenant", "outcome"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "appliance_prompt_tokens_total", "Prompt tokens served.", ["tenant"], registry=self.registry
        )
        self.completion_tokens = Counter(
            "appliance_completion_tokens_total", "Completion tokens served.", ["tenant"], registry=self.registry
        )
        self.ttft = Histogram(
            "appliance_time_to_first_token_seconds", "Time to first token.", ["sla_class"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30), registry=self.registry,
        )
        self.latency = Histogram(
            "appliance_request_latency_seconds", "End-to-end request latency.", ["sla_class"],
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120), registry=self.registry,
        )
        self.in_flight = Gauge(
            "appliance_requests_in_flight", "Requests being generated now.", registry=self.registry
        )
        self.node_requests = Counter(
            "appliance_node_requests_total", "Requests sent to each engine node, by outcome code "
            "(completed, failed, aborted, retried).", ["node", "code"], registry=self.registry,
        )
        self.node_in_flight = Gauge(
            "appliance_node_requests_in_flight", "This gateway's requests in flight on each engine node.", ["node"],
            registry=self.registry,
        )
        self.node_state = Gauge(
            "appliance_node_state", "1 for the state each engine node is in (active, draining, drained, down).",
            ["node", "state"], registry=self.registry,
        )
        self.audit_free_bytes = Gauge(
            "appliance_audit_free_bytes", "Free bytes on the filesystem of the audit store (data/).",
            registry=self.registry,
        )
        self.loop_db_calls = Counter(
            "appliance_loop_db_calls_total",
            "Database statements run on the event loop while serving (counted only with SOVEREIGN_LOOP_GUARD=1).",
            registry=self.registry,
        )
        self.audit_publish_errors = Counter(
            "appliance_audit_publish_errors_total", "Checkpoint publications to audit.publish_dir that failed.",
            registry=self.registry,
        )
        self.sla = SlaMetrics(self.registry)

    def set_node_state(self, node: str, state: str) -> None:
        for name in NODE_STATES:
            self.node_state.labels(node, name).set(1 if name == state else 0)

    def forget_node(self, node: str) -> None:
        for name in NODE_STATES:
            with contextlib.suppress(KeyError):
                self.node_state.remove(node, name)
        with contextlib.suppress(KeyError):
            self.node_in_flight.remove(node)
