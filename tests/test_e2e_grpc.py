"""End to end: real exported models, a real gRPC server on 127.0.0.1:0, a real client channel.

Every answer is compared with the same ONNX files run directly in onnxruntime (with the
sampling contract's noise); the determinism contract, batching, each error status, health,
reflection and graceful shutdown are each shown on the wire.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from serving_fixtures import (
    BROKEN,
    WAIT_S,
    Reference,
    ServerThread,
    SlowManifest,
    array,
    channel,
    export_repository,
    tensor,
)

from vaeserve.proto.v1 import vaeserve_pb2 as pb
from vaeserve.proto.v1 import vaeserve_pb2_grpc as pb_grpc
from vaeserve.server.settings import BatchingSettings, ServerSettings, usable_cores

SERVICE = "vaeserve.v1.VaeService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
T = 30.0  # per-call timeout: a hung server fails the test instead of hanging it


def settings(repository, **batching) -> ServerSettings:
    return ServerSettings(
        repository=repository,
        port=0,
        device="cpu",
        intra_op_threads=1,
        max_stream_chunk_size=4096,
        batching=BatchingSettings(**batching),
    )


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    return export_repository(tmp_path_factory.mktemp("repo"), tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def refs(repository):
    return {
        (name, v): Reference(repository / name / str(v))
        for name, v in (("vae", 1), ("vae", 2), ("concat", 1), ("prior", 1))
    }


@pytest.fixture(scope="module")
def served(repository):
    """The main server: batches of up to 64 rows, waiting 5 ms for company."""
    server = ServerThread(settings(repository, max_batch_size=64, max_queue_delay_ms=5.0))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def replica(repository):
    """A second server with batching off and a one-request queue (queue-full, replicas)."""
    server = ServerThread(
        settings(repository, max_batch_size=1, max_queue_delay_ms=0.0, max_queue_size=1)
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def main_channel(served):
    with channel(served.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(main_channel):
    return pb_grpc.VaeServiceStub(main_channel)


@pytest.fixture(scope="module")
def replica_stub(replica):
    with channel(replica.address) as ch:
        yield pb_grpc.VaeServiceStub(ch)


@pytest.fixture
def loading(repository, tmp_path):
    """A server still loading: its one version's manifest arrives only when fed."""
    slow = SlowManifest(repository / "prior" / "1", tmp_path)
    server = ServerThread(settings(tmp_path), wait_ready=False)
    writer = None
    try:
        with channel(server.address) as ch:
            yield server, ch, slow
            writer = slow.feed_in_background()
    finally:
        writer = writer or slow.feed_in_background()
        server.stop()
        slow.release(writer)


def ref(name: str, version: int = 0) -> pb.ModelRef:
    return pb.ModelRef(name=name, version=version)


def sample(stub, name, n, seed, **fields) -> pb.SampleResponse:
    return stub.Sample(
        pb.SampleRequest(model=ref(name), num_samples=n, seed=seed, **fields), timeout=T
    )


# --- every RPC equals onnxruntime run directly ---


def test_list_models_reports_ready_and_failed_versions(stub):
    states = {
        (m.name, m.version): m for m in stub.ListModels(pb.ListModelsRequest(), timeout=T).models
    }
    assert {k for k, m in states.items() if m.state == pb.MODEL_STATE_READY} == {
        ("vae", 1),
        ("vae", 2),
        ("concat", 1),
        ("prior", 1),
    }
    broken = states[BROKEN]
    assert broken.state == pb.MODEL_STATE_FAILED and "sha256" in broken.reason


def test_model_info_is_the_manifest_plus_provider_and_limits(stub, refs, repository):
    info = stub.GetModelInfo(pb.GetModelInfoRequest(model=ref("vae")), timeout=T)
    m = refs["vae", 2].manifest  # latest = the highest *loaded* version (3 is broken)
    assert (info.model.name, info.model.version, info.model.kind) == ("vae", 2, "vae")
    assert list(info.model.available_versions) == [1, 2]
    assert tuple(info.model.sample_shape) == m.sample_shape and info.model.latent_dim == 2
    assert info.model.likelihood == m.likelihood and info.provider == "CPUExecutionProvider"
    assert {t.name for t in info.model.decoder_inputs} == {"z"}
    assert info.model.manifest_json == (repository / "vae" / "2" / "manifest.json").read_text()
    assert info.limits.max_batch_size == 64 and info.limits.max_samples_per_request == 4096
    cvae = stub.GetModelInfo(pb.GetModelInfoRequest(model=ref("concat")), timeout=T).model
    assert (cvae.conditioning, cvae.num_classes, len(cvae.class_names)) == ("concat", 10, 10)


@pytest.mark.parametrize(
    "name, version, fields, labels",
    [
        pytest.param("vae", 0, {}, None, id="vae-latest"),
        pytest.param("vae", 1, {}, None, id="vae-version-1"),
        pytest.param("concat", 0, {"label": 3}, [3] * 6, id="concat-one-label"),
        pytest.param(
            "concat", 0, {"labels": [0, 1, 2, 9, 9, 4]}, [0, 1, 2, 9, 9, 4], id="concat-labels"
        ),
        pytest.param(
            "prior", 0, {"labels": [5, 0, 7, 7, 1, 2]}, [5, 0, 7, 7, 1, 2], id="prior-labels"
        ),
        pytest.param(
            "prior", 0, {"label": 8, "temperature": 0.25}, [8] * 6, id="prior-temperature"
        ),
        pytest.param(
            "concat", 0, {"label": 2, "output": pb.OUTPUT_KIND_DRAW}, [2] * 6, id="concat-draw"
        ),
        pytest.param(
            "vae",
            0,
            {"output": pb.OUTPUT_KIND_DRAW, "start_index": 1000},
            None,
            id="vae-draw-offset",
        ),
    ],
)
def test_sample_equals_onnxruntime(stub, refs, name, version, fields, labels):
    request = pb.SampleRequest(
        model=ref(name, version), num_samples=6, seed=11, return_latents=True, **fields
    )
    answer = stub.Sample(request, timeout=T)
    served_version = version or max(v for n, v in refs if n == name)
    reference = refs[name, served_version]
    x, z = reference.sample(
        11,
        request.start_index,
        6,
        labels,
        fields.get("temperature", 1.0),
        draw=request.output == pb.OUTPUT_KIND_DRAW,
    )
    np.testing.assert_array_equal(array(answer.latents), z)
    np.testing.assert_array_equal(array(answer.samples), x)
    assert (answer.seed, answer.start_index, answer.model_name) == (11, request.start_index, name)
    assert answer.model_version == served_version
    if labels is not None:
        np.testing.assert_array_equal(array(answer.labels), labels)


def test_a_request_without_a_seed_gets_one_and_it_reproduces(stub):
    first = stub.Sample(pb.SampleRequest(model=ref("vae"), num_samples=3), timeout=T)
    again = sample(stub, "vae", 3, first.seed)
    assert first.samples.data == again.samples.data


def test_compact_sample_encodings(stub, refs):
    x, _ = refs["concat", 1].sample(5, 0, 40, [4] * 40)
    half = sample(stub, "concat", 40, 5, label=4, encoding=pb.SAMPLE_ENCODING_FLOAT16)
    np.testing.assert_array_equal(array(half.samples), x.astype(np.float16))
    q = array(sample(stub, "concat", 40, 5, label=4, encoding=pb.SAMPLE_ENCODING_UINT8).samples)
    assert q.dtype == np.uint8 and q.shape == x.shape
    np.testing.assert_allclose(q / 255.0, x, atol=0.5 / 255 + 1e-6)  # value_range is [0, 1]


def test_encode_decode_and_reconstruct_equal_onnxruntime(stub, refs):
    rng = np.random.default_rng(0)
    x = (rng.random((5, 1, 8, 8)) < 0.4).astype(np.float32)
    labels = [3, 1, 4, 1, 5]
    r = refs["concat", 1]
    encoded = stub.Encode(
        pb.EncodeRequest(model=ref("concat"), x=tensor(x), labels=labels, num_draws=3, seed=8),
        timeout=T,
    )
    q = r.encode(x, labels)
    np.testing.assert_array_equal(array(encoded.mu), q["mu"])
    np.testing.assert_array_equal(array(encoded.logvar), q["logvar"])
    from vaeserve.engine.sampling import ENCODE_STREAM, normal_rows

    eps = normal_rows(8, ENCODE_STREAM, 0, 15, 2).reshape(5, 3, 2)  # row i*k+j
    expected_z = q["mu"][:, None] + np.exp(0.5 * q["logvar"])[:, None] * eps
    np.testing.assert_allclose(array(encoded.z), expected_z, rtol=1e-6, atol=1e-7)
    decoded = stub.Decode(
        pb.DecodeRequest(model=ref("concat"), z=encoded.mu, labels=labels), timeout=T
    )
    np.testing.assert_array_equal(array(decoded.x), r.decode(q["mu"], labels))
    drawn = stub.Decode(
        pb.DecodeRequest(
            model=ref("concat"), z=encoded.mu, labels=labels, output=pb.OUTPUT_KIND_DRAW, seed=2
        ),
        timeout=T,
    )
    np.testing.assert_array_equal(array(drawn.x), r.decode(q["mu"], labels, draw=True, seed=2))
    rebuilt = stub.Reconstruct(
        pb.ReconstructRequest(model=ref("concat"), x=tensor(x), labels=labels), timeout=T
    )
    np.testing.assert_array_equal(array(rebuilt.x), r.decode(q["mu"], labels))


def test_prior_cvae_graphs_take_no_labels(stub, refs):
    x = np.full((2, 1, 8, 8), 0.5, dtype=np.float32)
    r = refs["prior", 1]
    rebuilt = stub.Reconstruct(pb.ReconstructRequest(model=ref("prior"), x=tensor(x)), timeout=T)
    np.testing.assert_array_equal(array(rebuilt.x), r.decode(r.encode(x)["mu"]))


# --- the determinism contract: sample i of seed s is the same whatever the circumstances ---


def test_sample_i_does_not_depend_on_request_size_or_offset(stub):
    whole = array(sample(stub, "concat", 50, 77, label=6).samples)
    for start, n in ((0, 1), (13, 1), (49, 1), (20, 17), (0, 50)):
        part = sample(stub, "concat", n, 77, label=6, start_index=start)
        np.testing.assert_array_equal(array(part.samples), whole[start : start + n])


@pytest.mark.parametrize("chunk_size", [0, 1, 7, 50, 64])
def test_sample_i_does_not_depend_on_stream_chunking(stub, chunk_size):
    whole = sample(stub, "prior", 50, 3, label=2, start_index=5)
    request = pb.SampleStreamRequest(
        chunk_size=chunk_size,
        request=pb.SampleRequest(
            model=ref("prior"), num_samples=50, seed=3, label=2, start_index=5
        ),
    )
    chunks = list(stub.SampleStream(request, timeout=T))
    assert [c.start_index for c in chunks] == list(range(5, 55, chunk_size or 50))
    assert b"".join(c.samples.data for c in chunks) == whole.samples.data


def test_sample_i_does_not_depend_on_batch_mates_or_replica(stub, replica_stub, served):
    alone = {
        seed: sample(stub, "concat", 5, seed, label=seed % 10).samples.data for seed in range(8)
    }
    with ThreadPoolExecutor(16) as pool:  # the same requests among others with other seeds
        crowd = list(
            pool.map(
                lambda s: sample(stub, "concat", 5, s, label=s % 10).samples.data,
                list(range(8)) + list(range(100, 124)),
            )
        )
    assert crowd[:8] == [alone[s] for s in range(8)]
    for seed in range(3):  # batching off, another server
        assert sample(replica_stub, "concat", 5, seed, label=seed % 10).samples.data == alone[seed]


def test_sample_i_does_not_depend_on_the_instance_that_ran_it(stub, repository):
    """Three single-threaded instances share a large request's rows out and may finish its
    runs in any order; the answer is the same bytes as one instance's."""
    server = ServerThread(
        dataclasses.replace(
            settings(repository, max_batch_size=64, max_queue_delay_ms=0.0, instances=3),
            intra_op_threads=0,
        )
    )
    try:
        decoder = server.server.registry.get("concat").decoder
        assert decoder.instances == 3
        with channel(server.address) as ch:
            parallel = pb_grpc.VaeServiceStub(ch)
            for n, seed in ((1000, 1), (64, 2), (7, 3)):
                labels = [i % 10 for i in range(n)]
                expected = sample(stub, "concat", n, seed, labels=labels).samples.data
                got = sample(parallel, "concat", n, seed, labels=labels).samples.data
                assert got == expected, (n, seed)
        assert max(decoder.stats.batch_sizes) <= 64 and decoder.stats.batches >= 16
    finally:
        server.stop()


@pytest.mark.parametrize(
    "intra_op_threads, instances, expected",
    [(1, 0, 1), (3, 0, 3), (0, 0, usable_cores()), (1, 2, 2)],
)
def test_instances_default_to_one_per_onnxruntime_thread(
    repository, intra_op_threads, instances, expected
):
    batching = BatchingSettings(instances=instances)
    server = ServerThread(
        dataclasses.replace(
            settings(repository), intra_op_threads=intra_op_threads, batching=batching
        )
    )
    try:
        model = server.server.registry.get("vae")
        assert model.decoder.instances == model.encoder.instances == expected
    finally:
        server.stop()


def test_concurrent_callers_are_batched_and_each_gets_its_own_rows(stub, refs, served):
    stats = served.server.registry.get("concat").decoder.stats
    merged_before = sum(c for k, c in stats.requests_per_batch.items() if k > 1)
    r = refs["concat", 1]

    def call(i: int):
        n, label = 1 + i % 3, i % 10
        answer = sample(stub, "concat", n, 1000 + i, label=label)
        return i, n, label, array(answer.samples)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, range(96)))
    for i, n, label, x in results:
        np.testing.assert_array_equal(x, r.sample(1000 + i, 0, n, [label] * n)[0])
    merged = sum(c for k, c in stats.requests_per_batch.items() if k > 1) - merged_before
    assert merged > 0, f"no batch held more than one request: {stats.requests_per_batch}"


# --- each error status, reached by a real request ---


def _queue_full(c):
    """Keep the replica's one-request queue busy with a big request, knock until refused."""
    replica_stub = c.replica_stub
    big = replica_stub.Sample.future(
        pb.SampleRequest(model=ref("vae"), num_samples=4096, seed=1), timeout=T
    )
    try:
        for _ in range(500):
            sample(replica_stub, "vae", 1, 2)
            if big.done():
                big = replica_stub.Sample.future(
                    pb.SampleRequest(model=ref("vae"), num_samples=4096, seed=1), timeout=T
                )
    finally:
        big.result()
    pytest.fail("the queue never filled")


def _sample(name="vae", n=2, model=None, **fields):
    request = pb.SampleRequest(model=model or ref(name), num_samples=n, seed=1, **fields)
    return lambda c: c.stub.Sample(request, timeout=T)


def _encode(**x_fields):
    x = {"dtype": pb.FLOAT32, "shape": [2, 1, 8, 8], "data": bytes(512), **x_fields}
    return lambda c: c.stub.Encode(pb.EncodeRequest(model=ref("vae"), x=pb.Tensor(**x)), timeout=T)


def _decode(name, z_shape, labels=()):
    z = tensor(np.zeros(z_shape, np.float32))
    request = pb.DecodeRequest(model=ref(name), z=z, labels=labels)
    return lambda c: c.stub.Decode(request, timeout=T)


def _stream(chunk_size):
    request = pb.SampleRequest(model=ref("vae"), num_samples=10, seed=1)
    stream = pb.SampleStreamRequest(request=request, chunk_size=chunk_size)
    return lambda c: next(c.stub.SampleStream(stream, timeout=T))


def _expired(c):
    """A 1 ms deadline expires in the client, before the server sees the call: what a caller
    gets for it. Deadlines that pass at the server are tested where a queue holds requests:
    test_client.py (per-call deadline) and test_faults.py (expired in the queue)."""
    request = pb.SampleRequest(model=ref("vae"), num_samples=4096)
    return c.stub.Sample(request, timeout=0.001)


def _loading(c):
    request = pb.SampleRequest(model=ref("prior"), num_samples=1, label=1)
    return c.loading_stub().Sample(request, timeout=T)


def _floats(value):
    return np.full(128, value, np.float32).tobytes()


INVALID = grpc.StatusCode.INVALID_ARGUMENT
ERRORS = [
    pytest.param(
        _sample("nope"),
        grpc.StatusCode.NOT_FOUND,
        "model.name 'nope' is not served",
        id="unknown-model",
    ),
    pytest.param(
        _sample(model=ref("vae", 9)),
        grpc.StatusCode.NOT_FOUND,
        "model.version 9 of 'vae' is not loaded",
        id="unknown-version",
    ),
    pytest.param(_sample(""), INVALID, "model.name is empty", id="no-model-name"),
    pytest.param(_sample(n=0), INVALID, "num_samples is 0, expected 1..4096", id="zero-samples"),
    pytest.param(_sample(n=4097), INVALID, "num_samples is 4097", id="too-many-samples"),
    pytest.param(
        _sample("concat", label=10),
        INVALID,
        "label holds class 10, expected classes 0..9",
        id="label-out-of-range",
    ),
    pytest.param(
        _sample("concat", labels=[1, -1]), INVALID, "labels holds class -1", id="negative-label"
    ),
    pytest.param(
        _sample("concat"), INVALID, "labels holds 0 classes, expected 2", id="cvae-without-labels"
    ),
    pytest.param(
        _sample("concat", label=1, labels=[1, 2]),
        INVALID,
        "label and labels are both set",
        id="label-and-labels",
    ),
    pytest.param(_sample(label=1), INVALID, "expected no labels", id="vae-with-label"),
    pytest.param(
        _sample(temperature=-1),
        INVALID,
        "temperature is -1.0, expected a number in 0..1e+06",
        id="negative-temperature",
    ),
    pytest.param(
        _sample(temperature=math.nan), INVALID, "temperature is nan", id="nan-temperature"
    ),
    pytest.param(
        _sample(temperature=3e38), INVALID, "expected a number in 0..1e+06", id="huge-temperature"
    ),
    pytest.param(
        lambda c: c.raw("Sample", b"\xff\xff\xff"),
        INVALID,
        "the request is not a valid vaeserve.v1.SampleRequest message",
        id="not-a-message",
    ),
    pytest.param(
        _sample(output=7),
        INVALID,
        "output is 7, expected one of OUTPUT_KIND_MEAN, OUTPUT_KIND_DRAW",
        id="bad-output",
    ),
    pytest.param(_sample(encoding=9), INVALID, "encoding is 9", id="bad-encoding"),
    pytest.param(_sample(start_index=-5), INVALID, "start_index is -5", id="negative-start"),
    pytest.param(
        _encode(shape=[2, 1, 8, 7]),
        INVALID,
        "x.shape is [2, 1, 8, 7], expected [n, 1, 8, 8]",
        id="x-shape",
    ),
    pytest.param(
        _encode(data=bytes(100)),
        INVALID,
        "x.data holds 100 bytes, expected 512",
        id="x-byte-length",
    ),
    pytest.param(
        _encode(dtype=pb.INT64),
        INVALID,
        "x.dtype is INT64, expected FLOAT32 or FLOAT16",
        id="x-dtype",
    ),
    pytest.param(_encode(data=_floats(np.nan)), INVALID, "x holds NaN or Inf", id="x-nan"),
    pytest.param(
        _encode(data=_floats(2.0)),
        INVALID,
        "expected the model's value_range [0.0, 1.0]",
        id="x-out-of-range",
    ),
    pytest.param(
        _decode("vae", (1, 3)), INVALID, "z.shape is [1, 3], expected [n, 2]", id="z-width"
    ),
    pytest.param(
        _decode("concat", (2, 2), labels=[1]),
        INVALID,
        "labels holds 1 classes, expected 2",
        id="decode-labels",
    ),
    pytest.param(_stream(5000), INVALID, "chunk_size is 5000, expected 1..4096", id="chunk-size"),
    pytest.param(
        _expired, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline", id="deadline-exceeded-in-client"
    ),
    pytest.param(
        _loading, grpc.StatusCode.UNAVAILABLE, "still loading models", id="unavailable-loading"
    ),
    pytest.param(
        _queue_full,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "queued (max_queue_size); retry with backoff",
        id="queue-full",
    ),
]


class Clients:
    """The stubs an error case may use; each server starts only if a case asks for it."""

    def __init__(self, request: pytest.FixtureRequest):
        self._request = request

    @property
    def stub(self):
        return self._request.getfixturevalue("stub")

    def raw(self, rpc: str, payload: bytes):
        """Send ``payload`` as the request's bytes, whatever they are."""
        method = self._request.getfixturevalue("main_channel").unary_unary(f"/{SERVICE}/{rpc}")
        return method(payload, timeout=T)

    @property
    def replica_stub(self):
        return self._request.getfixturevalue("replica_stub")

    def loading_stub(self):
        _, ch, _ = self._request.getfixturevalue("loading")
        return pb_grpc.VaeServiceStub(ch)


@pytest.mark.parametrize("call, code, message", ERRORS)
def test_each_error_status_is_reached_by_a_real_request(request, call, code, message):
    with pytest.raises(grpc.RpcError) as caught:
        call(Clients(request))
    assert caught.value.code() == code, caught.value.details()
    assert message.lower() in caught.value.details().lower()


# --- health, reflection, loading, shutdown ---


def health_of(ch, service: str = "") -> int:
    check = health_pb2_grpc.HealthStub(ch).Check
    return check(health_pb2.HealthCheckRequest(service=service), timeout=T).status


def test_health_and_reflection(served):
    with channel(served.address) as ch:
        assert health_of(ch) == SERVING and health_of(ch, SERVICE) == SERVING
        services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
    assert {
        SERVICE,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services


def test_health_is_not_serving_until_every_model_is_loaded_and_warm(loading):
    server, ch, slow = loading
    assert health_of(ch) == NOT_SERVING and health_of(ch, SERVICE) == NOT_SERVING
    (status,) = pb_grpc.VaeServiceStub(ch).ListModels(pb.ListModelsRequest(), timeout=T).models
    assert (status.name, status.state) == ("prior", pb.MODEL_STATE_LOADING)
    slow.feed()
    server.call(server.server.wait_ready())
    assert health_of(ch) == SERVING and health_of(ch, SERVICE) == SERVING


def _big_stream(stub, n: int):
    """A stream far larger than gRPC's flow-control window: it stays in flight until read."""
    request = pb.SampleRequest(model=ref("vae"), num_samples=n, seed=4)
    return stub.SampleStream(pb.SampleStreamRequest(request=request, chunk_size=4096), timeout=T)


def _finish_stream(first, stream, n, refs):
    chunks = [first, *stream]
    assert sum(c.samples.shape[0] for c in chunks) == n
    last = chunks[-1]
    x, _ = refs["vae", 2].sample(4, last.start_index, last.samples.shape[0])
    np.testing.assert_array_equal(array(last.samples), x)


def test_graceful_shutdown_lets_an_in_flight_call_finish(repository, refs):
    server = ServerThread(settings(repository))
    n = 100_000  # 25 MB of answers
    with channel(server.address) as ch:
        stub = pb_grpc.VaeServiceStub(ch)
        stream = _big_stream(stub, n)
        first = next(stream)  # now surely in flight
        stopping = server.submit(server.server.stop(WAIT_S))
        deadline = time.monotonic() + WAIT_S
        while health_of(ch) != NOT_SERVING and time.monotonic() < deadline:
            time.sleep(0.01)
        assert health_of(ch) == NOT_SERVING
        with pytest.raises(grpc.RpcError) as refused:
            sample(stub, "vae", 1, 1)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in refused.value.details()
        _finish_stream(first, stream, n, refs)
    stopping.result(WAIT_S)
    server.stop()


def test_sigterm_drains_and_exits_0_without_ever_importing_torch(repository, refs):
    from client_fixtures import OutputLines

    code = (
        "import sys; from vaeserve.server.cli import main; rc = main(); "
        "sys.exit(rc or (3 if 'torch' in sys.modules else 0))"
    )
    command = [
        sys.executable,
        "-c",
        code,
        "--repository",
        str(repository),
        "--models",
        "vae",
        "--port",
        "0",
        "--http-port",
        "off",
        "--device",
        "cpu",
        "--grace-period-s",
        "30",
    ]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        output = OutputLines(process)
        port = int(output.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        output.wait_for("health is SERVING")
        n = 60_000
        with channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.VaeServiceStub(ch)
            stream = _big_stream(stub, n)
            first = next(stream)
            process.send_signal(signal.SIGTERM)
            output.wait_for("shutting down")
            assert health_of(ch) == NOT_SERVING
            with pytest.raises(grpc.RpcError) as refused:
                sample(stub, "vae", 1, 1)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            _finish_stream(first, stream, n, refs)
        assert process.wait(WAIT_S) == 0, output.text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(WAIT_S)
