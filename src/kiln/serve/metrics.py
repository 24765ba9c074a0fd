"""Prometheus metrics of one app, in its own registry (several apps in one process do not share counts)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)  # seconds
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # rows per forward pass
CONTENT_TYPE = CONTENT_TYPE_LATEST  # of what render() writes: Prometheus's text format


class ServeMetrics:
    def __init__(self, waiting_rows: Callable[[], int]) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("kiln_requests_total", "HTTP requests by route and status code", ["code", "route"],
                                registry=r)
        self.errors = Counter("kiln_request_errors_total", "requests answered with an error, by error code",
                              ["code"], registry=r)
        self.instances = Counter("kiln_predicted_instances_total", "instances predicted", registry=r)
        self.latency = Histogram("kiln_request_duration_seconds", "time from request to response", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("kiln_batch_size", "rows per model forward pass", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.batch_time = Histogram("kiln_batch_duration_seconds", "time of one forward pass",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.generated = Counter("kiln_generated_tokens_total", "tokens written by POST /v1/completions", registry=r)
        self.decode_rows = Histogram("kiln_decode_batch_size", "texts decoded together in one step",
                                     buckets=BATCH_BUCKETS, registry=r)
        Gauge("kiln_queue_rows", "rows waiting for the model", registry=r).set_function(waiting_rows)
        # (route, status) -> its counter and histogram: looking a labelled child up costs 3 us a request
        # against 1 us for the two updates. Routes and status codes are few, so this stays small.
        self._per_request: dict[tuple[str, int], tuple] = {}

    def request(self, route: str, status: int, seconds: float) -> None:
        children = self._per_request.get((route, status))
        if children is None:
            children = self.requests.labels(str(status), route), self.latency.labels(route)
            self._per_request[(route, status)] = children
        children[0].inc()
        children[1].observe(seconds)

    def error(self, code: str) -> None:
        self.errors.labels(code).inc()

    def batch(self, rows: int, seconds: float) -> None:
        """Called by the batch worker thread after each forward pass (the client library takes its locks)."""
        self.batch_size.observe(rows)
        self.batch_time.observe(seconds)
        self.instances.inc(rows)

    def decode_step(self, rows: int, seconds: float) -> None:
        """Called by the generation worker after each step (one token for each of ``rows`` texts)."""
        if rows:
            self.decode_rows.observe(rows)
            self.generated.inc(rows)

    def render(self) -> bytes:
        return generate_latest(self.registry)
