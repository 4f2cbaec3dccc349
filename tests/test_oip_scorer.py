"""NAME-scorer: the typed API's Score through the Open Inference Protocol, in process.

The same engine path and the same checks as ``VaeService.Score``: every answer is compared
with the typed call's, byte for byte (float64), and every refusal with the typed call's
message. One call goes through Triton's own client, in a process of its own (its protos and
ours cannot share one: docs/architecture.md, "A trap").
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import grpc
import numpy as np
import pytest
from client_fixtures import CVAE, VAE, tiny_repository
from missing import missing
from ops_fixtures import settings
from serving_fixtures import ServerThread, channel, tensor

from vaeserve.proto.inference import grpc_service_pb2 as pb
from vaeserve.proto.inference import grpc_service_pb2_grpc as pb_grpc
from vaeserve.proto.inference import model_config_pb2 as config_pb
from vaeserve.proto.v1 import vaeserve_pb2 as typed_pb
from vaeserve.proto.v1 import vaeserve_pb2_grpc as typed_grpc

T = 30.0  # per-call timeout
MAX_K = 8
MAX_ROWS = 200  # n * k of one call
OUTPUTS = ["elbo", "log_px", "log_likelihood", "kl"]
CVAE_SCORER, VAE_SCORER = f"{CVAE}-scorer", f"{VAE}-scorer"
_Requested = pb.ModelInferRequest.InferRequestedOutputTensor


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    config = settings(
        tiny_repository(tmp_path_factory), max_score_samples=MAX_K, max_score_rows=MAX_ROWS
    )
    server = ServerThread(config)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stubs(served):
    with channel(served.address) as ch:
        yield pb_grpc.GRPCInferenceServiceStub(ch), typed_grpc.VaeServiceStub(ch)


def _data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (n, 1, 8, 8)).astype(np.float32)
    return x, (np.arange(n, dtype=np.int64) * 3) % 10


def _param(value: int, kind: str = "int64_param") -> pb.InferParameter:
    return pb.InferParameter(**{kind: value})


def _oip(model: str, x, y=None, raw: bool = True, outputs=(), **params) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id="s-1")
    inputs = {"x": ("FP32", "fp32_contents", x)}
    if y is not None:
        inputs["y"] = ("INT64", "int64_contents", y)
    for name, (datatype, field, value) in inputs.items():
        t = request.inputs.add(name=name, datatype=datatype, shape=value.shape)
        if raw:
            request.raw_input_contents.append(value.tobytes())
        else:
            getattr(t.contents, field).extend(value.ravel().tolist())
    request.outputs.extend(_Requested(name=n) for n in outputs)
    for name, value in params.items():
        request.parameters[name].CopyFrom(
            value if isinstance(value, pb.InferParameter) else _param(value)
        )
    return request


def _typed(model: str, x, y=None, k: int = 1, seed=None, start: int = 0) -> typed_pb.ScoreRequest:
    request = typed_pb.ScoreRequest(
        model=typed_pb.ModelRef(name=model), x=tensor(x), k=k, start_index=start
    )
    if y is not None:
        request.labels.extend(y.tolist())
    if seed is not None:
        request.seed = seed
    return request


def _outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    assert len(response.raw_output_contents) == len(response.outputs)
    out = {}
    for o, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        assert o.datatype == "FP64"
        out[o.name] = np.frombuffer(raw, "<f8").reshape(tuple(o.shape))
    return out


def test_scorer_metadata_config_and_readiness(stubs):
    oip, _ = stubs
    meta = oip.ModelMetadata(pb.ModelMetadataRequest(name=CVAE_SCORER), timeout=T)
    assert (meta.name, list(meta.versions)) == (CVAE_SCORER, ["1"])
    assert {t.name: (t.datatype, list(t.shape)) for t in meta.inputs} == {
        "x": ("FP32", [-1, 1, 8, 8]),
        "y": ("INT64", [-1]),
    }
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        (n, "FP64", [-1]) for n in OUTPUTS
    ]
    vae = oip.ModelMetadata(pb.ModelMetadataRequest(name=VAE_SCORER, version="1"), timeout=T)
    assert [t.name for t in vae.inputs] == ["x"]
    config = oip.ModelConfig(pb.ModelConfigRequest(name=CVAE_SCORER), timeout=T).config
    assert config.name == CVAE_SCORER and config.max_batch_size == 64
    assert {i.name: list(i.dims) for i in config.input} == {"x": [1, 8, 8], "y": []}
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        (n, config_pb.TYPE_FP64, []) for n in OUTPUTS
    ]
    assert oip.ModelReady(pb.ModelReadyRequest(name=CVAE_SCORER), timeout=T).ready
    assert not oip.ModelReady(pb.ModelReadyRequest(name=CVAE_SCORER, version="2"), timeout=T).ready
    everything = oip.ModelStatistics(pb.ModelStatisticsRequest(), timeout=T)
    assert {(CVAE_SCORER, "1"), (VAE_SCORER, "1")} <= {
        (s.name, s.version) for s in everything.model_stats
    }
    with pytest.raises(grpc.RpcError) as caught:
        oip.ModelMetadata(pb.ModelMetadataRequest(name="nope-scorer"), timeout=T)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert repr(CVAE_SCORER) in caught.value.details()  # among the served models


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed-contents"])
@pytest.mark.parametrize("model", [CVAE, VAE])
def test_infer_equals_the_typed_score(stubs, model, raw):
    oip, typed = stubs
    x, y = _data(6)
    y = y if model == CVAE else None
    request = _oip(f"{model}-scorer", x, y, raw=raw, k=5, seed=123, start_index=2)
    response = oip.ModelInfer(request, timeout=T)
    expected = typed.Score(_typed(model, x, y, k=5, seed=123, start=2), timeout=T)
    assert (response.model_name, response.model_version, response.id) == (
        f"{model}-scorer",
        "1",
        "s-1",
    )
    assert response.parameters["seed"].uint64_param == 123
    got = _outputs(response)
    assert list(got) == OUTPUTS
    for name in OUTPUTS:
        want = np.array(getattr(expected, name), dtype="<f8")
        assert got[name].shape == (6,)
        assert got[name].tobytes() == want.tobytes(), name


def test_seed_is_chosen_when_absent_and_answered(stubs):
    oip, typed = stubs
    x, y = _data(3, seed=1)
    first = oip.ModelInfer(_oip(CVAE_SCORER, x, y, k=4), timeout=T)
    assert first.parameters["seed"].WhichOneof("parameter_choice") == "uint64_param"
    seed = first.parameters["seed"].uint64_param
    again = typed.Score(_typed(CVAE, x, y, k=4, seed=seed), timeout=T)
    assert _outputs(first)["log_px"].tobytes() == np.array(again.log_px, "<f8").tobytes()
    second = oip.ModelInfer(_oip(CVAE_SCORER, x, y, k=4), timeout=T)
    assert second.parameters["seed"].uint64_param != seed


def test_requested_outputs_and_unknown_parameters(stubs):
    oip, _ = stubs
    x, y = _data(4, seed=2)
    plain = _outputs(oip.ModelInfer(_oip(CVAE_SCORER, x, y, k=3, seed=9), timeout=T))
    ignored = {"priority": _param(1, "uint64_param"), "note": pb.InferParameter(string_param="x")}
    request = _oip(CVAE_SCORER, x, y, outputs=["kl", "log_px"], k=3, seed=9, **ignored)
    response = oip.ModelInfer(request, timeout=T)
    assert [o.name for o in response.outputs] == ["kl", "log_px"]
    for name, value in _outputs(response).items():
        assert value.tobytes() == plain[name].tobytes()
    # k and seed as uint64_param, as Triton's clients may send them: the same answer.
    unsigned = _oip(CVAE_SCORER, x, y, k=_param(3, "uint64_param"), seed=_param(9, "uint64_param"))
    assert _outputs(oip.ModelInfer(unsigned, timeout=T))["elbo"].tobytes() == (
        plain["elbo"].tobytes()
    )
    with pytest.raises(grpc.RpcError) as caught:
        oip.ModelInfer(_oip(CVAE_SCORER, x, y, outputs=["nll"]), timeout=T)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "requested output 'nll' is unknown" in caught.value.details()


X2, Y2 = _data(2)
SAME_AS_TYPED = [
    pytest.param(CVAE, X2, Y2, {"k": 0}, "k is 0, expected 1..8", id="k-zero"),
    pytest.param(CVAE, X2, Y2, {"k": MAX_K + 1}, "k is 9, expected 1..8", id="k-too-large"),
    pytest.param(CVAE, *_data(30), {"k": 8}, "expected at most 200", id="n-times-k"),
    pytest.param(CVAE, X2, None, {}, "labels holds 0 classes, expected 2", id="missing-y"),
    pytest.param(CVAE, X2.reshape(2, 1, 4, 16), Y2, {}, "expected [n, 1, 8, 8]",
                 id="x-shape"),
    pytest.param(CVAE, X2, np.array([0, 10]), {}, "expected classes 0..9", id="label-range"),
    pytest.param(CVAE, X2 * 2, Y2, {}, "value_range", id="x-range"),
    pytest.param(VAE, X2, Y2, {}, "take no label", id="y-for-a-vae"),
    pytest.param(VAE, X2, None, {"start_index": -1}, "start_index is -1", id="start-index"),
]  # fmt: skip


@pytest.mark.parametrize(("model", "x", "y", "params", "message"), SAME_AS_TYPED)
def test_refusals_are_the_typed_apis(stubs, model, x, y, params, message):
    oip, typed = stubs
    with pytest.raises(grpc.RpcError) as caught:
        oip.ModelInfer(_oip(f"{model}-scorer", x, y, **params), timeout=T)
    typed_params = {"k": params.get("k", 1), "start": params.get("start_index", 0)}
    with pytest.raises(grpc.RpcError) as typed_caught:
        typed.Score(_typed(model, x, y, **typed_params), timeout=T)
    assert caught.value.code() == typed_caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == typed_caught.value.details()
    assert message in caught.value.details()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param(lambda r: r.parameters["k"].CopyFrom(pb.InferParameter(string_param="2")),
                     "parameter 'k' is string_param, expected int64_param or uint64_param",
                     id="k-as-string"),
        pytest.param(lambda r: r.parameters["seed"].CopyFrom(_param(-1)),
                     "seed is -1, expected 0..", id="negative-seed"),
        pytest.param(lambda r: setattr(r.inputs[0], "datatype", "FP16"),
                     "input 'x' has datatype 'FP16', expected 'FP32'", id="x-datatype"),
        pytest.param(lambda r: setattr(r.inputs[1], "name", "labels"),
                     "expected exactly ['x', 'y']", id="unknown-input"),
        pytest.param(lambda r: r.inputs[1].shape.append(1), "expected [-1]", id="y-shape"),
    ],
)  # fmt: skip
def test_protocol_refusals(stubs, change, message):
    oip, _ = stubs
    request = _oip(CVAE_SCORER, X2, Y2)
    change(request)
    with pytest.raises(grpc.RpcError) as caught:
        oip.ModelInfer(request, timeout=T)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()


_TRITON_CALL = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tritonclient.grpc as grpcclient

    address, model, path = sys.argv[1:]
    data = np.load(path)
    client = grpcclient.InferenceServerClient(address)
    meta = client.get_model_metadata(model, as_json=True)
    inputs = [grpcclient.InferInput("x", list(data["x"].shape), "FP32"),
              grpcclient.InferInput("y", list(data["y"].shape), "INT64")]
    inputs[0].set_data_from_numpy(data["x"])
    inputs[1].set_data_from_numpy(data["y"])
    result = client.infer(model, inputs, parameters={"k": 4, "seed": 77},
                          outputs=[grpcclient.InferRequestedOutput("log_px"),
                                   grpcclient.InferRequestedOutput("elbo")])
    response = result.get_response(as_json=True)
    print(json.dumps({
        "outputs": [meta_o["datatype"] for meta_o in meta["outputs"]],
        "log_px": result.as_numpy("log_px").tobytes().hex(),
        "elbo": result.as_numpy("elbo").tobytes().hex(),
        "dtype": str(result.as_numpy("log_px").dtype),
        "parameters": response.get("parameters", {}),
    }))
    """
)


def test_tritonclient_scores_with_k_and_seed(served, stubs, tmp_path):
    if importlib.util.find_spec("tritonclient") is None:
        missing("tritonclient is not installed (the dev extra installs it)")
    _, typed = stubs
    x, y = _data(3, seed=5)
    np.savez(tmp_path / "inputs.npz", x=x, y=y)
    done = subprocess.run(
        [sys.executable, "-c", _TRITON_CALL, served.address, CVAE_SCORER,
         str(tmp_path / "inputs.npz")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    expected = typed.Score(_typed(CVAE, x, y, k=4, seed=77), timeout=T)
    assert seen["outputs"] == ["FP64"] * 4 and seen["dtype"] == "float64"
    assert bytes.fromhex(seen["log_px"]) == np.array(expected.log_px, "<f8").tobytes()
    assert bytes.fromhex(seen["elbo"]) == np.array(expected.elbo, "<f8").tobytes()
    assert seen["parameters"]["seed"] == {"uint64_param": "77"}
