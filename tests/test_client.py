"""VaeClient: retries, tensors on the wire, and every call against a real server on port 0."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from client_fixtures import Hangup, ServerProcess, free_port, serve
from serving_fixtures import ServerThread

from vaeserve.client import RetryPolicy, VaeClient
from vaeserve.client.retry import call_with_retry
from vaeserve.client.tensors import Outgoing, request_serializer
from vaeserve.errors import InvalidRequest, ModelNotFound, VaeServeError, error_for_status
from vaeserve.proto.v1 import vaeserve_pb2 as pb
from vaeserve.server.settings import BatchingSettings, ServerSettings
from vaeserve.tensors import from_array, to_array


class _StatusError(grpc.RpcError):
    """What a failed call raises, with just the parts the retry logic looks at."""

    def __init__(self, code: grpc.StatusCode):
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return f"test {self._code.name}"


def _flaky(failures: list[grpc.StatusCode]):
    calls = []

    def attempt(timeout: float) -> str:
        calls.append(timeout)
        if len(calls) <= len(failures):
            raise _StatusError(failures[len(calls) - 1])
        return "ok"

    return attempt, calls


FAST = RetryPolicy(initial_backoff_s=0.001, max_backoff_s=0.002, deadline_s=5.0)


def test_backoff_grows_exponentially_with_full_jitter():
    policy = RetryPolicy(initial_backoff_s=0.1, multiplier=2.0, max_backoff_s=1.0)
    rng = random.Random(0)
    for retry, cap in [(0, 0.1), (1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (10, 1.0)]:
        waits = [policy.backoff_s(retry, rng) for _ in range(200)]
        assert 0.0 <= min(waits) and max(waits) <= cap
        assert max(waits) > 0.8 * cap, "jitter should spread over the whole interval"


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED], ids=str
)
def test_retryable_codes_are_retried_until_success(code):
    attempt, calls = _flaky([code, code, code])
    assert call_with_retry(attempt, FAST, timeout_s=2.0) == "ok"
    assert len(calls) == 4
    assert all(0 < t <= 2.0 for t in calls), "each attempt gets the per-call deadline"


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.CANCELLED,
    ],
    ids=str,
)
def test_other_codes_fail_fast(code):
    attempt, calls = _flaky([code])
    with pytest.raises(VaeServeError) as info:
        call_with_retry(attempt, FAST, timeout_s=None)
    assert info.value.code == code
    assert info.value.status == code.name
    assert type(info.value) is type(error_for_status(code.name, ""))
    assert len(calls) == 1


def test_retries_stop_at_max_attempts_and_at_the_overall_deadline():
    attempt, calls = _flaky([grpc.StatusCode.UNAVAILABLE] * 100)
    with pytest.raises(VaeServeError):
        call_with_retry(attempt, RetryPolicy(max_attempts=3, initial_backoff_s=0.001), None)
    assert len(calls) == 3

    policy = RetryPolicy(max_attempts=None, initial_backoff_s=0.01, deadline_s=0.2)
    attempt, calls = _flaky([grpc.StatusCode.UNAVAILABLE] * 10_000)
    with pytest.raises(VaeServeError):
        call_with_retry(attempt, policy, timeout_s=10.0)
    assert 2 <= len(calls) < 10_000
    assert all(t <= 0.2 for t in calls), "no attempt may outlive the overall deadline"


@pytest.mark.parametrize(
    "kwargs",
    [{"max_attempts": 0}, {"initial_backoff_s": 0}, {"deadline_s": -1}, {"multiplier": 0.5}],
)
def test_retry_policy_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        RetryPolicy(**kwargs)


@pytest.mark.parametrize("dtype", ["float32", "float16", "int64", "uint8"])
def test_tensors_round_trip_little_endian(dtype):
    array = (np.arange(24).reshape(2, 3, 4) % 7).astype(dtype)
    tensor = from_array(array)
    assert list(tensor.shape) == [2, 3, 4]
    assert tensor.data == array.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    np.testing.assert_array_equal(to_array(tensor), array)
    big_endian = array.astype(np.dtype(dtype).newbyteorder(">"))
    assert from_array(big_endian).data == tensor.data


def test_tensors_reject_unknown_dtypes_and_short_data():
    with pytest.raises(ValueError, match="float64 is not supported"):
        from_array(np.zeros(3))
    tensor = from_array(np.zeros((2, 3), np.float32))
    tensor.data = tensor.data[:-1]
    with pytest.raises(ValueError, match="expected 24"):
        to_array(tensor)


@pytest.mark.parametrize("dtype", ["float32", ">f4", "float16", "uint8"])
def test_outgoing_requests_serialize_as_protobuf_would_with_the_tensor_set(dtype):
    x = (np.arange(24).reshape(3, 8) % 5).astype(dtype)[:, ::2]  # not contiguous either
    message = pb.EncodeRequest(model=pb.ModelRef(name="m"), labels=[1, 2, 3], num_draws=2)
    wire = request_serializer(pb.EncodeRequest)(Outgoing(message, {"x": x}))
    expected = pb.EncodeRequest()
    expected.CopyFrom(message)
    expected.x.CopyFrom(from_array(x))
    assert pb.EncodeRequest.FromString(wire) == expected
    plain = pb.EncodeRequest(model=pb.ModelRef(name="m"))
    assert request_serializer(pb.EncodeRequest)(plain) == plain.SerializeToString()


def test_outgoing_requests_refuse_unknown_dtypes_before_sending():
    with pytest.raises(ValueError, match="float64 is not supported"):
        Outgoing(pb.DecodeRequest(), {"z": np.zeros((2, 3))})


def test_client_needs_an_address():
    with pytest.raises(ValueError, match="addresses"):
        VaeClient(" , ")


def test_a_served_job_never_imports_onnxruntime():
    # torch is test_import_boundaries.py's; onnxruntime is only for --local (serve extra).
    code = (
        "import sys, vaeserve.client, vaeserve.client.generate, vaeserve.client.job\n"
        "import vaeserve.client.shards, vaeserve.client.sources\n"
        "print('onnxruntime' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- against a real server --------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    yield from serve(tmp_path_factory)


@pytest.fixture
def client(served):
    with VaeClient(served.address, retry=FAST) as c:
        yield c


def test_model_info_describes_the_manifest(client, served):
    info = client.model_info(served.cvae)
    assert (info.name, info.version, info.kind) == (served.cvae, 1, "cvae")
    assert info.num_classes == 10 and len(info.class_names) == 10
    assert info.sample_shape == (1, 8, 8) and info.latent_dim == 2
    assert info.manifest["decoder"]["sha256"]
    assert info.max_samples_per_request > 0 and info.provider


def test_samples_depend_only_on_seed_and_index(client, served):
    whole = client.sample(served.cvae, 10, labels=range(10), seed=7, return_latents=True)
    assert whole.samples.shape == (10, 1, 8, 8) and whole.samples.dtype == np.float32
    assert whole.latents.shape == (10, 2) and whole.seed == 7
    np.testing.assert_array_equal(whole.labels, np.arange(10))
    tail = client.sample(served.cvae, 4, labels=range(6, 10), seed=7, start_index=6)
    assert tail.samples.tobytes() == whole.samples[6:].tobytes()
    chunks = list(client.sample_stream(served.cvae, 10, labels=range(10), seed=7, chunk_size=3))
    assert [len(c.samples) for c in chunks] == [3, 3, 3, 1]
    assert [c.start_index for c in chunks] == [0, 3, 6, 9]
    assert np.concatenate([c.samples for c in chunks]).tobytes() == whole.samples.tobytes()


def test_sample_encodings_and_server_chosen_seed(client, served):
    a = client.sample(served.cvae, 5, label=3, encoding="uint8")
    assert a.samples.dtype == np.uint8 and a.seed > 0
    b = client.sample(served.cvae, 5, label=3, encoding="float16", seed=a.seed)
    assert b.samples.dtype == np.float16
    np.testing.assert_allclose(b.samples.astype(np.float32) * 255, a.samples, atol=1.0)
    with pytest.raises(ValueError, match="encoding"):
        client.sample(served.cvae, 1, label=0, encoding="int8")


def test_encode_decode_reconstruct(client, served):
    x = client.sample(served.cvae, 6, labels=range(6), seed=1).samples
    enc = client.encode(served.cvae, x, labels=range(6), num_draws=3, seed=2)
    assert enc.mu.shape == enc.logvar.shape == (6, 2) and enc.z.shape == (6, 3, 2)
    dec = client.decode(served.cvae, enc.mu, labels=range(6))
    assert dec.x.shape == (6, 1, 8, 8)
    rec = client.reconstruct(served.cvae, x, labels=range(6))
    np.testing.assert_allclose(rec, dec.x, atol=1e-6)


def test_not_found_fails_fast_without_retries(client, caplog):
    with caplog.at_level(logging.WARNING, logger="vaeserve.client.retry"):
        with pytest.raises(VaeServeError) as info:
            client.model_info("no-such-model")
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert isinstance(info.value, ModelNotFound) and isinstance(info.value, LookupError)
    assert "no-such-model" in str(info.value)
    assert not caplog.records


def test_invalid_argument_fails_fast(client, served):
    with pytest.raises(VaeServeError) as info:
        client.sample(served.cvae, 2, label=99, seed=1)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(info.value, InvalidRequest)
    assert "label holds class 99, expected classes 0..9" in str(info.value)


def test_unreachable_server_is_retried_then_reported(caplog):
    policy = RetryPolicy(max_attempts=None, initial_backoff_s=0.02, deadline_s=0.5)
    with VaeClient(f"127.0.0.1:{free_port()}", retry=policy) as c:
        with caplog.at_level(logging.WARNING, logger="vaeserve.client.retry"):
            with pytest.raises(VaeServeError) as info:
                c.model_info("anything")
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert len(caplog.records) >= 2, "UNAVAILABLE is retried"


def test_round_robin_tries_a_dead_address_and_skips_it(served, caplog):
    dead = Hangup()
    try:
        with VaeClient([dead.address, served.address], retry=FAST) as c:
            with caplog.at_level(logging.WARNING, logger="vaeserve.client.retry"):
                results = [c.sample(served.cvae, 2, label=1, seed=5).samples for _ in range(4)]
    finally:
        dead.close()
    assert all(r.tobytes() == results[0].tobytes() for r in results)
    assert dead.accepted >= 1, "the dead address was never dialled"
    assert caplog.records, "calls that met the dead address were retried on the live one"


def test_per_call_deadline_reaches_the_server(served):
    """The deadline travels with the call: on a server whose batches wait 3 s for company, a
    0.5 s deadline ends the call at the server (its queue drops the request uncomputed), not
    after the client's default deadline, nor at once inside the client."""
    holding = BatchingSettings(max_queue_delay_ms=3_000, queue_delay_policy="always")
    settings = ServerSettings(
        repository=served.repository, port=0, device="cpu", intra_op_threads=1, batching=holding
    )
    server = ServerThread(settings)
    try:
        decoder = server.server.registry.get(served.vae).decoder
        with VaeClient(server.address, retry=RetryPolicy(max_attempts=1)) as c:
            start = time.perf_counter()
            with pytest.raises(VaeServeError) as info:
                c.sample(served.vae, 4, seed=5, timeout_s=0.5)
            took = time.perf_counter() - start
        rows_computed = decoder.stats.rows
    finally:
        server.stop()
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.5 <= took < 5.0  # the deadline, not an instant client-side expiry
    assert rows_computed == 0  # it waited in the server's queue and was dropped there


def test_a_stream_broken_by_a_server_crash_resumes_where_it_stopped(served, caplog):
    with VaeClient(served.address) as c:
        expected = np.concatenate(
            [r.samples for r in c.sample_stream(served.vae, 16_384, seed=3, chunk_size=4096)]
        )
    server = ServerProcess(served.repository)
    policy = RetryPolicy(max_attempts=None, max_backoff_s=0.5, deadline_s=60.0)
    try:
        with VaeClient(f"127.0.0.1:{server.port}", retry=policy) as c:
            # Chunks of 16 samples: far more bytes than the connection buffers, so the server
            # dies with most of the stream unsent.
            stream = c.sample_stream(served.vae, 16_384, seed=3, chunk_size=16)
            chunks = [next(stream) for _ in range(4)]
            server.kill()
            server = ServerProcess(served.repository, port=server.port)
            with caplog.at_level(logging.WARNING, logger="vaeserve.client.retry"):
                chunks += list(stream)
    finally:
        server.kill()
    assert any("SampleStream failed with UNAVAILABLE" in r.message for r in caplog.records)
    assert [c.start_index for c in chunks] == list(range(0, 16_384, 16))
    assert np.concatenate([c.samples for c in chunks]).tobytes() == expected.tobytes()


@contextlib.contextmanager
def _server_with(settings, **options) -> Iterator[int]:
    """create_server(settings, **options) on a loop thread; yields the port.

    serving_fixtures.ServerThread passes no interceptors or credentials; hence this one.
    """
    from vaeserve.server.app import create_server

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="vaeserve-test-tls-loop")
    thread.start()

    def call(coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(60)

    async def start():
        server, port = await create_server(settings, **options)
        await server.start()
        await server.wait_ready()
        return server, port

    try:
        server, port = call(start())
        try:
            yield port
        finally:
            call(server.stop(0))
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(60)
        loop.close()


def test_mutual_tls_and_bearer_token(served, tmp_path):
    from tls_certs import make_certs

    from vaeserve.server.security import BearerTokenInterceptor, server_credentials
    from vaeserve.server.settings import ServerSettings

    certs = make_certs(tmp_path / "certs")
    settings = ServerSettings(
        repository=served.repository, models=(served.vae,), port=0, device="cpu"
    )
    credentials = server_credentials(certs.server_cert, certs.server_key, certs.ca)
    interceptors = [BearerTokenInterceptor("s3cret")]
    tls = {
        "root_certificates": certs.ca.read_bytes(),
        "private_key": certs.client_key.read_bytes(),
        "certificate_chain": certs.client_cert.read_bytes(),
    }
    once = RetryPolicy(max_attempts=1)
    with _server_with(settings, interceptors=interceptors, credentials=credentials) as port:
        address = f"127.0.0.1:{port}"
        with VaeClient(address, token="s3cret", **tls) as c:
            assert c.sample(served.vae, 3, seed=1).samples.shape == (3, 1, 8, 8)
        with VaeClient(address, token="wrong", retry=once, **tls) as c:
            with pytest.raises(VaeServeError) as info:
                c.model_info(served.vae)
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        without_client_cert = {"root_certificates": tls["root_certificates"]}
        with VaeClient(address, token="s3cret", retry=once, **without_client_cert) as c:
            with pytest.raises(VaeServeError) as info:
                c.model_info(served.vae)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
