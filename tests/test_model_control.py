"""Model control: the modes, and Triton's repository API (index, load, unload) end to end.

Servers run in this process (``ServerThread``); Triton's own client makes the repository calls
from a child process (tests/model_control_calls.py), since its protos and ours cannot share
one. Our own stubs, on the same wire, hold calls in flight and watch states in between.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from client_fixtures import VAE, tiny_repository
from missing import missing
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

from vaeserve.errors import InvalidRequest, ModelControlDisabled, ModelNotFound, NotServing
from vaeserve.proto.inference import grpc_service_pb2 as oip_pb
from vaeserve.proto.inference import grpc_service_pb2_grpc as oip_grpc
from vaeserve.proto.v1 import vaeserve_pb2 as vae_pb
from vaeserve.proto.v1 import vaeserve_pb2_grpc as vae_grpc
from vaeserve.server.model_control import IndexEntry, ModelControl, VersionPolicy
from vaeserve.server.reload import Reloader

CALLS = Path(__file__).with_name("model_control_calls.py")
T = 30.0
MAX_CALLS = 2000  # bound of the call loop that runs through a swap
OK = {"ok": None}


def triton(address: str, *steps: dict) -> list[dict]:
    """Run ``steps`` with tritonclient against ``address``; what each step gave."""
    if importlib.util.find_spec("tritonclient") is None:
        missing("tritonclient is not installed (the dev extra installs it)")
    done = subprocess.run(
        [sys.executable, str(CALLS), json.dumps([{"address": address, **s} for s in steps])],
        capture_output=True, text=True, timeout=2 * T,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def index(address: str, ready: bool = False) -> dict[tuple[str, str], tuple[str, str]]:
    """(name, version) -> (state, reason), from our own stub."""
    with channel(address) as ch:
        answer = oip_grpc.GRPCInferenceServiceStub(ch).RepositoryIndex(
            oip_pb.RepositoryIndexRequest(ready=ready), timeout=T
        )
    return {(m.name, m.version): (m.state, m.reason) for m in answer.models}


def model_ready(address: str, version: str = "") -> bool:
    with channel(address) as ch:
        request = oip_pb.ModelReadyRequest(name=DECODER, version=version)
        return oip_grpc.GRPCInferenceServiceStub(ch).ModelReady(request, timeout=T).ready


def infer_request(version: str = "") -> oip_pb.ModelInferRequest:
    z, y = decoder_inputs(2)
    request = oip_pb.ModelInferRequest(model_name=DECODER, model_version=version)
    request.inputs.add(name="z", datatype="FP32", shape=z.shape)
    request.inputs.add(name="y", datatype="INT64", shape=y.shape)
    request.raw_input_contents.extend([z.tobytes(), y.tobytes()])
    return request


@pytest.fixture
def repository(tmp_path_factory, tmp_path) -> Path:
    return copy_repository(tmp_path_factory, tmp_path / "models")


# --- version policies (the "config" parameter of a load) ---


@pytest.mark.parametrize(
    "config, versions",
    [
        ("{}", [1, 2, 3]),
        ('{"version_policy": {"all": {}}}', [1, 2, 3]),
        ('{"version_policy": {"latest": {"num_versions": 2}}}', [2, 3]),
        ('{"versionPolicy": {"latest": {"numVersions": 9}}}', [1, 2, 3]),
        ('{"version_policy": {"specific": {"versions": [3, "1", 3]}}}', [1, 3]),
    ],
)
def test_version_policy_picks_versions(config, versions):
    assert VersionPolicy.from_config(config).select("m", [3, 1, 2]) == versions


@pytest.mark.parametrize(
    "config, message",
    [
        ("{", "expected a JSON model configuration"),
        ("[]", "expected a JSON object"),
        ('{"name": "m", "max_batch_size": 8}', r"only 'version_policy' .*'max_batch_size', 'name'"),
        ('{"version_policy": {"newest": {}}}', r"version_policy: expected one of"),
        ('{"version_policy": {"all": {}, "latest": {"num_versions": 1}}}', "expected one of"),
        ('{"version_policy": {"latest": {"num_versions": 0}}}', r"num_versions: expected an int"),
        ('{"version_policy": {"specific": {"versions": []}}}', "expected one of"),
        ('{"version_policy": {"specific": {"versions": [true]}}}', r"versions: expected an int"),
    ],
)  # fmt: skip
def test_version_policy_refuses_what_it_cannot_honour(config, message):
    with pytest.raises(InvalidRequest, match=message):
        VersionPolicy.from_config(config)


def test_a_specific_version_must_be_on_disk():
    policy = VersionPolicy.from_config('{"version_policy": {"specific": {"versions": [2, 7]}}}')
    with pytest.raises(ModelNotFound, match=r"\[7\] of model 'm'.*versions on disk: \[1, 2\]"):
        policy.select("m", [1, 2])


# --- in process: the explicit mode's rescans, and the checks before a change ---


def test_an_explicit_mode_rescan_never_adds_a_model_or_a_version(tmp_path):
    for name, version in (("a", 1), ("a", 2), ("b", 1)):
        (tmp_path / name / str(version)).mkdir(parents=True)
        (tmp_path / name / str(version) / "manifest.json").write_text("{}")
    target = FakeTarget(served=[("a", 1)])
    refresh = Reloader(target, tmp_path, refresh_only=True)
    assert not asyncio.run(refresh.rescan())  # a/2 and b are on disk, but not loaded
    (tmp_path / "a" / "1" / "manifest.json").unlink()
    (tmp_path / "a" / "1").rmdir()
    asyncio.run(refresh.rescan())
    assert target.calls == [("unload", ("a", 1))]
    assert not asyncio.run(Reloader(FakeTarget([]), tmp_path, refresh_only=True).rescan())
    everything = FakeTarget(served=[])
    asyncio.run(Reloader(everything, tmp_path).rescan())  # modes none and poll
    assert everything.calls == [("load", ("a", 2)), ("load", ("b", 1))]


def test_load_and_unload_check_mode_parameters_names_and_readiness(repository):
    s = settings(repository, model_control_mode="explicit")
    server = ServerThread(s)
    control = ModelControl(server.server.registry, s, suffixes=("decoder",))
    refused = ModelControl(server.server.registry, settings(repository))  # mode none
    try:
        with pytest.raises(ModelControlDisabled, match="model_control_mode is 'none'"):
            server.call(refused.load(CVAE, {}))
        for parameters, message in (
            ({"file:1/decoder.onnx": b"graph"}, "model files in the request are not supported"),
            ({"unload_dependents": True}, r"not a load parameter; expected \['config'\]"),
            ({"config": None}, "expected a str parameter, got None"),
        ):
            with pytest.raises(InvalidRequest, match=message):
                server.call(control.load(CVAE, parameters))
        with pytest.raises(ModelNotFound, match=rf"'{CVAE}-scorer' is not in the repository"):
            server.call(control.unload(f"{CVAE}-scorer", {}))  # not a suffix it was given
        server.call(control.unload(CVAE, {"unload_dependents": False}))  # not loaded: a no-op
        assert server.call(control.index()) == [IndexEntry(CVAE, 1, "UNAVAILABLE", "unloaded")]
        (repository / "empty").mkdir()
        with pytest.raises(ModelNotFound, match="'empty' holds no version to load"):
            server.call(control.load("empty", {}))
        assert server.call(control.index())[0] == IndexEntry("empty", None)
        assert server.call(control.index(ready_only=True)) == []
        server.server.registry.drain()  # what shutdown does first
        with pytest.raises(NotServing, match="shutting down"):
            server.call(control.load(CVAE, {}))
    finally:
        server.stop()


# --- modes none and poll: everything loaded, load and unload refused ---


def test_modes_none_and_poll_refuse_load_and_unload(repository):
    poll = settings(repository, model_control_mode="poll", reload_interval_s=60)
    servers = [ServerThread(settings(repository)), ServerThread(poll)]
    try:
        for server, mode in zip(servers, ("none", "poll"), strict=True):
            seen = triton(server.address, {"call": "load", "model": CVAE},
                          {"call": "unload", "model": DECODER}, {"call": "index"},
                          {"call": "model_ready", "model": DECODER})  # fmt: skip
            for refused, call in zip(seen[:2], ("load", "unload"), strict=True):
                assert refused["status"] == "StatusCode.UNAVAILABLE"
                assert f"explicit model {call} is not allowed" in refused["message"]
                assert f"model_control_mode is '{mode}', expected 'explicit'" in refused["message"]
            assert seen[2] == {"ok": [{"name": CVAE, "version": "1", "state": "READY"}]}
            assert seen[3] == {"ok": True}
        with channel(servers[0].address) as ch:
            metadata = oip_grpc.GRPCInferenceServiceStub(ch).ServerMetadata(
                oip_pb.ServerMetadataRequest(), timeout=T
            )
        assert "model_repository" in metadata.extensions
    finally:
        for server in servers:
            server.stop()


# --- mode explicit ---


def test_explicit_mode_starts_with_the_load_model_models_only(tmp_path_factory):
    repository = tiny_repository(tmp_path_factory)  # not changed: served as it is
    server = ServerThread(settings(repository, model_control_mode="explicit", models=(CVAE,)))
    try:
        assert index(server.address) == {(CVAE, "1"): ("READY", ""),
                                          (VAE, "1"): ("UNAVAILABLE", "unloaded")}  # fmt: skip
        assert index(server.address, ready=True) == {(CVAE, "1"): ("READY", "")}
    finally:
        server.stop()
    server = ServerThread(settings(repository, model_control_mode="explicit", models=("*",)))
    try:  # Triton's --load-model=*
        assert set(index(server.address).values()) == {("READY", "")}
    finally:
        server.stop()


def _stream_on_version_1(ch: grpc.Channel):
    """A SampleStream far larger than gRPC's flow-control window: in flight until read."""
    chunk, chunks = 256, 100
    request = vae_pb.SampleStreamRequest(
        request=vae_pb.SampleRequest(model=vae_pb.ModelRef(name=CVAE, version=1),
                                     num_samples=chunk * chunks, label=4, seed=1),
        chunk_size=chunk,
    )  # fmt: skip
    return vae_grpc.VaeServiceStub(ch).SampleStream(request, timeout=T), chunk * chunks


def test_explicit_mode_loads_and_unloads_models_and_drains_calls(repository):
    server = ServerThread(settings(repository, model_control_mode="explicit"))
    address = server.address
    try:
        seen = triton(
            address,
            {"call": "server_ready"},  # with no model at all
            {"call": "index"},
            {"call": "model_ready", "model": DECODER},
            {"call": "infer", "model": DECODER},
            {"call": "load", "model": "nope"},
            {"call": "load", "model": "../models"},
            {"call": "load", "model": DECODER},  # a protocol model's name loads its folder
            {"call": "model_ready", "model": DECODER},
            {"call": "infer", "model": DECODER},
            {"call": "index"},
        )
        assert seen[0] == {"ok": True}
        assert seen[1] == {"ok": [{"name": CVAE, "version": "1", "state": "UNAVAILABLE",
                                   "reason": "unloaded"}]}  # fmt: skip
        assert seen[2] == {"ok": False}
        assert seen[3]["status"] == "StatusCode.NOT_FOUND"
        assert seen[4]["status"] == "StatusCode.NOT_FOUND"
        assert f"model 'nope' is not in the repository; models: ['{CVAE}']" in seen[4]["message"]
        assert seen[5]["status"] == "StatusCode.INVALID_ARGUMENT"
        assert seen[6:9] == [OK, {"ok": True}, {"ok": "1"}]
        assert seen[9] == {"ok": [{"name": CVAE, "version": "1", "state": "READY"}]}

        with channel(address) as ch:
            stream, samples = _stream_on_version_1(ch)
            first = next(stream)
            unload = subprocess.Popen(
                [sys.executable, str(CALLS),
                 json.dumps([{"address": address, "call": "unload", "model": CVAE}])],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            try:
                wait_until(lambda: index(address)[(CVAE, "1")][0] == "UNLOADING", "unloading")
                assert not model_ready(address)  # new calls no longer find it...
                rest = list(stream)  # ...while the call in flight finishes on it
                out, err = unload.communicate(timeout=2 * T)
            finally:
                if unload.poll() is None:
                    unload.kill()
        assert unload.returncode == 0, err
        assert json.loads(out) == [OK]  # returned once the stream was done
        assert sum(a.samples.shape[0] for a in [first, *rest]) == samples
        assert index(address) == {(CVAE, "1"): ("UNAVAILABLE", "unloaded")}

        # SIGHUP's rescan refreshes what is loaded only: the unloaded model stays unloaded.
        server.call(server.server.reload())
        assert not model_ready(address)
        with channel(address) as ch, pytest.raises(grpc.RpcError) as failed:
            oip_grpc.GRPCInferenceServiceStub(ch).ModelInfer(infer_request(), timeout=T)
        assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        server.stop()


def test_a_version_policy_loads_only_the_chosen_versions(repository, tmp_path_factory):
    source = pristine_version(tmp_path_factory)
    for version in (2, 3):
        add_version(source, repository, version)
    server = ServerThread(settings(repository, model_control_mode="explicit"))
    policy = lambda kind, body: json.dumps({"version_policy": {kind: body}})  # noqa: E731
    try:
        seen = triton(
            server.address,
            {"call": "load", "model": CVAE, "config": policy("latest", {"num_versions": 1})},
            {"call": "index"},
            {"call": "load", "model": CVAE, "config": policy("specific", {"versions": [1, 2]})},
            {"call": "index"},
            {"call": "load", "model": CVAE, "config": policy("specific", {"versions": [7]})},
            {"call": "load", "model": CVAE, "config": '{"max_batch_size": 8}'},
        )
        states = lambda answer: {m["version"]: m["state"] for m in answer["ok"]}  # noqa: E731
        assert seen[0] == OK
        assert states(seen[1]) == {"1": "UNAVAILABLE", "2": "UNAVAILABLE", "3": "READY"}
        assert seen[2] == OK
        assert states(seen[3]) == {"1": "READY", "2": "READY", "3": "UNAVAILABLE"}
        assert seen[4]["status"] == "StatusCode.NOT_FOUND"
        assert "versions on disk: [1, 2, 3]" in seen[4]["message"]
        assert seen[5]["status"] == "StatusCode.INVALID_ARGUMENT"
        assert "only 'version_policy' is honoured" in seen[5]["message"]
        assert index(server.address, ready=True) == {(CVAE, "1"): ("READY", ""),
                                                     (CVAE, "2"): ("READY", "")}  # fmt: skip
    finally:
        server.stop()


class Calls:
    """One thread calling version 1 of the decoder until stopped (at most MAX_CALLS)."""

    def __init__(self, address: str):
        self.answered = 0
        self.failures: list[str] = []
        self.stop = threading.Event()
        self._channel = channel(address)
        self._stub = oip_grpc.GRPCInferenceServiceStub(self._channel)
        self._thread = threading.Thread(target=self._run, name="calls")
        self._thread.start()

    def _run(self) -> None:
        for _ in range(MAX_CALLS):
            if self.stop.is_set():
                return
            try:
                self._stub.ModelInfer(infer_request("1"), timeout=T)
                self.answered += 1
            except grpc.RpcError as exc:
                self.failures.append(f"{exc.code().name}: {exc.details()}")

    def close(self) -> None:
        self.stop.set()
        self._thread.join(T)
        self._channel.close()


def test_a_reload_swaps_a_changed_version_without_failed_calls(repository):
    server = ServerThread(settings(repository, model_control_mode="explicit", models=(CVAE,)))
    registry = server.server.registry
    calls = Calls(server.address)
    try:
        before = registry.get(CVAE, 1)
        wait_until(lambda: calls.answered >= 20, "answers before the swap")
        # Same files, new times: what a copy over the version's folder leaves.
        manifest = repository / CVAE / "1" / "manifest.json"
        os.utime(manifest, ns=(manifest.stat().st_atime_ns, manifest.stat().st_mtime_ns + 10**9))
        with channel(server.address) as ch:
            stream, samples = _stream_on_version_1(ch)
            first = next(stream)  # in flight on the old files through the swap
            load = oip_grpc.GRPCInferenceServiceStub(ch).RepositoryModelLoad.future(
                oip_pb.RepositoryModelLoadRequest(model_name=CVAE), timeout=T
            )
            wait_until(lambda: registry.get(CVAE, 1) is not before, "the new files to serve")
            answered = calls.answered
            wait_until(lambda: calls.answered >= answered + 20, "answers after the swap")
            assert not load.done()  # the old files wait for the stream...
            rest = list(stream)  # ...which finishes on them
            load.result(timeout=T)
    finally:
        calls.close()
        server.stop()
    assert sum(a.samples.shape[0] for a in [first, *rest]) == samples
    assert calls.failures == []


def test_a_broken_version_fails_the_load_and_is_unavailable(repository, tmp_path_factory):
    add_version(pristine_version(tmp_path_factory), repository, 2, broken=True)
    server = ServerThread(settings(repository, model_control_mode="explicit"))
    try:
        seen = triton(server.address, {"call": "load", "model": CVAE},
                      {"call": "infer", "model": DECODER})  # fmt: skip
        assert seen[0]["status"] == "StatusCode.INVALID_ARGUMENT"
        assert seen[0]["message"].startswith(f"load failed for model '{CVAE}': version 2: ")
        assert "decoder.onnx" in seen[0]["message"]
        assert seen[1] == {"ok": "1"}  # the version that loaded serves
        states = index(server.address)
        assert states[(CVAE, "1")] == ("READY", "")
        assert states[(CVAE, "2")][0] == "UNAVAILABLE"
        assert "decoder.onnx" in states[(CVAE, "2")][1]
    finally:
        server.stop()


def test_repository_calls_need_the_token(repository, tmp_path):
    token = "model-control-token"
    token_file = tmp_path / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    server = ServerThread(
        settings(repository, model_control_mode="explicit", auth_token_file=token_file)
    )
    try:
        seen = triton(
            server.address,
            {"call": "index"},
            {"call": "load", "model": CVAE},
            {"call": "unload", "model": CVAE},
            {"call": "load", "model": CVAE, "token": token},
            {"call": "index", "token": token},
            {"call": "unload", "model": CVAE, "token": token},
        )
        assert [s.get("status") for s in seen[:3]] == ["StatusCode.UNAUTHENTICATED"] * 3
        assert seen[3] == OK
        assert seen[4] == {"ok": [{"name": CVAE, "version": "1", "state": "READY"}]}
        assert seen[5] == OK
    finally:
        server.stop()
