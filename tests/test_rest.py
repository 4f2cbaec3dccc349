"""The Open Inference Protocol over REST, as plain HTTP clients (curl, urllib) send it.

In process (``ServerThread``, REST on a free port beside gRPC): every endpoint, JSON and binary
tensors, answers equal to gRPC ModelInfer's byte for byte, each error class with its HTTP
status and gRPC's very text, metrics, bearer-token auth and TLS, the drain. Against a
``vae-serve`` subprocess (as tests/test_hostile.py does for gRPC): a body over the limit, slow
headers, a slow body, JSON bombs, each while a bystander on its own connection keeps getting
fast answers.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import select
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from client_fixtures import CVAE, VAE, ServerProcess, tiny_repository
from ops_fixtures import DECODER, ENCODER, settings
from serving_fixtures import ServerThread, channel
from test_hostile import rss_bytes
from tls_certs import make_certs

from vaeserve.proto.inference import grpc_service_pb2 as pb
from vaeserve.proto.inference import grpc_service_pb2_grpc as pb_grpc
from vaeserve.server import rest_json, rest_tensors
from vaeserve.server.rest import HTTP_STATUS as HTTP
from vaeserve.server.security import UNAUTHENTICATED_MESSAGE

SCORER = f"{CVAE}-scorer"
T = 30.0
TOKEN = "rest-test-token"
RNG = np.random.default_rng(11)
Z = RNG.standard_normal((3, 2)).astype(np.float32)
Y = np.array([0, 4, 9], dtype=np.int64)
X = RNG.uniform(0, 1, (3, 1, 8, 8)).astype(np.float32)
_KSERVE = {np.dtype("float32"): "FP32", np.dtype("int64"): "INT64"}


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self):
        return json.loads(self.body)


def call(base: str, method: str, path: str, body: bytes | None = None, headers=None,
         context: ssl.SSLContext | None = None) -> Answer:  # fmt: skip
    """One request as curl would send it (urllib, a connection of its own)."""
    request = urllib.request.Request(base + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=T, context=context) as r:
            return Answer(r.status, r.headers, r.read())
    except urllib.error.HTTPError as e:
        with e:  # it holds the connection: closed here, not whenever it is collected
            return Answer(e.code, e.headers, e.read())


def json_inputs(arrays: dict[str, np.ndarray], nested: bool = True) -> list[dict]:
    return [
        {"name": n, "datatype": _KSERVE[a.dtype], "shape": list(a.shape),
         "data": a.tolist() if nested else a.ravel().tolist()}
        for n, a in arrays.items()
    ]  # fmt: skip


def binary_body(arrays: dict[str, np.ndarray], **document) -> tuple[bytes, dict[str, str]]:
    """Triton's binary tensor data: a JSON header, then the inputs' bytes in order."""
    inputs = [
        {"name": n, "datatype": _KSERVE[a.dtype], "shape": list(a.shape),
         "parameters": {"binary_data_size": a.nbytes}}
        for n, a in arrays.items()
    ]  # fmt: skip
    header = json.dumps({"inputs": inputs, **document}).encode()
    body = header + b"".join(a.astype(a.dtype.newbyteorder("<")).tobytes() for a in arrays.values())
    return body, {"Inference-Header-Content-Length": str(len(header))}


def grpc_infer(stub, model: str, arrays: dict[str, np.ndarray], version: str = "", **fields):
    request = pb.ModelInferRequest(model_name=model, model_version=version, **fields)
    for name, a in arrays.items():
        request.inputs.add(name=name, datatype=_KSERVE[a.dtype], shape=a.shape)
        request.raw_input_contents.append(a.tobytes())
    return stub.ModelInfer(request, timeout=T)


def split_binary(answer: Answer) -> tuple[dict, dict[str, bytes]]:
    """The JSON header and each binary output's bytes of an answer."""
    length = int(answer.headers["Inference-Header-Content-Length"])
    header = json.loads(answer.body[:length])
    raw, offset = {}, length
    for output in header["outputs"]:
        size = output.get("parameters", {}).get("binary_data_size")
        if size is not None:
            raw[output["name"]] = answer.body[offset : offset + size]
            offset += size
    assert offset == len(answer.body)
    return header, raw


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[ServerThread]:
    server = ServerThread(settings(tiny_repository(tmp_path_factory), http_port=0))
    server.base = f"http://127.0.0.1:{server.server.http_port}"
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stub(served):
    with channel(served.address) as ch:
        yield pb_grpc.GRPCInferenceServiceStub(ch)


# --- the pure conversions -------------------------------------------------------------


def test_float32_answers_round_trip_exactly_through_json():
    tiny = np.finfo(np.float32)
    values = np.concatenate([
        np.array([tiny.max, -tiny.max, tiny.tiny, tiny.smallest_subnormal, 0.0, 1 / 3, 0.1],
                 np.float32),
        np.random.default_rng(0).standard_normal(10_000).astype(np.float32) * 1e-30,
        np.random.default_rng(1).standard_normal(10_000).astype(np.float32) * 1e30,
        np.random.default_rng(2).uniform(0, 1, 10_000).astype(np.float32),
    ])  # fmt: skip
    text = rest_tensors._data_json(values)
    assert np.asarray(json.loads(text), np.float32).tobytes() == values.tobytes()
    assert np.asarray(json.loads(text), np.float64).astype(np.float32).tobytes() == values.tobytes()
    assert "0.100000001," in text  # 9 digits, not repr's 0.10000000149011612
    # NaN has no JSON spelling of its own, "%g" would turn -0.0 into 0: Python's repr instead.
    assert rest_tensors._data_json(np.array([np.nan], np.float32)) == "[NaN]"
    assert (
        rest_tensors._data_json(np.array([-0.0, 0.1], np.float32)) == "[-0.0,0.10000000149011612]"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(b"[" * 33 + b"]" * 33, "nested more than 32 levels", id="depth"),
        pytest.param(b"[" + b"[]," * 99 + b"[]]", "more than 100 arrays and objects",
                     id="containers"),
        pytest.param(b'{"a": "]]]]]]]]", "b": ' + b"[" * 40 + b"]" * 40 + b"}",
                     "nested more than 32 levels", id="brackets-in-strings-hide-nothing"),
    ],
)  # fmt: skip
def test_json_structure_is_bounded_before_parsing(text, message):
    from vaeserve.errors import InvalidRequest

    bounds = rest_json.JsonBounds(max_depth=32, max_containers=100)
    with pytest.raises(InvalidRequest, match=message):
        rest_json.load_json(text, "the body", bounds)
    assert rest_json.load_json(b"[" * 32 + b"]" * 32, "the body", bounds) is not None


# --- endpoints ----------------------------------------------------------------------------


def test_health_server_and_model_metadata(served, stub):
    base = served.base
    assert call(base, "GET", "/v2/health/live").status == 200
    assert call(base, "GET", "/v2/health/ready").status == 200
    meta = call(base, "GET", "/v2").json()
    assert meta["name"] == "vaeserve" and "binary_tensor_data" in meta["extensions"]
    assert call(base, "GET", f"/v2/models/{DECODER}/ready").status == 200
    assert call(base, "GET", f"/v2/models/{DECODER}/versions/1/ready").status == 200
    assert call(base, "GET", "/v2/models/nope-decoder/ready").status == 400  # Triton's "not ready"
    answer = call(base, "GET", f"/v2/models/{DECODER}")
    assert answer.status == 200 and answer.headers["Content-Type"].startswith("application/json")
    grpc_meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=DECODER), timeout=T)
    assert answer.json() == {
        "name": DECODER, "versions": list(grpc_meta.versions), "platform": grpc_meta.platform,
        "inputs": [{"name": "z", "datatype": "FP32", "shape": [-1, 2]},
                   {"name": "y", "datatype": "INT64", "shape": [-1]}],
        "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, 1, 8, 8]}],
    }  # fmt: skip
    assert call(base, "GET", f"/v2/models/{DECODER}/versions/1").json() == answer.json()


def test_model_config_and_statistics(served, stub):
    config = call(served.base, "GET", f"/v2/models/{DECODER}/config").json()
    expected = stub.ModelConfig(pb.ModelConfigRequest(name=DECODER), timeout=T).config
    assert config["name"] == DECODER and config["max_batch_size"] == expected.max_batch_size
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [
        ("z", "TYPE_FP32", [2]), ("y", "TYPE_INT64", [])
    ]  # fmt: skip
    assert config["dynamic_batching"]["preferred_batch_size"] == [16]
    assert call(served.base, "GET", f"/v2/models/{DECODER}/versions/1/config").json() == config
    grpc_infer(stub, DECODER, {"z": Z, "y": Y})
    for path in (f"/v2/models/{DECODER}/stats", f"/v2/models/{DECODER}/versions/1/stats"):
        (stats,) = call(served.base, "GET", path).json()["model_stats"]
        assert (stats["name"], stats["version"]) == (DECODER, "1")
        assert stats["inference_stats"]["success"]["count"] >= 1
        assert isinstance(stats["inference_stats"]["success"]["ns"], int)  # a number, as Triton
    everything = call(served.base, "GET", "/v2/models/stats").json()["model_stats"]
    assert {(s["name"], s["version"]) for s in everything} >= {(DECODER, "1"), (ENCODER, "1")}
    assert call(served.base, "GET", "/v2/models/nope-decoder/stats").status == 404


def test_repository_endpoints(served, stub):
    index = call(served.base, "POST", "/v2/repository/index", b"")
    assert index.status == 200
    assert {(m["name"], m["version"], m["state"]) for m in index.json()} >= {(CVAE, "1", "READY")}
    ready = call(served.base, "POST", "/v2/repository/index", b'{"ready": true}').json()
    assert all(m["state"] == "READY" for m in ready)
    refused = call(served.base, "POST", "/v2/repository/index", b'{"ready": 3}')
    assert refused.status == 400 and "ready" in refused.json()["error"]
    # Loading needs --model-control-mode explicit: refused here as over gRPC.
    refused = call(served.base, "POST", f"/v2/repository/models/{VAE}/load", b"{}")
    with pytest.raises(grpc.RpcError) as caught:
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=VAE), timeout=T)
    assert refused.status == HTTP[caught.value.code().name]
    assert refused.json() == {"error": caught.value.details()}


def test_repository_load_and_unload_in_explicit_mode(tmp_path_factory):
    repository = tiny_repository(tmp_path_factory)
    server = ServerThread(
        settings(repository, http_port=0, model_control_mode="explicit", models=(CVAE,))
    )
    base = f"http://127.0.0.1:{server.server.http_port}"
    try:
        assert call(base, "GET", f"/v2/models/{VAE}-decoder/ready").status == 400
        loaded = call(base, "POST", f"/v2/repository/models/{VAE}/load", b'{"parameters": {}}')
        assert loaded.status == 200, loaded.body
        assert call(base, "GET", f"/v2/models/{VAE}-decoder/ready").status == 200
        unloaded = call(base, "POST", f"/v2/repository/models/{VAE}/unload",
                        b'{"parameters": {"unload_dependents": false}}')  # fmt: skip
        assert unloaded.status == 200, unloaded.body
        assert call(base, "GET", f"/v2/models/{VAE}-decoder/ready").status == 400
        index = {m["name"]: m["state"] for m in call(base, "POST", "/v2/repository/index").json()}
        assert index[CVAE] == "READY" and index[VAE] != "READY"
        missing = call(base, "POST", "/v2/repository/models/nope/load", b"{}")
        assert missing.status == 404 and "nope" in missing.json()["error"]
        bad = call(base, "POST", f"/v2/repository/models/{VAE}/load",
                   b'{"parameters": {"file:1/model.onnx": "not base64!"}}')  # fmt: skip
        assert bad.status == 400 and "not base64" in bad.json()["error"]
    finally:
        server.stop()


# --- infer: JSON and binary equal gRPC ---------------------------------------------------


@pytest.mark.parametrize("nested", [True, False], ids=["nested", "flat"])
def test_json_infer_equals_grpc_byte_for_byte(served, stub, nested):
    cases = [(DECODER, {"z": Z, "y": Y}, {}), (ENCODER, {"x": X, "y": Y}, {}),
             (SCORER, {"x": X, "y": Y}, {"seed": 5, "k": 2})]  # fmt: skip
    for model, arrays, parameters in cases:
        document = {"id": "call-1", "inputs": json_inputs(arrays, nested)}
        if parameters:
            document["parameters"] = parameters
        answer = call(
            served.base, "POST", f"/v2/models/{model}/infer", json.dumps(document).encode()
        )
        assert answer.status == 200, answer.body
        assert answer.headers["Content-Type"].startswith("application/json")
        assert "Inference-Header-Content-Length" not in answer.headers
        result = answer.json()
        grpc_parameters = {k: pb.InferParameter(int64_param=v) for k, v in parameters.items()}
        expected = grpc_infer(stub, model, arrays, parameters=grpc_parameters, id="call-1")
        assert (result["model_name"], result["model_version"], result["id"]) == (
            model,
            "1",
            "call-1",
        )
        assert [o["name"] for o in result["outputs"]] == [o.name for o in expected.outputs]
        for output, grpc_output, raw in zip(
            result["outputs"], expected.outputs, expected.raw_output_contents, strict=True
        ):
            assert output["datatype"] == grpc_output.datatype
            assert output["shape"] == list(grpc_output.shape)
            assert len(output["data"]) == np.prod(output["shape"])  # flat, row-major
            dtype = "<f8" if output["datatype"] == "FP64" else "<f4"
            assert np.asarray(output["data"], dtype).tobytes() == raw, (model, output["name"])
        if parameters:
            assert result["parameters"] == {"seed": 5}


def test_binary_inputs_and_outputs_equal_grpc(served, stub):
    body, headers = binary_body({"x": X, "y": Y}, parameters={"binary_data_output": True})
    answer = call(served.base, "POST", f"/v2/models/{ENCODER}/infer", body, headers)
    assert answer.status == 200, answer.body
    assert answer.headers["Content-Type"] == "application/octet-stream"
    header, raw = split_binary(answer)
    expected = grpc_infer(stub, ENCODER, {"x": X, "y": Y})
    assert raw == dict(
        zip([o.name for o in expected.outputs], expected.raw_output_contents, strict=True)
    )
    assert [o["parameters"]["binary_data_size"] for o in header["outputs"]] == [24, 24]
    # Output-level binary_data wins over the request's; unlisted outputs are not answered.
    body, headers = binary_body(
        {"x": X, "y": Y}, outputs=[{"name": "logvar", "parameters": {"binary_data": True}},
                                   {"name": "mu", "parameters": {"binary_data": False}}],
    )  # fmt: skip
    header, raw = split_binary(
        call(served.base, "POST", f"/v2/models/{ENCODER}/infer", body, headers)
    )
    assert [o["name"] for o in header["outputs"]] == ["logvar", "mu"]
    assert raw["logvar"] == expected.raw_output_contents[1]
    assert (
        np.asarray(header["outputs"][1]["data"], "<f4").tobytes() == expected.raw_output_contents[0]
    )


def test_json_and_binary_inputs_mix(served, stub):
    header = {"inputs": [
        {"name": "z", "datatype": "FP32", "shape": [3, 2], "parameters": {"binary_data_size": 24}},
        {"name": "y", "datatype": "INT64", "shape": [3], "data": Y.tolist()},
    ]}  # fmt: skip
    text = json.dumps(header).encode()
    answer = call(served.base, "POST", f"/v2/models/{DECODER}/infer", text + Z.tobytes(),
                  {"Inference-Header-Content-Length": str(len(text))})  # fmt: skip
    expected = grpc_infer(stub, DECODER, {"z": Z, "y": Y})
    assert (
        np.asarray(answer.json()["outputs"][0]["data"], "<f4").tobytes()
        == (expected.raw_output_contents[0])
    )


# --- errors: the same text as gRPC, KServe's status codes --------------------------------

SAME_AS_GRPC = [
    pytest.param(DECODER, {"z": np.zeros((2, 3), np.float32), "y": np.zeros(2, np.int64)}, "",
                 400, id="shape"),
    pytest.param(DECODER, {"z": np.zeros((2, 2), np.float32), "y": np.array([0, 10])}, "", 400,
                 id="label-range"),
    pytest.param(DECODER, {"z": np.full((1, 2), np.nan, np.float32), "y": np.zeros(1, np.int64)},
                 "", 400, id="nan"),
    pytest.param(DECODER, {"z": np.zeros((65, 2), np.float32), "y": np.zeros(65, np.int64)}, "",
                 400, id="too-many-rows"),
    pytest.param(DECODER, {"z": np.zeros((1, 2), np.float32)}, "", 400, id="missing-input"),
    pytest.param(DECODER, {"z": np.zeros((1, 2), np.float32), "y": np.zeros(1, np.int64)}, "x",
                 400, id="bad-version"),
    pytest.param(DECODER, {"z": np.zeros((1, 2), np.float32), "y": np.zeros(1, np.int64)}, "4",
                 404, id="unknown-version"),
    pytest.param("nope-decoder", {"z": np.zeros((1, 2), np.float32)}, "", 404,
                 id="unknown-model"),
    pytest.param(CVAE, {"z": np.zeros((1, 2), np.float32)}, "", 404, id="no-kind-suffix"),
]  # fmt: skip


@pytest.mark.parametrize(("model", "arrays", "version", "status"), SAME_AS_GRPC)
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_errors_carry_grpcs_text_under_kserves_status(served, stub, model, arrays, version,
                                                      status, binary):  # fmt: skip
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    if binary:
        body, headers = binary_body(arrays)
    else:
        body, headers = json.dumps({"inputs": json_inputs(arrays)}).encode(), {}
    answer = call(served.base, "POST", path, body, headers)
    with pytest.raises(grpc.RpcError) as caught:
        grpc_infer(stub, model, arrays, version)
    assert answer.status == status
    assert answer.json() == {"error": caught.value.details()}
    # The metadata endpoints map the same way.
    meta_path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "")
    if model != DECODER or version:
        meta = call(served.base, "GET", meta_path)
        with pytest.raises(grpc.RpcError) as meta_error:
            stub.ModelMetadata(pb.ModelMetadataRequest(name=model, version=version), timeout=T)
        assert (meta.status, meta.json()["error"]) == (status, meta_error.value.details())


BINARY_HEADER = json.dumps(
    {"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 2],
                 "parameters": {"binary_data_size": 8}}]}
).encode()  # fmt: skip
REST_ONLY = [
    pytest.param(b"{not json", {}, "not valid JSON", id="not-json"),
    pytest.param(b"[1, 2]", {}, "expected a JSON object", id="not-an-object"),
    pytest.param(b'{"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 2], "data": [1]}]}',
                 {}, "input 'z' has 1 values in data, expected 2 for shape [1, 2]",
                 id="data-count"),
    pytest.param(b'{"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 2],'
                 b' "data": ["a", "b"]}]}', {}, "not a flat or evenly nested list of numbers",
                 id="data-strings"),
    pytest.param(b'{"inputs": [{"name": "y", "datatype": "INT64", "shape": [2],'
                 b' "data": [1.5, 2]}]}', {}, "list of integers", id="ints-as-floats"),
    pytest.param(b'{"inputs": [{"name": "z", "datatype": "FP32", "shape": [2, 1],'
                 b' "data": [[1, 2]]}]}', {}, "nested as [1, 2], expected [2, 1]",
                 id="nesting"),
    pytest.param(b'{"inputs": [{"name": "z", "datatype": "FP32", "shape": "2"}]}', {},
                 "input 'z' shape is '2', expected a JSON array", id="shape-type"),
    pytest.param(b'{"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 2.5]}]}', {},
                 "expected a list of 64-bit integers", id="shape-floats"),
    pytest.param(b'{"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 2]}]}', {},
                 "neither data nor parameters.binary_data_size", id="no-data"),
    pytest.param(BINARY_HEADER + b"1234", {"Inference-Header-Content-Length":
                 str(len(BINARY_HEADER))}, "only 4 bytes of binary data are left",
                 id="binary-short"),
    pytest.param(b'{"inputs": []}xx', {"Inference-Header-Content-Length": "14"},
                 "2 bytes of binary data after", id="binary-extra"),
    pytest.param(b"{}", {"Inference-Header-Content-Length": "9"}, "expected 0 to the body's 2",
                 id="header-length-past-body"),
    pytest.param(b"{}", {"Inference-Header-Content-Length": "two"}, "expected a byte count",
                 id="header-length-text"),
    pytest.param(b'{"parameters": {"binary_data_output": "yes"}}', {}, "expected true or false",
                 id="binary-flag"),
    pytest.param(b'{"parameters": {"p": [1]}}', {}, "parameters.p is [1], expected a bool",
                 id="parameter-type"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "headers", "message"), REST_ONLY)
def test_malformed_bodies_are_400_naming_the_field(served, body, headers, message):
    answer = call(served.base, "POST", f"/v2/models/{DECODER}/infer", body, headers)
    assert answer.status == 400, answer.body
    assert message in answer.json()["error"]


def test_other_refusals(served):
    base = served.base
    gzip = call(base, "POST", f"/v2/models/{DECODER}/infer", b"x", {"Content-Encoding": "gzip"})
    assert gzip.status == 415 and "Content-Encoding 'gzip'" in gzip.json()["error"]
    assert call(base, "GET", "/v2/nothing").json() == {"error": "no endpoint GET /v2/nothing"}
    assert call(base, "GET", f"/v2/models/{DECODER}/infer").status == 405
    # Triton's request parameter "timeout" (microseconds) is the call's deadline: 504.
    document = {"inputs": json_inputs({"z": Z, "y": Y}), "parameters": {"timeout": 0}}
    late = call(base, "POST", f"/v2/models/{DECODER}/infer", json.dumps(document).encode())
    assert late.status == 504 and "deadline" in late.json()["error"]


def test_expect_100_continue_invites_only_bodies_that_will_be_read(served):
    port = served.server.http_port
    body = json.dumps({"inputs": json_inputs({"z": Z, "y": Y})}).encode()
    head = (f"POST /v2/models/{DECODER}/infer HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n").encode()  # fmt: skip
    with socket.create_connection(("127.0.0.1", port), timeout=T) as sock:
        sock.sendall(head)
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        assert sock.recv(100).startswith(b"HTTP/1.1 200 OK")
    too_big = head.replace(f"Content-Length: {len(body)}".encode(), b"Content-Length: 99999999")
    with socket.create_connection(("127.0.0.1", port), timeout=T) as sock:
        sock.sendall(too_big)
        assert sock.recv(100).startswith(b"HTTP/1.1 413 ")


def test_calls_are_counted_under_grpcs_method_names(served):
    registry = served.server.registry.metrics.registry

    def count(rpc: str, code: str) -> float:
        labels = {"rpc": rpc, "model": DECODER, "code": code}
        return registry.get_sample_value("vaeserve_requests_total", labels) or 0.0

    before = count("ModelInfer", "OK"), count("ModelInfer", "INVALID_ARGUMENT")
    body = json.dumps({"inputs": json_inputs({"z": Z, "y": Y})}).encode()
    assert call(served.base, "POST", f"/v2/models/{DECODER}/infer", body).status == 200
    assert call(served.base, "POST", f"/v2/models/{DECODER}/infer", b"{").status == 400
    assert (count("ModelInfer", "OK"), count("ModelInfer", "INVALID_ARGUMENT")) == (
        before[0] + 1, before[1] + 1
    )  # fmt: skip


# --- auth, TLS, shared bounds, the drain --------------------------------------------------


@pytest.fixture(scope="module")
def guarded(tmp_path_factory) -> Iterator[tuple[ServerThread, ssl.SSLContext]]:
    folder = tmp_path_factory.mktemp("rest-guarded")
    certs = make_certs(folder / "certs")
    token = folder / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    server = ServerThread(settings(
        tiny_repository(tmp_path_factory), http_port=0, auth_token_file=token,
        tls_cert=certs.server_cert, tls_key=certs.server_key, max_inflight_request_bytes=64 << 10,
    ))  # fmt: skip
    server.base = f"https://127.0.0.1:{server.server.http_port}"
    yield server, ssl.create_default_context(cafile=str(certs.ca))
    server.stop()


def test_bearer_token_and_open_health(guarded):
    server, tls = guarded
    path = f"/v2/models/{DECODER}"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        answer = call(server.base, "GET", path, headers=headers, context=tls)
        assert answer.status == 401 and answer.json() == {"error": UNAUTHENTICATED_MESSAGE}
        assert answer.headers["WWW-Authenticate"] == "Bearer"
    body = json.dumps({"inputs": json_inputs({"z": Z, "y": Y})}).encode()
    refused = call(server.base, "POST", f"{path}/infer", body, context=tls)
    assert refused.status == 401
    unknown = call(server.base, "GET", "/v2/secret", context=tls)
    assert unknown.status == 401  # unknown paths say nothing without the token
    for open_path in ("/v2/health/live", "/v2/health/ready"):
        assert call(server.base, "GET", open_path, context=tls).status == 200
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert call(server.base, "GET", path, headers=auth, context=tls).status == 200
    answer = call(server.base, "POST", f"{path}/infer", body, auth, context=tls)
    assert answer.status == 200, answer.body


def test_tls_only(guarded):
    server, tls = guarded
    plain = server.base.replace("https://", "http://")
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
        call(plain, "GET", "/v2/health/live")
    untrusted = ssl.create_default_context()  # the system's CAs did not sign the test certs
    with pytest.raises(urllib.error.URLError):
        call(server.base, "GET", "/v2/health/live", context=untrusted)


def test_request_bytes_in_flight_are_bounded_like_grpc(guarded):
    server, tls = guarded
    # A JSON body counts JSON_COST (8) times its size: ~13 KiB of JSON is over 64 KiB.
    big = {"inputs": json_inputs({"z": np.zeros((1000, 2), np.float32),
                                  "y": np.zeros(1000, np.int64)})}  # fmt: skip
    body = json.dumps(big).encode()
    assert 8 * len(body) > 64 << 10
    auth = {"Authorization": f"Bearer {TOKEN}"}
    answer = call(server.base, "POST", f"/v2/models/{DECODER}/infer", body, auth, context=tls)
    assert answer.status == 429
    assert "max_inflight_request_bytes 65536); retry with backoff" in answer.json()["error"]


def test_drain_answers_503_with_grpcs_text(tmp_path_factory):
    server = ServerThread(settings(tiny_repository(tmp_path_factory), http_port=0))
    base = f"http://127.0.0.1:{server.server.http_port}"
    try:
        server._loop.call_soon_threadsafe(server.server.registry.drain)
        time.sleep(0.1)
        body = json.dumps({"inputs": json_inputs({"z": Z, "y": Y})}).encode()
        answer = call(base, "POST", f"/v2/models/{DECODER}/infer", body)
        with channel(server.address) as ch, pytest.raises(grpc.RpcError) as caught:
            grpc_infer(pb_grpc.GRPCInferenceServiceStub(ch), DECODER, {"z": Z, "y": Y})
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert answer.status == 503 and answer.json() == {"error": caught.value.details()}
        assert call(base, "GET", "/v2/health/ready").status == 400
        assert call(base, "GET", "/v2/health/live").status == 200
    finally:
        server.stop(grace_s=1.0)
    with pytest.raises(urllib.error.URLError):  # stopped: the port no longer accepts
        call(base, "GET", "/v2/health/live")


# --- hostile traffic against a vae-serve subprocess ---------------------------------------

STALL_S = 2.0  # --stream-stall-timeout-s: the header and body time bound
MAX_MESSAGE = 4 << 20
BYSTANDER_WORST_S = 1.0
REFUSED_WITHIN_S = 1.0
MIB = 1 << 20


@dataclass
class Bystander:
    """REST readiness and a small infer every 50 ms on a keep-alive connection of its own."""

    port: int
    worst_s: float = 0.0
    calls: int = 0
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        self._body = json.dumps({"inputs": json_inputs({"x": X[:1]})}).encode()
        self._round()
        self.worst_s, self.calls = 0.0, 0
        self._thread = threading.Thread(target=self._run, name="rest-bystander", daemon=True)

    def _request(self, method: str, path: str, body: bytes | None = None) -> int:
        self._connection.request(method, path, body, {"Authorization": f"Bearer {TOKEN}"})
        answer = self._connection.getresponse()
        answer.read()
        return answer.status

    def _round(self) -> None:
        start = time.perf_counter()
        ready = self._request("GET", "/v2/health/ready")
        statuses = (ready, self._request("POST", f"/v2/models/{VAE}-encoder/infer", self._body))
        self.worst_s = max(self.worst_s, time.perf_counter() - start)
        self.calls += 1
        if statuses != (200, 200):
            self.failures.append(str(statuses))

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._round()

    def __enter__(self) -> Bystander:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        time.sleep(0.1)  # a round that began while the attack was on
        self._stop.set()
        self._thread.join(timeout=30)
        self._connection.close()
        assert not self.failures, self.failures
        assert self.calls >= 1
        assert self.worst_s < BYSTANDER_WORST_S, f"bystander waited {self.worst_s:.2f} s"


@pytest.fixture(scope="module")
def hostile_target(tmp_path_factory) -> Iterator[ServerProcess]:
    token = tmp_path_factory.mktemp("rest-token") / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    flags = ["--http-port", "0", "--auth-token-file", str(token), "--stream-stall-timeout-s",
             str(STALL_S), "--max-message-bytes", str(MAX_MESSAGE)]  # fmt: skip
    process = ServerProcess(tiny_repository(tmp_path_factory), flags=flags)
    try:
        # ServerProcess read past it, waiting for SERVING: it is among the lines read.
        found = [re.search(r"REST listening on http://127\.0\.0\.1:(\d+)", line)
                 for line in process.output.lines]  # fmt: skip
        process.http_port = int(next(m for m in found if m).group(1))
        with Bystander(process.http_port):  # runs the models once before RSS is taken
            pass
        process.rss_at_start = rss_bytes(process.process.pid)
        yield process
    finally:
        process.kill()


@contextlib.contextmanager
def _raw(port: int, data: bytes) -> Iterator[socket.socket]:
    """A connection of its own that sent ``data`` first."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        yield sock


def _read_all(sock: socket.socket, timeout_s: float) -> bytes:
    """What the server sends until it closes the connection (fails past timeout_s)."""
    sock.settimeout(timeout_s)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def _head(path: str, *lines: str) -> bytes:
    text = f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
    return (text + "".join(f"{line}\r\n" for line in lines) + "\r\n").encode()


def test_a_body_over_the_limit_is_refused_unread(hostile_target):
    port, infer = hostile_target.http_port, f"/v2/models/{VAE}-encoder/infer"
    with Bystander(port):
        for _ in range(4):
            start = time.perf_counter()
            # Headers only: the 1 GB body is never sent, so the answer cannot have read it.
            over = _head(infer, "Content-Length: 1000000000", "Expect: 100-continue")
            with _raw(port, over) as sock:  # no "100 Continue": the refusal comes first
                answer = _read_all(sock, 5)
            took = time.perf_counter() - start
            assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
            assert b"the request is 1000000000 bytes, over this method's limit of 4194304" in answer
            assert took < REFUSED_WITHIN_S
        # Chunked: no length to check first; refused once the bytes read pass the limit.
        with _raw(port, _head(infer, "Transfer-Encoding: chunked")) as sock:
            chunk = b"%x\r\n%s\r\n" % (MIB, b"[" * MIB)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                for _ in range(8):  # the server closes the connection once it refused
                    sock.sendall(chunk)
            answer = _read_all(sock, 5)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    grown = rss_bytes(hostile_target.process.pid) - hostile_target.rss_at_start
    assert grown < 64 * MIB, f"RSS grew {grown / MIB:.0f} MiB"


def _closed_after(sock: socket.socket, trickle: bytes, limit_s: float) -> float | None:
    """Send ``trickle`` every 0.2 s until the server answers or closes; seconds it took."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        try:
            sock.sendall(trickle)
        except (BrokenPipeError, ConnectionResetError):
            return time.perf_counter() - start
        readable, _, _ = select.select([sock], [], [], 0.2)
        if readable:
            return time.perf_counter() - start
    return None


def test_slow_headers_and_silent_connections_are_cut_off(hostile_target):
    port = hostile_target.http_port
    with Bystander(port), socket.create_connection(("127.0.0.1", port), timeout=10) as silent:
        with _raw(port, b"GET /v2/health/live HTTP/1.1\r\n") as slow:
            took = _closed_after(slow, b"X", STALL_S + 3)  # one header byte per 0.2 s
            assert _read_all(slow, 5) == b""  # cut off without an answer
        assert took is not None and took < STALL_S + 1.0, took
        assert _read_all(silent, 2) == b""  # idle from the start: closed as well


def test_a_slow_body_is_cut_off_with_408(hostile_target):
    port = hostile_target.http_port
    with Bystander(port):
        with _raw(port, _head(f"/v2/models/{VAE}-encoder/infer", "Content-Length: 4000")) as sock:
            took = _closed_after(sock, b" " * 10, STALL_S + 3)  # 10 bytes per 0.2 s
            answer = _read_all(sock, 5)
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert b"did not arrive within 2 s" in answer
        assert took is not None and took < STALL_S + 1.0, took


def test_a_client_that_reads_no_answer_is_cut_off(hostile_target):
    port = hostile_target.http_port
    z = np.zeros((4096, 2), np.float32)  # answers of 1 MiB each
    body, headers = binary_body({"z": z}, parameters={"binary_data_output": True})
    lines = [f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
    request = _head(f"/v2/models/{VAE}-decoder/infer", *lines) + body
    with Bystander(port), socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a tiny window, unread
        sock.settimeout(5)
        sock.connect(("127.0.0.1", port))
        with contextlib.suppress(TimeoutError):
            for _ in range(12):  # pipelined: more answers than any buffer holds
                sock.sendall(request)
        hostile_target.output.wait_for(
            r"rpc=ModelInfer .*code=RESOURCE_EXHAUSTED.*did not read its \d+-byte answer "
            r"within 2 s", timeout_s=STALL_S + 10,
        )  # fmt: skip
        received = 0
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
        assert received < 12 * 4096 * 256  # cut off, not all answered


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(b"[" * (3 * MIB), b"nested more than 32 levels", id="depth"),
        pytest.param(b"[" + b"[]," * MIB + b"[]]", b"more than 262144 arrays and objects",
                     id="containers"),
        pytest.param(b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": '
                     + b"[" * 40 + b"1" + b"]" * 40 + b"}]}", b"nested more than 32 levels",
                     id="deep-data"),
    ],
)  # fmt: skip
def test_json_bombs_are_refused_cheaply(hostile_target, body, message):
    port = hostile_target.http_port
    with Bystander(port):
        start = time.perf_counter()
        answer = call(f"http://127.0.0.1:{port}", "POST", f"/v2/models/{VAE}-encoder/infer", body,
                      {"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
        took = time.perf_counter() - start
    assert answer.status == 400 and message in answer.body, answer.body[:200]
    assert took < REFUSED_WITHIN_S
    grown = rss_bytes(hostile_target.process.pid) - hostile_target.rss_at_start
    assert grown < 64 * MIB, f"RSS grew {grown / MIB:.0f} MiB"


def test_the_server_survived_and_kept_its_memory(hostile_target):
    assert hostile_target.process.poll() is None
    assert Path(f"/proc/{hostile_target.process.pid}").exists()
    grown = rss_bytes(hostile_target.process.pid) - hostile_target.rss_at_start
    assert grown < 64 * MIB, f"RSS grew {grown / MIB:.0f} MiB"
