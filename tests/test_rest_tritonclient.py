"""Triton's own HTTP client (``tritonclient.http``), which nobody here wrote, against vae-serve.

``vae-serve`` runs as a child process on 127.0.0.1 with its REST port on (and a bearer token);
the client runs unchanged in the test process (unlike tritonclient.grpc, its HTTP client
imports no generated protos, so it can share the process with ours). Every answer is compared
with our own gRPC ModelInfer against the same server: same bytes, JSON or binary.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator

import numpy as np
import pytest
from client_fixtures import CVAE, VAE, ServerProcess, tiny_repository
from missing import missing
from serving_fixtures import channel

from vaeserve.proto.inference import grpc_service_pb2 as pb
from vaeserve.proto.inference import grpc_service_pb2_grpc as pb_grpc

TOKEN = "tritonclient-http-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
METADATA = (("authorization", f"Bearer {TOKEN}"),)
DECODER, ENCODER, SCORER = (f"{CVAE}-{kind}" for kind in ("decoder", "encoder", "scorer"))
T = 30.0
RNG = np.random.default_rng(5)
Z = RNG.standard_normal((4, 2)).astype(np.float32)
Y = np.array([0, 3, 7, 9], dtype=np.int64)
X = RNG.uniform(0, 1, (4, 1, 8, 8)).astype(np.float32)
_TYPES = {np.dtype("float32"): "FP32", np.dtype("int64"): "INT64"}
_CLOSED: list[object] = []


@pytest.fixture(autouse=True, scope="module")
def tritonclient_installed() -> None:
    if importlib.util.find_spec("tritonclient") is None:
        missing("tritonclient is not installed (the dev extra installs it)")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    token = tmp_path_factory.mktemp("tritonclient-http") / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    flags = ["--http-port", "0", "--auth-token-file", str(token)]
    process = ServerProcess(tiny_repository(tmp_path_factory), flags=flags)
    try:
        found = [re.search(r"REST listening on http://127\.0\.0\.1:(\d+)", line)
                 for line in process.output.lines]  # fmt: skip
        process.http_port = int(next(m for m in found if m).group(1))
        yield process
    finally:
        process.kill()


@pytest.fixture(scope="module")
def client(server):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(
        f"127.0.0.1:{server.http_port}", connection_timeout=T, network_timeout=T
    )
    yield client
    client.close()
    # The client sits in reference cycles; its __del__ closes it again through gevent, which
    # fails when the collector happens to run on another thread (a later module's server
    # loop). Kept alive, it is collected at exit, on the main thread.
    _CLOSED.append(client)


@pytest.fixture(scope="module")
def stub(server):
    with channel(f"127.0.0.1:{server.port}") as ch:
        yield pb_grpc.GRPCInferenceServiceStub(ch)


def grpc_outputs(stub, model: str, arrays: dict[str, np.ndarray], **parameters) -> dict:
    request = pb.ModelInferRequest(model_name=model)
    for name, value in parameters.items():
        request.parameters[name].int64_param = value
    for name, a in arrays.items():
        request.inputs.add(name=name, datatype=_TYPES[a.dtype], shape=a.shape)
        request.raw_input_contents.append(a.tobytes())
    response = stub.ModelInfer(request, timeout=T, metadata=METADATA)
    return dict(zip([o.name for o in response.outputs], response.raw_output_contents, strict=True))


def triton_infer(client, model: str, arrays: dict[str, np.ndarray], binary: bool, **options):
    import tritonclient.http as httpclient

    inputs = []
    for name, a in arrays.items():
        tensor = httpclient.InferInput(name, list(a.shape), _TYPES[a.dtype])
        tensor.set_data_from_numpy(a, binary_data=binary)
        inputs.append(tensor)
    # A copy: tritonclient adds Inference-Header-Content-Length to the dict it is given.
    return client.infer(model, inputs, headers=dict(AUTH), **options)


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()  # open without the token
    meta = client.get_server_metadata(headers=AUTH)
    assert meta["name"] == "vaeserve"
    assert {"binary_tensor_data", "model_configuration", "statistics"} <= set(meta["extensions"])
    assert client.is_model_ready(DECODER, headers=AUTH)
    assert client.is_model_ready(DECODER, "1", headers=AUTH)
    assert not client.is_model_ready("nope-decoder", headers=AUTH)
    model = client.get_model_metadata(DECODER, headers=AUTH)
    assert model["name"] == DECODER and model["versions"] == ["1"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in model["inputs"]] == [
        ("z", "FP32", [-1, 2]), ("y", "INT64", [-1])
    ]  # fmt: skip
    config = client.get_model_config(DECODER, headers=AUTH)
    assert config["name"] == DECODER and config["max_batch_size"] > 0
    assert {i["name"] for i in config["input"]} == {"z", "y"}
    assert "dynamic_batching" in config


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_equals_grpc_for_every_kind(client, stub, binary):
    import tritonclient.http as httpclient

    cases = [(DECODER, {"z": Z, "y": Y}, {}), (ENCODER, {"x": X, "y": Y}, {}),
             (SCORER, {"x": X, "y": Y}, {"seed": 9, "k": 3})]  # fmt: skip
    for model, arrays, parameters in cases:
        expected = grpc_outputs(stub, model, arrays, **parameters)
        outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in expected]
        result = triton_infer(client, model, arrays, binary, outputs=outputs,
                              request_id="req-42", parameters=parameters or None)  # fmt: skip
        response = result.get_response()
        assert (response["id"], response["model_version"]) == ("req-42", "1")
        for name, raw in expected.items():
            got = result.as_numpy(name)
            assert got.dtype == (np.float64 if model == SCORER else np.float32)
            assert got.astype(got.dtype.newbyteorder("<")).tobytes() == raw, (model, name)
        if parameters:
            assert response["parameters"]["seed"] == 9


def test_no_outputs_named_means_all_in_binary(client, stub):
    result = triton_infer(client, ENCODER, {"x": X, "y": Y}, binary=True)
    expected = grpc_outputs(stub, ENCODER, {"x": X, "y": Y})
    assert [o["name"] for o in result.get_response()["outputs"]] == ["mu", "logvar"]
    assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])
    for name, raw in expected.items():
        assert result.as_numpy(name).tobytes() == raw


def test_errors_are_inference_server_exceptions(client, stub):
    from tritonclient.utils import InferenceServerException

    bad = {"z": np.zeros((2, 3), np.float32), "y": np.zeros(2, np.int64)}
    with pytest.raises(InferenceServerException) as caught:
        triton_infer(client, DECODER, bad, binary=True)
    assert caught.value.status() == "400"
    assert "input 'z' has shape [2, 3], expected [-1, 2]" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        triton_infer(client, "nope-decoder", {"z": Z}, binary=False)
    assert caught.value.status() == "404" and "'nope-decoder' is not served" in (
        caught.value.message()
    )
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_metadata(DECODER, "7", headers=AUTH)
    assert caught.value.status() == "404" and "no loaded version '7'" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:  # no --model-control-mode explicit
        client.load_model(VAE, headers=AUTH)
    assert caught.value.status() == "503" and "explicit" in caught.value.message()


def test_auth(client):
    from tritonclient.utils import InferenceServerException

    for headers in (None, {"Authorization": "Bearer wrong"}):
        with pytest.raises(InferenceServerException) as caught:
            client.get_model_metadata(DECODER, headers=headers)
        assert caught.value.status() == "401"
        assert "bearer token" in caught.value.message()
        with pytest.raises(InferenceServerException) as caught:
            client.infer(DECODER, [], headers=headers)
        assert caught.value.status() == "401"


def test_statistics_and_repository_index(client):
    stats = client.get_inference_statistics(DECODER, headers=AUTH)
    (decoder,) = stats["model_stats"]
    assert (decoder["name"], decoder["version"]) == (DECODER, "1")
    assert decoder["inference_stats"]["success"]["count"] >= 2  # the infer tests' calls
    everything = client.get_inference_statistics(headers=AUTH)["model_stats"]
    assert {s["name"] for s in everything} >= {DECODER, ENCODER, SCORER}
    index = client.get_model_repository_index(headers=AUTH)
    assert {(m["name"], m["state"]) for m in index} >= {(CVAE, "READY"), (VAE, "READY")}
