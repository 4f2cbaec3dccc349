"""Metrics: the registry's content, its HTTP endpoint, and (end to end) a served model's numbers
as scraped and as answered by ModelStatistics."""

from __future__ import annotations

import logging
import urllib.request

import grpc
import pytest
from client_fixtures import tiny_repository
from ops_fixtures import CVAE, DECODER, decoder_inputs, settings, wait_until
from prometheus_client.parser import text_string_to_metric_families
from serving_fixtures import ServerThread, channel

from vaeserve.proto.inference import grpc_service_pb2 as oip_pb
from vaeserve.proto.inference import grpc_service_pb2_grpc as oip_grpc
from vaeserve.proto.v1 import vaeserve_pb2 as vae_pb
from vaeserve.proto.v1 import vaeserve_pb2_grpc as vae_grpc
from vaeserve.server.metrics import GraphKey, MetricsEndpoint, ServerMetrics

KEY = GraphKey("digits", 1, "decoder")


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return answer.read().decode()


def test_graph_events_reach_the_registry_and_the_statistics():
    metrics = ServerMetrics(max_batch_size=8)
    observer = metrics.graph_observer(KEY)
    observer.on_dequeue(0.002)
    observer.on_dequeue(0.004)
    observer.on_batch(rows=5, compute_s=0.010)
    observer.on_request(total_s=0.015, ok=True)
    observer.on_request(total_s=0.020, ok=False)
    stats = metrics.graph_statistics(KEY)
    assert (stats.queue_count, stats.queue_ns) == (2, 6_000_000)
    assert (stats.execution_count, stats.inference_count) == (1, 5)
    assert (stats.compute_count, stats.compute_ns) == (1, 10_000_000)
    assert (stats.success_count, stats.success_ns) == (1, 15_000_000)
    assert (stats.fail_count, stats.fail_ns) == (1, 20_000_000)
    assert stats.last_inference_ms > 0
    labels = KEY.labels()
    get = metrics.registry.get_sample_value
    assert get("vaeserve_batch_size_bucket", {**labels, "le": "4.0"}) == 0
    assert get("vaeserve_batch_size_bucket", {**labels, "le": "8.0"}) == 1


def test_another_graph_is_counted_apart():
    metrics = ServerMetrics()
    metrics.graph_observer(KEY).on_batch(rows=3, compute_s=0.001)
    other = metrics.graph_statistics(GraphKey("digits", 2, "decoder"))
    assert other.execution_count == 0 and other.inference_count == 0


def test_requests_and_failures_by_rpc_model_and_code():
    metrics = ServerMetrics()
    metrics.observe_request("ModelInfer", "digits-decoder", "OK", 0.001)
    metrics.observe_request("ModelInfer", "digits-decoder", "INVALID_ARGUMENT", 0.002)
    get = metrics.registry.get_sample_value
    ok = {"rpc": "ModelInfer", "model": "digits-decoder", "code": "OK"}
    bad = {**ok, "code": "INVALID_ARGUMENT"}
    assert get("vaeserve_requests_total", ok) == 1
    assert get("vaeserve_requests_total", bad) == 1
    assert get("vaeserve_request_failures_total", bad) == 1
    assert get("vaeserve_request_failures_total", ok) is None
    latency = {"rpc": "ModelInfer", "model": "digits-decoder"}
    assert get("vaeserve_request_latency_seconds_count", latency) == 2


def test_the_exposition_is_prometheus_clients_own(monkeypatch):
    """The plain-number families expose what prometheus_client's Counter, Histogram and Gauge
    would for the same events: names, labels, buckets, values (the _created times aside)."""
    import re

    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    from vaeserve.server import metrics as module

    monkeypatch.setattr(module.time, "time", lambda: 1234.5)
    ours = ServerMetrics(max_batch_size=8)
    reference = CollectorRegistry()
    requests = Counter("vaeserve_requests", ours.requests.doc, ("rpc", "model", "code"),
                       registry=reference)  # fmt: skip
    failures = Counter("vaeserve_request_failures", ours.failures.doc,
                       ("rpc", "model", "code"), registry=reference)  # fmt: skip
    latency = Histogram("vaeserve_request_latency_seconds", ours.latency.doc, ("rpc", "model"),
                        buckets=module._TIME_BUCKETS, registry=reference)  # fmt: skip
    labels = ("model", "version", "graph")
    histograms = {
        name: Histogram(name, family.doc, labels, buckets=buckets, registry=reference)
        for name, family, buckets in (
            ("vaeserve_queue_seconds", ours.queue_seconds, module._TIME_BUCKETS),
            ("vaeserve_compute_seconds", ours.compute_seconds, module._TIME_BUCKETS),
            ("vaeserve_batch_size", ours.batch_size, module._size_buckets(8)),
        )
    }
    inference = Histogram("vaeserve_inference_seconds", ours.inference_seconds.doc,
                          (*labels, "outcome"), buckets=module._TIME_BUCKETS,
                          registry=reference)  # fmt: skip
    last = Gauge("vaeserve_last_inference_timestamp_seconds", ours.last_inference.doc, labels,
                 registry=reference)  # fmt: skip
    Gauge("vaeserve_model_state", "1 for the state each model version is in, else 0.",
          ("model", "version", "state"), registry=reference)  # fmt: skip
    Gauge("vaeserve_queue_depth", "Requests waiting in a graph's batcher queue.", labels,
          registry=reference)  # fmt: skip
    observer = ours.graph_observer(KEY)
    key = ("digits", "1", "decoder")
    # Values on bucket bounds, between them, past the last one, zero.
    for value in (0.0, 0.0001, 0.0003, 0.001, 0.5, 29.0, 30.0, 31.0):
        ours.observe_request("Sample", "digits", "OK", value)
        requests.labels("Sample", "digits", "OK").inc()
        latency.labels("Sample", "digits").observe(value)
        observer.on_dequeue(value)
        histograms["vaeserve_queue_seconds"].labels(*key).observe(value)
        observer.on_request(value, ok=value < 1)
        inference.labels(*key, "success" if value < 1 else "failure").observe(value)
        if value < 1:
            last.labels(*key).set(1234.5)
    ours.observe_request("ModelInfer", "_unknown", "NOT_FOUND", 0.002)
    requests.labels("ModelInfer", "_unknown", "NOT_FOUND").inc()
    failures.labels("ModelInfer", "_unknown", "NOT_FOUND").inc()
    latency.labels("ModelInfer", "_unknown").observe(0.002)
    for rows in (1, 3, 8):
        observer.on_batch(rows, 0.004)
        histograms["vaeserve_batch_size"].labels(*key).observe(rows)
        histograms["vaeserve_compute_seconds"].labels(*key).observe(0.004)

    def text(registry) -> str:
        return re.sub(r"(?m)^\S+_created\{.*\n", "", generate_latest(registry).decode())

    assert text(ours.registry) == text(reference)
    assert "_created{" in generate_latest(ours.registry).decode()


def test_model_state_and_queue_depth():
    metrics = ServerMetrics()
    metrics.set_queue_depth_source(lambda: [(KEY, 7)])
    metrics.set_model_state("digits", 1, "loading")
    metrics.set_model_state("digits", 1, "ready")
    get = metrics.registry.get_sample_value
    assert get("vaeserve_queue_depth", KEY.labels()) == 7
    state = {"model": "digits", "version": "1"}
    assert get("vaeserve_model_state", {**state, "state": "ready"}) == 1
    assert get("vaeserve_model_state", {**state, "state": "loading"}) == 0
    metrics.set_model_state("digits", 1, None)
    assert get("vaeserve_model_state", {**state, "state": "ready"}) is None


def test_servers_in_one_process_keep_their_own_registries():
    first, second = ServerMetrics(), ServerMetrics()
    first.observe_request("Sample", "digits", "OK", 0.001)
    labels = {"rpc": "Sample", "model": "digits", "code": "OK"}
    assert first.registry.get_sample_value("vaeserve_requests_total", labels) == 1
    assert second.registry.get_sample_value("vaeserve_requests_total", labels) is None


def test_endpoint_serves_the_registry_over_http():
    metrics = ServerMetrics()
    metrics.observe_request("Sample", "digits", "OK", 0.001)
    endpoint = MetricsEndpoint(metrics.registry, "127.0.0.1", 0)
    try:
        samples = _samples(_scrape(endpoint.port))
    finally:
        endpoint.close()
    labels = frozenset({"rpc": "Sample", "model": "digits", "code": "OK"}.items())
    assert samples[("vaeserve_requests_total", labels)] == 1


# --- end to end: a served model's numbers, scraped and as ModelStatistics ---

T = 30.0


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    server = ServerThread(settings(tiny_repository(tmp_path_factory), metrics_port=0))
    yield server
    server.stop()


def _traffic(address: str) -> None:
    """3 good decoder inferences, 1 malformed, 1 unknown model; 2 typed Sample calls."""
    with channel(address) as ch:
        oip = oip_grpc.GRPCInferenceServiceStub(ch)
        z, y = decoder_inputs(5)
        for rows in (5, 3, 1):
            request = oip_pb.ModelInferRequest(model_name=DECODER)
            request.inputs.add(name="z", datatype="FP32", shape=[rows, 2])
            request.inputs.add(name="y", datatype="INT64", shape=[rows])
            request.raw_input_contents.extend([z[:rows].tobytes(), y[:rows].tobytes()])
            oip.ModelInfer(request, timeout=T)
        bad = oip_pb.ModelInferRequest(model_name=DECODER)
        bad.inputs.add(name="z", datatype="FP32", shape=[1, 2])
        with pytest.raises(grpc.RpcError):
            oip.ModelInfer(bad, timeout=T)
        with pytest.raises(grpc.RpcError):
            oip.ModelMetadata(oip_pb.ModelMetadataRequest(name="made-up-name"), timeout=T)
        typed = vae_grpc.VaeServiceStub(ch)
        for _ in range(2):
            typed.Sample(vae_pb.SampleRequest(model=vae_pb.ModelRef(name=CVAE), num_samples=4,
                                              label=1, seed=5), timeout=T)  # fmt: skip


def _scrape_when(port: int, settled) -> dict:
    """Scrape until ``settled(samples)``: the server counts (and logs) a call just after
    answering it, on its own thread."""

    def scrape() -> dict | None:
        samples = _samples(_scrape(port))
        return samples if settled(samples) else None

    return wait_until(scrape, "the last call to be counted")


def test_scraped_metrics_count_what_was_served(served, caplog):
    sample_ok = ("vaeserve_requests_total", frozenset({"rpc": "Sample", "model": CVAE,
                                                       "code": "OK"}.items()))  # fmt: skip
    with caplog.at_level(logging.INFO, logger="vaeserve.server.observer"):
        _traffic(served.address)
        samples = _scrape_when(served.server.metrics_port, lambda s: s.get(sample_ok) == 2)

    def value(name: str, **labels: str) -> float:
        return samples.get((name, frozenset(labels.items())), 0.0)

    infer = {"rpc": "ModelInfer", "model": DECODER}
    assert value("vaeserve_requests_total", **infer, code="OK") == 3
    assert value("vaeserve_requests_total", **infer, code="INVALID_ARGUMENT") == 1
    assert value("vaeserve_request_failures_total", **infer, code="INVALID_ARGUMENT") == 1
    assert value("vaeserve_request_failures_total", rpc="ModelMetadata", model="_unknown",
                 code="NOT_FOUND") == 1  # fmt: skip
    assert value("vaeserve_requests_total", rpc="Sample", model=CVAE, code="OK") == 2
    assert value("vaeserve_request_latency_seconds_count", **infer) == 4
    graph = {"model": CVAE, "version": "1", "graph": "decoder"}
    assert value("vaeserve_batch_size_sum", **graph) == 5 + 3 + 1 + 2 * 4
    assert value("vaeserve_queue_seconds_count", **graph) == 5  # 3 OIP + 2 Sample requests
    assert value("vaeserve_compute_seconds_count", **graph) >= 1
    assert value("vaeserve_queue_depth", **graph) == 0
    assert value("vaeserve_model_state", model=CVAE, version="1", state="ready") == 1
    # one log line per failed request, with its fields
    failed = [r for r in caplog.records if getattr(r, "event", "") == "rpc_failed"]
    assert sorted(r.code for r in failed) == ["INVALID_ARGUMENT", "NOT_FOUND"]


def test_model_statistics_agree_with_the_metrics(served):
    with channel(served.address) as ch:
        oip = oip_grpc.GRPCInferenceServiceStub(ch)
        answer = oip.ModelStatistics(oip_pb.ModelStatisticsRequest(name=DECODER), timeout=T)
    samples = _samples(_scrape(served.server.metrics_port))
    graph = frozenset({"model": CVAE, "version": "1", "graph": "decoder"}.items())
    success = graph | {("outcome", "success")}
    (stats,) = answer.model_stats
    assert stats.inference_count == samples[("vaeserve_batch_size_sum", graph)]
    assert stats.execution_count == samples[("vaeserve_batch_size_count", graph)]
    inference = stats.inference_stats
    assert inference.success.count == samples[("vaeserve_inference_seconds_count", success)]
    assert inference.queue.count == samples[("vaeserve_queue_seconds_count", graph)]
    assert inference.compute_infer.count == samples[("vaeserve_compute_seconds_count", graph)]
    assert inference.queue.ns == pytest.approx(
        samples[("vaeserve_queue_seconds_sum", graph)] * 1e9, abs=1e3
    )
    assert stats.last_inference > 0
