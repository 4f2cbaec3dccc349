"""Hot reload: the rescan plan, the reloader loop, and (end to end) a served repository changing
under concurrent load without a failed request."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import signal
import threading
from pathlib import Path

import grpc
from client_fixtures import ServerProcess
from ops_fixtures import (
    CVAE,
    DECODER,
    add_version,
    copy_repository,
    decoder_inputs,
    pristine_version,
    settings,
    wait_until,
)
from reload_fixtures import FakeTarget
from serving_fixtures import ServerThread, channel

from vaeserve.proto.inference import grpc_service_pb2 as oip_pb
from vaeserve.proto.inference import grpc_service_pb2_grpc as oip_grpc
from vaeserve.proto.v1 import vaeserve_pb2 as vae_pb
from vaeserve.proto.v1 import vaeserve_pb2_grpc as vae_grpc
from vaeserve.server.reload import Reloader, VersionOnDisk, plan_reload, scan_repository


def _version_dir(
    root: Path, name: str, version: str, files: dict[str, bytes] | None = None
) -> Path:
    folder = root / name / version
    folder.mkdir(parents=True)
    for file, data in (files or {"manifest.json": b"{}"}).items():
        (folder / file).write_bytes(data)
    return folder


# --- scan and plan ---


def test_scan_finds_published_versions_only(tmp_path):
    _version_dir(tmp_path, "digits", "1")
    _version_dir(tmp_path, "digits", "2")
    _version_dir(tmp_path, "digits", ".staging-abc")  # the exporter's half-written version
    _version_dir(tmp_path, "digits", "007")  # not a version name
    _version_dir(tmp_path, "faces", "3")
    (tmp_path / "README").write_text("not a model")
    found = scan_repository(tmp_path)
    assert sorted(found) == [("digits", 1), ("digits", 2), ("faces", 3)]
    assert sorted(scan_repository(tmp_path, ["faces"])) == [("faces", 3)]
    assert found[("digits", 1)].path == tmp_path / "digits" / "1"


def test_fingerprint_changes_with_the_files(tmp_path):
    folder = _version_dir(tmp_path, "digits", "1")
    before = scan_repository(tmp_path)[("digits", 1)].fingerprint
    (folder / "encoder.onnx").write_bytes(b"more")
    after = scan_repository(tmp_path)[("digits", 1)].fingerprint
    assert before != after


def _on_disk(*keys: tuple[str, int], fingerprint=(("m", 1, 1),)) -> dict:
    return {k: VersionOnDisk(k[0], k[1], Path(k[0], str(k[1])), fingerprint) for k in keys}


def test_plan_loads_new_and_unloads_removed_versions():
    plan = plan_reload(_on_disk(("a", 1), ("a", 2), ("b", 1)), served=[("a", 1), ("c", 4)],
                       failed={})  # fmt: skip
    assert [v.key for v in plan.load] == [("a", 2), ("b", 1)]
    assert plan.unload == (("c", 4),)


def test_plan_forgets_a_failed_version_whose_folder_is_gone():
    plan = plan_reload(_on_disk(("a", 1)), served=[("a", 1)], failed={("a", 2): (("m", 1, 1),)})
    assert plan.unload == (("a", 2),) and not plan.load


def test_plan_is_empty_when_nothing_changed():
    assert not plan_reload(_on_disk(("a", 1)), served=[("a", 1)], failed={})


def test_plan_retries_a_failed_version_only_after_its_files_change():
    on_disk = _on_disk(("a", 2))
    same = plan_reload(on_disk, served=[], failed={("a", 2): (("m", 1, 1),)})
    changed = plan_reload(on_disk, served=[], failed={("a", 2): (("m", 1, 0),)})
    assert not same
    assert [v.key for v in changed.load] == [("a", 2)]


# --- the reloader against a fake registry ---


def test_rescan_applies_the_plan_and_skips_broken_versions(tmp_path):
    asyncio.run(_rescan_applies_the_plan_and_skips_broken_versions(tmp_path))


async def _rescan_applies_the_plan_and_skips_broken_versions(tmp_path):
    _version_dir(tmp_path, "digits", "2")
    _version_dir(tmp_path, "digits", "3")
    target = FakeTarget(served=[("digits", 1)], broken=[("digits", 3)])
    reloader = Reloader(target, tmp_path)
    await reloader.rescan()
    assert target.calls == [("load", ("digits", 2)), ("load", ("digits", 3)),
                            ("unload", ("digits", 1))]  # fmt: skip
    target.calls.clear()
    await reloader.rescan()  # the broken version is not retried until its files change
    assert target.calls == []


def test_trigger_runs_a_rescan(tmp_path):
    asyncio.run(_trigger_runs_a_rescan(tmp_path))


async def _trigger_runs_a_rescan(tmp_path):
    target = FakeTarget()
    reloader = Reloader(target, tmp_path, interval_s=0)  # no periodic rescans
    reloader.start()
    try:
        _version_dir(tmp_path, "digits", "1")
        reloader.trigger()
        for _ in range(200):
            if target.loaded:
                break
            await asyncio.sleep(0.01)
        assert target.loaded == {("digits", 1)}
    finally:
        await reloader.stop()


def test_periodic_rescans(tmp_path):
    asyncio.run(_periodic_rescans(tmp_path))


async def _periodic_rescans(tmp_path):
    target = FakeTarget()
    reloader = Reloader(target, tmp_path, interval_s=0.02)
    reloader.start()
    try:
        _version_dir(tmp_path, "digits", "1")
        for _ in range(200):
            if target.loaded:
                break
            await asyncio.sleep(0.01)
        assert target.loaded == {("digits", 1)}
    finally:
        await reloader.stop()


def test_an_unreadable_repository_changes_nothing(tmp_path):
    asyncio.run(_an_unreadable_repository_changes_nothing(tmp_path))


async def _an_unreadable_repository_changes_nothing(tmp_path):
    target = FakeTarget(served=[("digits", 1)])
    plan = await Reloader(target, tmp_path / "missing").rescan()
    assert not plan and target.loaded == {("digits", 1)}


# --- end to end: a served repository changing under concurrent load ---

T = 30.0
LOAD_THREADS = 3
MAX_REQUESTS_PER_THREAD = 5000  # a bound; the scenario stops the load long before


class Load:
    """Threads calling the latest decoder (OIP) and Sample (typed) until stopped; bounded."""

    def __init__(self, address: str):
        self.stop = threading.Event()
        self.versions: list[str] = []
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._channel = channel(address)
        self._oip = oip_grpc.GRPCInferenceServiceStub(self._channel)  # stubs are thread-safe
        self._typed = vae_grpc.VaeServiceStub(self._channel)
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=f"load-{i}")
            for i in range(LOAD_THREADS)
        ]
        for thread in self._threads:
            thread.start()

    def _one(self, i: int, n: int) -> str:
        if (i + n) % 2:
            z, y = decoder_inputs(1 + n % 4, seed=n)
            request = oip_pb.ModelInferRequest(model_name=DECODER)
            request.inputs.add(name="z", datatype="FP32", shape=z.shape)
            request.inputs.add(name="y", datatype="INT64", shape=y.shape)
            request.raw_input_contents.extend([z.tobytes(), y.tobytes()])
            return self._oip.ModelInfer(request, timeout=T).model_version
        sample = vae_pb.SampleRequest(model=vae_pb.ModelRef(name=CVAE), num_samples=3, label=2)
        return str(self._typed.Sample(sample, timeout=T).model_version)

    def _run(self, i: int) -> None:
        for n in range(MAX_REQUESTS_PER_THREAD):
            if self.stop.is_set():
                return
            try:
                version = self._one(i, n)
            except grpc.RpcError as exc:
                with self._lock:
                    self.failures.append(f"{exc.code().name}: {exc.details()}")
                continue
            with self._lock:
                self.versions.append(version)

    def count(self, version: str) -> int:
        with self._lock:
            return self.versions.count(version)

    def close(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(T)
        self._channel.close()


def _states(address: str) -> dict[int, str]:
    with channel(address) as ch:
        models = vae_grpc.VaeServiceStub(ch).ListModels(vae_pb.ListModelsRequest(), timeout=T)
    return {m.version: vae_pb.ModelState.Name(m.state) for m in models.models if m.name == CVAE}


def test_versions_come_and_go_under_load_without_a_failed_request(
    tmp_path_factory, tmp_path, caplog
):
    repository = copy_repository(tmp_path_factory, tmp_path / "models")
    source = pristine_version(tmp_path_factory)
    caplog.set_level(logging.INFO, logger="vaeserve.server.repository")
    server = ServerThread(settings(repository, reload_interval_s=0.1))
    load = Load(server.address)
    try:
        wait_until(lambda: load.count("1") >= 20, "answers from version 1")

        add_version(source, repository, 2)  # a new version loads and takes over "latest"
        wait_until(lambda: load.count("2") >= 20, "answers from version 2")

        # A stream pinned to version 1 is in flight when version 1 is removed: the stream
        # finishes on version 1, and only then does version 1 unload.
        chunk, chunks = 256, 100
        request = vae_pb.SampleStreamRequest(
            request=vae_pb.SampleRequest(model=vae_pb.ModelRef(name=CVAE, version=1),
                                         num_samples=chunk * chunks, label=4, seed=1),
            chunk_size=chunk,
        )  # fmt: skip
        with channel(server.address) as ch:
            stream = vae_grpc.VaeServiceStub(ch).SampleStream(request, timeout=T)
            first = next(stream)
            shutil.rmtree(repository / CVAE / "1")
            wait_until(lambda: _states(server.address).get(1) == "MODEL_STATE_UNLOADING",
                       "version 1 draining")  # fmt: skip
            rest = list(stream)
        assert {a.model_version for a in [first, *rest]} == {1}
        assert sum(a.samples.shape[0] for a in [first, *rest]) == chunk * chunks
        wait_until(lambda: 1 not in _states(server.address), "version 1 unloaded")

        add_version(source, repository, 3, broken=True)  # logged, skipped; 2 keeps serving
        wait_until(lambda: _states(server.address).get(3) == "MODEL_STATE_FAILED",
                   "version 3 failed")  # fmt: skip
        served_before = load.count("2")
        wait_until(lambda: load.count("2") >= served_before + 20, "more answers from version 2")
    finally:
        load.close()
        server.stop()
    assert load.failures == []
    assert load.count("3") == 0
    events = [(r.event, r.version) for r in caplog.records if getattr(r, "model", "") == CVAE]
    assert sorted(events) == [("model_load_failed", 3), ("model_loaded", 1), ("model_loaded", 2),
                              ("model_unloaded", 1)]  # fmt: skip


def test_sighup_rescans_the_repository(tmp_path_factory, tmp_path, monkeypatch):
    repository = copy_repository(tmp_path_factory, tmp_path / "models")
    monkeypatch.setenv("VAESERVE_LOG_FORMAT", "json")  # the child's configuration
    server = ServerProcess(repository)
    try:
        add_version(pristine_version(tmp_path_factory), repository, 2)
        server.process.send_signal(signal.SIGHUP)
        server.output.wait_for(rf"loaded {CVAE} version 2")
        with channel(f"127.0.0.1:{server.port}") as ch:
            oip = oip_grpc.GRPCInferenceServiceStub(ch)
            ready = oip.ModelReady(oip_pb.ModelReadyRequest(name=DECODER, version="2"), timeout=T)
        assert ready.ready
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=T) == 0
    finally:
        if server.process.poll() is None:
            server.kill()
        text = server.output.text()
    logged = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    loaded = [e for e in logged if e.get("event") == "model_loaded"]
    assert [(e["model"], e["version"]) for e in loaded] == [(CVAE, 1), (CVAE, 2)]
    assert all({"time", "level", "logger", "message"} <= e.keys() for e in logged)
