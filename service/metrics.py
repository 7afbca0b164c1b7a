"""Prometheus metrics: one registry per app (so tests can build many apps), fed by `middleware.RequestMetrics`.

Request series carry a `protocol` label: "v2" for the Open Inference Protocol's routes (`/v2`, `/v2/...`,
`service.v2`), "v1" for every other route, so one dashboard compares the two front doors of one engine.

With WORKERS > 1 every worker process keeps its own registry, so a scrape would see one worker at random:
`python -m service` then sets PROMETHEUS_MULTIPROC_DIR (see `service.__main__.worker_metrics`) and /metrics
aggregates all workers through prometheus-client's multiprocess collector instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
V2_PREFIX = "/v2"


def protocol_of(path: str) -> str:
    """The `protocol` label of a request path: "v2" for the Open Inference Protocol's routes, else "v1"."""
    return "v2" if path.startswith(V2_PREFIX) and (len(path) == 3 or path[3] == "/") else "v1"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["endpoint", "model", "protocol"]
        self.requests = Counter(
            "vae_requests", "HTTP requests by route and status.", [*labels, "status"], registry=self.registry
        )
        self.errors = Counter(
            "vae_request_errors", "Responses with status >= 400.", [*labels, "status"], registry=self.registry
        )
        self.latency = Histogram(
            "vae_request_duration_seconds",
            "Time from request to the last response byte.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.samples = Counter(
            "vae_samples_generated",
            "eps rows drawn on the server.",
            ["endpoint", "model"],
            registry=self.registry,
        )
        self.model_loaded = Gauge(
            "vae_model_loaded",
            "1 when the model version is loaded and warmed up, 0 when it failed to load.",
            ["model", "version"],
            multiprocess_mode="min",
            registry=self.registry,
        )
        self.key_requests = Counter(
            "vae_api_key_requests",
            "Requests by API key name (API_KEYS) and status.",
            ["key", "status"],
            registry=self.registry,
        )
        self._children: dict[tuple[str, str, int, str], tuple[Any, Any | None, Any]] = {}
        self._sample_children: dict[tuple[str, str], Any] = {}
        graph = ["model", "version", "graph"]
        self.batch_rows = Histogram(
            "vae_batch_rows", "Rows per onnxruntime run.", graph, buckets=ROW_BUCKETS, registry=self.registry
        )
        self.batch_requests = Histogram(
            "vae_batch_requests",
            "Requests merged per onnxruntime run.",
            graph,
            buckets=ROW_BUCKETS,
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "vae_batch_run_seconds",
            "Duration of one onnxruntime run.",
            graph,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def observe_request(
        self, endpoint: str, model: str, status: int, seconds: float, protocol: str = "v1"
    ) -> None:
        """Count and time one request. The labelled children are cached: `labels()` costs microseconds
        per call, and the label sets are few (routes x loaded models x statuses x protocols)."""
        key = (endpoint, model, status, protocol)
        children = self._children.get(key)
        if children is None:
            code = str(status)
            errors = self.errors.labels(endpoint, model, protocol, code) if status >= 400 else None
            children = (
                self.requests.labels(endpoint, model, protocol, code),
                errors,
                self.latency.labels(endpoint, model, protocol),
            )
            self._children[key] = children
        requests, errors, latency = children
        requests.inc()
        if errors is not None:
            errors.inc()
        latency.observe(seconds)

    def count_key(self, key: str, status: int) -> None:
        """Count one request made with the API key named `key` (the names are few: API_KEYS)."""
        self.key_requests.labels(key, str(status)).inc()

    def count_samples(self, endpoint: str, model: str, rows: int) -> None:
        """Add `rows` eps rows to vae_samples_generated (children cached, as in `observe_request`)."""
        if not rows:
            return
        child = self._sample_children.get((endpoint, model))
        if child is None:
            child = self._sample_children[endpoint, model] = self.samples.labels(endpoint, model)
        child.inc(rows)

    def batch_observer(self, model: str, version: str, graph: str) -> Callable[[int, int, float], None]:
        """The batcher's `on_run(requests_merged, rows, seconds)` hook for one graph."""
        rows_h = self.batch_rows.labels(model, version, graph)
        requests_h = self.batch_requests.labels(model, version, graph)
        seconds_h = self.batch_seconds.labels(model, version, graph)

        def on_run(requests: int, rows: int, seconds: float) -> None:
            requests_h.observe(requests)
            rows_h.observe(rows)
            seconds_h.observe(seconds)

        return on_run

    def exposition(self) -> tuple[bytes, str]:
        """The text format, across all workers when PROMETHEUS_MULTIPROC_DIR is set."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            merged = CollectorRegistry()
            MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
            return generate_latest(merged), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
