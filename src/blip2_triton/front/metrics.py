"""Prometheus metrics of the front, in a registry of their own (several fronts may live in one test process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds; from a health check to a long generation on CPU.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class FrontMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.request_duration = Histogram(
            "blip2_front_request_duration_seconds",
            "Requests through the front, from arrival to the last byte of the answer",
            ("protocol", "route", "model", "code"), buckets=DURATION_BUCKETS, registry=self.registry)
        self.time_to_first_token = Histogram(
            "blip2_front_time_to_first_token_seconds",
            "Streamed OpenAI requests: from arrival to the first generated text sent",
            ("model",), buckets=DURATION_BUCKETS, registry=self.registry)
        self.rejected = Counter(
            "blip2_front_rejected_requests_total",
            "Requests the front refused before Triton saw them", ("protocol", "reason"), registry=self.registry)
        self.in_flight = Gauge(
            "blip2_front_requests_in_flight", "Requests the front is serving", ("protocol",), registry=self.registry)
        self.in_flight_bytes = Gauge(
            "blip2_front_in_flight_request_bytes", "Request bytes in flight towards Triton (max_inflight_bytes)",
            registry=self.registry)
        self.completion_tokens = Counter(
            "blip2_front_completion_tokens_total", "OpenAI routes: completion tokens reported in usage",
            ("model",), registry=self.registry)
