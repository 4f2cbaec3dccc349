"""Faults a server must survive: SIGTERM under load, clients that leave, a damaged model
repository, and onnxruntime failing inside a batch.

Everything runs against the real server (in process on 127.0.0.1:0, or ``vae-serve`` as a
child process) and the tiny models of client_fixtures.tiny_repository; answers are compared
with the same graphs run directly in onnxruntime (serving_fixtures.Reference).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from client_fixtures import CVAE, VAE, ServerProcess, tiny_repository
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import helper, numpy_helper
from serving_fixtures import WAIT_S, Reference, ServerThread, array, channel, tensor

from vaeserve.manifest import MANIFEST_FILE, sha256_of_file
from vaeserve.proto.v1 import vaeserve_pb2 as pb
from vaeserve.proto.v1 import vaeserve_pb2_grpc as pb_grpc
from vaeserve.server.settings import BatchingSettings, ServerSettings
from vaeserve.server.status import INTERNAL_MESSAGE

T = 30.0  # per-call timeout: a hung server fails the test instead of hanging it
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# A batch closes only once it is full: requests stay queued until a test fills it.
HOLD_MS = 10_000.0
ROWS = 64  # max_batch_size of the servers that hold batches
_SERVE = "import sys; from vaeserve.server.cli import main; sys.exit(main())"  # vae-serve


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return tiny_repository(tmp_path_factory)


@pytest.fixture(scope="module")
def refs(models) -> dict[str, Reference]:
    return {name: Reference(models / name / "1") for name in (VAE, CVAE)}


def _settings(repository: Path, **batching) -> ServerSettings:
    return ServerSettings(
        repository=repository,
        port=0,
        device="cpu",
        intra_op_threads=1,
        batching=BatchingSettings(**batching),
    )


def _ref(name: str, version: int = 0) -> pb.ModelRef:
    return pb.ModelRef(name=name, version=version)


def _health(ch: grpc.Channel) -> int:
    request = health_pb2.HealthCheckRequest(service="")
    return health_pb2_grpc.HealthStub(ch).Check(request, timeout=T).status


def _wait_until(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    """Poll a condition on the server's state (there is no event to wait on from outside)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.005)


# --- SIGTERM under load, against vae-serve in a child process ---------------------------


@dataclass
class Outcome:
    rpc: str
    start: float
    end: float
    code: grpc.StatusCode
    details: str


class Load:
    """Client threads calling Sample (small, large, CVAE labels), Encode and SampleStream.

    Bounded in calls per thread and in time; each outcome is recorded with its timing.
    """

    def __init__(self, address: str, clients: int, max_calls: int, max_s: float):
        self.outcomes: list[Outcome] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._channel = channel(address)
        self._stub = pb_grpc.VaeServiceStub(self._channel)
        self._until = time.monotonic() + max_s
        self._threads = [
            threading.Thread(target=self._client, args=(i, max_calls), name=f"load-{i}")
            for i in range(clients)
        ]
        for thread in self._threads:
            thread.start()

    def _calls(self, i: int) -> list[tuple[str, Callable[[], object]]]:
        stub, x = self._stub, np.full((4, 1, 8, 8), 0.5, np.float32)
        small = pb.SampleRequest(model=_ref(CVAE), num_samples=1 + i % 8, label=i % 10)
        large = pb.SampleRequest(model=_ref(VAE), num_samples=2048, seed=i)
        stream = pb.SampleStreamRequest(
            request=pb.SampleRequest(model=_ref(VAE), num_samples=3000, seed=i), chunk_size=512
        )
        encode = pb.EncodeRequest(model=_ref(CVAE), x=tensor(x), labels=[1, 2, 3, 4])
        return [
            ("Sample-small", lambda: stub.Sample(small, timeout=T)),
            ("Sample-large", lambda: stub.Sample(large, timeout=T)),
            ("Encode", lambda: stub.Encode(encode, timeout=T)),
            ("SampleStream", lambda: sum(1 for _ in stub.SampleStream(stream, timeout=T))),
        ]

    def _client(self, i: int, max_calls: int) -> None:
        calls = self._calls(i)
        for k in range(max_calls):
            if self.stop.is_set() or time.monotonic() > self._until:
                return
            rpc, call = calls[(i + k) % len(calls)]
            start = time.monotonic()
            try:
                call()
                code, details = grpc.StatusCode.OK, ""
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
            with self._lock:
                self.outcomes.append(Outcome(rpc, start, time.monotonic(), code, details))

    def finish(self) -> list[Outcome]:
        self.stop.set()
        for thread in self._threads:
            thread.join(WAIT_S)
        self._channel.close()
        return self.outcomes


def _big_stream(stub, n: int):
    """A stream far larger than gRPC's flow-control window: in flight until it is read."""
    request = pb.SampleRequest(model=_ref(VAE), num_samples=n, seed=4)
    return stub.SampleStream(pb.SampleStreamRequest(request=request, chunk_size=4096), timeout=T)


# UNAVAILABLE is right only when the server refused the call before admitting it, or was gone.
_REFUSED = re.compile(r"shutting down|failed to connect|connection refused|connect failed", re.I)


def test_sigterm_under_load_finishes_in_flight_calls_refuses_new_ones_and_exits_0(
    models, refs, monkeypatch, figure
):
    grace_s = 20.0
    monkeypatch.setenv("VAESERVE_GRACE_PERIOD_S", str(grace_s))
    server = ServerProcess(models)
    load = None
    try:
        with channel(f"127.0.0.1:{server.port}") as ch:
            stub = pb_grpc.VaeServiceStub(ch)
            load = Load(f"127.0.0.1:{server.port}", clients=12, max_calls=400, max_s=WAIT_S)
            _wait_until(lambda: len(load.outcomes) >= 60, "60 calls under load")
            n = 60_000
            streams = [_big_stream(stub, n) for _ in range(2)]
            firsts = [next(s) for s in streams]  # both surely in flight now
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            server.output.wait_for("shutting down")
            assert _health(ch) == NOT_SERVING
            for first, stream in zip(firsts, streams, strict=True):
                chunks = [first, *stream]
                assert sum(c.samples.shape[0] for c in chunks) == n
                last = chunks[-1]
                x, _ = refs[VAE].sample(4, last.start_index, last.samples.shape[0])
                np.testing.assert_array_equal(array(last.samples), x)
            # New calls kept coming (and were refused) while the streams drained; once they
            # stop, the server has nothing left to wait for.
            load.stop.set()
            assert server.process.wait(grace_s + 10) == 0, server.output.text()
            exited = time.monotonic()
        outcomes = load.finish()
    finally:
        if load is not None:
            load.finish()
        if server.process.poll() is None:
            server.kill()
    # Every in-flight call finished inside the grace period: the server says so, not a clock.
    log = server.output.text()
    assert "did not finish within the grace period" not in log, log
    assert re.search(r"INFO .*: stopped$", log, re.M), log
    figure("calls", len(outcomes))
    figure("ok", sum(o.code == grpc.StatusCode.OK for o in outcomes))
    figure("unavailable", sum(o.code == grpc.StatusCode.UNAVAILABLE for o in outcomes))
    figure("exit_after_sigterm_s", round(exited - signalled, 2))
    expected = {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
    wrong = [o for o in outcomes if o.code not in expected]
    assert not wrong, [(o.rpc, o.code.name, o.details, o.start - signalled) for o in wrong]
    refused = [o for o in outcomes if o.code == grpc.StatusCode.UNAVAILABLE]
    assert all(_REFUSED.search(o.details) for o in refused), {o.details for o in refused}
    assert all(o.end >= signalled for o in refused), "UNAVAILABLE before the signal"
    assert any("shutting down" in o.details for o in refused), "no call was refused while draining"
    finished_after = [o for o in outcomes if o.code == grpc.StatusCode.OK and o.end > signalled]
    assert finished_after, "no load call was in flight at the signal"
    ok_before = [o for o in outcomes if o.code == grpc.StatusCode.OK and o.end < signalled]
    assert {o.rpc for o in ok_before} == {"Sample-small", "Sample-large", "Encode", "SampleStream"}


def _codes(calls: list[grpc.Future]) -> list[grpc.StatusCode]:
    codes = []
    for call in calls:
        try:
            call.result(timeout=T)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            codes.append(exc.code())
    return codes


def test_calls_waiting_inside_grpc_when_the_server_stops_get_unavailable(models):
    server = ServerThread(_settings(models))
    registry = server.server.registry
    hogging, release = threading.Event(), threading.Event()
    drained, resume = threading.Event(), threading.Event()

    def hold_the_loop(until: threading.Event) -> None:
        # The event loop is busy (as under load): new calls wait inside gRPC, not yet ours.
        assert until.wait(WAIT_S), "the test never released the event loop"

    async def hog() -> None:
        hogging.set()
        hold_the_loop(release)

    drain = registry.drain

    def drain_then_hold() -> None:
        """The stop signal: from here on new calls must be refused. The loop is held just
        after it, so the calls the test makes now wait inside gRPC while the server stops."""
        drain()
        drained.set()
        hold_the_loop(resume)

    registry.drain = drain_then_hold
    try:
        with channel(server.address) as ch:
            stub = pb_grpc.VaeServiceStub(ch)
            one = pb.SampleRequest(model=_ref(VAE), num_samples=1)
            stub.Sample(one, timeout=T)
            hogged = server.submit(hog())
            assert hogging.wait(WAIT_S)
            before = [stub.Sample.future(one, timeout=T) for _ in range(5)]
            stopping = server.submit(server.server.stop(WAIT_S))  # runs once the loop is free
            release.set()
            assert drained.wait(WAIT_S), "the server never began to stop"
            after = [stub.Sample.future(one, timeout=T) for _ in range(5)]
            resume.set()
            codes_before, codes_after = _codes(before), _codes(after)
            hogged.result(WAIT_S)
            stopping.result(WAIT_S)
    finally:
        release.set()
        resume.set()
        server.stop()
    # Calls made before the stop signal may have been admitted (and served); every call
    # made after it must be refused, whether gRPC still held it or the port was gone.
    assert set(codes_before) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes_before
    assert after and codes_after == [grpc.StatusCode.UNAVAILABLE] * len(after), codes_after


# --- clients that leave: cancelled calls, tiny deadlines, broken streams -----------------


@pytest.fixture(scope="module")
def holding(models):
    """A server whose batches close only when full (ROWS rows): even lone requests wait."""
    server = ServerThread(
        _settings(
            models, max_batch_size=ROWS, max_queue_delay_ms=HOLD_MS, queue_delay_policy="always"
        )
    )
    yield server
    server.stop()


def _full_batch(stub, ref: Reference, seed: int) -> None:
    """A request that fills a batch by itself, checked against onnxruntime."""
    answer = stub.Sample(
        pb.SampleRequest(model=_ref(CVAE), num_samples=ROWS, seed=seed, label=seed % 10),
        timeout=T,
    )
    np.testing.assert_array_equal(
        array(answer.samples), ref.sample(seed, 0, ROWS, [seed % 10] * ROWS)[0]
    )


class Bystander:
    """Another client, calling throughout a test; all its calls must succeed and be right."""

    def __init__(self, address: str, ref: Reference):
        self.errors: list[BaseException] = []
        self.calls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(address, ref), name="bystander")
        self._thread.start()

    def _run(self, address: str, ref: Reference) -> None:
        with channel(address) as ch:
            stub = pb_grpc.VaeServiceStub(ch)
            while not self._stop.is_set() and self.calls < 2000:
                try:
                    _full_batch(stub, ref, 100 + self.calls)
                except BaseException as exc:  # noqa: BLE001 - reported by finish()
                    self.errors.append(exc)
                    return
                self.calls += 1

    def finish(self) -> None:
        self._stop.set()
        self._thread.join(WAIT_S)
        assert not self.errors, self.errors
        assert self.calls > 0


def _decoder(server: ServerThread, name: str = CVAE):
    return server.server.registry.get(name).decoder


def _idle(server: ServerThread) -> Callable[[], bool]:
    return lambda: server.server.registry.in_flight == 0


def test_calls_that_expire_or_are_cancelled_in_the_queue_are_never_computed(holding, refs, figure):
    batcher = _decoder(holding)
    with channel(holding.address) as ch:
        stub = pb_grpc.VaeServiceStub(ch)
        _wait_until(_idle(holding), "an idle server")
        rows, dropped = batcher.stats.rows, batcher.stats.cancelled + batcher.stats.expired
        one = pb.SampleRequest(model=_ref(CVAE), num_samples=1, label=3)
        cancelled = [stub.Sample.future(one, timeout=T) for _ in range(10)]
        _wait_until(lambda: batcher.queue_length == 10, "10 queued requests")
        for call in cancelled:
            call.cancel()
        expiring = [stub.Sample.future(one, timeout=0.2) for _ in range(10)]
        for call in expiring:
            with pytest.raises(grpc.RpcError) as caught:
                call.result()
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert all(call.cancelled() for call in cancelled)
        _wait_until(_idle(holding), "the server to see every caller leave")
        assert batcher.stats.rows == rows  # none of them reached a batch
        queued = batcher.queue_length  # dead entries wait for the next batch to sweep them
        assert queued >= 10  # (an expiring call may have expired before it was queued)
        bystander = Bystander(holding.address, refs[CVAE])
        _full_batch(stub, refs[CVAE], 7)
        bystander.finish()
    assert batcher.queue_length == 0
    assert batcher.stats.cancelled + batcher.stats.expired - dropped == queued
    assert batcher.stats.rows == rows + ROWS * (1 + bystander.calls)
    figure("dropped_uncomputed", queued)
    figure("bystander_calls", bystander.calls)


@pytest.fixture(scope="module")
def holding_four(models):
    """A server that holds lone requests (as ``holding``) and queues at most 4 per graph."""
    settings = _settings(
        models,
        max_batch_size=ROWS,
        max_queue_delay_ms=HOLD_MS,
        max_queue_size=4,
        queue_delay_policy="always",
    )
    server = ServerThread(settings)
    yield server
    server.stop()


def test_callers_that_left_do_not_hold_queue_slots(holding_four, refs):
    batcher = _decoder(holding_four)
    with channel(holding_four.address) as ch:
        stub = pb_grpc.VaeServiceStub(ch)
        one = pb.SampleRequest(model=_ref(CVAE), num_samples=1, label=3)
        calls = [stub.Sample.future(one, timeout=T) for _ in range(4)]
        _wait_until(lambda: batcher.queue_length == 4, "a full queue")
        for call in calls:
            call.cancel()
        _wait_until(_idle(holding_four), "the server to see every caller leave")
        # Every queued caller has gone: a new one must get in, not RESOURCE_EXHAUSTED.
        _full_batch(stub, refs[CVAE], 3)
    assert batcher.queue_length == 0


def test_a_client_that_disconnects_mid_stream_stops_its_computation(holding, refs, figure):
    batcher = _decoder(holding)
    bystander = Bystander(holding.address, refs[CVAE])
    _wait_until(lambda: bystander.calls >= 3, "the bystander to be running")
    n = 1_000_000
    request = pb.SampleRequest(model=_ref(CVAE), num_samples=n, seed=5, label=1)
    leaving = channel(holding.address)
    stream = pb_grpc.VaeServiceStub(leaving).SampleStream(
        pb.SampleStreamRequest(request=request, chunk_size=ROWS), timeout=T
    )
    for _, chunk in zip(range(3), stream, strict=False):
        assert chunk.samples.shape[0] == ROWS
    leaving.close()  # the client goes away without a word
    _wait_until(_idle(holding), "the server to see the stream's client leave")
    bystander.finish()
    rows, calls = batcher.stats.rows, bystander.calls
    # Only chunks already sent, buffered by flow control or prefetched were computed.
    assert rows < n // 20
    figure("stream_rows_asked", n)
    figure("rows_computed", rows)
    with channel(holding.address) as ch:
        _full_batch(pb_grpc.VaeServiceStub(ch), refs[CVAE], 9)
    assert batcher.stats.rows == rows + ROWS, "the gone stream's work went on"
    assert batcher.queue_length == 0 and bystander.calls == calls


# --- a damaged model repository ---------------------------------------------------------


def _publish(source: Path, repository: Path, name: str, version: int) -> Path:
    """Copy a version folder into ``repository`` as ``name``/``version``."""
    target = repository / name / str(version)
    shutil.copytree(source, target)
    _edit_manifest(target, lambda m: m.update(version=version, name=name))
    return target


def _edit_manifest(version_dir: Path, edit: Callable[[dict], object]) -> None:
    path = version_dir / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=2))


def _reseal(version_dir: Path, graph: str) -> None:
    """Record a graph file's current sha256, as if the damage had been published on purpose."""
    digest = sha256_of_file(version_dir / f"{graph}.onnx")
    _edit_manifest(version_dir, lambda m: m[graph].update(sha256=digest))


def _truncated_and_resealed(version_dir: Path) -> None:
    path = version_dir / "decoder.onnx"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _reseal(version_dir, "decoder")


def _tampered(version_dir: Path) -> None:
    path = version_dir / "encoder.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _lying_about_shapes(version_dir: Path) -> None:
    """A manifest consistent with itself (latent 3) whose graphs have latent 2."""

    def edit(m: dict) -> None:
        m["latent_dim"] = 3
        for spec in (m["encoder"]["outputs"]["mu"], m["encoder"]["outputs"]["logvar"]):
            spec["shape"] = [-1, 3]
        m["decoder"]["inputs"]["z"]["shape"] = [-1, 3]

    _edit_manifest(version_dir, edit)


def _truncated_manifest(version_dir: Path) -> None:
    path = version_dir / MANIFEST_FILE
    path.write_bytes(path.read_bytes()[:100])


DAMAGE = {  # version of VAE -> (damage, what ListModels must say about it)
    2: (_truncated_and_resealed, "decoder.onnx"),
    3: (_tampered, "sha256"),
    4: (_lying_about_shapes, "manifest declares float32[-1, 3]"),
    5: (_truncated_manifest, "not valid JSON"),
}


@pytest.fixture
def damaged(models, tmp_path):
    """Intact VAE 1 and CVAE 1 and 2, damaged VAE 2..5, a model folder without versions."""
    repository = tmp_path / "repository"
    for version in (1, 2, 3, 4, 5):
        target = _publish(models / VAE / "1", repository, VAE, version)
        if version in DAMAGE:
            DAMAGE[version][0](target)
    for version in (1, 2):
        _publish(models / CVAE / "1", repository, CVAE, version)
    (repository / "empty-model").mkdir()
    server = ServerThread(_settings(repository, max_batch_size=ROWS, max_queue_delay_ms=1.0))
    try:
        yield server, repository
    finally:
        server.stop()


def test_a_damaged_repository_serves_what_is_intact_and_reports_the_rest(damaged, refs):
    server, _ = damaged
    with channel(server.address) as ch:
        stub = pb_grpc.VaeServiceStub(ch)
        assert _health(ch) == SERVING
        states = {
            (m.name, m.version): m
            for m in stub.ListModels(pb.ListModelsRequest(), timeout=T).models
        }
        ready = {k for k, m in states.items() if m.state == pb.MODEL_STATE_READY}
        assert ready == {(VAE, 1), (CVAE, 1), (CVAE, 2)}
        for version, (_, reason) in DAMAGE.items():
            status = states[VAE, version]
            assert status.state == pb.MODEL_STATE_FAILED and reason in status.reason, status
        info = stub.GetModelInfo(pb.GetModelInfoRequest(model=_ref(VAE)), timeout=T)
        assert (info.model.version, list(info.model.available_versions)) == (1, [1])
        with pytest.raises(grpc.RpcError) as caught:
            stub.Sample(pb.SampleRequest(model=_ref(VAE, 4), num_samples=1), timeout=T)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "loaded versions: [1]" in caught.value.details()
        answer = stub.Sample(pb.SampleRequest(model=_ref(VAE), num_samples=5, seed=2), timeout=T)
        np.testing.assert_array_equal(array(answer.samples), refs[VAE].sample(2, 0, 5)[0])


def test_a_version_folder_deleted_while_serving_does_not_disturb_the_calls(damaged, refs):
    server, repository = damaged
    x = np.full((3, 1, 8, 8), 0.25, np.float32)
    expected = refs[CVAE].encode(x, [1, 2, 3])["mu"]

    def call(i: int) -> int:
        with channel(server.address) as ch:
            stub = pb_grpc.VaeServiceStub(ch)
            request = pb.EncodeRequest(model=_ref(CVAE), x=tensor(x), labels=[1, 2, 3])
            for _ in range(40):
                answer = stub.Encode(request, timeout=T)
                np.testing.assert_array_equal(array(answer.mu), expected)
                if i == 0 and (repository / CVAE / "2").exists():
                    shutil.rmtree(repository / CVAE / "2")  # the latest version, mid-load
        return i

    with ThreadPoolExecutor(6) as pool:
        assert sorted(pool.map(call, range(6))) == list(range(6))
    assert not (repository / CVAE / "2").exists()
    with channel(server.address) as ch:
        assert _health(ch) == SERVING
        stub = pb_grpc.VaeServiceStub(ch)
        models = stub.ListModels(pb.ListModelsRequest(), timeout=T).models
        assert (CVAE, 1) in {(m.name, m.version) for m in models}


def test_a_repository_path_that_is_a_file_stops_vae_serve_with_a_clear_message(tmp_path):
    repository = tmp_path / "models"
    repository.write_text("not a folder")
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _SERVE,
            "--repository",
            str(repository),
            "--port",
            "0",
            "--http-port",
            "off",
        ],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert done.returncode == 2, done.stderr
    assert f"repository {repository} is not a folder" in done.stderr
    assert "Traceback" not in done.stderr


# --- onnxruntime failing inside a batch -------------------------------------------------

_POISON_BOUND = 16  # |max(z)| of a row at or past this makes the poisoned decoder fail


def _poison_decoder(version_dir: Path) -> None:
    """Make decoder.onnx fail in onnxruntime for rows whose max(z) is >= _POISON_BOUND.

    A Gather from a table of zeros, indexed by int(max(z)), is added to the output: the
    values do not change, but an index outside the table is an onnxruntime runtime error,
    just as a real kernel failure would be. Loading and warm-up (z = 0) pass.
    """
    path = version_dir / "decoder.onnx"
    model = onnx.load(path)
    graph = model.graph
    out = graph.output[0].name
    for node in graph.node:
        node.output[:] = [f"{o}_clean" if o == out else o for o in node.output]
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.zeros(_POISON_BOUND, np.float32), "poison_table"),
            numpy_helper.from_array(np.array([1], np.int64), "poison_row_axes"),
            numpy_helper.from_array(np.array([1, 2, 3], np.int64), "poison_pixel_axes"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("ReduceMax", ["z", "poison_row_axes"], ["poison_max"], keepdims=0),
            helper.make_node("Cast", ["poison_max"], ["poison_index"], to=onnx.TensorProto.INT64),
            helper.make_node("Gather", ["poison_table", "poison_index"], ["poison_zero"]),
            helper.make_node("Unsqueeze", ["poison_zero", "poison_pixel_axes"], ["poison_4d"]),
            helper.make_node("Add", [f"{out}_clean", "poison_4d"], [out]),
        ]
    )
    onnx.checker.check_model(model)
    onnx.save(model, path)
    _reseal(version_dir, "decoder")


FAILING_BATCH = 8  # rows; four requests of two rows share one batch


@pytest.fixture(scope="module")
def poisoned(models, tmp_path_factory):
    repository = tmp_path_factory.mktemp("poisoned")
    _poison_decoder(_publish(models / VAE / "1", repository, VAE, 1))
    _publish(models / CVAE / "1", repository, CVAE, 1)
    server = ServerThread(
        _settings(
            repository,
            max_batch_size=FAILING_BATCH,
            max_queue_delay_ms=HOLD_MS,
            queue_delay_policy="always",
        )
    )
    yield server
    server.stop()


def _decode_calls(stub, zs: list[np.ndarray]) -> list[tuple[grpc.StatusCode, object]]:
    """Decode each z concurrently (they share one batch); (code, x or details) of each."""
    futures = [
        stub.Decode.future(pb.DecodeRequest(model=_ref(VAE), z=tensor(z)), timeout=T) for z in zs
    ]
    results = []
    for future in futures:
        try:
            results.append((grpc.StatusCode.OK, array(future.result().x)))
        except grpc.RpcError as exc:
            results.append((exc.code(), exc.details()))
    return results


def _rows(value: float) -> np.ndarray:
    return np.full((FAILING_BATCH // 4, 2), value, np.float32)


def test_onnxruntime_failing_inside_a_batch_fails_only_the_requests_whose_rows_fail(poisoned, refs):
    batcher = _decoder(poisoned, VAE)
    failed_before = batcher.stats.failed_runs
    with channel(poisoned.address) as ch:
        stub = pb_grpc.VaeServiceStub(ch)
        good = [_rows(0.5), _rows(-1.0), _rows(2.0)]
        results = _decode_calls(stub, [good[0], _rows(1000.0), good[1], good[2]])
        assert results[1] == (grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
        for (code, x), z in zip([results[0], *results[2:]], good, strict=True):
            assert code == grpc.StatusCode.OK
            np.testing.assert_array_equal(x, refs[VAE].decode(z))
        # The whole batch failed once, then each request ran alone and only the culprit failed.
        assert batcher.stats.failed_runs - failed_before == 2

        everyone = _decode_calls(stub, [_rows(100.0 + i) for i in range(4)])
        assert everyone == [(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)] * 4

        hot = pb.SampleRequest(model=_ref(VAE), num_samples=FAILING_BATCH, temperature=1e6)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Sample(hot, timeout=T)
        assert (caught.value.code(), caught.value.details()) == (
            grpc.StatusCode.INTERNAL,
            INTERNAL_MESSAGE,
        )

        # The server keeps serving: health, the same graph, and the other model.
        assert _health(ch) == SERVING
        ok = stub.Sample(
            pb.SampleRequest(model=_ref(VAE), num_samples=FAILING_BATCH, seed=3), timeout=T
        )
        np.testing.assert_array_equal(array(ok.samples), refs[VAE].sample(3, 0, FAILING_BATCH)[0])
        other = stub.Sample(
            pb.SampleRequest(model=_ref(CVAE), num_samples=FAILING_BATCH, seed=3, label=2),
            timeout=T,
        )
        assert other.samples.shape[0] == FAILING_BATCH
    assert batcher.queue_length == 0
