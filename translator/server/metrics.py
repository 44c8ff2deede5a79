"""The service's Prometheus metrics (prometheus-client), one registry per app.

With `PROMETHEUS_MULTIPROC_DIR` set (for `translator serve --workers N`), every worker writes
its samples there and `/metrics` reports all workers together (prometheus-client's multiprocess
mode): counters and histograms are summed, the queue depth is summed over live workers and
`translator_model_ready` is 1 only when every live worker is ready. The directory must exist;
`serve` empties it of an earlier run's samples.
"""

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    multiprocess,
)
from prometheus_client.registry import Collector

# The content type /metrics has always answered with: the text exposition format 0.0.4, which
# `generate_latest` writes (newer prometheus-client releases name a later version by default).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def multiprocess_dir() -> str | None:
    """Where prometheus-client's multiprocess mode keeps its files, or None when it is off."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")


class Metrics:
    """The service's counters, histograms and gauges, in their own `CollectorRegistry` (so that
    several apps in one process do not collide), rendered in the text exposition format."""

    LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
    SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
    METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "translator_http_requests",
            "HTTP requests by route, method and status.",
            ("route", "method", "status"),
            registry=registry,
        )
        self.latency = Histogram(
            "translator_http_request_duration_seconds",
            "Request latency by route.",
            ("route",),
            buckets=self.LATENCY,
            registry=registry,
        )
        self.batch_texts = Histogram(
            "translator_batch_texts",
            "Texts per model call (after micro-batching).",
            buckets=self.SIZES,
            registry=registry,
        )
        self.batch_requests = Histogram(
            "translator_batch_requests",
            "Requests merged into one model call.",
            buckets=self.SIZES,
            registry=registry,
        )
        self.model_seconds = Histogram(
            "translator_model_call_seconds",
            "Duration of model calls.",
            buckets=self.LATENCY,
            registry=registry,
        )
        self.model_errors = Counter(
            "translator_model_errors", "Model calls that raised.", registry=registry
        )
        self.rejected_overload = Counter(
            "translator_rejected_overload", "Requests refused: queue full.", registry=registry
        )
        self.rejected_budget = Counter(
            "translator_rejected_budget",
            "Requests refused (413): over a cost or alignment limit, by limit.",
            ("limit",),
            registry=registry,
        )
        self.deadline_exceeded = Counter(
            "translator_deadline_exceeded",
            "Requests answered 504: their deadline passed before their work was done.",
            registry=registry,
        )
        self.abandoned = Counter(
            "translator_abandoned",
            "Requests whose client left while their work was queued (dropped, not run).",
            registry=registry,
        )
        self.version_load_failed = Gauge(
            "translator_model_version_load_failed",
            "1 for each model version that failed to load (an older one is served instead).",
            ("version",),
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.queue_depth = Gauge(
            "translator_queue_depth",
            "Requests waiting for the model.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.model_ready = Gauge(
            "translator_model_ready",
            "1 when the model is loaded and warmed up.",
            registry=registry,
            multiprocess_mode="livemin",
        )
        ProcessCollector(registry=registry)  # process_resident_memory_bytes and friends

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        method = method if method in self.METHODS else "other"  # clients choose methods
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_batch(self, texts: int, requests: int, seconds: float) -> None:
        self.batch_texts.observe(texts)
        self.batch_requests.observe(requests)
        self.model_seconds.observe(seconds)

    def render(self) -> bytes:
        """Every metric in the text exposition format (of every worker in multiprocess mode)."""
        registry = self.registry
        if multiprocess_dir():
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            ProcessCollector(registry=registry)  # this worker's memory, as before
        return generate_latest(_WithoutCreated(registry))

    def close(self) -> None:
        """Drops this process's live gauges (multiprocess mode) when its app stops."""
        if multiprocess_dir():
            multiprocess.mark_process_dead(os.getpid())


class _WithoutCreated(Collector):
    """A registry's metrics without the `*_created` samples (creation timestamps), which the
    service never exposed: `prometheus_client.disable_created_metrics()` would do the same for
    every registry of the process."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def collect(self):
        for family in self.registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family
