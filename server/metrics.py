"""Prometheus metrics of one server, in a registry of its own (tests run several servers).

Three sources feed it, each through one narrow hook rather than calls spread over the code:
``RequestObserver`` (a gRPC interceptor: every RPC's status code and latency), ``GraphObserver``
(the batcher: queue time, compute time, batch sizes, per-request outcome of each graph) and
``set_model_state`` (the repository: load state of each version). Queue depths are read from
the batchers when scraped. ``graph_statistics`` reads the Open Inference Protocol's
``ModelStatistics`` numbers back out of the same registry, so the two always agree.

Every served call updates several counters and histograms, so those are kept in plain numbers
(``_Family``) and exported by a collector with prometheus_client's own names, labels and
samples: an event is a ``bisect`` and two adds under one lock, where prometheus_client takes a
lock per value and scans the buckets (docs/performance.md, issue 17).
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, metrics, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

__all__ = [
    "MODEL_STATES",
    "GraphKey",
    "GraphObserver",
    "GraphStatistics",
    "ServerMetrics",
    "MetricsEndpoint",
]

logger = logging.getLogger(__name__)

MODEL_STATES = ("loading", "ready", "failed", "unloading")  # as ModelRegistry names them
# Latencies of a served call span ~0.1 ms (batch 1, in-process) to seconds (large answers).
_TIME_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # fmt: skip
_NS = 1_000_000_000
_GRAPH_LABELS = ("model", "version", "graph")


@dataclass(frozen=True)
class GraphKey:
    """One graph of one model version: the unit a batcher serves."""

    model: str
    version: int
    graph: str  # "encoder" | "decoder"

    def labels(self) -> dict[str, str]:
        return {"model": self.model, "version": str(self.version), "graph": self.graph}


@dataclass(frozen=True)
class GraphStatistics:
    """Triton's per-model statistics of one graph, as counts and nanoseconds."""

    success_count: int
    success_ns: int
    fail_count: int
    fail_ns: int
    queue_count: int
    queue_ns: int
    compute_count: int  # batched runs (each request waits for its whole run)
    compute_ns: int
    inference_count: int  # rows computed
    execution_count: int  # batched runs
    last_inference_ms: int


class GraphObserver:
    """The batcher's hook: label lookups done once, so each event is a few adds."""

    def __init__(self, metrics: ServerMetrics, key: GraphKey):
        labels = key.labels()
        self._queue = metrics.queue_seconds.labels(**labels)
        self._compute = metrics.compute_seconds.labels(**labels)
        self._batch = metrics.batch_size.labels(**labels)
        self._ok = metrics.inference_seconds.labels(**labels, outcome="success")
        self._failed = metrics.inference_seconds.labels(**labels, outcome="failure")
        self._last = metrics.last_inference.labels(**labels)

    def on_dequeue(self, queue_s: float) -> None:
        """A request left the queue: for its first batch, or dropped (expired, cancelled)."""
        self._queue.observe(queue_s)

    def on_batch(self, rows: int, compute_s: float) -> None:
        """One batched run of ``rows`` rows took ``compute_s`` on the worker thread."""
        self._batch.observe(rows)
        self._compute.observe(compute_s)

    def on_request(self, total_s: float, ok: bool) -> None:
        """A request got its answer (``ok``) or its error, ``total_s`` after it was submitted."""
        if ok:
            self._ok.observe(total_s)
            self._last.set(time.time())
        else:
            self._failed.observe(total_s)


class _CounterChild:
    __slots__ = ("value", "created", "_lock")

    def __init__(self, lock: threading.Lock):
        self.value = 0.0
        self.created = time.time()
        self._lock = lock

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self.value += amount

    def samples(self) -> list[tuple[str, dict[str, str], float]]:
        out = [("_total", {}, self.value)]
        return out + [("_created", {}, self.created)] if metrics._use_created else out


class _GaugeChild(_CounterChild):
    __slots__ = ()

    def set(self, value: float) -> None:
        self.value = float(value)

    def samples(self) -> list[tuple[str, dict[str, str], float]]:
        return [("", {}, self.value)]


class _HistogramChild:
    __slots__ = ("_bounds", "_labels", "counts", "sum", "created", "_lock")

    def __init__(self, lock: threading.Lock, bounds: list[float], labels: list[dict[str, str]]):
        self._bounds, self._labels, self._lock = bounds, labels, lock
        self.counts = [0] * len(bounds)  # per bucket, not yet cumulative
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        # The first bound >= value, as prometheus_client's linear scan finds it.
        with self._lock:
            self.counts[bisect.bisect_left(self._bounds, value)] += 1
            self.sum += value

    def samples(self) -> list[tuple[str, dict[str, str], float]]:
        with self._lock:
            counts, total = list(self.counts), self.sum
        out, acc = [], 0.0
        for labels, count in zip(self._labels, counts, strict=True):
            acc += count
            out.append(("_bucket", labels, acc))
        out += [("_count", {}, acc), ("_sum", {}, total)]
        return out + [("_created", {}, self.created)] if metrics._use_created else out


class _Family:
    """A labelled metric kept in plain numbers and exported by ``_FastCollector``: the same
    names, labels and samples as prometheus_client's Counter, Gauge and Histogram, without
    their per-call costs (a lock per value, a label tuple built per lookup, a linear bucket
    scan); every served call updates several of these."""

    def __init__(self, kind: str, name: str, doc: str, labelnames: Iterable[str],
                 buckets: Iterable[float] = ()):  # fmt: skip
        self.kind, self.name, self.doc = kind, name, doc
        self.labelnames = tuple(labelnames)
        self._bounds = [*(float(b) for b in buckets), math.inf]
        self._bucket_labels = [{"le": floatToGoString(b)} for b in self._bounds]
        self._children: dict[tuple[str, ...], Any] = {}
        self._lock = threading.Lock()

    def labels(self, *values: Any, **named: Any) -> Any:
        if named:
            values = tuple(named[n] for n in self.labelnames)
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            if len(key) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {key}")
            if self.kind == "histogram":
                child = _HistogramChild(self._lock, self._bounds, self._bucket_labels)
            else:
                child = (_CounterChild if self.kind == "counter" else _GaugeChild)(self._lock)
            child = self._children.setdefault(key, child)
        return child

    def metric(self, with_samples: bool = True) -> Metric:
        metric = Metric(self.name, self.doc, self.kind)
        for key, child in list(self._children.items()) if with_samples else ():
            labels = dict(zip(self.labelnames, key, strict=True))
            for suffix, extra, value in child.samples():
                metric.add_sample(self.name + suffix, {**labels, **extra}, value)
        return metric


class _FastCollector(Collector):
    def __init__(self, families: list[_Family]):
        self._families = families

    def describe(self) -> Iterable[Metric]:
        return [family.metric(with_samples=False) for family in self._families]

    def collect(self) -> Iterable[Metric]:
        return [family.metric() for family in self._families]


class _DepthCollector(Collector):
    """Queue depth per graph, read from the live batchers at scrape time."""

    def __init__(self) -> None:
        self.source: Callable[[], Iterable[tuple[GraphKey, int]]] = lambda: ()

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "vaeserve_queue_depth", "Requests waiting in a graph's batcher queue.",
            labels=_GRAPH_LABELS,
        )  # fmt: skip
        for key, depth in self.source():
            family.add_metric([key.model, str(key.version), key.graph], depth)
        yield family


class ServerMetrics:
    """All of one server's metrics; ``registry`` is what the HTTP endpoint exposes."""

    def __init__(self, max_batch_size: int = 1024):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = _Family(
            "counter", "vaeserve_requests", "RPCs answered, by method, model and status code.",
            ("rpc", "model", "code"),
        )  # fmt: skip
        self.failures = _Family(
            "counter", "vaeserve_request_failures", "RPCs answered with a status other than OK.",
            ("rpc", "model", "code"),
        )  # fmt: skip
        self.latency = _Family(
            "histogram", "vaeserve_request_latency_seconds",
            "Time from receiving an RPC to its status.", ("rpc", "model"), _TIME_BUCKETS,
        )  # fmt: skip
        self.queue_seconds = _Family(
            "histogram", "vaeserve_queue_seconds", "Time a request waited in a batcher queue.",
            _GRAPH_LABELS, _TIME_BUCKETS,
        )  # fmt: skip
        self.compute_seconds = _Family(
            "histogram", "vaeserve_compute_seconds", "Time of one batched onnxruntime run.",
            _GRAPH_LABELS, _TIME_BUCKETS,
        )  # fmt: skip
        self.batch_size = _Family(
            "histogram", "vaeserve_batch_size", "Rows of each executed batch.",
            _GRAPH_LABELS, _size_buckets(max_batch_size),
        )  # fmt: skip
        self.inference_seconds = _Family(
            "histogram", "vaeserve_inference_seconds", "Time from submitting a request to a "
            "batcher to its result, by outcome.", (*_GRAPH_LABELS, "outcome"), _TIME_BUCKETS,
        )  # fmt: skip
        self.last_inference = _Family(
            "gauge", "vaeserve_last_inference_timestamp_seconds",
            "Unix time of a graph's last success.", _GRAPH_LABELS,
        )  # fmt: skip
        r.register(_FastCollector([
            self.requests, self.failures, self.latency, self.queue_seconds, self.compute_seconds,
            self.batch_size, self.inference_seconds, self.last_inference,
        ]))  # fmt: skip
        self.model_state = Gauge(
            "vaeserve_model_state", "1 for the state each model version is in, else 0.",
            ("model", "version", "state"), registry=r,
        )  # fmt: skip
        self._depth = _DepthCollector()
        r.register(self._depth)
        # (rpc, model, code) -> its series: labels() takes a lock and builds a key per call.
        self._series: dict[tuple[str, str, str], tuple[Any, Any, Any]] = {}

    def graph_observer(self, key: GraphKey) -> GraphObserver:
        return GraphObserver(self, key)

    def set_queue_depth_source(self, source: Callable[[], Iterable[tuple[GraphKey, int]]]) -> None:
        """Where scrapes read queue depths from: ``() -> [(graph, queued requests), ...]``."""
        self._depth.source = source

    def set_model_state(self, model: str, version: int, state: str | None) -> None:
        """Record a version's load state; ``None`` once unloaded (its series disappear)."""
        for name in MODEL_STATES:
            labels = (model, str(version), name)
            if state is None:
                try:
                    self.model_state.remove(*labels)
                except KeyError:
                    pass
            else:
                self.model_state.labels(*labels).set(1.0 if name == state else 0.0)

    def observe_request(self, rpc: str, model: str, code: str, latency_s: float) -> None:
        """Count one answered RPC and its latency."""
        series = self._series.get((rpc, model, code))
        if series is None:
            failures = None if code == "OK" else self.failures.labels(rpc, model, code)
            series = (self.requests.labels(rpc, model, code), failures,
                      self.latency.labels(rpc, model))  # fmt: skip
            self._series[(rpc, model, code)] = series
        requests, failures, latency = series
        requests.inc()
        if failures is not None:
            failures.inc()
        latency.observe(latency_s)

    def graph_statistics(self, key: GraphKey) -> GraphStatistics:
        """The ``ModelStatistics`` numbers of one graph, read from this registry."""
        labels = key.labels()

        def value(name: str, **extra: str) -> float:
            return self.registry.get_sample_value(name, {**labels, **extra}) or 0.0

        return GraphStatistics(
            success_count=int(value("vaeserve_inference_seconds_count", outcome="success")),
            success_ns=int(value("vaeserve_inference_seconds_sum", outcome="success") * _NS),
            fail_count=int(value("vaeserve_inference_seconds_count", outcome="failure")),
            fail_ns=int(value("vaeserve_inference_seconds_sum", outcome="failure") * _NS),
            queue_count=int(value("vaeserve_queue_seconds_count")),
            queue_ns=int(value("vaeserve_queue_seconds_sum") * _NS),
            compute_count=int(value("vaeserve_compute_seconds_count")),
            compute_ns=int(value("vaeserve_compute_seconds_sum") * _NS),
            inference_count=int(value("vaeserve_batch_size_sum")),
            execution_count=int(value("vaeserve_batch_size_count")),
            last_inference_ms=int(value("vaeserve_last_inference_timestamp_seconds") * 1000),
        )


def _size_buckets(max_batch_size: int) -> tuple[float, ...]:
    """Powers of two up to the largest batch, so each bucket is an octave of batch sizes."""
    sizes = [1]
    while sizes[-1] < max_batch_size:
        sizes.append(sizes[-1] * 2)
    return tuple(float(s) for s in sizes)


class MetricsEndpoint:
    """The HTTP(S) endpoint Prometheus scrapes: ``GET /metrics`` on its own port and thread."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        certfile: str | None = None,
        keyfile: str | None = None,
        client_cafile: str | None = None,
    ):
        """Start serving; ``port`` 0 picks a free port (see ``self.port``).

        With ``certfile`` and ``keyfile`` the endpoint speaks HTTPS, and with ``client_cafile``
        it also requires a client certificate signed by that CA: the same policy as gRPC.

        Raises:
            RuntimeError: the port cannot be bound.
        """
        try:
            self._httpd, self._thread = start_http_server(
                port, addr=host, registry=registry, certfile=certfile, keyfile=keyfile,
                client_cafile=client_cafile, client_auth_required=client_cafile is not None,
            )  # fmt: skip
        except OSError as exc:
            raise RuntimeError(f"could not bind the metrics port {host}:{port}: {exc}") from None
        self.port = int(self._httpd.server_port)
        scheme = "https" if certfile else "http"
        logger.info("metrics at %s://%s:%d/metrics", scheme, host, self.port)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
