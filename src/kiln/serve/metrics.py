"""Prometheus counters and histograms in the text exposition format (no client library needed)."""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)  # seconds
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # rows per forward pass


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    esc = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for _, v in pairs)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(pairs, esc, strict=True)) + "}"


class Counter:
    def __init__(self, name: str, help: str) -> None:
        self.name, self.help = name, help
        self.values: dict[tuple, float] = defaultdict(float)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self.values[tuple(sorted(labels.items()))] += amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        lines += [f"{self.name}{_labels(k)} {v:g}" for k, v in sorted(self.values.items())]
        return lines


class Gauge:
    def __init__(self, name: str, help: str, read) -> None:
        self.name, self.help, self.read = name, help, read

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge", f"{self.name} {self.read():g}"]


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help, buckets
        self.series: dict[tuple, list] = {}  # labels -> [bucket counts..., sum, count]

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        s = self.series.setdefault(key, [0] * len(self.buckets) + [0.0, 0])
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.buckets):
            s[i] += 1
        s[-2] += value
        s[-1] += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key, s in sorted(self.series.items()):
            cumulative = 0
            for bound, n in zip(self.buckets, s, strict=False):
                cumulative += n
                lines.append(f"{self.name}_bucket{_labels(key + (('le', f'{bound:g}'),))} {cumulative}")
            lines.append(f"{self.name}_bucket{_labels(key + (('le', '+Inf'),))} {s[-1]}")
            lines.append(f"{self.name}_sum{_labels(key)} {s[-2]:.6f}")
            lines.append(f"{self.name}_count{_labels(key)} {s[-1]}")
        return lines


class ServeMetrics:
    def __init__(self, waiting_rows) -> None:
        self._lock = threading.Lock()  # batches are observed from the worker thread
        self.requests = Counter("kiln_requests_total", "HTTP requests by route and status code")
        self.errors = Counter("kiln_request_errors_total", "requests answered with an error, by error code")
        self.instances = Counter("kiln_predicted_instances_total", "instances predicted")
        self.latency = Histogram("kiln_request_duration_seconds", "time from request to response", LATENCY_BUCKETS)
        self.batch_size = Histogram("kiln_batch_size", "rows per model forward pass", BATCH_BUCKETS)
        self.batch_time = Histogram("kiln_batch_duration_seconds", "time of one forward pass", LATENCY_BUCKETS)
        self.queue = Gauge("kiln_queue_rows", "rows waiting for the model", waiting_rows)

    def request(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests.inc(route=route, code=str(status))
            self.latency.observe(seconds, route=route)

    def error(self, code: str) -> None:
        with self._lock:
            self.errors.inc(code=code)

    def batch(self, rows: int, seconds: float) -> None:
        with self._lock:
            self.batch_size.observe(rows)
            self.batch_time.observe(seconds)
            self.instances.inc(rows)

    def render(self) -> str:
        with self._lock:
            parts = [self.requests, self.errors, self.instances, self.latency, self.batch_size, self.batch_time,
                     self.queue]
            return "\n".join(line for m in parts for line in m.render()) + "\n"
