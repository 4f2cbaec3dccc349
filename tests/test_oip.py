"""The Open Inference Protocol with our own stubs: tensor conversion, and (in process) the
server's answers to the calls KServe's and Triton's clients make."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from client_fixtures import tiny_repository
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from ops_fixtures import CVAE, DECODER, ENCODER, decoder_inputs, pristine_version, settings
from serving_fixtures import Reference, ServerThread, channel

from vaeserve.errors import InvalidRequest, ModelNotFound
from vaeserve.manifest import TensorSpec
from vaeserve.proto.inference import grpc_service_pb2 as pb
from vaeserve.proto.inference import grpc_service_pb2_grpc as pb_grpc
from vaeserve.proto.inference import model_config_pb2 as config_pb
from vaeserve.server import oip_convert as convert
from vaeserve.server.inference_protocol import split_name

SPECS = {"z": TensorSpec("float32", (-1, 2)), "y": TensorSpec("int64", (-1,))}
OUT_SPECS = {
    "probs": TensorSpec("float32", (-1, 1, 8, 8)),
    "log_sigma": TensorSpec("float32", (-1, 1, 8, 8)),
}


def _raw_request(z: np.ndarray, y: np.ndarray, **fields) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m-decoder", **fields)
    request.inputs.add(name="z", datatype="FP32", shape=z.shape)
    request.inputs.add(name="y", datatype="INT64", shape=y.shape)
    request.raw_input_contents.extend([z.astype("<f4").tobytes(), y.astype("<i8").tobytes()])
    return request


def _typed_request(z: np.ndarray, y: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m-decoder")
    request.inputs.add(name="y", datatype="INT64", shape=y.shape).contents.int64_contents.extend(
        y.ravel().tolist()
    )
    request.inputs.add(name="z", datatype="FP32", shape=z.shape).contents.fp32_contents.extend(
        z.ravel().tolist()
    )
    return request


Z = np.arange(6, dtype=np.float32).reshape(3, 2) / 8
Y = np.array([0, 3, 9], dtype=np.int64)


@pytest.mark.parametrize("build", [_raw_request, _typed_request], ids=["raw", "typed"])
def test_decode_inputs_raw_and_typed(build):
    arrays = convert.decode_inputs(build(Z, Y), SPECS, max_rows=16)
    np.testing.assert_array_equal(arrays["z"], Z)
    np.testing.assert_array_equal(arrays["y"], Y)
    assert arrays["z"].dtype == np.float32 and arrays["y"].dtype == np.int64


MALFORMED = [
    pytest.param("raw", lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 5), "raw bytes",
                 id="raw-byte-count"),
    pytest.param("raw", lambda r: r.raw_input_contents.pop(), "one per input",
                 id="raw-entry-missing"),
    pytest.param("raw", lambda r: r.raw_input_contents.__delitem__(slice(None)),
                 "values in contents", id="no-contents"),
    pytest.param("raw", lambda r: setattr(r.inputs[0], "datatype", "FP64"), "expected 'FP32'",
                 id="datatype"),
    pytest.param("raw", lambda r: r.inputs[0].shape.__setitem__(1, 3), "expected [-1, 2]",
                 id="shape"),
    pytest.param("raw", lambda r: r.inputs[0].shape.__setitem__(0, -3), "expected 1 to 16",
                 id="negative-rows"),
    pytest.param("raw", lambda r: r.inputs[1].shape.__setitem__(0, 2), "raw bytes",
                 id="rows-disagree-with-bytes"),
    pytest.param("raw", lambda r: setattr(r.inputs[1], "name", "label"), "expected exactly",
                 id="unknown-input"),
    pytest.param("raw", lambda r: r.inputs[0].contents.fp32_contents.append(1.0),
                 "send every input one way", id="raw-and-typed"),
    pytest.param("typed", lambda r: r.inputs[0].contents.int_contents.append(1),
                 "expected int64_contents only", id="wrong-typed-field"),
    pytest.param("typed", lambda r: r.inputs[1].contents.fp32_contents.pop(),
                 "5 values in contents.fp32_contents, expected 6", id="typed-count"),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "change", "message"), MALFORMED)
def test_malformed_tensors_are_invalid(kind, change, message):
    request = (_raw_request if kind == "raw" else _typed_request)(Z, Y)
    change(request)
    with pytest.raises(InvalidRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
        convert.decode_inputs(request, SPECS, max_rows=16)


@pytest.mark.parametrize(
    ("z", "y", "message"),
    [
        pytest.param(np.zeros((17, 2)), np.zeros(17), "expected 1 to 16", id="too-many-rows"),
        pytest.param(Z, Y[:2], "different batch sizes", id="batch-mismatch"),
    ],
)
def test_inconsistent_rows_are_invalid(z, y, message):
    with pytest.raises(InvalidRequest, match=message):
        convert.decode_inputs(_raw_request(z, y), SPECS, max_rows=16)


def test_fp16_has_no_typed_contents():
    request = pb.ModelInferRequest()
    request.inputs.add(name="x", datatype="FP16", shape=[1, 2]).contents.fp32_contents.extend(
        [0, 1]
    )
    with pytest.raises(InvalidRequest, match="raw_input_contents"):
        convert.decode_inputs(request, {"x": TensorSpec("float16", (-1, 2))}, max_rows=4)


def test_requested_outputs_keep_the_request_order():
    request = pb.ModelInferRequest()
    assert convert.requested_outputs(request, OUT_SPECS) == ["probs", "log_sigma"]
    request.outputs.add(name="log_sigma")
    request.outputs.add(name="probs")
    assert convert.requested_outputs(request, OUT_SPECS) == ["log_sigma", "probs"]
    request.outputs.add(name="nope")
    with pytest.raises(InvalidRequest, match="'nope' is unknown"):
        convert.requested_outputs(request, OUT_SPECS)


def test_encode_outputs_one_raw_entry_per_output_in_order():
    arrays = {
        "probs": np.full((2, 1, 8, 8), 0.5, np.float32),
        "log_sigma": np.zeros((2, 1, 8, 8), np.float32),
    }
    wire = convert.encode_outputs(
        pb.ModelInferResponse(id="7"), arrays, ["log_sigma", "probs"], OUT_SPECS
    )
    response = pb.ModelInferResponse.FromString(wire)
    assert response.id == "7"
    assert len(response.raw_output_contents) == 2
    assert [o.name for o in response.outputs] == ["log_sigma", "probs"]
    assert [o.datatype for o in response.outputs] == ["FP32", "FP32"]
    assert list(response.outputs[1].shape) == [2, 1, 8, 8]
    probs = np.frombuffer(response.raw_output_contents[1], "<f4").reshape(2, 1, 8, 8)
    np.testing.assert_array_equal(probs, arrays["probs"])


def test_answer_size_is_bounded_before_computing():
    convert.check_answer_fits(100, ["probs"], OUT_SPECS, max_message_bytes=1 << 20)
    with pytest.raises(InvalidRequest, match="max_message_bytes"):
        convert.check_answer_fits(10_000, ["probs"], OUT_SPECS, max_message_bytes=1 << 20)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("digits-decoder", ("digits", "decoder")), ("my-model-encoder", ("my-model", "encoder"))],
)
def test_split_name(name, expected):
    assert split_name(name) == expected


@pytest.mark.parametrize("name", ["digits", "digits-decoders", "-decoder", ""])
def test_split_name_rejects_other_names(name):
    with pytest.raises(ModelNotFound, match="expected NAME-encoder, NAME-decoder"):
        split_name(name)


# --- in process, on the wire, with our own stubs ---

T = 30.0  # per-call timeout: a hung server fails the test instead of hanging it


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    server = ServerThread(settings(tiny_repository(tmp_path_factory)))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stub(served):
    with channel(served.address) as ch:
        yield pb_grpc.GRPCInferenceServiceStub(ch)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return Reference(pristine_version(tmp_path_factory))


def _infer(stub, model: str, inputs: dict[str, np.ndarray], raw: bool = True, **fields):
    request = pb.ModelInferRequest(model_name=model, **fields)
    kserve = {
        np.dtype("float32"): ("FP32", "fp32_contents"),
        np.dtype("int64"): ("INT64", "int64_contents"),
    }
    for name, value in inputs.items():
        datatype, field = kserve[value.dtype]
        tensor = request.inputs.add(name=name, datatype=datatype, shape=value.shape)
        if raw:
            request.raw_input_contents.append(value.tobytes())
        else:
            getattr(tensor.contents, field).extend(value.ravel().tolist())
    return stub.ModelInfer(request, timeout=T)


def _outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    assert len(response.raw_output_contents) == len(response.outputs)
    return {
        o.name: np.frombuffer(raw, "<f4").reshape(tuple(o.shape))
        for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def test_health_and_server_metadata(stub):
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=T).live
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=T).ready
    ready = stub.ModelReady
    assert ready(pb.ModelReadyRequest(name=DECODER), timeout=T).ready
    assert ready(pb.ModelReadyRequest(name=ENCODER, version="1"), timeout=T).ready
    assert not ready(pb.ModelReadyRequest(name=DECODER, version="9"), timeout=T).ready
    assert not ready(pb.ModelReadyRequest(name=CVAE), timeout=T).ready
    meta = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=T)
    assert meta.name == "vaeserve" and meta.version
    assert {"model_configuration", "statistics"} <= set(meta.extensions)


def test_reflection_describes_the_protocol(served):
    """What grpcurl needs to call the protocol without proto files."""
    with channel(served.address) as ch:
        database = ProtoReflectionDescriptorDatabase(ch)
        assert "inference.GRPCInferenceService" in database.get_services()
        pool = descriptor_pool.DescriptorPool(database)
        request = pool.FindMessageTypeByName("inference.ModelInferRequest")
        config = pool.FindMessageTypeByName("inference.ModelConfig")
    assert request.fields_by_name["raw_input_contents"].number == 7
    assert config.fields_by_name["dynamic_batching"].number == 11


def test_model_metadata_names_the_graph_tensors(stub):
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=DECODER), timeout=T)
    assert (meta.name, list(meta.versions), meta.platform) == (DECODER, ["1"], "onnxruntime_onnx")
    tensors = {t.name: (t.datatype, list(t.shape)) for t in meta.inputs}
    assert tensors == {"z": ("FP32", [-1, 2]), "y": ("INT64", [-1])}
    assert {t.name: (t.datatype, list(t.shape)) for t in meta.outputs} == {
        "probs": ("FP32", [-1, 1, 8, 8])
    }
    encoder = stub.ModelMetadata(pb.ModelMetadataRequest(name=ENCODER, version="1"), timeout=T)
    assert [t.name for t in encoder.outputs] == ["mu", "logvar"]
    assert all(t.shape[0] == -1 for t in [*encoder.inputs, *encoder.outputs])


def test_model_config_is_what_tritons_tools_need(stub):
    config = stub.ModelConfig(pb.ModelConfigRequest(name=DECODER), timeout=T).config
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=DECODER), timeout=T)
    assert config.name == DECODER and config.max_batch_size == 64  # max_samples_per_request
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert [i.name for i in config.input] == [t.name for t in meta.inputs]
    assert [o.name for o in config.output] == [t.name for t in meta.outputs]
    assert {i.name: list(i.dims) for i in config.input} == {"z": [2], "y": []}
    assert config.input[0].data_type == config_pb.TYPE_FP32


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_decoder_infer_equals_onnxruntime(stub, reference, raw):
    z, y = decoder_inputs(5, seed=1)
    response = _infer(stub, DECODER, {"z": z, "y": y}, raw=raw, id="req-7")
    assert (response.model_name, response.model_version, response.id) == (DECODER, "1", "req-7")
    probs = _outputs(response)["probs"]
    np.testing.assert_allclose(probs, reference.decode(z, y), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_encoder_infer_honours_requested_outputs(stub, reference, raw):
    x = (np.arange(3 * 64, dtype=np.float32).reshape(3, 1, 8, 8) % 7) / 7
    y = np.array([1, 2, 3], dtype=np.int64)
    request_outputs = [pb.ModelInferRequest.InferRequestedOutputTensor(name=n)
                       for n in ("logvar", "mu")]  # fmt: skip
    response = _infer(stub, ENCODER, {"y": y, "x": x}, raw=raw, outputs=request_outputs)
    assert [o.name for o in response.outputs] == ["logvar", "mu"]
    expected = reference.encode(x, y)
    for name, value in _outputs(response).items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-6, atol=1e-6)
    only_mu = _infer(stub, ENCODER, {"x": x, "y": y}, outputs=request_outputs[1:])
    assert [o.name for o in only_mu.outputs] == ["mu"]


def test_request_parameters_are_accepted_and_ignored(stub):
    z, y = decoder_inputs(2)
    params = {
        "triton_enable_empty_final_response": pb.InferParameter(bool_param=True),
        "priority": pb.InferParameter(uint64_param=1),
        "timeout": pb.InferParameter(int64_param=1_000_000),
        "custom": pb.InferParameter(string_param="anything"),
    }
    response = _infer(stub, DECODER, {"z": z, "y": y}, parameters=params)
    plain = _infer(stub, DECODER, {"z": z, "y": y})
    assert response.model_name == plain.model_name
    assert [o.name for o in response.outputs] == [o.name for o in plain.outputs] == ["probs"]
    with_parameters, without = _outputs(response), _outputs(plain)
    assert with_parameters["probs"].shape == (2, 1, 8, 8)
    np.testing.assert_array_equal(with_parameters["probs"], without["probs"])


@pytest.mark.parametrize(
    ("model", "inputs", "version", "code", "message"),
    [
        pytest.param(DECODER, {"z": np.zeros((2, 3), np.float32), "y": np.zeros(2, np.int64)},
                     "", grpc.StatusCode.INVALID_ARGUMENT, "expected [-1, 2]", id="shape"),
        pytest.param(DECODER, {"z": np.zeros((2, 2), np.float32), "y": np.array([0, 10])},
                     "", grpc.StatusCode.INVALID_ARGUMENT, "expected classes 0..9",
                     id="label-range"),
        pytest.param(DECODER, {"z": np.full((1, 2), np.nan, np.float32),
                               "y": np.zeros(1, np.int64)},
                     "", grpc.StatusCode.INVALID_ARGUMENT, "NaN", id="nan"),
        pytest.param(DECODER, {"z": np.zeros((65, 2), np.float32), "y": np.zeros(65, np.int64)},
                     "", grpc.StatusCode.INVALID_ARGUMENT, "expected 1 to 64", id="too-many-rows"),
        pytest.param(DECODER, {"z": np.zeros((1, 2), np.float32)}, "",
                     grpc.StatusCode.INVALID_ARGUMENT, "expected exactly", id="missing-input"),
        pytest.param(DECODER, {"z": np.zeros((1, 2), np.float32), "y": np.zeros(1, np.int64)},
                     "x", grpc.StatusCode.INVALID_ARGUMENT, "version 'x'", id="bad-version"),
        pytest.param(DECODER, {"z": np.zeros((1, 2), np.float32), "y": np.zeros(1, np.int64)},
                     "4", grpc.StatusCode.NOT_FOUND, "no loaded version '4'", id="unknown-version"),
        pytest.param("nope-decoder", {}, "", grpc.StatusCode.NOT_FOUND, "not served",
                     id="unknown-model"),
        pytest.param(CVAE, {}, "", grpc.StatusCode.NOT_FOUND, "expected NAME-encoder, NAME-decoder",
                     id="no-graph-suffix"),
    ],
)  # fmt: skip
def test_bad_requests_get_a_status_naming_the_problem(stub, model, inputs, version, code, message):
    with pytest.raises(grpc.RpcError) as caught:
        _infer(stub, model, inputs, model_version=version)
    assert caught.value.code() == code
    assert message in caught.value.details()


def test_raw_bytes_that_do_not_fill_the_shape_are_invalid(stub):
    request = pb.ModelInferRequest(model_name=DECODER)
    request.inputs.add(name="z", datatype="FP32", shape=[2, 2])
    request.inputs.add(name="y", datatype="INT64", shape=[2])
    request.raw_input_contents.extend([b"\0" * 15, b"\0" * 16])
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=T)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'z' has 15 raw bytes, expected 16" in caught.value.details()


def test_perf_analyzer_call_sequence(stub):
    """Triton's perf_analyzer: ModelMetadata, ModelConfig, ServerMetadata, statistics, then
    ModelInfer with raw inputs of its batch size, asking for every output by name."""
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=DECODER), timeout=T)
    config = stub.ModelConfig(pb.ModelConfigRequest(name=DECODER), timeout=T).config
    stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=T)
    assert meta.name == DECODER and config.max_batch_size > 0
    assert config.HasField("dynamic_batching")
    assert {i.name for i in config.input} <= {t.name for t in meta.inputs}
    before = _decoder_stats(stub)
    batch, count = 4, 12
    kserve = {"FP32": np.float32, "INT64": np.int64}
    for i in range(count):
        request = pb.ModelInferRequest(model_name=meta.name, model_version="")
        for tensor in meta.inputs:  # the batch axis is perf_analyzer's -b, the rest as declared
            shape = [batch, *tensor.shape[1:]]
            request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=shape)
            data = np.full(shape, i % 10, dtype=kserve[tensor.datatype])
            request.raw_input_contents.append(data.tobytes())
        request.outputs.extend(
            pb.ModelInferRequest.InferRequestedOutputTensor(name=t.name) for t in meta.outputs
        )
        response = stub.ModelInfer(request, timeout=T)
        assert [o.name for o in response.outputs] == [t.name for t in meta.outputs]
        for output, tensor in zip(response.outputs, meta.outputs, strict=True):
            assert output.datatype == tensor.datatype
            assert list(output.shape) == [batch, *tensor.shape[1:]]
    after = _decoder_stats(stub)
    assert after.inference_stats.success.count - before.inference_stats.success.count == count
    assert after.inference_count - before.inference_count == batch * count
    assert after.execution_count > before.execution_count


def _decoder_stats(stub) -> pb.ModelStatistics:
    answer = stub.ModelStatistics(pb.ModelStatisticsRequest(name=DECODER), timeout=T)
    (stats,) = answer.model_stats
    assert (stats.name, stats.version) == (DECODER, "1")
    return stats


@pytest.mark.parametrize("version", ["²", "٣", "0", "-1", "1.0"])
def test_versions_that_are_not_positive_ascii_numbers_are_invalid(stub, version):
    request = pb.ModelMetadataRequest(name=DECODER, version=version)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelMetadata(request, timeout=T)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_statistics_of_an_unknown_model_are_not_found(stub):
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelStatistics(pb.ModelStatisticsRequest(name="nope-decoder"), timeout=T)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    everything = stub.ModelStatistics(pb.ModelStatisticsRequest(), timeout=T)
    assert {(s.name, s.version) for s in everything.model_stats} >= {(DECODER, "1"), (ENCODER, "1")}
