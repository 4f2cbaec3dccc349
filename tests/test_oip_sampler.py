"""NAME-sampler: the typed API's Sample through the Open Inference Protocol, in process.

Every answer is compared with the typed ``Sample`` call's, byte for byte: a contiguous run of
indices with ``start_index`` and ``num_samples``, a shuffled or repeated list of indices with
the rows of the contiguous answer at those indices. One call goes through Triton's own client
in a process of its own (its protos and ours cannot share one).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from client_fixtures import CVAE, VAE, tiny_repository
from missing import missing
from ops_fixtures import settings
from serving_fixtures import ServerThread, array, channel

from vaeserve.engine import sampling
from vaeserve.proto.inference import grpc_service_pb2 as pb
from vaeserve.proto.inference import grpc_service_pb2_grpc as pb_grpc
from vaeserve.proto.inference import model_config_pb2 as config_pb
from vaeserve.proto.v1 import vaeserve_pb2 as typed_pb
from vaeserve.proto.v1 import vaeserve_pb2_grpc as typed_grpc
from vaeserve.server.settings import BatchingSettings

T = 30.0  # per-call timeout
PRIOR = "tiny-prior"  # a prior-conditioned CVAE: its class means move the latents
MAX_ROWS = 4096  # rows per request (the batcher's batches hold 16)
MAX_MESSAGE = 1 << 20  # the smallest the server takes: 3723 rows of tiny-vae's outputs
_Requested = pb.ModelInferRequest.InferRequestedOutputTensor


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from export_fixtures import save_tiny_checkpoint, tiny_config

    from vaeserve.export.onnx_export import export_checkpoint

    models = tiny_repository(tmp_path_factory)
    repository = tmp_path_factory.mktemp("oip-sampler") / "models"
    for name in (VAE, CVAE):
        shutil.copytree(models / name, repository / name)
    config = tiny_config(kind="cvae", conditioning="prior")
    export_checkpoint(
        save_tiny_checkpoint(repository.parent / "prior.pt", config), repository, PRIOR
    )
    # A queue delay long enough that concurrent requests' rows meet in one batch.
    batching = BatchingSettings(
        max_batch_size=16, max_queue_delay_ms=20.0, queue_delay_policy="always"
    )
    server = ServerThread(
        settings(
            repository,
            max_samples_per_request=MAX_ROWS,
            max_message_bytes=MAX_MESSAGE,
            batching=batching,
        )
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stubs(served):
    with channel(served.address) as ch:
        yield pb_grpc.GRPCInferenceServiceStub(ch), typed_grpc.VaeServiceStub(ch)


def _labels(model: str, n: int, salt: int = 0) -> np.ndarray | None:
    return None if model == VAE else (np.arange(n, dtype=np.int64) * 3 + salt) % 10


def _param(value) -> pb.InferParameter:
    if isinstance(value, pb.InferParameter):
        return value
    if isinstance(value, str):
        return pb.InferParameter(string_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    return pb.InferParameter(int64_param=value)


def _oip(model, index, y=None, raw=True, outputs=(), **params) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=f"{model}-sampler", id="r-1")
    inputs = {"index": np.asarray(index, dtype=np.int64)}
    if y is not None:
        inputs["y"] = np.asarray(y, dtype=np.int64)
    for name, value in inputs.items():
        t = request.inputs.add(name=name, datatype="INT64", shape=value.shape)
        if raw:
            request.raw_input_contents.append(value.tobytes())
        else:
            t.contents.int64_contents.extend(value.tolist())
    request.outputs.extend(_Requested(name=n) for n in outputs)
    for name, value in params.items():
        request.parameters[name].CopyFrom(_param(value))
    return request


def _outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    types = {"FP32": "<f4", "INT64": "<i8"}
    assert len(response.raw_output_contents) == len(response.outputs)
    return {
        o.name: np.frombuffer(raw, types[o.datatype]).reshape(tuple(o.shape))
        for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def _typed(typed, model, seed, start, n, labels=None, temperature=None, draw=False):
    request = typed_pb.SampleRequest(
        model=typed_pb.ModelRef(name=model),
        num_samples=n,
        seed=seed,
        start_index=start,
        return_latents=True,
        output=typed_pb.OUTPUT_KIND_DRAW if draw else typed_pb.OUTPUT_KIND_MEAN,
    )
    if labels is not None:
        request.labels.extend(labels.tolist())
    if temperature is not None:
        request.temperature = temperature
    answer = typed.Sample(request, timeout=T)
    out = {"samples": array(answer.samples), "latents": array(answer.latents)}
    if labels is not None:
        out["labels"] = array(answer.labels)
    return out


def _assert_bytes_equal(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name, value in want.items():
        assert got[name].shape == value.shape, name
        assert got[name].tobytes() == value.tobytes(), name


def test_metadata_config_statistics_and_readiness(stubs):
    oip, _ = stubs
    meta = oip.ModelMetadata(pb.ModelMetadataRequest(name=f"{CVAE}-sampler"), timeout=T)
    assert meta.platform == "vaeserve" and list(meta.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("index", "INT64", [-1]),
        ("y", "INT64", [-1]),
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("samples", "FP32", [-1, 1, 8, 8]),
        ("latents", "FP32", [-1, 2]),
        ("labels", "INT64", [-1]),
    ]
    vae = oip.ModelMetadata(pb.ModelMetadataRequest(name=f"{VAE}-sampler"), timeout=T)
    assert [t.name for t in vae.inputs] == ["index"]
    assert [t.name for t in vae.outputs] == ["samples", "latents"]
    config = oip.ModelConfig(pb.ModelConfigRequest(name=f"{VAE}-sampler"), timeout=T).config
    # index is [n], no shape per row: full shapes and max_batch_size 0, which perf_analyzer
    # can drive (it refuses an input with an empty per-row shape under an implicit batch axis).
    assert (config.backend, config.max_batch_size) == ("vaeserve", 0)
    assert not config.HasField("dynamic_batching")
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("index", config_pb.TYPE_INT64, [-1])
    ]
    assert [(o.name, list(o.dims)) for o in config.output] == [
        ("samples", [-1, 1, 8, 8]),
        ("latents", [-1, 2]),
    ]
    assert oip.ModelReady(pb.ModelReadyRequest(name=f"{PRIOR}-sampler"), timeout=T).ready
    oip.ModelInfer(_oip(VAE, np.arange(4), seed=1), timeout=T)
    stats = oip.ModelStatistics(pb.ModelStatisticsRequest(name=f"{VAE}-sampler"), timeout=T)
    assert [(s.name, s.version) for s in stats.model_stats] == [(f"{VAE}-sampler", "1")]
    # The decoder batcher's numbers, where the sampler's rows ran: not zero after a call.
    decoder = oip.ModelStatistics(pb.ModelStatisticsRequest(name=f"{VAE}-decoder"), timeout=T)
    assert stats.model_stats[0].inference_count == decoder.model_stats[0].inference_count >= 4


RANGES = [(0, 1), (7, 1), (0, 16), (10, 20), (3, 64), (sampling.MAX_ROW_INDEX - 3, 3)]


@pytest.mark.parametrize("model", [VAE, CVAE, PRIOR])
def test_index_ranges_equal_the_typed_sample(stubs, model):
    oip, typed = stubs
    for start, n in RANGES:  # (10, 20) crosses the batcher's 16-row batches
        y = _labels(model, n, salt=start)
        response = oip.ModelInfer(_oip(model, np.arange(start, start + n), y, seed=41), timeout=T)
        assert (response.model_name, response.id) == (f"{model}-sampler", "r-1")
        assert response.parameters["seed"].uint64_param == 41
        _assert_bytes_equal(_outputs(response), _typed(typed, model, 41, start, n, y))


@pytest.mark.parametrize("model", [VAE, CVAE, PRIOR])
def test_shuffled_and_repeated_indices_are_rows_of_the_contiguous_answer(stubs, model):
    oip, typed = stubs
    whole = _typed(typed, model, 5, 100, 40, _labels(model, 40))
    rng = np.random.default_rng(3)
    for rows in (rng.permutation(40), rng.integers(0, 40, 50), np.array([39, 0, 0, 17, 18, 19])):
        y = None if model == VAE else whole["labels"][rows]
        response = oip.ModelInfer(_oip(model, 100 + rows, y, raw=False, seed=5), timeout=T)
        _assert_bytes_equal(_outputs(response), {k: v[rows] for k, v in whole.items()})


@pytest.mark.parametrize("model", [VAE, PRIOR])
@pytest.mark.parametrize(
    ("params", "temperature", "draw"),
    [
        ({"temperature": 0.37}, 0.37, False),
        ({"temperature": 2}, 2.0, False),
        ({"temperature": 0.0, "output": "draw"}, 0.0, True),
        ({"output": "draw"}, None, True),
        ({"output": "mean", "temperature": "1.5"}, 1.5, False),
    ],
)
def test_temperature_and_output_as_the_typed_sample(stubs, model, params, temperature, draw):
    oip, typed = stubs
    index = np.array([3, 4, 5, 9, 2])
    whole = _typed(typed, model, 8, 0, 10, _labels(model, 10), temperature, draw)
    y = None if model == VAE else whole["labels"][index]
    got = _outputs(oip.ModelInfer(_oip(model, index, y, seed=8, **params), timeout=T))
    _assert_bytes_equal(got, {k: v[index] for k, v in whole.items()})


def test_seed_is_chosen_when_absent_and_outputs_as_requested(stubs):
    oip, typed = stubs
    response = oip.ModelInfer(_oip(VAE, [4, 5], outputs=["latents"]), timeout=T)
    assert [o.name for o in response.outputs] == ["latents"]
    seed = response.parameters["seed"].uint64_param
    again = _typed(typed, VAE, seed, 4, 2)
    assert _outputs(response)["latents"].tobytes() == again["latents"].tobytes()
    unsigned = _oip(VAE, [4, 5], seed=pb.InferParameter(uint64_param=seed))
    assert _outputs(oip.ModelInfer(unsigned, timeout=T))["samples"].tobytes() == (
        again["samples"].tobytes()
    )
    other = oip.ModelInfer(_oip(VAE, [4, 5]), timeout=T)
    assert other.parameters["seed"].uint64_param != seed


def _decoder_counts(oip) -> np.ndarray:
    """NAME-decoder's rows, batched runs and batcher calls so far."""
    request = pb.ModelStatisticsRequest(name=f"{VAE}-decoder", version="1")
    stats = oip.ModelStatistics(request, timeout=T).model_stats[0]
    calls = stats.inference_stats.success.count
    return np.array([stats.inference_count, stats.execution_count, calls])


def test_rows_of_concurrent_requests_share_decoder_batches(stubs):
    oip, typed = stubs
    before = _decoder_counts(oip)
    rng = np.random.default_rng(9)
    requests = [rng.choice(1000, 6, replace=False) for _ in range(8)]  # scattered: 6 runs each
    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(
            pool.map(lambda i: oip.ModelInfer(_oip(VAE, i, seed=2), timeout=T), requests)
        )
    rows, runs, calls = _decoder_counts(oip) - before
    # Each request's 6 runs are one decoder call; the 8 calls, queued within the 20 ms
    # delay, share batches of up to 16 rows.
    assert (rows, calls) == (6 * len(requests), len(requests))
    assert runs < len(requests), (rows, runs)
    whole = _typed(typed, VAE, 2, 0, 1000)["samples"]
    for index, answer in zip(requests, answers, strict=True):
        assert _outputs(answer)["samples"].tobytes() == whole[index].tobytes()


Y2 = np.array([1, 2])
REFUSALS = [
    pytest.param(CVAE, {"index": None}, {}, "inputs are ['y'], expected exactly ['index', 'y']",
                 id="missing-index"),
    pytest.param(CVAE, {"y": None}, {}, "expected exactly ['index', 'y']: tiny-cvae is a cvae",
                 id="missing-y"),
    pytest.param(VAE, {"y": Y2}, {}, "expected exactly ['index']", id="y-for-a-vae"),
    pytest.param(CVAE, {"datatype": "INT32"}, {},
                 "input 'index' has datatype 'INT32', expected 'INT64'", id="index-datatype"),
    pytest.param(CVAE, {"index": [0, -1]}, {}, "input 'index' holds -1, expected sample "
                 "indices 0..1099511627775", id="negative-index"),
    pytest.param(VAE, {"index": [sampling.MAX_ROW_INDEX]}, {}, "input 'index' holds "
                 "1099511627776", id="index-past-the-end"),
    pytest.param(CVAE, {"y": [0, 10]}, {}, "input 'y' holds class 10, expected classes 0..9",
                 id="y-out-of-classes"),
    pytest.param(CVAE, {"y": [1]}, {}, "inputs have different batch sizes", id="y-rows"),
    pytest.param(VAE, {"index": list(range(MAX_ROWS + 1))}, {},
                 "input 'index' has 4097 rows, expected 1 to 4096", id="too-many-rows"),
    pytest.param(VAE, {}, {"seed": -1}, "seed is -1, expected 0..", id="negative-seed"),
    pytest.param(VAE, {}, {"seed": 1.5}, "parameter 'seed' is double_param, expected "
                 "int64_param or uint64_param", id="seed-as-double"),
    pytest.param(VAE, {}, {"temperature": "hot"}, "parameter 'temperature' is 'hot', "
                 "expected a number: double_param", id="temperature-not-a-number"),
    pytest.param(VAE, {}, {"temperature": pb.InferParameter(bool_param=True)},
                 "parameter 'temperature' is bool_param, expected a number", id="temperature-bool"),
    pytest.param(VAE, {}, {"temperature": -0.5}, "temperature is -0.5, expected a number in "
                 "0..1e+06", id="negative-temperature"),
    pytest.param(VAE, {}, {"temperature": float("nan")}, "temperature is nan", id="nan"),
    pytest.param(VAE, {}, {"output": "sample"}, "parameter 'output' is 'sample', expected "
                 "string_param 'mean'", id="output-kind"),
    pytest.param(VAE, {"outputs": ["x"]}, {}, "requested output 'x' is unknown, expected one "
                 "of ['samples', 'latents']", id="unknown-output"),
]  # fmt: skip


@pytest.mark.parametrize(("model", "change", "params", "message"), REFUSALS)
def test_refusals_name_the_tensor_or_parameter(stubs, model, change, params, message):
    oip, _ = stubs
    index = change.get("index", [0, 1])
    y = change.get("y", Y2 if model != VAE else None)
    request = _oip(model, [] if index is None else index, y, outputs=change.get("outputs", ()))
    if index is None:
        del request.inputs[0]
        del request.raw_input_contents[0]
    if "datatype" in change:
        request.inputs[0].datatype = change["datatype"]
    for name, value in params.items():
        request.parameters[name].CopyFrom(_param(value))
    with pytest.raises(grpc.RpcError) as caught:
        oip.ModelInfer(request, timeout=T)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()


def test_an_answer_too_large_is_refused_before_computing(stubs):
    oip, _ = stubs
    # 1 MiB less the headroom holds 3840 rows of samples alone, 3723 with their latents.
    answer = oip.ModelInfer(_oip(VAE, range(3800), outputs=["samples"], seed=1), timeout=T)
    assert list(answer.outputs[0].shape) == [3800, 1, 8, 8]
    with pytest.raises(grpc.RpcError) as caught:
        oip.ModelInfer(_oip(VAE, range(3800), seed=1), timeout=T)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ask for at most 3723 rows" in caught.value.details()


_TRITON_CALL = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tritonclient.grpc as grpcclient

    address, model = sys.argv[1:]
    client = grpcclient.InferenceServerClient(address)
    meta = client.get_model_metadata(model, as_json=True)
    index = grpcclient.InferInput("index", [3], "INT64")
    index.set_data_from_numpy(np.array([12, 10, 11], dtype=np.int64))
    result = client.infer(model, [index], parameters={"seed": 7, "temperature": "0.5"})
    response = result.get_response(as_json=True)
    print(json.dumps({
        "inputs": [i["name"] for i in meta["inputs"]],
        "samples": result.as_numpy("samples").tobytes().hex(),
        "shape": list(result.as_numpy("samples").shape),
        "parameters": response.get("parameters", {}),
    }))
    """
)


def test_tritonclient_samples_with_seed(served, stubs):
    if importlib.util.find_spec("tritonclient") is None:
        missing("tritonclient is not installed (the dev extra installs it)")
    _, typed = stubs
    done = subprocess.run(
        [sys.executable, "-c", _TRITON_CALL, served.address, f"{VAE}-sampler"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    want = _typed(typed, VAE, 7, 10, 3, temperature=0.5)["samples"][[2, 0, 1]]
    assert seen["inputs"] == ["index"] and seen["shape"] == [3, 1, 8, 8]
    assert bytes.fromhex(seen["samples"]) == want.tobytes()
    assert seen["parameters"]["seed"] == {"uint64_param": "7"}
