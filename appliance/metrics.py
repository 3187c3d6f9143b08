"""Prometheus metrics of the gateway, in a registry of its own (one per appliance instance)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


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
